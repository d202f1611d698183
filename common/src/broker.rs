//! Connecting to RabbitMQ and the AMQP properties of Hopper's messages.
//!
//! Publishing and consuming use separate connections: a publisher connection blocked by a
//! memory or disk alarm stops every frame on it, acks included.

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::codec::{CONTENT_TYPE, SCHEMA_VERSION};
use crate::job::redact_url;
use crate::message::{Chunk, Reply};

/// The broker could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to RabbitMQ at {url} ({name}): {source}")]
pub struct ConnectError {
    /// The broker URL, password redacted.
    pub url: String,
    /// The connection name we asked for.
    pub name: String,
    /// lapin's error.
    pub source: lapin::Error,
}

/// Opens a connection named `name` (shown in the management UI's Connections tab).
///
/// # Errors
/// [`ConnectError`], with the URL's password redacted.
pub async fn connect(url: &str, name: &str) -> Result<Connection, ConnectError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props)
        .await
        .map_err(|source| ConnectError {
            url: redact_url(url),
            name: name.to_string(),
            source,
        })
}

/// `host/pid`: who is talking, for connection names and replies.
pub fn process_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}/{}", std::process::id())
}

fn headers(job: &str, run: u64, seq: u64, attempt: u32) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("job".into(), AMQPValue::LongString(LongString::from(job)));
    h.insert("run".into(), AMQPValue::LongLongInt(run as i64));
    h.insert("seq".into(), AMQPValue::LongLongInt(seq as i64));
    h.insert("attempt".into(), AMQPValue::LongLongInt(i64::from(attempt)));
    h
}

fn base(kind: &str, id: String, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_type(format!("hopper.{kind}.v{SCHEMA_VERSION}").into())
        .with_message_id(id.into())
        .with_headers(headers)
}

/// Persistent, with a readable id (`<run>/<seq>/<attempt>`), a versioned `type` and
/// job/run/seq/attempt headers, so a person can follow the chunk in the management UI.
pub fn chunk_properties(chunk: &Chunk) -> BasicProperties {
    base(
        "chunk",
        chunk.message_id(),
        headers(&chunk.job, chunk.run, chunk.seq, chunk.attempt),
    )
}

/// Like [`chunk_properties`], for a reply.
pub fn reply_properties(reply: &Reply) -> BasicProperties {
    base(
        "reply",
        format!("{}/{}/{}", reply.run, reply.seq, reply.attempt),
        headers(&reply.job, reply.run, reply.seq, reply.attempt),
    )
}

/// Properties of a message parked on the dead queue: the original's, plus why it was parked.
pub fn dead_properties(original: &BasicProperties, reason: &str) -> BasicProperties {
    let mut h = original.headers().clone().unwrap_or_default();
    h.insert(
        "x-hopper-dead-reason".into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    original.clone().with_delivery_mode(2).with_headers(h)
}
