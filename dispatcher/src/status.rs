//! `status`: where a run stands, read from the execution context only (no broker), as a
//! readable table or as the JSON object of the contract.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use hopper_common::Job;
use serde::Serialize;

use crate::context::{
    ChunkCounts, ExecutionContext, FailureClass, FailureRecord, ItemCounts, RunId, RunState,
    RunStatus, StuckAfter, StuckChunk,
};
use crate::error::DispatchError;
use crate::owner::{find_run, owner_alive, HEARTBEAT_STALE};

/// Where run `run` of `job` stands (its latest run when `None`).
///
/// # Errors
/// [`DispatchError::NoSuchRun`] (with `run: None` when the job has no runs yet), or the
/// execution context cannot be read.
pub async fn status(
    job: &Job,
    context: &ExecutionContext,
    run: Option<RunId>,
) -> Result<RunStatus, DispatchError> {
    let record = find_run(job, context.store().as_ref(), run).await?;
    Ok(context
        .store()
        .status(record.id, StuckAfter::for_job(job))
        .await?)
}

/// The `status --json` object. Its field names are a contract: add, never rename.
#[derive(Debug, Serialize)]
pub struct StatusReport<'a> {
    /// The job's name, as the job file gives it.
    pub job: &'a str,
    /// The run's id: what `--run` takes.
    pub run: u64,
    /// `running`, `completed`, `completed_with_failures` or `failed`.
    pub state: RunState,
    /// For a running run: false when its dispatcher stopped sending heartbeats.
    pub dispatcher_alive: bool,
    /// What the run reads, for people (`file data/x.jsonl (jsonl)`).
    pub source: &'a str,
    /// When the run started, RFC 3339.
    pub started_at: String,
    /// When it ended, RFC 3339; absent while it runs.
    pub finished_at: Option<String>,
    /// Records read, processed, skipped and failed: each record read is in exactly one of the
    /// other three once the run has ended.
    pub items: ItemCounts,
    /// Chunks by where they stand.
    pub chunks: ChunkCounts,
    /// Every failure still standing, in source order.
    pub failures: Vec<FailureOut<'a>>,
    /// Chunks consumers are processing and have said so (chunks that run long; fast ones never
    /// show here).
    pub in_progress: Vec<InProgressOut<'a>>,
    /// Chunks in progress whose consumer went silent, or whose processing passed
    /// `chunk_timeout`.
    pub stuck: Vec<StuckOut<'a>>,
    /// For a run still reading its input: how far it is, and about how long reading the rest
    /// takes at the last minute's pace (replies still to come are not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<EtaOut>,
    /// The broker's side, when it was asked ([`StatusReport::with_broker`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerOut>,
}

/// How far a run has read its input, and the time left at the recent pace.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EtaOut {
    /// Bytes read of the input, as a fraction (0 to 1).
    pub fraction_read: f64,
    /// Seconds to read the rest at the pace of the last minute; null when nothing was read in
    /// it (paused, stalled).
    pub seconds: Option<u64>,
}

/// The estimate for a run not ended that has not read all its input and knows its size.
fn eta(s: &RunStatus) -> Option<EtaOut> {
    let run = &s.run;
    if run.state.is_final() || run.checkpoint.exhausted {
        return None;
    }
    let size = run
        .input
        .as_deref()
        .and_then(crate::source::Fingerprint::parse)?
        .size();
    if size == 0 {
        return None;
    }
    let read = run.checkpoint.offset.min(size);
    let left = (size - read) as f64;
    Some(EtaOut {
        fraction_read: read as f64 / size as f64,
        seconds: s
            .recent
            .map(|r| (left / (r.bytes as f64 / (r.millis as f64 / 1000.0))).ceil() as u64),
    })
}

/// The broker's side of a job in the report: its queues as the broker holds them.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerOut {
    /// False when the broker could not be asked (`error` says why); the rest of the report
    /// comes from the execution context and stands.
    pub reachable: bool,
    /// Why the broker could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The job's queues: chunks, replies, dead, then the delay queues.
    pub queues: Vec<QueueOut>,
}

/// A queue in the report.
#[derive(Debug, Clone, Serialize)]
pub struct QueueOut {
    /// Its name.
    pub name: String,
    /// Messages ready and unacked; null when the queue does not exist.
    pub messages: Option<u32>,
    /// Consumers attached.
    pub consumers: u32,
}

/// The broker's side of `job`: its queues' messages and consumers (a passive declare tells,
/// without the management plugin). Never an error: an unreachable broker is said so, within
/// 5 s.
pub async fn broker_view(job: &Job) -> BrokerOut {
    let asked = tokio::time::timeout(
        Duration::from_secs(5),
        hopper_common::transport::amqp::admin::inspect(job),
    )
    .await;
    let (queues, error) = match asked {
        Ok(Ok(queues)) => (queues, None),
        Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
        Err(_) => (Vec::new(), Some("no answer within 5 s".to_string())),
    };
    BrokerOut {
        reachable: error.is_none(),
        error,
        queues: queues
            .into_iter()
            .map(|q| QueueOut {
                name: q.name,
                messages: q.messages,
                consumers: q.consumers,
            })
            .collect(),
    }
}

/// A failure in the report.
#[derive(Debug, Serialize)]
pub struct FailureOut<'a> {
    /// The chunk that failed or held the item; null for a record the dispatcher could not read.
    pub seq: Option<u64>,
    /// Where the failed record (or chunk) starts: its line number in a file; its key in a
    /// query (a value, or an array for a composite key).
    pub position: serde_json::Value,
    /// `bad_data`, `bad_item` or `chunk`.
    pub class: FailureClass,
    /// Why, as the reader or the processor said it: what to fix before `retry`.
    pub reason: &'a str,
}

