//! The transport between dispatcher and consumers: durable routes with confirmed publishing and
//! acknowledged, redeliverable receiving.
//!
//! The dispatcher and the consumers speak only [`Transport`]; [`AmqpTransport`] is RabbitMQ,
//! [`LocalTransport`] the in-process queues of local mode. The contract every implementation
//! keeps:
//! - a publish's [`Confirm`] resolves `Ok` only once the transport holds the message durably, and
//!   `Err` ([`TransportError::Refused`]) when it did not take it: then nothing was sent;
//! - a received message stays the receiver's until it is acked or given back; a receiver that
//!   disappears without acking gives it back, and the message is delivered again;
//! - at most `prefetch` unacked messages are handed to one receiver.

pub mod amqp;
mod local;
mod recovery;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use amqp::AmqpTransport;
pub use local::{LocalBroker, LocalTransport};
pub use recovery::Recoveries;

use crate::message::{message_id, Chunk, Reply};

/// Where a message goes, or comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Chunks waiting for a consumer.
    Chunks,
    /// Replies waiting for the dispatcher.
    Replies,
    /// Messages parked for good: chunks that exhausted their attempts, and unreadable messages.
    Dead,
    /// A chunk that failed transiently, waiting out its backoff before attempt `next` (over
    /// AMQP, a delay queue); it comes back on [`Route::Chunks`].
    Delay {
        /// The attempt it comes back as.
        next: u32,
    },
}

/// What a message is, for the people and tools following it (over AMQP: the message id, type
/// and headers). Fields are optional because an unreadable message may carry none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Label {
    /// `<run>/<seq>/<attempt>`, the id the management UI lists messages by.
    pub message_id: Option<String>,
    /// `hopper.chunk.v1` or `hopper.reply.v1`: what the body is, with its schema version.
    pub kind: Option<String>,
    /// The job that sent it, so a stray message on another job's queue is recognised.
    pub job: Option<String>,
    /// Run, seq and attempt of the chunk it is or answers, as headers a person can read.
    pub run: Option<u64>,
    /// See `run`.
    pub seq: Option<u64>,
    /// See `run`.
    pub attempt: Option<u32>,
    /// Why the message was parked, on [`Route::Dead`].
    pub dead_reason: Option<String>,
    /// Set by the broker on a message it dead-lettered itself (a chunk past its queue's
    /// delivery limit): why, as the broker says it (`delivery_limit`).
    pub dead_lettered: Option<String>,
    /// How often the broker delivered the message, where it counts (quorum queues).
    pub deliveries: Option<u64>,
}

impl Label {
    /// The label of a chunk.
    pub fn chunk(c: &Chunk) -> Label {
        Label::of("chunk", &c.job, c.run, c.seq, c.attempt)
    }

    /// The label of a chunk encoded from its head ([`crate::codec::encode_chunk_head`]).
    pub fn chunk_head(c: &crate::codec::ChunkHead<'_>) -> Label {
        Label::of("chunk", c.job, c.run, c.seq, c.attempt)
    }

    /// The label of a reply.
    pub fn reply(r: &Reply) -> Label {
        Label::of("reply", &r.job, r.run, r.seq, r.attempt)
    }

    fn of(kind: &str, job: &str, run: u64, seq: u64, attempt: u32) -> Label {
        Label {
            message_id: Some(message_id(run, seq, attempt)),
            kind: Some(format!("hopper.{kind}.v{}", crate::codec::SCHEMA_VERSION)),
            job: Some(job.to_string()),
            run: Some(run),
            seq: Some(seq),
            attempt: Some(attempt),
            dead_reason: None,
            dead_lettered: None,
            deliveries: None,
        }
    }

    /// The same label, saying why the message is parked.
    pub fn parked(mut self, reason: &str) -> Label {
        self.dead_reason = Some(reason.to_string());
        self
    }
}

/// The transport failed. The side that sees it cannot go on with this transport: the dispatcher
/// stops its run (it can be resumed), a consumer stops (its unacked messages come back).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The broker cannot be reached.
    #[error(transparent)]
    Connect(Box<amqp::ConnectError>),
    /// The broker failed a step.
    #[error("RabbitMQ: {what} ({queue}): {source}")]
    Broker {
        /// The step that failed (`publish`, `declare the queue`...), for the operator.
        what: &'static str,
        /// The queue involved.
        queue: String,
        /// The broker client's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker refused a step for a reason that retrying will not cure (access refused, a
    /// queue declared with other arguments, a message over its size limit): reconnecting would
    /// only loop. The side that sees it stops, naming the queue and the cause.
    #[error("RabbitMQ refused to {what} ({queue}): {code} {text}{}", rejected_hint(what, *code, text))]
    Rejected {
        /// The step refused.
        what: &'static str,
        /// The queue involved.
        queue: String,
        /// The AMQP reply code (403 access refused, 404 not found, 406 precondition failed...).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The transport did not take a message (nacked, or no queue to route it to).
    #[error("{queue} did not take the message: {why}")]
    Refused {
        /// The queue that refused it.
        queue: String,
        /// The broker's reason, as it gave it.
        why: String,
    },
}

impl TransportError {
    /// True when the connection to the broker is gone: [`Transport::reconnect`] may help. A
    /// refused message is not such an error: the transport is fine, the message was not taken.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            TransportError::Connect(_) | TransportError::Broker { .. } => true,
            TransportError::Refused { .. } | TransportError::Rejected { .. } => false,
        }
    }
}

