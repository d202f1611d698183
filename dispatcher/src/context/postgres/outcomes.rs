//! Applying replies: each outcome at most once per chunk, a later attempt's over an earlier
//! one's (as [`rules::decide`] says), and the failures it reports beside it. The chunk's row is
//! locked while its reply is applied.

use hopper_common::{Outcome, Reply};

use super::{Fail, Tx};
use crate::context::{
    now_ms, rules, Applied, ChunkStatus, FailureClass, FailureRecord, Fence, Keys, RunId,
};

async fn insert_failures(tx: &Tx<'_>, run: RunId, failures: &[FailureRecord]) -> Result<(), Fail> {
    if failures.is_empty() {
        return Ok(());
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO failures (run, seq, position, class, reason, key)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    for f in failures {
        tx.execute(
            &insert,
            &[
                &(run as i64),
                &f.seq.map(|s| s as i64),
                &(f.position as i64),
                &f.class.as_str(),
                &f.reason,
                &f.key,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Applies one reply inside `tx`.
async fn apply_one(tx: &Tx<'_>, reply: &Reply) -> Result<Applied, Fail> {
    let (run, seq, now) = (reply.run as i64, reply.seq as i64, now_ms() as i64);
    let find = tx
        .prepare_cached(
            "SELECT c.status, c.attempts, c.line, c.keys FROM chunks c JOIN runs r ON r.id = c.run
             WHERE c.run = $1 AND c.seq = $2 AND r.job = $3 FOR UPDATE OF c",
        )
        .await?;
    let Some(row) = tx.query_opt(&find, &[&run, &seq, &reply.job]).await? else {
        return Ok(Applied::Unknown);
    };
    let status: ChunkStatus = row
        .try_get::<_, String>(0)?
        .parse()
        .map_err(Fail::Corrupt)?;
    let attempts: i64 = row.try_get(1)?;
    let line: i64 = row.try_get(2)?;
    let keys: Option<String> = row.try_get(3)?;
    match rules::decide(status, attempts as u32, reply) {
        Applied::Recorded => {}
        other => return Ok(other),
    }
    let attempt = i64::from(reply.attempt);
    if matches!(status, ChunkStatus::Failed | ChunkStatus::Dead) {
        // A newer attempt answered after an older one failed: that failure no longer stands.
        tx.execute(
            "DELETE FROM failures WHERE run = $1 AND seq = $2 AND class = 'chunk'",
            &[&run, &seq],
        )
        .await?;
    }
    let finish = tx
        .prepare_cached(
            "UPDATE chunks SET status = $3, processed = $4, attempts = GREATEST(attempts, $5),
             finished_at = $6, last_error = COALESCE($7, last_error), consumer = $8
             WHERE run = $1 AND seq = $2",
        )
        .await?;
    match &reply.outcome {
        Outcome::Done { processed, .. } => {
            tx.execute(
                &finish,
                &[
                    &run,
                    &seq,
                    &ChunkStatus::Done.as_str(),
                    &(*processed as i64),
                    &attempt,
                    &now,
                    &None::<String>,
                    &reply.consumer,
                ],
            )
            .await?;
            insert_failures(tx, reply.run, &rules::bad_items(reply)).await?;
        }
        Outcome::Retrying {
            error,
            next_attempt,
        } => {
            // The chunk comes back after its delay; its next attempt is not in progress yet.
            tx.execute(
                "UPDATE chunks SET status = 'in_flight', attempts = $3, last_error = $4,
                 consumer = $5, dispatched_at = $6, processing_since = NULL, noted_at = NULL
                 WHERE run = $1 AND seq = $2",
                &[
                    &run,
                    &seq,
                    &i64::from(*next_attempt),
                    error,
                    &reply.consumer,
                    &now,
                ],
            )
            .await?;
        }
        Outcome::Processing { elapsed_ms } => {
            // Since when, by this clock: the consumer's own clock may differ.
            tx.execute(
                "UPDATE chunks SET consumer = $3, processing_since = $4, noted_at = $5
                 WHERE run = $1 AND seq = $2",
                &[
                    &run,
                    &seq,
                    &reply.consumer,
                    &now.saturating_sub(*elapsed_ms as i64),
                    &now,
                ],
            )
            .await?;
        }
        Outcome::Dead { error } | Outcome::Failed { error } => {
            let (status, reason) = rules::chunk_failure(reply, error);
            tx.execute(
                &finish,
                &[
                    &run,
                    &seq,
                    &status.as_str(),
                    &0i64,
                    &attempt,
                    &now,
                    error,
                    &reply.consumer,
                ],
            )
            .await?;
            let first_key = keys
                .as_deref()
                .map(Keys::parse)
                .transpose()
                .map_err(Fail::Corrupt)?
                .and_then(|k| k.first().map(str::to_string));
            let failure = FailureRecord {
                seq: Some(reply.seq),
                position: line as u64,
                key: first_key,
                class: FailureClass::Chunk,
                reason,
            };
            insert_failures(tx, reply.run, &[failure]).await?;
        }
    }
    Ok(Applied::Recorded)
}

pub(super) async fn apply(
    tx: &Tx<'_>,
    fence: &Fence,
    replies: &[Reply],
) -> Result<Vec<Applied>, Fail> {
    let owner = super::runs::owner(tx).await?;
    let apply = async {
        let mut applied = Vec::with_capacity(replies.len());
        for reply in replies {
            applied.push(apply_one(tx, reply).await?);
        }
        Ok::<_, Fail>(applied)
    };
    // The ownership check is sent first and the replies right behind it, in one transaction:
    // when the check fails, nothing they wrote is committed.
    let ((), applied) = futures::try_join!(super::runs::owned(tx, &owner, fence), apply)?;
    Ok(applied)
}