/// A chunk in progress in the report.
#[derive(Debug, Serialize)]
pub struct InProgressOut<'a> {
    /// The chunk being processed.
    pub seq: u64,
    /// The attempt being processed.
    pub attempt: u32,
    /// The consumer processing it (`host/pid`).
    pub consumer: Option<&'a str>,
    /// When its processing started (time in a queue does not count), RFC 3339.
    pub since: String,
}

/// A stuck chunk in the report.
#[derive(Debug, Serialize)]
pub struct StuckOut<'a> {
    /// The stuck chunk.
    pub seq: u64,
    /// The consumer (`host/pid`) that was processing it, to look at first.
    pub consumer: Option<&'a str>,
    /// When its processing started, RFC 3339.
    pub since: String,
    /// The attempt it is at.
    pub attempt: u32,
    /// Why it counts as stuck.
    pub reason: &'a str,
}

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl<'a> StatusReport<'a> {
    /// The report of a run's status, as `status` prints it.
    pub fn new(s: &'a RunStatus) -> StatusReport<'a> {
        let alive = !s.run.state.is_final() && owner_alive(&s.run);
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
            in_progress: s
                .in_progress
                .iter()
                .map(|c| InProgressOut {
                    seq: c.seq,
                    attempt: c.attempt,
                    consumer: c.consumer.as_deref(),
                    since: rfc3339(c.since),
                })
                .collect(),
            stuck: s.stuck.iter().map(stuck).collect(),
            eta: eta(s),
            broker: None,
        }
    }

    /// The report with the broker's side ([`broker_view`]).
    pub fn with_broker(mut self, broker: BrokerOut) -> StatusReport<'a> {
        self.broker = Some(broker);
        self
    }

    /// The report as the table `status` prints without `--json`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let state = if !self.state.is_final() && !self.dispatcher_alive {
            format!(
                "{} (dispatcher not seen for {}s: interrupted?)",
                self.state,
                HEARTBEAT_STALE.as_secs()
            )
        } else {
            self.state.to_string()
        };
        let _ = writeln!(out, "job      {}", self.job);
        let _ = writeln!(out, "run      {}", self.run);
        let _ = writeln!(out, "state    {state}");
        let _ = writeln!(out, "source   {}", printable(self.source));
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
        if let Some(e) = &self.eta {
            let pace = match e.seconds {
                Some(secs) => format!(
                    "; reading the rest takes about {} at the last minute's pace",
                    humantime::format_duration(Duration::from_secs(secs))
                ),
                None => "; nothing read in the last minute".to_string(),
            };
            let _ = writeln!(out, "input    {:.1}% read{pace}", e.fraction_read * 100.0);
        }
        match &self.broker {
            Some(b) if b.reachable => {
                let _ = writeln!(out, "\nqueues (messages ready and unacked, consumers):");
                for q in &b.queues {
                    let messages = q.messages.map_or("-".to_string(), |m| m.to_string());
                    let _ = writeln!(out, "  {:<48}  {:>8}  {:>4}", q.name, messages, q.consumers);
                }
            }
            Some(b) => {
                let _ = writeln!(
                    out,
                    "\nqueues   not known: {}",
                    printable(b.error.as_deref().unwrap_or("the broker did not answer"))
                );
            }
            None => {}
        }
        if !self.in_progress.is_empty() {
            let _ = writeln!(out, "\nin progress (chunks that run long):");
            let _ = writeln!(
                out,
                "  {:>8}  {:>7}  {:<20}  consumer",
                "seq", "attempt", "since"
            );
            for c in &self.in_progress {
                let _ = writeln!(
                    out,
                    "  {:>8}  {:>7}  {:<20}  {}",
                    c.seq,
                    c.attempt,
                    c.since,
                    printable(c.consumer.unwrap_or("-"))
                );
            }
        }
        if !self.stuck.is_empty() {
            let _ = writeln!(out, "\nstuck chunks:");
            let _ = writeln!(
                out,
                "  {:>8}  {:>7}  {:<20}  {:<24}  why",
                "seq", "attempt", "since", "consumer"
            );
            for s in &self.stuck {
                let _ = writeln!(
                    out,
                    "  {:>8}  {:>7}  {:<20}  {:<24}  {}",
                    s.seq,
                    s.attempt,
                    s.since,
                    printable(s.consumer.unwrap_or("-")),
                    printable(s.reason)
                );
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nfailures:");
            let keyed = self.failures.iter().any(|f| !f.position.is_u64());
            let _ = writeln!(
                out,
                "  {:>10}  {:>8}  {:<8}  reason",
                if keyed { "key" } else { "line" },
                "chunk",
                "class"
            );
            for f in &self.failures {
                let class = f.class.as_str();
                let seq = f.seq.map_or_else(|| "-".to_string(), |s| s.to_string());
                let _ = writeln!(
                    out,
                    "  {:>10}  {:>8}  {:<8}  {}",
                    printable(&f.position.to_string()),
                    seq,
                    class,
                    printable(f.reason)
                );
            }
        }
        out
    }
}

/// `text` with its control characters escaped (`\u{1b}`, `\r`, `\0`...): reasons come from
/// processors and inputs, and must not drive the operator's terminal.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn failure(f: &FailureRecord) -> FailureOut<'_> {
    let key = f.key.as_deref().and_then(|k| serde_json::from_str(k).ok());
    FailureOut {
        seq: f.seq,
        position: key.unwrap_or_else(|| f.position.into()),
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
        reason: &s.reason,
    }
}
