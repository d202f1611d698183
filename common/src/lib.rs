//! The pieces the Hopper dispatcher and consumers share.
//!
//! Hopper runs very large batch jobs over RabbitMQ: a dispatcher cuts a source into chunks and
//! publishes them durably under a throttling window; consumers process chunks, reply and ack.
//! This crate holds what both sides must agree on.
//!
//! # Layout
//! - [`job`]: the job file, from TOML to a validated [`Job`], once.
//! - [`message`]: the [`Chunk`] and [`Reply`] that cross the broker.
//! - [`codec`]: their MessagePack encoding, in a versioned envelope.
//! - [`topology`]: the queues of a job and how they are declared.
//! - [`transport`]: the [`Transport`] between dispatcher and consumers: RabbitMQ
//!   ([`AmqpTransport`]) or the in-process queues of local mode ([`LocalBroker`]).
//! - [`broker`]: RabbitMQ connections.
//! - [`shutdown`]: stopping on SIGINT or SIGTERM.
//! - [`state`]: the execution context ([`StateStore`]) and its SQLite implementation.

pub mod broker;
pub mod codec;
pub mod job;
pub mod message;
pub mod shutdown;
pub mod state;
pub mod topology;
pub mod transport;

pub use broker::{connect, ConnectError};
pub use codec::{CodecError, SCHEMA_VERSION};
pub use job::{FileFormat, Job, JobError, ProcessorSpec, SourceSpec, StateSpec};
pub use message::{BadItem, Chunk, Item, Outcome, Position, Reply};
pub use state::{RunId, RunState, RunStatus, SqliteStore, StateError, StateStore};
pub use topology::Topology;
pub use transport::{
    AmqpTransport, Incoming, Label, LocalBroker, LocalTransport, Route, Transport, TransportError,
};

/// Opens the state store a job names.
///
/// # Errors
/// [`StateError`] when the store cannot be opened.
pub fn open_state(job: &Job) -> Result<std::sync::Arc<dyn StateStore>, StateError> {
    match &job.state {
        StateSpec::Sqlite { path } => Ok(std::sync::Arc::new(SqliteStore::open(path)?)),
    }
}
