//! Applying replies: each outcome at most once per chunk, a later attempt's over an earlier
//! one's, and the failures it reports (bad items, a failed or dead chunk) beside it.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::Fail;
use crate::context::{
    now_ms, rules, Applied, ChunkStatus, FailureClass, FailureRecord, Fence, Keys, RunId,
};
use hopper_common::{Outcome, Reply};

fn insert_failures(
    tx: &rusqlite::Transaction<'_>,
    run: RunId,
    failures: &[FailureRecord],
) -> Result<(), Fail> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO failures (run, seq, position, class, reason, key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for f in failures {
        stmt.execute(params![
            run as i64,
            f.seq.map(|s| s as i64),
            f.position as i64,
            f.class.as_str(),
            f.reason,
            f.key
        ])?;
    }
    Ok(())
}

/// Applies one reply inside `tx`, as [`decide`] says.
fn apply_one(tx: &rusqlite::Transaction<'_>, reply: &Reply) -> Result<Applied, Fail> {
    // The statements of every reply are cached: parsing them again for each cost the
    // dispatcher about as much as running them.
    let found: Option<(String, i64, i64, Option<String>)> = tx
        .prepare_cached(
            "SELECT c.status, c.attempts, c.line, c.keys FROM chunks c JOIN runs r ON r.id = c.run
             WHERE c.run = ?1 AND c.seq = ?2 AND r.job = ?3",
        )?
        .query_row(
            params![reply.run as i64, reply.seq as i64, reply.job],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((status, attempts, line, keys)) = found else {
        return Ok(Applied::Unknown);
    };
    let status: ChunkStatus = status.parse().map_err(Fail::Corrupt)?;
    match rules::decide(status, attempts as u32, reply) {
        Applied::Recorded => {}
        other => return Ok(other),
    }
    let (run, seq, now) = (reply.run as i64, reply.seq as i64, now_ms() as i64);
    let attempt = i64::from(reply.attempt);
    if matches!(status, ChunkStatus::Failed | ChunkStatus::Dead) {
        // A newer attempt answered after an older one failed: that failure no longer stands.
        tx.execute(
            "DELETE FROM failures WHERE run = ?1 AND seq = ?2 AND class = 'chunk'",
            params![run, seq],
        )?;
    }
    let finish = |tx: &rusqlite::Transaction<'_>,
                  status: ChunkStatus,
                  processed: u64,
                  error: Option<&str>| {
        tx.prepare_cached(
            "UPDATE chunks SET status = ?3, processed = ?4, attempts = MAX(attempts, ?5),
             finished_at = ?6, last_error = COALESCE(?7, last_error), consumer = ?8
             WHERE run = ?1 AND seq = ?2",
        )?
        .execute(params![
            run,
            seq,
            status.as_str(),
            processed as i64,
            attempt,
            now,
            error,
            reply.consumer
        ])
    };
    match &reply.outcome {
        Outcome::Done { processed, .. } => {
            finish(tx, ChunkStatus::Done, *processed, None)?;
            insert_failures(tx, reply.run, &rules::bad_items(reply))?;
        }
        Outcome::Retrying {
            error,
            next_attempt,
        } => {
            // The chunk comes back after its delay; its next attempt is not in progress yet.
            tx.execute(
                "UPDATE chunks SET status = 'in_flight', attempts = ?3, last_error = ?4,
                 consumer = ?5, dispatched_at = ?6, processing_since = NULL, noted_at = NULL
                 WHERE run = ?1 AND seq = ?2",
                params![
                    run,
                    seq,
                    i64::from(*next_attempt),
                    error,
                    reply.consumer,
                    now
                ],
            )?;
        }
        Outcome::Processing { elapsed_ms } => {
            // Since when, by this clock: the consumer's own clock may differ.
            tx.execute(
                "UPDATE chunks SET consumer = ?3, processing_since = ?4, noted_at = ?5
                 WHERE run = ?1 AND seq = ?2",
                params![
                    run,
                    seq,
                    reply.consumer,
                    now.saturating_sub(*elapsed_ms as i64),
                    now
                ],
            )?;
        }
        Outcome::Dead { error } | Outcome::Failed { error } => {
            let (status, reason) = rules::chunk_failure(reply, error);
            finish(tx, status, 0, Some(error))?;
            let first_key = keys
                .as_deref()
                .map(Keys::parse)
                .transpose()
                .map_err(Fail::Corrupt)?
                .and_then(|k| k.first().map(str::to_string));
            insert_failures(
                tx,
                reply.run,
                &[FailureRecord {
                    seq: Some(reply.seq),
                    position: line as u64,
                    key: first_key,
                    class: FailureClass::Chunk,
                    reason,
                }],
            )?;
        }
    }
    Ok(Applied::Recorded)
}

pub(super) fn apply(
    conn: &mut Connection,
    fence: &Fence,
    replies: &[Reply],
) -> Result<Vec<Applied>, Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    super::runs::check(&tx, fence)?;
    let applied = replies
        .iter()
        .map(|r| apply_one(&tx, r))
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(applied)
}
