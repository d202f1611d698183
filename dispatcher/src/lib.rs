//! The Hopper dispatcher: reads a job's source once, cuts it into chunks, records each chunk in
//! the execution context, publishes it to RabbitMQ under a throttling window and applies the
//! consumers' replies until every chunk has a final outcome.
//!
//! The `hopper-dispatcher` binary is a thin command line over [`run()`] and [`StatusReport`].
//!
//! # Layout
//! - [`source`]: where records come from ([`Source`]; the file source reads JSON Lines, CSV and
//!   plain lines, keeping each record's line and byte offset).
//! - [`chunker`]: cuts records into chunks by item count and bytes.
//! - [`throttle`]: the window of outstanding chunks and the item rate with its ramp-up.
//! - [`mod@run`]: one run, from the first record to the last reply.
//! - [`mod@retry`]: `retry`, reading again only what a run failed on.
//! - [`local`]: where chunks go, RabbitMQ or (local mode) worker tasks in this process over the
//!   in-process transport.
//! - [`progress`]: the progress bar or progress log lines.
//! - [`status`]: a run's state as a table or as the `status --json` object.

pub mod chunker;
pub mod local;
pub mod progress;
pub mod retry;
pub mod run;
pub mod source;
pub mod status;
pub mod throttle;

pub use chunker::{Chunker, Chunks, RawChunk, RetryOf};
pub use local::Local;
pub use retry::{retry, Plan, RetryReader};
pub use run::{resume, run, run_on, DispatchError, RunOptions, RunSummary, Start};
pub use source::{FileSource, Source, SourceError};
pub use status::StatusReport;
pub use throttle::Throttle;
