//! What the Hopper dispatcher and consumers share: the job file, the messages and their codec,
//! and the transport between them.
//!
//! Hopper runs very large batch jobs over RabbitMQ: a dispatcher cuts a source into chunks and
//! publishes them durably under a throttling window; consumers process chunks, reply and ack.
//! This crate holds what both sides must agree on; the execution context belongs to the
//! dispatcher (`hopper-dispatcher`), the processors to the consumers (`hopper-consumer`).
//!
//! # Glossary
//! One meaning per word, in every crate:
//! - **job**: a job file ([`Job`]): a source, a processor, and how to cut, throttle and retry.
//!   Its name names its queues.
//! - **run**: one execution of a job, from its first record to its last outcome, with its own
//!   id ([`message::Chunk::run`]). A job has many runs over time.
//! - **chunk**: up to `chunking.items` items cut from the source, numbered by its **seq**
//!   within its run; the unit of work, of acknowledgement and of failure.
//! - **attempt**: one processing of a chunk by a consumer, numbered from 1. A chunk that failed
//!   transiently comes back as the next attempt after a backoff, through a **delay queue**.
//! - **outcome**: what an attempt ended in ([`Outcome`]): done, retrying (another attempt
//!   follows), dead (the last attempt failed), failed (retrying cannot help). Done, dead and
//!   failed are **final**.
//! - **reply**: a consumer's message about one attempt's outcome ([`Reply`]).
//! - **resume**: finishing an interrupted run (`run --resume`): publish what was recorded but
//!   not confirmed, wait for what is in flight, read on from the checkpoint.
//! - **retry**: the command that dispatches again, as new chunks of the same run, only what a
//!   run failed on, after the input was fixed. (The job file's `[retry]` section is the policy
//!   for attempts.)
//! - **stuck**: a chunk in flight for longer than `retry.chunk_timeout`.
//!
//! # Layout
//! - [`job`]: the job file, from TOML to a validated [`Job`], once.
//! - [`message`]: the [`Chunk`] and [`Reply`] that cross the broker.
//! - [`codec`]: their MessagePack encoding, in a versioned envelope.
//! - [`transport`]: the [`Transport`] between dispatcher and consumers: RabbitMQ
//!   ([`transport::amqp`]: connections, queues, message properties) or the in-process queues of
//!   local mode ([`LocalBroker`]).
//! - [`process`]: this process's identity, and how a binary starts (logs, runtime).
//! - [`shutdown`]: stopping on SIGINT or SIGTERM.
//! - [`metrics`]: a binary's Prometheus registry (`hopper_` prefix, `job` label), served at
//!   `/metrics` when asked.
//! - [`postgres`]: what the PostgreSQL source, processor and store share: values in the text
//!   format, the database's errors as people read them, and connections made as the URL's
//!   `sslmode` asks ([`postgres::PgLink`]).

pub mod codec;
pub mod job;
pub mod message;
pub mod metrics;
pub mod postgres;
pub mod process;
pub mod shutdown;
pub mod transport;

pub use codec::{ChunkHead, CodecError, EncodedItems, SCHEMA_VERSION};
pub use job::{FileFormat, Job, JobError, MetricsSpec, ProcessorSpec, SourceSpec, StateSpec};
pub use message::{BadItem, Chunk, Item, NoteTiming, Outcome, Position, Reply};
pub use transport::{
    AmqpTransport, Incoming, Label, LocalBroker, LocalTransport, Route, Transport, TransportError,
};
