//! What the execution context holds: runs, chunks and failures, as the dispatcher writes them
//! and as `status` reads them. The strings of the enums are stored, and are the contract of
//! `status --json`.

use std::fmt;
use std::str::FromStr;

use hopper_common::Position;
use serde::{Deserialize, Serialize};

/// A run's id; unique within a store.
pub type RunId = u64;

/// Where a run stands. The strings are the contract of `status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Dispatching or waiting for replies (or its dispatcher died; see the heartbeat).
    Running,
    /// Not ended, but told to publish nothing new (`pause`); chunks in hand finish and their
    /// replies are applied. `resume` makes it `running` again.
    Paused,
    /// Told to stop (`cancel`): nothing new is published, the chunks still waiting are taken
    /// back, the chunks in hand finish; then it is `cancelled`.
    Cancelling,
    /// Stopped by `cancel`: final; `retry` and `--resume` refuse it.
    Cancelled,
    /// Every item processed.
    Completed,
    /// Finished, with skipped items or failed chunks.
    CompletedWithFailures,
    /// Stopped because a limit was passed.
    Failed,
}

impl RunState {
    /// The state as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Cancelling => "cancelling",
            RunState::Cancelled => "cancelled",
            RunState::Completed => "completed",
            RunState::CompletedWithFailures => "completed_with_failures",
            RunState::Failed => "failed",
        }
    }

    /// True once the run has ended.
    pub fn is_final(self) -> bool {
        match self {
            RunState::Running | RunState::Paused | RunState::Cancelling => false,
            RunState::Completed
            | RunState::CompletedWithFailures
            | RunState::Failed
            | RunState::Cancelled => true,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "cancelling" => RunState::Cancelling,
            "cancelled" => RunState::Cancelled,
            "completed" => RunState::Completed,
            "completed_with_failures" => RunState::CompletedWithFailures,
            "failed" => RunState::Failed,
            other => return Err(format!("unknown run state {other:?}")),
        })
    }
}

/// Where the source reading stands: the pointer to the next input record.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Checkpoint {
    /// Byte offset of the next record.
    pub offset: u64,
    /// Line number of the last line read (the next record starts after it).
    pub line: u64,
    /// The seq the next chunk gets.
    pub next_seq: u64,
    /// True once the source has been read to its end.
    pub exhausted: bool,
    /// For a source read by key (a query): the key of the last row read, as JSON; reading
    /// goes on after it. `None` for a file, or before the first row.
    pub key: Option<String>,
}

/// Where a chunk of a source read by key (a query) lies: how it is read again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Keys {
    /// The rows after the key `after` (`None`: from the first row) up to the key `last`,
    /// included: a chunk as the scan cut it.
    Range {
        /// The key of the row before the chunk's first.
        after: Option<String>,
        /// The key of its first row: where `status` says a failed chunk starts.
        first: String,
        /// The key of its last row.
        last: String,
    },
    /// Just these rows, by key, each with its line (its ordinal in the first scan): failed
    /// rows read again by `retry`.
    Rows(Vec<(String, u64)>),
}

impl Keys {
    /// The key of the chunk's first row.
    pub(crate) fn first(&self) -> Option<&str> {
        match self {
            Keys::Range { first, .. } => Some(first),
            Keys::Rows(rows) => rows.first().map(|(key, _)| key.as_str()),
        }
    }

    /// The form kept in the store.
    pub(crate) fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the form kept in the store.
    pub(crate) fn parse(text: &str) -> Result<Keys, String> {
        serde_json::from_str(text).map_err(|e| format!("chunk keys {text:?}: {e}"))
    }
}

/// One run, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    /// Unique within its execution context.
    pub id: RunId,
    /// The job's name: runs of every job can share one store.
    pub job: String,
    /// Running, or how it ended.
    pub state: RunState,
    /// What it reads, for people (`file data/x.jsonl (jsonl)`).
    pub source: String,
    /// When it started, in ms since the Unix epoch.
    pub started_at: u64,
    /// When it ended, in ms since the Unix epoch; `None` while it runs.
    pub finished_at: Option<u64>,
    /// The dispatcher's last sign of life; a `running` run with an old heartbeat lost its
    /// dispatcher.
    pub heartbeat_at: u64,
    /// The dispatcher process that owns the run (`host/pid`).
    pub owner: Option<String>,
    /// The owner's write token ([`Fence`]), which also tells when its process started.
    #[serde(skip)]
    pub(crate) owner_token: Option<String>,
    /// Where reading the source stands: where `--resume` reads on from.
    pub checkpoint: Checkpoint,
    /// The input's fingerprint when the run started reading it (or when `retry` last took
    /// its fixes), as [`crate::source::Fingerprint`] writes it; `None` for a run of an older
    /// store.
    pub(crate) input: Option<String>,
    /// The window, rate and ramp-up set by `throttle` for this run, over the job file's;
    /// `None` when the job file's apply.
    #[serde(skip)]
    pub throttle: Option<hopper_common::job::Throttle>,
}

