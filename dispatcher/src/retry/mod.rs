//! `retry`: dispatches again, as new chunks of the same run, only what a run failed on (failed
//! and dead chunks, bad data, bad items), read again from the positions the run recorded.
//!
//! The operator fixes the failed records in place, then runs `retry`. A fix may make a record
//! longer or shorter, which moves every byte after it: the reader keeps the shift (`delta`) seen
//! at the end of each record or chunk it read again, and seeks to the next one at its recorded
//! offset plus that shift. It never scans the input from its start.
//!
//! [`plan`] decides what to read again; [`reader`] reads it from the fixed input. A query's
//! failures are read again by key instead ([`keyed`]): nothing in a database moves when a row
//! is fixed.
//!
//! Invariants:
//! - **Nothing done is sent again.** Only the lines of what failed are read: a failed chunk's
//!   whole range, a done chunk's bad items by line, a bad record by its own span.
//! - **Checked before anything is sent.** The whole plan is read once before the run is taken
//!   up: every seek must land at the start of a line, and the shift after the last failed record
//!   must be the input's change in size. Otherwise something else moved and nothing is sent
//!   ([`SourceError::Moved`]).
//! - **A retry chunk takes over in the transaction that records it.** Its failures stop counting
//!   in the same transaction, so an interrupted retry leaves every failure either taken over by
//!   a recorded chunk or still standing for the next `retry`.

use hopper_common::Job;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::carrier::drive;
use crate::chunker::{Chunker, Chunks, Then};
use crate::context::RunRecord;
use crate::context::{ExecutionContext, RunId, RunState, StuckAfter};
use crate::dispatch::{RunSummary, Start};
use crate::error::DispatchError;
use crate::options::RunOptions;
use crate::owner::{find_run, refuse_if_alive};
use crate::source::{self, Cursor, Fingerprint};
use keyed::KeyedReader;
use plan::Plan;
use reader::RetryReader;

mod keyed;
mod plan;
mod reader;
#[cfg(test)]
mod tests;

/// Dispatches again what run `run` of `job` failed on (over RabbitMQ, or to workers in this
/// process with [`RunOptions::with_local`]) and ends the run again:
/// `completed` when everything now succeeds.
///
/// A run that is still going (its dispatcher alive) is refused; one whose dispatcher died is
/// taken over first, as `--resume` would. A run that stopped at the skip limit before reading
/// all its input is finished: once what failed is read again, `retry` reads on from where it
/// stopped.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::exit_code`] tells the ones where nothing was sent.
pub async fn retry(
    job: &Job,
    context: &ExecutionContext,
    run: RunId,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let store = context.store();
    let record = find_run(job, store.as_ref(), Some(run)).await?;
    match record.state {
        RunState::Running | RunState::Paused => refuse_if_alive(job, &record)?,
        RunState::Cancelling => {
            refuse_if_alive(job, &record)?;
            return Err(DispatchError::NotRetryable {
                run,
                state: record.state,
            });
        }
        RunState::Cancelled => {
            return Err(DispatchError::Ended {
                run,
                state: record.state,
                what: "retry",
            })
        }
        RunState::Completed | RunState::CompletedWithFailures | RunState::Failed => {}
    }
    if !job.source.key().is_empty() {
        return retry_keyed(job, context, record, opts, shutdown).await;
    }
    // A run stopped at the skip limit has not read all its input: once what failed is read
    // again, `retry` reads on from its checkpoint. That needs the input's size when the run
    // read it (its fingerprint) to check the fixes; a run still going is finished by
    // `--resume`, not here.
    let first_size = record
        .input
        .as_deref()
        .and_then(Fingerprint::parse)
        .map(|f| f.size());
    let reads_on = !record.checkpoint.exhausted;
    let size_before = match (reads_on, record.state, first_size) {
        (false, _, _) => record.checkpoint.offset,
        (true, RunState::Failed, Some(size)) => size,
        (true, _, _) => {
            return Err(DispatchError::NotRetryable {
                run,
                state: record.state,
            })
        }
    };
    let failed = store.retryable(run).await?;
    let plan = Plan::new(&failed);
    let open = store.open_chunks(run).await?;
    if plan.is_empty() && open.is_empty() && !reads_on {
        return nothing_to_retry(job, context, &record).await;
    }
    let (spec, limits) = (job.source.clone(), job.chunking);
    let checked = plan.clone();
    let found = tokio::task::spawn_blocking(move || {
        RetryReader::new(&spec, limits, &checked).check(size_before)
    })
    .await
    .map_err(|e| DispatchError::Task {
        what: "retry check",
        message: e.to_string(),
    })??;
    info!(job = %job.name, run, failures = plan.failures(), items = found.items,
          still_bad = found.bad, "retrying what failed");
    // From here on the run's positions are those of the input as it is now, so that failures
    // found by this retry and those it has yet to reach share one frame, even if it is
    // interrupted.
    // Every failed record lies before the checkpoint, so the checkpoint moved by the whole
    // change in size.
    let checkpoint = if reads_on {
        let moved = record.checkpoint.offset as i64 + (found.size as i64 - size_before as i64);
        u64::try_from(moved).unwrap_or(0)
    } else {
        found.size
    };
    let input = Fingerprint::of(&job.source)?;
    store
        .rebase(run, &found.moves, checkpoint, &input.to_string())
        .await?;
    let plan = Plan::new(&store.retryable(run).await?);
    let record = find_run(job, store.as_ref(), Some(run)).await?;
    let again: Box<dyn Chunks> = Box::new(RetryReader::new(&job.source, job.chunking, &plan));
    let chunks = if reads_on {
        let at = Cursor {
            offset: record.checkpoint.offset,
            lines: record.checkpoint.line,
        };
        info!(job = %job.name, run, offset = at.offset, line = at.lines + 1,
              "then reading on from where the run stopped");
        let rest = source::open_at(&job.source, at, None, job.chunking.max_bytes)?;
        Box::new(Then::new(again, Box::new(Chunker::new(rest, job.chunking))))
    } else {
        again
    };
    let start = Start::Retry {
        record,
        chunks,
        size: reads_on.then_some(input.size()),
    };
    drive(job, start, context, opts, shutdown).await
}

