//! The RabbitMQ transport.
//!
//! Routes map to the job's queues ([`Topology`]); `Retry { next }` maps to the delay queue of the
//! backoff before attempt `next`. Messages are persistent, published `mandatory` with publisher
//! confirms: an unroutable message comes back inside its ack and is reported as refused, never
//! as sent. Publishing and receiving use separate connections ([`Link`]).

use std::sync::Mutex;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Confirmation};

use super::{Confirm, Inbox, Incoming, Label, Route, Settle, Transport, TransportError};
use crate::broker::{process_identity, Link, LinkError};
use crate::codec::CONTENT_TYPE;
use crate::job::Job;
use crate::topology::Topology;

/// How long [`Transport::reconnect`] keeps trying before it gives up.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Hopper's transport over RabbitMQ.
#[derive(Debug)]
pub struct AmqpTransport {
    job: Job,
    topology: Topology,
    role: String,
    /// Swapped whole by [`Transport::reconnect`]; cloned out, never held across an await.
    link: std::sync::RwLock<std::sync::Arc<Link>>,
    /// Channels and consumer tags of the inboxes, to stop them.
    receivers: Mutex<Vec<(Channel, String)>>,
}

fn broker(what: &'static str, queue: &str) -> impl FnOnce(lapin::Error) -> TransportError {
    let queue = queue.to_string();
    move |source| TransportError::Broker {
        what,
        queue,
        source: Box::new(source),
    }
}

impl From<LinkError> for TransportError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Connect(c) => TransportError::Connect(Box::new(c)),
            LinkError::Broker {
                what,
                queue,
                source,
            } => TransportError::Broker {
                what,
                queue,
                source: Box::new(source),
            },
        }
    }
}

impl AmqpTransport {
    /// Connects `role` (`hopper-dispatcher`, `hopper-consumer`) to `job`'s broker and declares
    /// the job's queues.
    ///
    /// # Errors
    /// [`TransportError::Connect`] or [`TransportError::Broker`], naming the step.
    pub async fn open(job: &Job, role: &str) -> Result<AmqpTransport, TransportError> {
        let topology = Topology::for_job(job);
        let link = Link::open(job, &topology, role).await?;
        Ok(AmqpTransport {
            job: job.clone(),
            topology,
            role: role.to_string(),
            link: std::sync::RwLock::new(std::sync::Arc::new(link)),
            receivers: Mutex::new(Vec::new()),
        })
    }

    fn link(&self) -> std::sync::Arc<Link> {
        std::sync::Arc::clone(&self.link.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn queue(&self, route: Route) -> Result<&str, TransportError> {
        Ok(match route {
            Route::Chunks => &self.topology.chunks,
            Route::Replies => &self.topology.replies,
            Route::Dead => &self.topology.dead,
            Route::Retry { next } => {
                self.topology.retry_queue(&self.job, next).ok_or_else(|| {
                    TransportError::Refused {
                        queue: format!("hopper.{}.retry.*", self.job.name),
                        why: format!("no delay queue for attempt {next}"),
                    }
                })?
            }
        })
    }
}

/// Persistent, with a readable id, a versioned type and job/run/seq/attempt headers, so that a
/// person can follow the message in the management UI.
fn properties(label: &Label) -> BasicProperties {
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
        h.insert("x-hopper-dead-reason".into(), text(reason));
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

/// The label of a received message, as far as its properties tell.
fn label_of(props: &BasicProperties) -> Label {
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
    Label {
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        kind: props.kind().as_ref().map(|s| s.to_string()),
        job: text("job"),
        run: number("run"),
        seq: number("seq"),
        attempt: number("attempt").and_then(|a| u32::try_from(a).ok()),
        dead_reason: text("x-hopper-dead-reason"),
    }
}

struct AmqpSettle {
    acker: Acker,
    queue: String,
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn ack(&self, through: bool) -> Result<(), TransportError> {
        self.acker
            .ack(BasicAckOptions { multiple: through })
            .await
            .map(|_| ())
            .map_err(broker("ack", &self.queue))
    }

    async fn give_back(&self) -> Result<(), TransportError> {
        self.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .map(|_| ())
            .map_err(broker("give back", &self.queue))
    }
}

fn incoming(delivery: Delivery, queue: &str) -> Incoming {
    let label = label_of(&delivery.properties);
    Incoming::new(
        delivery.data,
        label,
        delivery.redelivered,
        Box::new(AmqpSettle {
            acker: delivery.acker,
            queue: queue.to_string(),
        }),
    )
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn publish(
        &self,
        route: Route,
        payload: &[u8],
        label: &Label,
    ) -> Result<Confirm, TransportError> {
        let queue = self.queue(route)?.to_string();
        let link = self.link();
        let confirm = link
            .channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties(label),
            )
            .await
            .map_err(broker("publish", &queue))?;
        Ok(Box::pin(async move {
            match confirm.await.map_err(broker("confirm", &queue))? {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                Confirmation::Ack(Some(returned)) => Err(TransportError::Refused {
                    queue,
                    why: format!("unroutable ({})", returned.reply_text),
                }),
                Confirmation::Nack(_) => Err(TransportError::Refused {
                    queue,
                    why: "nacked by the broker".to_string(),
                }),
            }
        }))
    }

    async fn receive(&self, route: Route, prefetch: u16) -> Result<Inbox, TransportError> {
        let queue = self.queue(route)?.to_string();
        let link = self.link();
        let channel = link
            .consume
            .create_channel()
            .await
            .map_err(broker("open channel", &queue))?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(broker("set prefetch", &queue))?;
        let tag = format!("{} {}", self.job.name, process_identity());
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("consume", &queue))?;
        self.receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((channel, tag));
        Ok(consumer
            .map(move |next| {
                next.map(|d| incoming(d, &queue))
                    .map_err(broker("receive", &queue))
            })
            .boxed())
    }

    async fn stop_receiving(&self) {
        let receivers: Vec<(Channel, String)> = self
            .receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (channel, tag) in receivers {
            // Best effort: closing the channel stops deliveries all the same.
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    }

    async fn repair(&self) -> Result<(), TransportError> {
        self.topology
            .declare(&self.link().channel)
            .await
            .map_err(broker("declare queues", &self.topology.chunks))
    }

    async fn reconnect(&self) -> Result<(), TransportError> {
        let deadline = std::time::Instant::now() + RECONNECT_FOR;
        let mut delay = std::time::Duration::from_millis(200);
        self.link().close("reconnecting").await;
        self.receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        loop {
            // A broker that is starting can accept the connection and not answer: bounded.
            let attempt = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                Link::open(&self.job, &self.topology, &self.role),
            )
            .await;
            let failure = match attempt {
                Ok(Ok(link)) => {
                    *self.link.write().unwrap_or_else(|p| p.into_inner()) =
                        std::sync::Arc::new(link);
                    return Ok(());
                }
                Ok(Err(e)) => TransportError::from(e),
                Err(_) => TransportError::Broker {
                    what: "reconnect",
                    queue: self.topology.chunks.clone(),
                    source: Box::new(lapin::Error::from(lapin::ErrorKind::IOError(
                        std::sync::Arc::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                    ))),
                },
            };
            if std::time::Instant::now() + delay >= deadline {
                return Err(failure);
            }
            tracing::debug!(error = %failure, "broker still unreachable");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(5));
        }
    }

    async fn close(&self, why: &str) {
        self.link().close(why).await;
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
        };
        let props = properties(&label);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(label_of(&props), label);
        assert_eq!(label_of(&BasicProperties::default()), Label::default());
    }
}
