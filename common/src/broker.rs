//! Connecting to RabbitMQ and the AMQP properties of Hopper's messages.
//!
//! Publishing and consuming use separate connections: a publisher connection blocked by a
//! memory or disk alarm stops every frame on it, acks included.

use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::codec::{CONTENT_TYPE, SCHEMA_VERSION};
use crate::job::redact_url;
use crate::job::Job;
use crate::message::{Chunk, Reply};
use crate::topology::Topology;

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

/// One side's link to the broker: a connection to publish on, with a channel in confirm mode,
/// and a separate connection to consume on, the job's queues declared.
#[derive(Debug)]
pub struct Link {
    /// Publishes, with publisher confirms.
    pub publish: Connection,
    /// Consumes: kept apart so that a publisher blocked by a broker alarm does not stop acks.
    pub consume: Connection,
    /// A channel on `publish`, in confirm mode.
    pub channel: Channel,
}

/// The broker failed while a [`Link`] was being set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The broker cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The broker refused a step.
    #[error("RabbitMQ: {what} ({queue}): {source}")]
    Broker {
        /// The step.
        what: &'static str,
        /// The queue involved.
        queue: String,
        /// lapin's error.
        source: lapin::Error,
    },
}

impl Link {
    /// Connects `role` (`hopper-dispatcher`, `hopper-consumer`) for `job`, naming the connections
    /// after the role, the job and this process, and declares the job's queues.
    ///
    /// # Errors
    /// [`LinkError`], naming the step and queue.
    pub async fn open(job: &Job, topology: &Topology, role: &str) -> Result<Link, LinkError> {
        let me = process_identity();
        let step = |what: &'static str, queue: &str| {
            let queue = queue.to_string();
            move |source| LinkError::Broker {
                what,
                queue,
                source,
            }
        };
        let publish = connect(
            &job.broker_url,
            &format!("{role} {} publish {me}", job.name),
        )
        .await?;
        let consume = connect(
            &job.broker_url,
            &format!("{role} {} consume {me}", job.name),
        )
        .await?;
        let channel = publish
            .create_channel()
            .await
            .map_err(step("open channel", &topology.chunks))?;
        topology
            .declare(&channel)
            .await
            .map_err(step("declare queues", &topology.chunks))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(step("enable publisher confirms", &topology.chunks))?;
        Ok(Link {
            publish,
            consume,
            channel,
        })
    }

    /// Closes both connections. Best effort: what matters was confirmed and recorded already.
    pub async fn close(&self, why: &str) {
        let _ = self.publish.close(200, why.into()).await;
        let _ = self.consume.close(200, why.into()).await;
    }
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
