//! `clean`: what an operator removes once runs are over: ended runs from the execution context
//! (`--older-than`), and the job's queues from the broker (`--queues`).
//!
//! Never what a run still needs: runs not ended stay; queues are kept while a run of the job
//! has not ended (its chunks are on them) or the dead queue holds chunks (what they are for is
//! in their headers), unless forced; and never while a dispatcher of the job is alive.

use std::time::Duration;

use hopper_common::transport::amqp::admin;
use hopper_common::Job;
use tracing::info;

use crate::context::{now_ms, ExecutionContext};
use crate::error::DispatchError;
use crate::owner::refuse_if_alive;

/// Removes the runs of `job` that ended more than `older_than` ago, with their chunks and
/// failures; returns how many.
///
/// # Errors
/// The execution context cannot be written.
pub async fn clean_runs(
    job: &Job,
    context: &ExecutionContext,
    older_than: Duration,
) -> Result<u64, DispatchError> {
    let before = now_ms().saturating_sub(older_than.as_millis() as u64);
    let n = context.store().delete_runs(&job.name, before).await?;
    info!(job = %job.name, runs = n, "removed ended runs");
    Ok(n)
}

/// Deletes the job's queues from its broker; returns the names deleted. Refused while a
/// dispatcher of the job is alive ([`DispatchError::AlreadyRunning`]), and, unless `force`,
/// while a run has not ended or the dead queue holds chunks ([`DispatchError::CleanRefused`]).
///
/// # Errors
/// A refusal above, or the broker or the execution context cannot be reached.
pub async fn clean_queues(
    job: &Job,
    context: Option<&ExecutionContext>,
    force: bool,
) -> Result<Vec<String>, DispatchError> {
    let runs = match context {
        Some(c) => c.store().runs(&job.name).await?,
        None => Vec::new(),
    };
    for run in runs.iter().filter(|r| !r.state.is_final()) {
        refuse_if_alive(job, run)?;
        if !force {
            return Err(DispatchError::CleanRefused {
                why: format!(
                    "run {} has not ended: its chunks are on the queues (`run --resume {}` \
                     finishes it; --force deletes them anyway)",
                    run.id, run.id
                ),
            });
        }
    }
    let dead = admin::inspect(job)
        .await?
        .into_iter()
        .find(|q| q.name.ends_with(".dead"))
        .and_then(|q| q.messages)
        .unwrap_or(0);
    if dead > 0 && !force {
        return Err(DispatchError::CleanRefused {
            why: format!(
                "the dead queue hopper.{}.dead holds {dead} chunk(s): look at them (their \
                 x-hopper-dead-reason header says why) and `retry` their runs, or --force",
                job.name
            ),
        });
    }
    let deleted = admin::delete(job).await?;
    info!(job = %job.name, queues = deleted.len(), "deleted the job's queues");
    Ok(deleted)
}