/// [`retry`] of a run of a query: its failed chunks and rows read again by key, then, for a run
/// stopped at the skip limit, the rest of the query after its checkpoint's key.
async fn retry_keyed(
    job: &Job,
    context: &ExecutionContext,
    record: RunRecord,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let (store, run) = (context.store(), record.id);
    let reads_on = !record.checkpoint.exhausted;
    if reads_on && record.state != RunState::Failed {
        return Err(DispatchError::NotRetryable {
            run,
            state: record.state,
        });
    }
    source::check(&job.source).await?;
    let again = KeyedReader::new(&job.source, job.chunking, &store.retryable(run).await?);
    let open = store.open_chunks(run).await?;
    if again.failures() == 0 && open.is_empty() && !reads_on {
        return nothing_to_retry(job, context, &record).await;
    }
    info!(job = %job.name, run, failures = again.failures(), "retrying what failed, by key");
    let chunks: Box<dyn Chunks> = if reads_on {
        let at = Cursor {
            offset: record.checkpoint.offset,
            lines: record.checkpoint.line,
        };
        let after = record.checkpoint.key.clone();
        info!(job = %job.name, run, after = after.as_deref().unwrap_or("the start"),
              "then reading on from where the run stopped");
        let rest = source::open_at(&job.source, at, after, job.chunking.max_bytes)?;
        Box::new(Then::new(
            Box::new(again),
            Box::new(Chunker::new(rest, job.chunking)),
        ))
    } else {
        Box::new(again)
    };
    let start = Start::Retry {
        record,
        chunks,
        size: None,
    };
    drive(job, start, context, opts, shutdown).await
}

/// What `retry` says of a run with nothing to dispatch again: the run as it stands.
async fn nothing_to_retry(
    job: &Job,
    context: &ExecutionContext,
    record: &RunRecord,
) -> Result<RunSummary, DispatchError> {
    info!(job = %job.name, run = record.id, state = %record.state, "nothing to retry");
    let status = context
        .store()
        .status(record.id, StuckAfter::for_job(job))
        .await?;
    Ok(RunSummary {
        run: record.id,
        state: record.state,
        status,
    })
}
