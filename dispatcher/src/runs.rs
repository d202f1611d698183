//! `runs`: a job's runs, newest first, one line each: what the operator looks at before
//! `status --run`, `--resume` or `retry`.

use std::fmt::Write as _;

use hopper_common::Job;
use serde::Serialize;

use crate::context::{ChunkCounts, ExecutionContext, ItemCounts, RunState, StuckAfter};
use crate::error::DispatchError;
use crate::owner::owner_alive;
use crate::status::{printable, rfc3339};

/// One run in `runs --json` (an array of these, newest first). Field names are a contract: add,
/// never rename.
#[derive(Debug, Clone, Serialize)]
pub struct RunLine {
    /// The run's id: what `--run` takes.
    pub run: u64,
    /// Where it stands or how it ended.
    pub state: RunState,
    /// For a run not ended: whether its dispatcher is alive (false: interrupted).
    pub dispatcher_alive: bool,
    /// The dispatcher that owns or owned it (`host/pid`).
    pub dispatcher: Option<String>,
    /// What it reads, for people.
    pub source: String,
    /// When it started, RFC 3339.
    pub started_at: String,
    /// When it ended, RFC 3339; absent while it runs.
    pub finished_at: Option<String>,
    /// Records read, processed, skipped and failed.
    pub items: ItemCounts,
    /// Chunks by where they stand.
    pub chunks: ChunkCounts,
    /// Failures still standing (`status --run` lists them).
    pub failures: usize,
}

/// Every run of `job`, newest first, with its counts. A job never run has none.
///
/// # Errors
/// The execution context cannot be read.
pub async fn runs(job: &Job, context: &ExecutionContext) -> Result<Vec<RunLine>, DispatchError> {
    let store = context.store();
    let mut lines = Vec::new();
    for run in store.runs(&job.name).await? {
        let status = store.status(run.id, StuckAfter::for_job(job)).await?;
        lines.push(RunLine {
            run: run.id,
            state: run.state,
            dispatcher_alive: !run.state.is_final() && owner_alive(&run),
            dispatcher: run.owner.clone(),
            source: run.source.clone(),
            started_at: rfc3339(run.started_at),
            finished_at: run.finished_at.map(rfc3339),
            items: status.items,
            chunks: status.chunks,
            failures: status.failures.len(),
        });
    }
    Ok(lines)
}

impl RunLine {
    /// The table `runs` prints without `--json`: a header and a line per run.
    pub fn table(lines: &[RunLine]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>5}  {:<24}  {:<20}  {:<20}  {:>10}  {:>10}  {:>8}  {:>8}  dispatcher",
            "run", "state", "started", "finished", "read", "processed", "skipped", "failed"
        );
        for l in lines {
            let state = match (l.state, l.dispatcher_alive) {
                (state, false) if !state.is_final() => format!("{state} (interrupted)"),
                (state, _) => state.to_string(),
            };
            let _ = writeln!(
                out,
                "{:>5}  {:<24}  {:<20}  {:<20}  {:>10}  {:>10}  {:>8}  {:>8}  {}",
                l.run,
                state,
                l.started_at,
                l.finished_at.as_deref().unwrap_or("-"),
                l.items.read,
                l.items.processed,
                l.items.skipped,
                l.items.failed,
                printable(l.dispatcher.as_deref().unwrap_or("-")),
            );
        }
        out
    }
}
