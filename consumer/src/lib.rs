//! The Hopper consumer: takes chunks of a job from RabbitMQ, runs a [`Processor`] over each,
//! replies with the outcome and acks.
//!
//! The `hopper-consumer` binary runs the built-in processors a job file names. To run your own
//! code, implement [`Processor`] and call [`run()`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use hopper_consumer::{async_trait, run, Chunk, ConsumerOptions, ProcessError, Processed, Processor};
//!
//! struct Shout;
//!
//! #[async_trait]
//! impl Processor for Shout {
//!     async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
//!         let mut out = Processed::all_done();
//!         for item in &chunk.items {
//!             match item.parse::<String>() {
//!                 Ok(text) => println!("{}", text.to_uppercase()),
//!                 Err(e) => out.bad_item(item, e.to_string()),
//!             }
//!         }
//!         Ok(out)
//!     }
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let job = hopper_consumer::Job::load("job.toml".as_ref())?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! run(&job, Arc::new(Shout), ConsumerOptions::default().with_concurrency(8), shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! A processor's own settings come from the job file's `[processor.options]` table, read with
//! [`Job::processor_options`]; `consumer/examples/custom_processor.rs` is a complete one.
//!
//! # Layout
//! - `processor/`: the [`Processor`] trait, its outcome types, and the built-in processors
//!   (`exec`, `file`, `noop`), one file each.
//! - `worker`: the loop that takes, processes, replies and acks ([`run()`] over RabbitMQ,
//!   [`run_on`] over any transport, such as the dispatcher's local mode).
//! - `metrics`: what a consumer counts for Prometheus ([`ConsumerMetrics`]).

mod metrics;
mod processor;
mod worker;

pub use async_trait::async_trait;
pub use hopper_common::shutdown::{cancel_on_signal, stop_on_signals};
pub use hopper_common::{BadItem, Chunk, Item, Job};
pub use metrics::ConsumerMetrics;
pub use processor::{
    build, BuildError, ExecProcessor, FileProcessor, NoopProcessor, PostgresProcessor,
    ProcessError, Processed, Processor,
};
pub use worker::{run, run_on, ConsumerError, ConsumerOptions, ConsumerSummary};
