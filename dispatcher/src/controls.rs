//! Live controls: `pause`, `resume`, `throttle` and `cancel` a run from any host that reaches its
//! execution context. They write the run's record; its dispatcher reads it every half second
//! and follows (publishing nothing new while paused; the new window and rate from the next
//! chunk, the ramp-up climbing again from the rate reached). What they write stays with the
//! run: a run resumed later (`run --resume`) keeps its throttle and its paused state.

use std::time::Duration;

use hopper_common::job::Throttle as ThrottleSpec;
use hopper_common::Job;

use crate::context::{ExecutionContext, RunId, RunRecord, RunState};
use crate::error::DispatchError;
use crate::owner::{find_run, owner_alive};

/// What a control command left the run with.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Controlled {
    /// The run.
    pub run: RunId,
    /// Its state now: `running` or `paused`.
    pub state: RunState,
    /// The window, rate and ramp-up in force for it now.
    pub throttle: ThrottleSpec,
    /// Whether its dispatcher is alive to follow (if not, `run --resume` is what it needs).
    pub dispatcher_alive: bool,
}

/// What `throttle` changes; what it leaves out stays as it is.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ThrottleChange {
    /// Chunks outstanding at the most (at least 1).
    pub window: Option<usize>,
    /// Items per second, 0 for unlimited.
    pub rate: Option<f64>,
    /// How long the rate takes to climb to `rate`, from the rate reached now.
    pub ramp_up: Option<Duration>,
}

impl ThrottleChange {
    /// A change of the window, the rate and/or the ramp-up.
    pub fn new(
        window: Option<usize>,
        rate: Option<f64>,
        ramp_up: Option<Duration>,
    ) -> ThrottleChange {
        ThrottleChange {
            window,
            rate,
            ramp_up,
        }
    }
}

/// Run `run` of `job` (its latest when `None`), refused when it has ended, or (for anything
/// but `cancel` again) when it is being cancelled.
async fn open_run(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
    what: &'static str,
) -> Result<RunRecord, DispatchError> {
    let record = find_run(job, context.store().as_ref(), run).await?;
    let cancelling = record.state == RunState::Cancelling && what != "cancel";
    if record.state.is_final() || cancelling {
        return Err(DispatchError::Ended {
            run: record.id,
            state: record.state,
            what,
        });
    }
    Ok(record)
}

async fn apply(
    job: &Job,
    context: &ExecutionContext,
    record: RunRecord,
    state: Option<RunState>,
    throttle: Option<ThrottleSpec>,
    what: &'static str,
) -> Result<Controlled, DispatchError> {
    if !context.store().control(record.id, state, throttle).await? {
        // It ended between the look and the write.
        let now = find_run(job, context.store().as_ref(), Some(record.id)).await?;
        return Err(DispatchError::Ended {
            run: now.id,
            state: now.state,
            what,
        });
    }
    Ok(Controlled {
        run: record.id,
        state: state.unwrap_or(record.state),
        throttle: throttle.or(record.throttle).unwrap_or(job.throttle),
        dispatcher_alive: owner_alive(&record),
    })
}

/// Pauses run `run` of `job` (its latest when `None`): its dispatcher publishes nothing new;
/// chunks in hand finish and their replies are applied.
///
/// # Errors
/// No such run, or it has ended ([`DispatchError::Ended`]); the execution context failed.
pub async fn pause(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
) -> Result<Controlled, DispatchError> {
    let record = open_run(job, context, run, "pause").await?;
    apply(job, context, record, Some(RunState::Paused), None, "pause").await
}

/// Undoes [`pause`]: the run's dispatcher publishes again (no burst for the time paused).
///
/// # Errors
/// No such run, or it has ended or is being cancelled ([`DispatchError::Ended`]); the
/// execution context failed.
pub async fn unpause(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
) -> Result<Controlled, DispatchError> {
    let record = open_run(job, context, run, "resume").await?;
    apply(
        job,
        context,
        record,
        Some(RunState::Running),
        None,
        "resume",
    )
    .await
}

/// Cancels run `run` of `job` (its latest when `None`): its dispatcher publishes nothing new,
/// takes back the chunks still waiting on the queues (recorded `dead`, "cancelled"), lets the
/// chunks in hand finish, and ends the run `cancelled`, which `retry` and `--resume` refuse.
/// A run whose dispatcher is gone is cancelled by `run --resume`.
///
/// # Errors
/// No such run, or it has ended ([`DispatchError::Ended`]); the execution context failed.
pub async fn cancel(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
) -> Result<Controlled, DispatchError> {
    let record = open_run(job, context, run, "cancel").await?;
    apply(
        job,
        context,
        record,
        Some(RunState::Cancelling),
        None,
        "cancel",
    )
    .await
}

/// Sets the window, rate and/or ramp-up of run `run` of `job` (its latest when `None`), over
/// the job file's: from the next chunk, the ramp-up climbing from the rate reached.
///
/// # Errors
/// A window of 0 or a negative rate ([`DispatchError::BadThrottle`]); no such run, or it has
/// ended; the execution context failed.
pub async fn throttle(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
    change: ThrottleChange,
) -> Result<Controlled, DispatchError> {
    if change.window == Some(0) {
        return Err(DispatchError::BadThrottle {
            why: "--window must be at least 1 (chunks outstanding at the most)".into(),
        });
    }
    if change.rate.is_some_and(|r| !r.is_finite() || r < 0.0) {
        return Err(DispatchError::BadThrottle {
            why: "--rate must be 0 (unlimited) or more items per second".into(),
        });
    }
    if change.window.is_none() && change.rate.is_none() && change.ramp_up.is_none() {
        return Err(DispatchError::BadThrottle {
            why: "say what to change: --window, --rate and/or --ramp-up".into(),
        });
    }
    let record = open_run(job, context, run, "throttle").await?;
    let now = record.throttle.unwrap_or(job.throttle);
    let wanted = ThrottleSpec {
        window: change.window.unwrap_or(now.window),
        rate: change.rate.unwrap_or(now.rate),
        ramp_up: change.ramp_up.unwrap_or(now.ramp_up),
    };
    apply(job, context, record, None, Some(wanted), "throttle").await
}
