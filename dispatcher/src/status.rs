//! `status`: a run's state as a readable table or as the JSON object of the contract.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use hopper_common::state::{now_ms, ChunkCounts, FailureRecord, ItemCounts, StuckChunk};
use hopper_common::{RunState, RunStatus};
use serde::Serialize;

/// A dispatcher whose heartbeat is older than this is taken for dead.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

/// The `status --json` object. Its field names are a contract: add, never rename.
#[derive(Debug, Serialize)]
pub struct StatusReport<'a> {
    /// The job.
    pub job: &'a str,
    /// The run id.
    pub run: u64,
    /// `running`, `paused`, `completed`, `completed_with_failures`, `failed` or `cancelled`.
    pub state: RunState,
    /// For a running run: false when its dispatcher stopped sending heartbeats.
    pub dispatcher_alive: bool,
    /// What the run reads.
    pub source: &'a str,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once ended.
    pub finished_at: Option<String>,
    /// Item counts.
    pub items: ItemCounts,
    /// Chunk counts.
    pub chunks: ChunkCounts,
    /// Every failure.
    pub failures: Vec<FailureOut<'a>>,
    /// Chunks in flight past the job's `chunk_timeout`.
    pub stuck: Vec<StuckOut<'a>>,
}

/// A failure in the report.
#[derive(Debug, Serialize)]
pub struct FailureOut<'a> {
    /// The chunk, if any.
    pub seq: Option<u64>,
    /// Line number.
    pub position: u64,
    /// `bad_data`, `bad_item` or `chunk`.
    pub class: hopper_common::state::FailureClass,
    /// Why.
    pub reason: &'a str,
}

/// A stuck chunk in the report.
#[derive(Debug, Serialize)]
pub struct StuckOut<'a> {
    /// The chunk.
    pub seq: u64,
    /// The consumer that last replied about it.
    pub consumer: Option<&'a str>,
    /// RFC 3339.
    pub since: String,
    /// Its attempt.
    pub attempt: u32,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl<'a> StatusReport<'a> {
    /// The report of `s`.
    pub fn new(s: &'a RunStatus) -> StatusReport<'a> {
        let alive = !s.run.state.is_final()
            && now_ms().saturating_sub(s.run.heartbeat_at) < HEARTBEAT_STALE.as_millis() as u64;
        StatusReport {
            job: &s.run.job,
            run: s.run.id,
            state: s.run.state,
            dispatcher_alive: alive,
            source: &s.run.source,
            started_at: rfc3339(s.run.started_at),
            finished_at: s.run.finished_at.map(rfc3339),
            items: s.items,
            chunks: s.chunks,
            failures: s.failures.iter().map(failure).collect(),
            stuck: s.stuck.iter().map(stuck).collect(),
        }
    }

    /// The readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let state = if self.state == RunState::Running && !self.dispatcher_alive {
            "running (dispatcher not seen for 30s: interrupted?)".to_string()
        } else {
            self.state.to_string()
        };
        let _ = writeln!(out, "job      {}", self.job);
        let _ = writeln!(out, "run      {}", self.run);
        let _ = writeln!(out, "state    {state}");
        let _ = writeln!(out, "source   {}", self.source);
        let _ = writeln!(out, "started  {}", self.started_at);
        if let Some(f) = &self.finished_at {
            let _ = writeln!(out, "finished {f}");
        }
        let i = &self.items;
        let _ = writeln!(
            out,
            "items    read {:>10}  processed {:>10}  skipped {:>8}  failed {:>8}",
            i.read, i.processed, i.skipped, i.failed
        );
        let c = &self.chunks;
        let _ = writeln!(
            out,
            "chunks   total {:>8}  pending {:>6}  in flight {:>6}  done {:>8}  failed {:>6}  dead {:>6}  retried {:>6}",
            c.total, c.pending, c.in_flight, c.done, c.failed, c.dead, c.retried
        );
        if !self.stuck.is_empty() {
            let _ = writeln!(out, "\nstuck chunks (in flight past chunk_timeout):");
            let _ = writeln!(
                out,
                "  {:>8}  {:>7}  {:<20}  consumer",
                "seq", "attempt", "since"
            );
            for s in &self.stuck {
                let _ = writeln!(
                    out,
                    "  {:>8}  {:>7}  {:<20}  {}",
                    s.seq,
                    s.attempt,
                    s.since,
                    s.consumer.unwrap_or("-")
                );
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nfailures:");
            let _ = writeln!(
                out,
                "  {:>10}  {:>8}  {:<8}  reason",
                "line", "chunk", "class"
            );
            for f in &self.failures {
                let class = f.class.as_str();
                let seq = f.seq.map_or_else(|| "-".to_string(), |s| s.to_string());
                let _ = writeln!(
                    out,
                    "  {:>10}  {:>8}  {:<8}  {}",
                    f.position, seq, class, f.reason
                );
            }
        }
        out
    }
}

fn failure(f: &FailureRecord) -> FailureOut<'_> {
    FailureOut {
        seq: f.seq,
        position: f.position,
        class: f.class,
        reason: &f.reason,
    }
}

fn stuck(s: &StuckChunk) -> StuckOut<'_> {
    StuckOut {
        seq: s.seq,
        consumer: s.consumer.as_deref(),
        since: rfc3339(s.since),
        attempt: s.attempt,
    }
}
