//! The two messages that cross the broker: a [`Chunk`] of items (dispatcher to consumers) and a
//! [`Reply`] (consumer to dispatcher).
//!
//! Every message names its job, run, seq and attempt, so that a reply can be matched to its chunk
//! record exactly once, whichever run or consumer it comes from.

use serde::{Deserialize, Serialize};

/// `<run>/<seq>/<attempt>`: the AMQP message id of a chunk and of its reply, readable in the
/// management UI. The one place this format is written.
pub fn message_id(run: u64, seq: u64, attempt: u32) -> String {
    format!("{run}/{seq}/{attempt}")
}

/// Where a chunk starts in its source, so that it can be read again without a scan from the top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    /// The 1-based line number of the chunk's first record.
    pub line: u64,
    /// The byte offset of the chunk's first record.
    pub offset: u64,
}

/// One item: a JSON value and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// 1-based line number in the source (for CSV, the line the record starts on).
    pub line: u64,
    /// The item as JSON text. Kept as text so that the dispatcher only validates it and the
    /// consumer parses it only if its processor needs to.
    pub data: String,
}

impl Item {
    /// Parses the item into `T`.
    ///
    /// # Errors
    /// When the JSON does not fit `T`; a processor usually reports that as a bad item.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.data)
    }
}

/// A chunk of items: the unit of work, of retry and of acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The job's name: a consumer parks a chunk of another job found on its queue.
    pub job: String,
    /// The run this chunk belongs to; with `seq`, the chunk's identity, which a processor keys
    /// its effect on to stay idempotent.
    pub run: u64,
    /// The chunk's number within its run, from 1.
    pub seq: u64,
    /// 1 for the first delivery; the consumer raises it when it sends the chunk to a retry queue.
    pub attempt: u32,
    /// Where the chunk starts in the source.
    pub position: Position,
    /// For a source read by key (a query): the item fields that make an item's key, so that a
    /// bad item can be reported by its key ([`BadItem::key`]). Empty for a file, whose items
    /// are known by their line.
    pub key: Vec<String>,
    /// The items, in source order.
    pub items: Vec<Item>,
}

impl Chunk {
    /// `<run>/<seq>/<attempt>`: the AMQP message id, readable in the management UI.
    pub fn message_id(&self) -> String {
        message_id(self.run, self.seq, self.attempt)
    }
}

/// An item a processor could not take, reported with its position and reason. It is skipped;
/// the rest of the chunk counts as done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadItem {
    /// The item's line number in the source (for a query, its ordinal in the scan).
    pub line: u64,
    /// Why it was refused, for the operator.
    pub reason: String,
    /// For a chunk of a keyed source, the item's key as JSON (a value, or an array for a
    /// composite key): how `retry` finds the row again. The consumer fills it in from the
    /// chunk's [`Chunk::key`]; a processor leaves it `None`.
    pub key: Option<String>,
}

/// What became of one attempt at a chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Processed and committed; `bad_items` were skipped.
    Done {
        /// Items processed successfully.
        processed: u64,
        /// Items skipped, with their positions.
        bad_items: Vec<BadItem>,
    },
    /// A transient failure; the chunk was sent to a delay queue and comes back as
    /// `next_attempt`. Not final.
    Retrying {
        /// What went wrong.
        error: String,
        /// The attempt number it comes back with.
        next_attempt: u32,
    },
    /// A transient failure on the last allowed attempt; the chunk was parked on the dead queue.
    Dead {
        /// The last error.
        error: String,
    },
    /// Not an outcome yet: the attempt is being processed, for `elapsed_ms` so far. A consumer
    /// sends this note once a chunk has run a while, then at every heartbeat until it ends
    /// ([`NoteTiming`]), so that `status` can show what is in progress and what is stuck. Fast
    /// chunks never send one.
    Processing {
        /// How long the attempt has been processed, by the consumer's clock.
        elapsed_ms: u64,
    },
    /// A permanent failure (the processor says retrying cannot help); the chunk was parked on the
    /// dead queue.
    Failed {
        /// What went wrong.
        error: String,
    },
}

impl Outcome {
    /// True when no further reply is expected for this chunk.
    pub fn is_final(&self) -> bool {
        match self {
            Outcome::Done { .. } | Outcome::Dead { .. } | Outcome::Failed { .. } => true,
            Outcome::Retrying { .. } | Outcome::Processing { .. } => false,
        }
    }
}

/// A consumer's reply about one attempt at one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The job, run, seq and attempt of the chunk it answers: the dispatcher applies a reply to
    /// exactly that chunk record, whichever run is current.
    pub job: String,
    /// See `job`.
    pub run: u64,
    /// See `job`.
    pub seq: u64,
    /// See `job`; an outcome of an older attempt never overrides a newer one's.
    pub attempt: u32,
    /// Which consumer processed it (`host/pid`), for `status`.
    pub consumer: String,
    /// What became of the attempt; [`Outcome::is_final`] tells whether another reply follows.
    pub outcome: Outcome,
}

/// When consumers tell the dispatcher about a chunk they are processing, and when the dispatcher
/// takes a silent one for gone. Both sides derive it from the job's `broker.heartbeat`, so they
/// agree without asking each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoteTiming {
    /// The first note, once processing has run this long: chunks faster than this send none.
    pub first: std::time::Duration,
    /// Then one note every this long.
    pub every: std::time::Duration,
    /// A chunk whose consumer sent no note for this long is reported stuck.
    pub silent: std::time::Duration,
}

impl NoteTiming {
    /// The timing of `job`: a first note after 5 s (sooner with a shorter heartbeat), then one
    /// per heartbeat; silent for three heartbeats and a first note's time is gone.
    pub fn for_job(job: &crate::Job) -> NoteTiming {
        let every = job.broker_heartbeat;
        let first = every.min(std::time::Duration::from_secs(5));
        NoteTiming {
            first,
            every,
            silent: every * 3 + first,
        }
    }
}
