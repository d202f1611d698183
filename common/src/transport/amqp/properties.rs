//! A message's [`Label`] as AMQP properties and headers, and back.
//!
//! Persistent (delivery mode 2), with the readable message id, the versioned type and
//! job/run/seq/attempt headers, so that a person can follow a message in the management UI,
//! where the MessagePack body itself is unreadable.

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

use crate::codec::CONTENT_TYPE;
use crate::transport::Label;

/// The header that says why a message was parked on the dead queue.
const DEAD_REASON: &str = "x-hopper-dead-reason";

/// The properties a message is published with.
pub(super) fn properties(label: &Label) -> BasicProperties {
    let mut h = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    if let Some(job) = &label.job {
        h.insert("job".into(), text(job));
    }
    for (key, value) in [
        ("run", label.run),
        ("seq", label.seq),
        ("attempt", label.attempt.map(u64::from)),
    ] {
        if let Some(v) = value {
            h.insert(key.into(), AMQPValue::LongLongInt(v as i64));
        }
    }
    if let Some(reason) = &label.dead_reason {
        h.insert(DEAD_REASON.into(), text(reason));
    }
    let mut props = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_headers(h);
    if let Some(id) = &label.message_id {
        props = props.with_message_id(id.as_str().into());
    }
    if let Some(kind) = &label.kind {
        props = props.with_type(kind.as_str().into());
    }
    props
}

/// The label of a received message, as far as its properties tell: a message published by
/// someone else may carry none of them.
pub(super) fn label_of(props: &BasicProperties) -> Label {
    let headers = props.headers().clone().unwrap_or_default();
    let get = |key: &str| headers.inner().get(key);
    let number = |key: &str| match get(key) {
        Some(AMQPValue::LongLongInt(v)) => u64::try_from(*v).ok(),
        Some(AMQPValue::LongInt(v)) => u64::try_from(*v).ok(),
        Some(AMQPValue::LongUInt(v)) => Some(u64::from(*v)),
        _ => None,
    };
    let text = |key: &str| match get(key) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    // A message the broker dead-lettered carries `x-death`, newest first, each with a count.
    let died = match get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => match t.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).ok(),
                Some(AMQPValue::LongInt(n)) => u64::try_from(*n).ok(),
                _ => None,
            },
            _ => None,
        }),
        _ => None,
    };
    Label {
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        kind: props.kind().as_ref().map(|s| s.to_string()),
        job: text("job"),
        run: number("run"),
        seq: number("seq"),
        attempt: number("attempt").and_then(|a| u32::try_from(a).ok()),
        dead_reason: text(DEAD_REASON),
        dead_lettered: text("x-first-death-reason"),
        deliveries: number("x-delivery-count").or(died),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_survives_the_amqp_properties() {
        let label = Label {
            message_id: Some("3/7/2".into()),
            kind: Some("hopper.chunk.v1".into()),
            job: Some("j".into()),
            run: Some(3),
            seq: Some(7),
            attempt: Some(2),
            dead_reason: Some("bad".into()),
            dead_lettered: None,
            deliveries: None,
        };
        let props = properties(&label);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(label_of(&props), label);
        assert_eq!(label_of(&BasicProperties::default()), Label::default());
    }
}