/// Where a chunk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChunkStatus {
    /// Recorded; not yet confirmed by the broker (maybe not even published).
    Pending,
    /// Confirmed by the broker; no final reply yet.
    InFlight,
    /// Processed.
    Done,
    /// Failed permanently.
    Failed,
    /// Parked on the dead queue after its last attempt.
    Dead,
}

impl ChunkStatus {
    /// The status as stored.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChunkStatus::Pending => "pending",
            ChunkStatus::InFlight => "in_flight",
            ChunkStatus::Done => "done",
            ChunkStatus::Failed => "failed",
            ChunkStatus::Dead => "dead",
        }
    }
}

impl FromStr for ChunkStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => ChunkStatus::Pending,
            "in_flight" => ChunkStatus::InFlight,
            "done" => ChunkStatus::Done,
            "failed" => ChunkStatus::Failed,
            "dead" => ChunkStatus::Dead,
            other => return Err(format!("unknown chunk status {other:?}")),
        })
    }
}

/// A recorded chunk, as a resumed run needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkRecord {
    /// The chunk's number in its run.
    pub seq: u64,
    /// Where it starts in the source.
    pub position: Position,
    /// The byte offset just past its last record.
    pub end_offset: u64,
    /// How many items it carries.
    pub items: u64,
    /// Pending or in flight for an open chunk; a resumed run publishes pending ones again.
    pub status: ChunkStatus,
    /// The attempt it is at: a chunk published again goes as that attempt.
    pub attempts: u32,
    /// For a source read by key, its rows' keys: how it is read again.
    pub keys: Option<Keys>,
}

/// A chunk about to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewChunk {
    /// The chunk's number in its run, from the checkpoint's `next_seq`.
    pub seq: u64,
    /// Where it starts in the source.
    pub position: Position,
    /// The byte offset just past its last record.
    pub end_offset: u64,
    /// How many items it carries.
    pub items: u64,
    /// The line count at its end offset (its last line), so that `retry` can tell where the
    /// chunk ends when a fix made lines longer or shorter.
    pub end_line: u64,
    /// For a source read by key, its rows' keys.
    pub keys: Option<Keys>,
}

/// What kind of failure a [`FailureRecord`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The dispatcher could not read a record (malformed JSON or CSV); the item was skipped.
    BadData,
    /// A processor refused an item; the item was skipped.
    BadItem,
    /// A whole chunk failed (retries exhausted, or a permanent error).
    Chunk,
}

impl FailureClass {
    /// The class as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::BadData => "bad_data",
            FailureClass::BadItem => "bad_item",
            FailureClass::Chunk => "chunk",
        }
    }
}

impl FromStr for FailureClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "bad_data" => FailureClass::BadData,
            "bad_item" => FailureClass::BadItem,
            "chunk" => FailureClass::Chunk,
            other => return Err(format!("unknown failure class {other:?}")),
        })
    }
}

/// One failure, with where it is in the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureRecord {
    /// The chunk, when there is one (bad data is found before a chunk exists).
    pub seq: Option<u64>,
    /// The line number of the item, or of the chunk's first item (for a query: its ordinal in
    /// the scan).
    pub position: u64,
    /// For a source read by key (a query), the item's key as JSON (a chunk's: its first
    /// row's, when known).
    pub key: Option<String>,
    /// Bad data, a bad item, or a whole chunk.
    pub class: FailureClass,
    /// Why, as the reader or the processor said it: what to fix before `retry`.
    pub reason: String,
}

/// A record the dispatcher could not read, with where it lies in the source, so that `retry`
/// can seek to it once the input is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadData {
    /// Where the record starts.
    pub position: Position,
    /// The byte offset just past it.
    pub end_offset: u64,
    /// Its last line.
    pub end_line: u64,
    /// Why it could not be read.
    pub reason: String,
    /// For a source read by key, the record's key: how `retry` finds it.
    pub key: Option<String>,
}

/// Something a `retry` dispatched again, so that it no longer counts as failed: a failed or
/// dead chunk (by seq), or a skipped item (by the failure's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retried {
    /// A failed or dead chunk; its chunk failure goes with it.
    Chunk(u64),
    /// A bad-data or bad-item failure.
    Failure(i64),
}

/// Where a failed stretch of the input lies now that the operator fixed it (records that got
/// longer or shorter move what follows them): the row, and its new start and end offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    /// A chunk (by seq) or a bad record's failure (by id).
    pub row: Retried,
    /// Byte offset of its start, now.
    pub offset: u64,
    /// Byte offset past its end, now.
    pub end_offset: u64,
}