/// What to do about a refusal, where the broker's text alone does not say it.
fn rejected_hint(what: &str, code: u16, text: &str) -> String {
    match code {
        403 if what == "connect" => {
            "; check the user and password in broker.url, and the user's access to its vhost".into()
        }
        // RabbitMQ names the exchange or queue but not the right: the step tells which.
        403 => match right_needed(what) {
            Some(needs) => {
                format!("; {needs} (config/rabbitmq/hopper-users.sh sets each side's rights)")
            }
            None => "; give the user that right on the job's exchange and queues (hopper.<job>.*; \
                     config/rabbitmq/hopper-users.sh sets each side's rights)"
                .into(),
        },
        406 if text.contains("inequivalent arg") => {
            "; the queue was declared by another version of Hopper with other arguments: delete \
             the job's queues once (they must be empty), and both sides declare them again"
                .into()
        }
        406 if text.contains("max size") => {
            "; lower chunking.max_bytes, or raise the broker's max_message_size".into()
        }
        _ => String::new(),
    }
}

/// The right a refused step needs, by the step's name; `None` for a step not named here.
fn right_needed(what: &str) -> Option<&'static str> {
    Some(match what {
        "consume" | "set prefetch" => "the user needs the read right on that queue",
        "publish" | "confirm" => {
            "the user needs the write right on the job's exchange, hopper.<job>.exchange"
        }
        "declare the exchange" => "the user needs the configure right on it",
        "declare the queue" => {
            "the user needs the configure right on it, and for a queue that dead-letters \
             (chunks, retry.*) the read right on it and the write right on the job's exchange"
        }
        "bind the queue" => {
            "the user needs the write right on the queue and the read right on the job's exchange"
        }
        _ => return None,
    })
}

impl From<amqp::ConnectError> for TransportError {
    fn from(e: amqp::ConnectError) -> Self {
        match e.refusal {
            Some((code, text)) => TransportError::Rejected {
                what: "connect",
                queue: e.url,
                code,
                text,
            },
            None => TransportError::Connect(Box::new(e)),
        }
    }
}

/// Resolves once the transport holds a published message durably.
pub type Confirm = BoxFuture<'static, Result<(), TransportError>>;

/// Received messages, in order.
pub type Inbox = BoxStream<'static, Result<Incoming, TransportError>>;

/// How a received message is settled.
#[async_trait]
pub trait Settle: Send + Sync {
    /// Done with it; with `through`, also with every earlier message of the same inbox.
    async fn ack(&self, through: bool) -> Result<(), TransportError>;
    /// Not done: deliver it again.
    async fn give_back(&self) -> Result<(), TransportError>;
}

/// A received message. Dropping it unsettled leaves it to the transport to deliver again once
/// the receiver is gone.
pub struct Incoming {
    /// The encoded message.
    pub payload: Vec<u8>,
    /// What it says it is, read without decoding the body.
    pub label: Label,
    /// True when delivered before (a receiver died or gave it back).
    pub redelivered: bool,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("bytes", &self.payload.len())
            .field("label", &self.label)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

impl Incoming {
    /// A message and how to settle it; for transport implementations.
    pub fn new(payload: Vec<u8>, label: Label, redelivered: bool, settle: Box<dyn Settle>) -> Self {
        Incoming {
            payload,
            label,
            redelivered,
            settle,
        }
    }

    /// Done with this message.
    ///
    /// # Errors
    /// The transport's: the message will be delivered again.
    pub async fn ack(&self) -> Result<(), TransportError> {
        self.settle.ack(false).await
    }

    /// Done with this message and every earlier one of its inbox.
    ///
    /// # Errors
    /// The transport's: the messages will be delivered again.
    pub async fn ack_through(&self) -> Result<(), TransportError> {
        self.settle.ack(true).await
    }

    /// Not done: deliver it again.
    ///
    /// # Errors
    /// The transport's; the message comes back when the receiver is gone all the same.
    pub async fn give_back(&self) -> Result<(), TransportError> {
        self.settle.give_back().await
    }
}

/// The transport between the dispatcher and the consumers of one job.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Publishes `payload` to `route`. The returned [`Confirm`] resolves when the transport holds
    /// it; keep it until then.
    async fn publish(
        &self,
        route: Route,
        payload: &[u8],
        label: &Label,
    ) -> Result<Confirm, TransportError>;

    /// Starts receiving from `route` (`Chunks` or `Replies`), at most `prefetch` unacked.
    async fn receive(&self, route: Route, prefetch: u16) -> Result<Inbox, TransportError>;

    /// Stops handing out new messages on every inbox; messages already received can still be
    /// settled.
    async fn stop_receiving(&self);

    /// Makes sure every route exists again (after a refused publish, for example).
    async fn repair(&self) -> Result<(), TransportError>;

    /// After the connection was lost: connects again, with backoff, for a bounded time, and
    /// declares the routes again. Inboxes and unconfirmed publishes from before are void:
    /// receive again, and publish again whatever was not confirmed.
    async fn reconnect(&self) -> Result<(), TransportError>;

    /// Removes the chunks of run `run` still waiting to be taken (on the chunk queue and the
    /// delay queues; not those a consumer holds) and returns their seqs: what `cancel` takes
    /// back. Other runs' messages stay where they are.
    async fn withdraw(&self, run: u64) -> Result<Vec<u64>, TransportError>;

    /// Closes the transport; unsettled messages are delivered again.
    async fn close(&self, why: &str);

    /// True when what was published outlives this process (a broker's durable queues). When it
    /// does not (local mode), a resumed run publishes again the chunks that were in flight.
    fn outlives_process(&self) -> bool {
        true
    }
}
