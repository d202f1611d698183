//! The RabbitMQ transport, in the layers lapin and RabbitMQ use: a `link` (connections, the
//! publishing channel in confirm mode), the job's `topology` (its queues), and the message
//! `properties` a person reads in the management UI.
//!
//! Routes map to the job's queues; `Delay { next }` maps to the delay queue of the backoff
//! before attempt `next`. Messages are persistent, published `mandatory` with publisher
//! confirms: an unroutable message comes back inside its ack and is reported as refused, never
//! as sent.

pub mod admin;
mod link;
mod properties;
mod topology;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Confirmation};

pub use link::{connect, ConnectError};
pub use topology::{DelayQueue, Topology, DELIVERY_LIMIT};

use super::{Confirm, Inbox, Incoming, Label, Route, Settle, Transport, TransportError};
use crate::job::Job;
use link::Link;
use properties::{label_of, properties};

/// How long [`Transport::reconnect`] keeps trying before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Hopper's transport over RabbitMQ.
#[derive(Debug)]
pub struct AmqpTransport {
    job: Job,
    topology: Topology,
    role: String,
    /// Swapped whole by [`Transport::reconnect`]; cloned out, never held across an await.
    link: RwLock<Arc<Link>>,
    /// Channels and consumer tags of the inboxes, to stop them.
    receivers: Mutex<Vec<(Channel, String)>>,
}

/// Maps lapin's error at `what` on `queue`: a refusal that will recur is
/// [`TransportError::Rejected`], anything else [`TransportError::Broker`] (the connection may
/// come back).
fn broker(what: &'static str, queue: &str) -> impl FnOnce(lapin::Error) -> TransportError {
    let queue = queue.to_string();
    move |source| match rejection(&source) {
        Some((code, text)) => TransportError::Rejected {
            what,
            queue,
            code,
            text,
        },
        None => TransportError::Broker {
            what,
            queue,
            source: Box::new(source),
        },
    }
}

/// The reply code and text of a broker refusal that retrying will not cure.
fn rejection(e: &lapin::Error) -> Option<(u16, String)> {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    let code = match amqp.kind() {
        AMQPErrorKind::Soft(
            soft @ (AMQPSoftError::ACCESSREFUSED
            | AMQPSoftError::NOTFOUND
            | AMQPSoftError::RESOURCELOCKED
            | AMQPSoftError::PRECONDITIONFAILED
            | AMQPSoftError::CONTENTTOOLARGE),
        ) => soft.get_id(),
        AMQPErrorKind::Hard(
            hard @ (AMQPHardError::NOTALLOWED
            | AMQPHardError::INVALIDPATH
            | AMQPHardError::COMMANDINVALID
            | AMQPHardError::NOTIMPLEMENTED),
        ) => hard.get_id(),
        AMQPErrorKind::Soft(_) | AMQPErrorKind::Hard(_) => return None,
    };
    Some((code, amqp.get_message().to_string()))
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
            link: RwLock::new(Arc::new(link)),
            receivers: Mutex::new(Vec::new()),
        })
    }

    fn link(&self) -> Arc<Link> {
        Arc::clone(&self.link.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn queue(&self, route: Route) -> Result<&str, TransportError> {
        Ok(match route {
            Route::Chunks => &self.topology.chunks,
            Route::Replies => &self.topology.replies,
            Route::Dead => &self.topology.dead,
            Route::Delay { next } => {
                self.topology.delay_queue(&self.job, next).ok_or_else(|| {
                    TransportError::Refused {
                        queue: format!("hopper.{}.retry.*", self.job.name),
                        why: format!("no delay queue for attempt {next}"),
                    }
                })?
            }
        })
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
                self.topology.exchange.as_str().into(),
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
        let tag = format!("{} {}", self.job.name, crate::process::identity());
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
        self.topology.declare(&self.link().channel).await
    }

    async fn reconnect(&self) -> Result<(), TransportError> {
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut delay = Duration::from_millis(200);
        self.link().close("reconnecting").await;
        self.receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        loop {
            // A broker that is starting can accept the connection and not answer: bounded.
            let attempt = tokio::time::timeout(
                Duration::from_secs(10),
                Link::open(&self.job, &self.topology, &self.role),
            )
            .await;
            let failure = match attempt {
                Ok(Ok(link)) => {
                    *self.link.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(link);
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => TransportError::Broker {
                    what: "reconnect",
                    queue: self.topology.chunks.clone(),
                    source: Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                },
            };
            if Instant::now() + delay >= deadline {
                return Err(failure);
            }
            tracing::debug!(error = %failure, "broker still unreachable");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn withdraw(&self, run: u64) -> Result<Vec<u64>, TransportError> {
        use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
        let link = self.link();
        let mut taken = Vec::new();
        let mut queues = vec![self.topology.chunks.clone()];
        queues.extend(self.topology.delays.iter().map(|d| d.queue.clone()));
        for queue in &queues {
            let channel = link
                .consume
                .create_channel()
                .await
                .map_err(broker("open a channel", queue))?;
            // Another run's messages are held unacked until the queue is empty, then given
            // back: requeued at once, they would be fetched again and again.
            let mut others = Vec::new();
            loop {
                let got = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(broker("take back chunks", queue))?;
                let Some(message) = got else { break };
                let label = properties::label_of(&message.delivery.properties);
                let tag = message.delivery.delivery_tag;
                match (label.run, label.seq) {
                    (Some(r), Some(seq)) if r == run => {
                        channel
                            .basic_ack(tag, BasicAckOptions::default())
                            .await
                            .map_err(broker("take back chunks", queue))?;
                        taken.push(seq);
                    }
                    _ => others.push(tag),
                }
            }
            for tag in others {
                channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        },
                    )
                    .await
                    .map_err(broker("give back another run's chunk", queue))?;
            }
            let _ = channel.close(200, "withdrawn".into()).await;
        }
        Ok(taken)
    }

    async fn close(&self, why: &str) {
        self.link().close(why).await;
    }
}
