//! The Hopper dispatcher: reads a job's source once, cuts it into chunks, records each chunk in
//! the execution context, publishes it to RabbitMQ under a throttling window and applies the
//! consumers' replies until every chunk has a final outcome.
//!
//! The `hopper-dispatcher` binary is a thin command line over this library. The library's whole
//! surface is the commands ([`run()`], [`resume()`], [`run_or_continue()`], [`retry()`],
//! [`status()`], [`runs()`], [`clean_runs()`], [`clean_queues()`], and the live controls
//! [`pause()`], [`unpause()`], [`throttle()`], [`cancel()`]), their
//! [`RunOptions`], the [`ExecutionContext`] they share, and what they return:
//!
//! ```no_run
//! use hopper_dispatcher::{run, ExecutionContext, Job, RunOptions};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let job = Job::load("job.toml".as_ref())?;
//! let context = ExecutionContext::open(&job).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let summary = run(&job, &context, RunOptions::default(), shutdown).await?;
//! println!("run {}: {} ({} processed)", summary.run, summary.state, summary.status.items.processed);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `launch` (`run`, `resume`) and `retry/` (`plan`, `reader`): the commands that start a run;
//!   `status`: where a run stands, as a table or the `status --json` object; `runs`: a job's
//!   runs, one line each; `clean`: ended runs and the job's queues removed.
//! - `source/`: where records come from (the file source reads JSON Lines, CSV and plain lines,
//!   keeping each record's line and byte offset), and reading a recorded range again.
//! - `chunker`: cuts records into chunks by item count and bytes.
//! - `throttle`: the window of outstanding chunks and the item rate with its ramp-up.
//! - `dispatch/`: the dispatch loop: `publish` (record, then publish; confirms; recovery),
//!   `outstanding` (the window's chunks and their confirms), `replies` (applied once).
//! - `carrier`: what carries the chunks, RabbitMQ or (local mode) worker tasks in this process.
//! - `context/`: the execution context (`model`, and the `sqlite` store behind a trait).
//! - `owner`: which dispatcher owns a run, by heartbeat; `controls`: `pause`, `resume`,
//!   `throttle` and `cancel`, written to the execution context and followed by the run's
//!   dispatcher.
//! - `options`, `error`, `progress`: how a run is started, why it stopped, what it shows;
//!   `notify`: whom the job file says to tell when a run ends; `metrics`: what a run counts
//!   for Prometheus ([`DispatcherMetrics`]).

mod carrier;
mod chunker;
mod clean;
mod context;
mod controls;
mod dispatch;
mod error;
mod launch;
mod metrics;
mod notify;
mod options;
mod owner;
mod progress;
mod retry;
mod runs;
mod source;
mod status;
mod throttle;

pub use clean::{clean_queues, clean_runs};
pub use context::{
    Checkpoint, ChunkCounts, ContextError, ExecutionContext, FailureClass, FailureRecord,
    InProgress, ItemCounts, RecentReading, RunId, RunRecord, RunState, RunStatus, StuckChunk,
};
pub use controls::{cancel, pause, throttle, unpause, Controlled, ThrottleChange};
pub use dispatch::RunSummary;
pub use error::DispatchError;
pub use hopper_common::Job;
pub use launch::{resume, run, run_or_continue};
pub use metrics::DispatcherMetrics;
pub use options::{Local, RunOptions};
pub use retry::retry;
pub use runs::{runs, RunLine};
pub use source::SourceError;
pub use status::{
    broker_view, status, BrokerOut, EtaOut, FailureOut, InProgressOut, QueueOut, StatusReport,
    StuckOut,
};
