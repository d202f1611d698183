//! Connecting to RabbitMQ: one connection, or the two-connection [`Link`] of one side.
//!
//! Publishing and consuming use separate connections: a publisher connection blocked by a
//! memory or disk alarm stops every frame on it, acks included.

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::job::redact_url;
use crate::job::Job;
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
    /// Bounded, because closing a connection the broker dropped can wait forever for its
    /// close-ok.
    pub async fn close(&self, why: &str) {
        let limit = std::time::Duration::from_secs(1);
        let _ = tokio::time::timeout(limit, self.publish.close(200, why.into())).await;
        let _ = tokio::time::timeout(limit, self.consume.close(200, why.into())).await;
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
