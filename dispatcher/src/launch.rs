//! Starting a run: a new one (`run`) or an interrupted one (`resume`). Each checks what it can
//! before anything is sent (the input opens, no live dispatcher owns the job, the run can be
//! resumed, its input has not changed), then drives the dispatch loop over the job's carrier.

use hopper_common::Job;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::carrier::drive;
use crate::context::{ExecutionContext, RunId};
use crate::dispatch::{RunSummary, Start};
use crate::error::DispatchError;
use crate::options::RunOptions;
use crate::owner::{find_run, refuse_if_alive};
use crate::source::{self, Cursor, Fingerprint, SourceError};

/// Dispatches a new run of `job` to the end, over RabbitMQ or (with [`RunOptions::with_local`])
/// to workers in this process.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::exit_code`] tells the ones where nothing was sent.
pub async fn run(
    job: &Job,
    context: &ExecutionContext,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    // The input and the execution context are checked before anything else: a missing file or
    // a live dispatcher of the same job sends nothing.
    source::check(&job.source).await?;
    let start = Start::new(&job.source, job.chunking.max_bytes)?;
    if let Some(prev) = context.store().run(&job.name, None).await? {
        if !prev.state.is_final() {
            refuse_if_alive(job, &prev)?;
            warn!(job = %job.name, run = prev.id,
                  "run {} was interrupted and stays unfinished; `run --resume {}` finishes it", prev.id, prev.id);
        }
    }
    drive(job, start, context, opts, shutdown).await
}

/// What a scheduler runs (`run --continue`): finishes the latest run of `job` if it was
/// interrupted (its dispatcher gone), as [`resume()`] would; otherwise starts a new one, as
/// [`run()`] would. While a dispatcher of the job is alive it changes nothing and returns
/// [`DispatchError::AlreadyRunning`] (exit 3), so overlapping starts are harmless.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::exit_code`] tells the ones where nothing was sent.
pub async fn run_or_continue(
    job: &Job,
    context: &ExecutionContext,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    match context.store().run(&job.name, None).await? {
        Some(latest) if !latest.state.is_final() => {
            refuse_if_alive(job, &latest)?;
            info!(job = %job.name, run = latest.id, "run {} was interrupted: finishing it", latest.id);
            resume(job, context, Some(latest.id), opts, shutdown).await
        }
        Some(_) | None => run(job, context, opts, shutdown).await,
    }
}

/// Finishes an interrupted run of `job` (the latest one unless `run` names it), like [`run()`]:
/// publishes again what was recorded but never confirmed, waits for what is in flight, and reads
/// on from the run's checkpoint.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::exit_code`] tells the ones where nothing was sent.
pub async fn resume(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let record = find_run(job, context.store().as_ref(), run).await?;
    if record.state.is_final() {
        return Err(DispatchError::NotResumable {
            run: record.id,
            state: record.state,
        });
    }
    refuse_if_alive(job, &record)?;
    // It reads on at offsets recorded from the input as it was: an edited input is refused
    // before anything is sent.
    if let Some(then) = record.input.as_deref().and_then(Fingerprint::parse) {
        if let Some(detail) = then.changes(&Fingerprint::of(&job.source)?) {
            if !job.source.key().is_empty() {
                return Err(SourceError::QueryChanged { run: record.id }.into());
            }
            return Err(SourceError::Edited {
                path: source::input_name(&job.source),
                run: record.id,
                detail,
            }
            .into());
        }
    }
    source::check(&job.source).await?;
    let source = if record.checkpoint.exhausted {
        None
    } else {
        let at = Cursor {
            offset: record.checkpoint.offset,
            lines: record.checkpoint.line,
        };
        let after = record.checkpoint.key.clone();
        Some(source::open_at(
            &job.source,
            at,
            after,
            job.chunking.max_bytes,
        )?)
    };
    drive(
        job,
        Start::Resume { record, source },
        context,
        opts,
        shutdown,
    )
    .await
}
