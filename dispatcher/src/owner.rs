//! Who owns a run: the dispatcher that created, resumed or retried it last, holding its write
//! token ([`crate::context::Fence`]). A second dispatcher refuses a run whose owner is alive:
//! on this host, its process exists (the same process: same pid and start time); elsewhere, its
//! heartbeat is fresh. `status` says when a `running` run's owner has gone. The owner's
//! heartbeat comes from a timer task of its own ([`beat`]).

use std::sync::Arc;
use std::time::Duration;

use hopper_common::Job;
use tokio_util::sync::CancellationToken;

use crate::context::{now_ms, Claimed, ContextError, ContextStore, Fence, RunId, RunRecord};
use crate::error::DispatchError;

/// How often the owner writes its heartbeat.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A heartbeat older than this means the owner is gone (six missed beats).
pub(crate) const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

/// True when the run's owner wrote its heartbeat within [`HEARTBEAT_STALE`].
pub(crate) fn heartbeat_fresh(run: &RunRecord) -> bool {
    now_ms().saturating_sub(run.heartbeat_at) < HEARTBEAT_STALE.as_millis() as u64
}

/// True when the dispatcher that owns `run` is alive: on this host, its process still runs
/// (however old its heartbeat: a live owner may be stalled); on another host, its heartbeat is
/// fresh.
pub(crate) fn owner_alive(run: &RunRecord) -> bool {
    let me = hopper_common::process::identity();
    let my_host = me.rsplit_once('/').map(|(h, _)| h);
    match run.owner_token.as_deref().and_then(Fence::process) {
        Some((host, pid, started)) if Some(host) == my_host => {
            hopper_common::process::started_at(pid) == Some(started)
        }
        Some(_) | None => heartbeat_fresh(run),
    }
}

/// Refuses to go on while the dispatcher that owns `run` is alive ([`owner_alive`]): a check
/// before anything is opened. The store checks again when the run is taken ([`won`]), in the
/// transaction that takes it.
pub(crate) fn refuse_if_alive(job: &Job, run: &RunRecord) -> Result<(), DispatchError> {
    if !owner_alive(run) {
        return Ok(());
    }
    Err(already_running(job, run))
}

/// What taking a run came to, as the dispatcher goes on with it: [`Claimed::Held`] is
/// [`DispatchError::AlreadyRunning`].
pub(crate) fn won<T>(job: &Job, claimed: Claimed<T>) -> Result<T, DispatchError> {
    match claimed {
        Claimed::Won(t) => Ok(t),
        Claimed::Held(run) => Err(already_running(job, &run)),
    }
}

fn already_running(job: &Job, run: &RunRecord) -> DispatchError {
    DispatchError::AlreadyRunning {
        job: job.name.clone(),
        run: run.id,
        owner: run.owner.clone().unwrap_or_else(|| "unknown".into()),
        started_at: run.started_at,
        age_secs: now_ms().saturating_sub(run.heartbeat_at) / 1000,
    }
}

/// The run `run` of `job` (its latest run when `None`), or [`DispatchError::NoSuchRun`].
pub(crate) async fn find_run(
    job: &Job,
    store: &dyn ContextStore,
    run: Option<RunId>,
) -> Result<RunRecord, DispatchError> {
    store
        .run(&job.name, run)
        .await?
        .ok_or_else(|| DispatchError::NoSuchRun {
            job: job.name.clone(),
            run,
        })
}

/// Writes the run's heartbeat every [`HEARTBEAT_EVERY`] until `stop` is cancelled. Cancels
/// `stop` itself when a write fails (the run was taken over, or the store is gone), returning
/// why.
pub(crate) async fn beat(
    store: Arc<dyn ContextStore>,
    fence: Fence,
    stop: CancellationToken,
) -> Result<(), ContextError> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
        }
        if let Err(e) = store.heartbeat(&fence).await {
            stop.cancel();
            return Err(e);
        }
    }
}

/// Why the heartbeat stopped on its own.
pub(crate) async fn stopped_beating(
    heartbeat: &mut tokio::task::JoinHandle<Result<(), ContextError>>,
) -> DispatchError {
    match heartbeat.await {
        Ok(Err(e)) => e.into(),
        Ok(Ok(())) => DispatchError::Task {
            what: "heartbeat",
            message: "stopped without a reason".into(),
        },
        Err(e) => DispatchError::Task {
            what: "heartbeat",
            message: e.to_string(),
        },
    }
}
