//! Who owns a run: the dispatcher process that created, resumed or retried it, proven alive by
//! a heartbeat in the execution context. A second dispatcher refuses a run whose owner is
//! alive; `status` says when a `running` run's owner has gone.

use std::path::Path;
use std::time::Duration;

use hopper_common::Job;

use crate::context::{now_ms, ContextStore, RunId, RunRecord};
use crate::error::DispatchError;

/// How often the owner writes its heartbeat.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A heartbeat older than this means the owner is gone (six missed beats).
pub(crate) const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

/// True when the run's owner wrote its heartbeat within [`HEARTBEAT_STALE`].
pub(crate) fn heartbeat_fresh(run: &RunRecord) -> bool {
    now_ms().saturating_sub(run.heartbeat_at) < HEARTBEAT_STALE.as_millis() as u64
}

/// Refuses to go on while the dispatcher that owns `run` is alive: its heartbeat is recent and,
/// when it ran on this host, its process still exists.
pub(crate) fn refuse_if_alive(job: &Job, run: &RunRecord) -> Result<(), DispatchError> {
    if !heartbeat_fresh(run) {
        return Ok(());
    }
    if let Some((host, pid)) = run.owner.as_deref().and_then(|o| o.rsplit_once('/')) {
        let me = hopper_common::process::identity();
        let same_host = me.rsplit_once('/').map(|(h, _)| h) == Some(host);
        if same_host && !Path::new("/proc").join(pid).exists() {
            return Ok(());
        }
    }
    Err(DispatchError::AlreadyRunning {
        job: job.name.clone(),
        run: run.id,
        owner: run.owner.clone().unwrap_or_else(|| "unknown".into()),
        age_secs: now_ms().saturating_sub(run.heartbeat_at) / 1000,
    })
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
