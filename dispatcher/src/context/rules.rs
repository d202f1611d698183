//! What every store decides the same way, whatever SQL it speaks: whether a reply changes a
//! chunk, what a failed chunk's failure says, how failures count in a run's items, which chunks
//! in progress are stuck, and how a run's throttle is kept. A store reads rows and writes rows;
//! the decisions are here, once, so that SQLite and PostgreSQL cannot drift apart.

use hopper_common::job::Throttle;
use hopper_common::{Outcome, Reply};

use super::model::{Applied, ChunkStatus, FailureClass, FailureRecord, CANCELLED_BY};
use super::report::{InProgress, ItemCounts, RecentReading, StuckAfter, StuckChunk};

/// What `reply` does to a chunk that stands at `status` after `attempts` attempts:
/// [`Applied::Recorded`] when it changes it.
///
/// Done is final: nothing changes a done chunk. An outcome of an older attempt never overrides
/// a newer attempt's: a copy of attempt 1 that fails late (its consumer was slow, or the broker
/// delivered it twice) is [`Applied::Stale`] once attempt 2 exists. A failed or dead chunk
/// changes only for an outcome of a newer attempt, which proves the failure was not the last
/// word.
pub(crate) fn decide(status: ChunkStatus, attempts: u32, reply: &Reply) -> Applied {
    let attempt = reply.attempt;
    let ended = match status {
        ChunkStatus::Done | ChunkStatus::Failed | ChunkStatus::Dead => true,
        ChunkStatus::Pending | ChunkStatus::InFlight => false,
    };
    let change = match status {
        ChunkStatus::Done => false,
        ChunkStatus::Failed | ChunkStatus::Dead => {
            attempt > attempts && !matches!(reply.outcome, Outcome::Processing { .. })
        }
        ChunkStatus::Pending | ChunkStatus::InFlight => match &reply.outcome {
            Outcome::Done { .. } => true,
            Outcome::Processing { .. } => attempt >= attempts,
            Outcome::Retrying { next_attempt, .. } => *next_attempt > attempts,
            Outcome::Dead { .. } | Outcome::Failed { .. } => attempt >= attempts,
        },
    };
    match (change, ended) {
        (true, _) => Applied::Recorded,
        (false, true) => Applied::Duplicate,
        // A retry already applied is a duplicate; another outcome of an older attempt is stale.
        (false, false) => match reply.outcome {
            Outcome::Retrying { .. } => Applied::Duplicate,
            _ if attempt < attempts => Applied::Stale,
            _ => Applied::Duplicate,
        },
    }
}

/// For a reply that ends its chunk without processing it (`Dead`, or `Failed`), with its
/// `error`: the status the chunk takes and the failure's reason, as `status` lists it.
pub(crate) fn chunk_failure(reply: &Reply, error: &str) -> (ChunkStatus, String) {
    if let Outcome::Failed { .. } = reply.outcome {
        return (ChunkStatus::Failed, format!("failed permanently: {error}"));
    }
    if reply.consumer == CANCELLED_BY {
        // Taken back by `cancel`: never parked anywhere, the reason says what happened.
        return (ChunkStatus::Dead, error.to_string());
    }
    (
        ChunkStatus::Dead,
        format!(
            "parked on the dead queue at attempt {}: {error}",
            reply.attempt
        ),
    )
}

/// The failures a `Done` reply reports: its bad items, each with its line and key.
pub(crate) fn bad_items(reply: &Reply) -> Vec<FailureRecord> {
    match &reply.outcome {
        Outcome::Done { bad_items, .. } => bad_items
            .iter()
            .map(|b| FailureRecord {
                seq: Some(reply.seq),
                position: b.line,
                key: b.key.clone(),
                class: FailureClass::BadItem,
                reason: b.reason.clone(),
            })
            .collect(),
        Outcome::Retrying { .. }
        | Outcome::Processing { .. }
        | Outcome::Dead { .. }
        | Outcome::Failed { .. } => Vec::new(),
    }
}

/// Counts one failure row into a run's items; true when it still stands (`status` lists it).
///
/// Records read count as they stand: a bad record is read but never put in a chunk; a bad item
/// dispatched again by `retry` is counted by its chunk and by the retry chunk that took it over,
/// so it comes off once.
pub(crate) fn count_failure(items: &mut ItemCounts, class: FailureClass, retried: bool) -> bool {
    match (class, retried) {
        (FailureClass::BadData, false) => items.read += 1,
        (FailureClass::BadItem, true) => items.read = items.read.saturating_sub(1),
        (FailureClass::BadData, true)
        | (FailureClass::BadItem, false)
        | (FailureClass::Chunk, _) => {}
    }
    if retried {
        return false;
    }
    match class {
        FailureClass::BadData | FailureClass::BadItem => items.skipped += 1,
        FailureClass::Chunk => {}
    }
    true
}

/// The chunks in progress that need a person's look at `now`, with why.
pub(crate) fn stuck(in_progress: &[InProgress], rules: StuckAfter, now: u64) -> Vec<StuckChunk> {
    in_progress
        .iter()
        .filter_map(|c| {
            let (silent, processing) =
                (now.saturating_sub(c.noted_at), now.saturating_sub(c.since));
            let reason = if silent > rules.silent.as_millis() as u64 {
                format!(
                    "its consumer sent no note for {}s (it notes every heartbeat while it works)",
                    silent / 1000
                )
            } else if processing > rules.processing.as_millis() as u64 {
                format!(
                    "processed for {}s, past chunk_timeout ({}s), and not cancelled",
                    processing / 1000,
                    rules.processing.as_secs()
                )
            } else {
                return None;
            };
            Some(StuckChunk {
                seq: c.seq,
                consumer: c.consumer.clone(),
                since: c.since,
                attempt: c.attempt,
                reason,
            })
        })
        .collect()
}

/// How far back `status` looks for the recent reading rate, in ms.
pub(crate) const RECENT_MS: u64 = 60_000;

/// The recent reading from the span of the chunks the broker confirmed since [`RECENT_MS`]
/// ago (first offset, last end offset, first confirmation), at `now`.
pub(crate) fn recent(
    from: Option<i64>,
    to: Option<i64>,
    first: Option<i64>,
    now: u64,
) -> Option<RecentReading> {
    match (from, to, first) {
        (Some(from), Some(to), Some(first)) if to > from => Some(RecentReading {
            bytes: (to - from) as u64,
            millis: now.saturating_sub(first as u64).max(1),
        }),
        _ => None,
    }
}

/// A run's throttle as stored: `{"window": N, "rate": R, "ramp_up_ms": MS}`.
pub(crate) fn throttle_from_json(text: &str) -> Option<Throttle> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(Throttle {
        window: usize::try_from(v["window"].as_u64()?).ok()?,
        rate: v["rate"].as_f64()?,
        ramp_up: std::time::Duration::from_millis(v["ramp_up_ms"].as_u64()?),
    })
}

/// The stored form of a run's throttle.
pub(crate) fn throttle_to_json(t: &Throttle) -> String {
    serde_json::json!({
        "window": t.window,
        "rate": t.rate,
        "ramp_up_ms": t.ramp_up.as_millis() as u64,
    })
    .to_string()
}