/// Who "replies" for the chunks `cancel` took back from the queues: the store records them
/// `dead` with the reason as given, not as parked on the dead queue.
pub(crate) const CANCELLED_BY: &str = "hopper-dispatcher (cancel)";

/// Tells whether the dispatcher that owns a run is alive ([`crate::owner::owner_alive`]); the
/// store asks it inside the transaction that takes a run, so that the check and the claim are
/// one step.
pub(crate) type Alive = fn(&RunRecord) -> bool;

/// What taking a run (creating, resuming or retrying it) came to.
#[derive(Debug, Clone)]
pub(crate) enum Claimed<T> {
    /// This dispatcher owns the run now.
    Won(T),
    /// A live dispatcher owns a run of the job (this one, or another that has not ended):
    /// nothing was changed.
    Held(Box<RunRecord>),
}

/// The right to write a run: its id and the token of the dispatcher that created, resumed or
/// retried it last. Every write of a run's state checks the token in the same transaction
/// (compare and set), so a dispatcher that lost the run to another stops at its next write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    /// The run.
    pub run: RunId,
    /// Unique per dispatcher: `host/pid#process-start#nanos`.
    pub token: String,
}

impl Fence {
    /// A new token, unique to this dispatcher: its process (with when that process started,
    /// so that a reused pid is not taken for it) and when it made the token.
    pub(crate) fn token() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let started = hopper_common::process::started_at(std::process::id()).unwrap_or(0);
        format!("{}#{started}#{nanos}", hopper_common::process::identity())
    }

    /// The token's process (`host/pid`), as `status` and errors show it.
    pub(crate) fn holder(token: &str) -> &str {
        token.split_once('#').map_or(token, |(who, _)| who)
    }

    /// The token's process: host, pid, and when it started.
    pub(crate) fn process(token: &str) -> Option<(&str, u32, u64)> {
        let mut parts = token.split('#');
        let (host, pid) = parts.next()?.rsplit_once('/')?;
        let started = parts.next()?.parse().ok()?;
        Some((host, pid.parse().ok()?, started))
    }
}

/// What [`ContextStore::record`] writes, in one transaction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordBatch<'a> {
    /// The chunks about to be published, in seq order (none when only bad records were read).
    pub chunks: &'a [NewChunk],
    /// Where reading stands after them.
    pub checkpoint: &'a Checkpoint,
    /// Records that could not be read, skipped.
    pub bad_data: &'a [BadData],
    /// True when these chunks and bad records were read again by `retry`: their items were
    /// counted as read the first time.
    pub retry: bool,
    /// The failures these chunks (and bad records) take over from.
    pub retried: &'a [Retried],
}

/// A failed or dead chunk that `retry` has not dispatched again yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailedChunk {
    /// The chunk's number in its run.
    pub seq: u64,
    /// Where it starts in the source: where `retry` seeks to.
    pub position: Position,
    /// The byte offset just past its last record.
    pub end_offset: u64,
    /// Its last line: where `retry` stops reading it.
    pub end_line: u64,
    /// For a source read by key, its rows' keys: what `retry` reads again.
    pub keys: Option<Keys>,
}

/// A skipped item that `retry` has not dispatched again yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenFailure {
    /// The failure's id in the store.
    pub id: i64,
    /// Its chunk (bad items), if any.
    pub seq: Option<u64>,
    /// The line it starts on: what `retry` looks for.
    pub line: u64,
    /// Bad data or bad item.
    pub class: FailureClass,
    /// For bad data, where the record starts and ends (always there: the store refuses a bad
    /// record without it); `None` for a bad item, which is read by its chunk's span.
    pub span: Option<(Position, u64, u64)>,
    /// For a source read by key, the record's key: how `retry` finds it.
    pub key: Option<String>,
}

/// What a run has failed on and `retry` may dispatch again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Retryable {
    /// Failed and dead chunks, in seq order.
    pub chunks: Vec<FailedChunk>,
    /// Skipped items (bad data and bad items), in line order.
    pub failures: Vec<OpenFailure>,
    /// Where the chunks that hold bad items lie: seq, start, end offset and last line.
    pub hosts: Vec<FailedChunk>,
}

/// What [`ContextStore::apply_replies`] did with one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The reply changed the chunk.
    Recorded,
    /// The chunk already had this outcome, or a final one; nothing changed.
    Duplicate,
    /// An outcome of an older attempt while a newer one is under way; nothing changed, and the
    /// chunk still waits for the newer attempt's outcome.
    Stale,
    /// No such chunk in this store (another store's run, or a deleted one); nothing changed.
    Unknown,
}
