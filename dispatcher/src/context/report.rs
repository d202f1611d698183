//! What `status` reads from the execution context: counts derived from the rows, the chunks in
//! progress, the stuck ones and the rules that tell them, and the whole status of a run.

use serde::Serialize;

use super::model::{FailureRecord, RunRecord};

/// Chunk counts by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ChunkCounts {
    /// All chunks recorded.
    pub total: u64,
    /// Recorded, not yet confirmed by the broker.
    pub pending: u64,
    /// Confirmed, no final reply yet.
    pub in_flight: u64,
    /// Processed.
    pub done: u64,
    /// Failed permanently.
    pub failed: u64,
    /// Parked on the dead queue after their last attempt.
    pub dead: u64,
    /// Failed or dead, then dispatched again by `retry` (counted here, not as failed or dead).
    pub retried: u64,
}

/// Item counts, derived from the chunk and failure rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ItemCounts {
    /// Records read from the source, bad ones included.
    pub read: u64,
    /// Items processed successfully.
    pub processed: u64,
    /// Items skipped as bad data or bad items (and not dispatched again by `retry`).
    pub skipped: u64,
    /// Items in failed or dead chunks (not dispatched again by `retry`).
    pub failed: u64,
}

/// A chunk a consumer is processing and has told the dispatcher about (chunks that run long
/// send notes; fast ones never show here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InProgress {
    /// The chunk being processed.
    pub seq: u64,
    /// The attempt being processed.
    pub attempt: u32,
    /// The consumer processing it (`host/pid`).
    pub consumer: Option<String>,
    /// Since when it has been processed (time in a queue does not count), ms since the Unix
    /// epoch.
    pub since: u64,
    /// The consumer's last note, ms since the Unix epoch.
    pub noted_at: u64,
}

/// A chunk in progress that needs a person's look: its consumer went silent, or its processing
/// passed `chunk_timeout` (the consumer should have cancelled it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StuckChunk {
    /// The stuck chunk.
    pub seq: u64,
    /// The consumer that was processing it, to look at first.
    pub consumer: Option<String>,
    /// Since when it has been processed, ms since the Unix epoch.
    pub since: u64,
    /// The attempt it is at.
    pub attempt: u32,
    /// Why it counts as stuck, for people.
    pub reason: String,
}

/// When `status` counts a chunk in progress as stuck: processed longer than `processing` (the
/// job's `chunk_timeout`), or no note from its consumer for `silent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StuckAfter {
    /// The job's `retry.chunk_timeout`.
    pub processing: std::time::Duration,
    /// [`hopper_common::NoteTiming::silent`].
    pub silent: std::time::Duration,
}

impl StuckAfter {
    /// The rules of `job`.
    pub(crate) fn for_job(job: &hopper_common::Job) -> StuckAfter {
        StuckAfter {
            processing: job.retry.chunk_timeout,
            silent: hopper_common::NoteTiming::for_job(job).silent,
        }
    }
}

/// Everything `status` shows about a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunStatus {
    /// The run as stored: its state, times, owner and checkpoint.
    pub run: RunRecord,
    /// Records read, processed, skipped and failed.
    pub items: ItemCounts,
    /// Chunks by where they stand.
    pub chunks: ChunkCounts,
    /// Every failure still standing (not dispatched again by `retry`), in source order.
    pub failures: Vec<FailureRecord>,
    /// Chunks that consumers are processing and have said so (chunks that run long).
    pub in_progress: Vec<InProgress>,
    /// Chunks in progress whose consumer went silent or whose processing passed
    /// `chunk_timeout`.
    pub stuck: Vec<StuckChunk>,
    /// How fast the input was read lately: for an estimate of the time left.
    pub recent: Option<RecentReading>,
}

/// The input read by the chunks the broker confirmed within the last minute: bytes over the
/// time since the first of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecentReading {
    /// Bytes of input those chunks span.
    pub bytes: u64,
    /// Milliseconds from the first of them to now.
    pub millis: u64,
}
