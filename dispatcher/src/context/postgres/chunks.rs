//! The `chunks` table as the dispatch loop writes it: chunks recorded (with the checkpoint and
//! bad records, in one transaction) before they are published, confirmed by the broker, and
//! those without a final outcome read back on resume. A batch of chunks is one statement each
//! way (arrays unnested), not one per chunk: the database is across a network.

use hopper_common::Position;

use super::{Fail, Tx};
use crate::context::{now_ms, ChunkRecord, Fence, Keys, RecordBatch, Retried, RunId};

pub(super) async fn record(tx: &Tx<'_>, fence: &Fence, batch: RecordBatch<'_>) -> Result<(), Fail> {
    let run = fence.run as i64;
    let now = now_ms() as i64;
    let column = |f: fn(&crate::context::NewChunk) -> u64| -> Vec<i64> {
        batch.chunks.iter().map(|c| f(c) as i64).collect()
    };
    let (seqs, lines, starts) = (
        column(|c| c.seq),
        column(|c| c.position.line),
        column(|c| c.position.offset),
    );
    let (ends, items, end_lines) = (
        column(|c| c.end_offset),
        column(|c| c.items),
        column(|c| c.end_line),
    );
    let keys: Vec<Option<String>> = batch
        .chunks
        .iter()
        .map(|c| c.keys.as_ref().map(Keys::to_text))
        .collect();
    let owner = super::runs::owner(tx).await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO chunks (run, seq, line, start_offset, end_offset, items, status,
                                 end_line, retry, keys)
             SELECT $1, u.seq, u.line, u.start_offset, u.end_offset, u.items, 'pending',
                    u.end_line, $2, u.keys
             FROM unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                         $7::bigint[], $8::bigint[], $9::text[])
                  AS u (seq, line, start_offset, end_offset, items, end_line, keys)",
        )
        .await?;
    let update = tx
        .prepare_cached(
            "UPDATE runs SET ckpt_offset = $2, ckpt_line = $3, next_seq = $4, exhausted = $5,
             heartbeat_at = $6, ckpt_key = $7 WHERE id = $1",
        )
        .await?;
    let chunks = async {
        if !batch.chunks.is_empty() {
            tx.execute(
                &insert,
                &[
                    &run,
                    &batch.retry,
                    &seqs,
                    &lines,
                    &starts,
                    &ends,
                    &items,
                    &end_lines,
                    &keys,
                ],
            )
            .await?;
        }
        Ok::<(), Fail>(())
    };
    let ckpt = batch.checkpoint;
    let (offset, line, next_seq) = (ckpt.offset as i64, ckpt.line as i64, ckpt.next_seq as i64);
    let checkpoint = async {
        tx.execute(
            &update,
            &[
                &run,
                &offset,
                &line,
                &next_seq,
                &ckpt.exhausted,
                &now,
                &ckpt.key,
            ],
        )
        .await?;
        Ok::<(), Fail>(())
    };
    // The ownership check, the chunks and the checkpoint go in one pipeline (one round trip,
    // not three; the check is sent first, so it still locks the run's row first). They are
    // one transaction: when the check fails, nothing of the others is committed.
    futures::try_join!(super::runs::owned(tx, &owner, fence), chunks, checkpoint)?;
    for b in batch.bad_data {
        tx.execute(
            "INSERT INTO failures (run, seq, position, class, reason, start_offset, end_offset,
                                   end_line, retry, key)
             VALUES ($1, NULL, $2, 'bad_data', $3, $4, $5, $6, $7, $8)",
            &[
                &run,
                &(b.position.line as i64),
                &b.reason,
                &(b.position.offset as i64),
                &(b.end_offset as i64),
                &(b.end_line as i64),
                &batch.retry,
                &b.key,
            ],
        )
        .await?;
    }
    for r in batch.retried {
        match *r {
            Retried::Chunk(seq) => {
                let seq = seq as i64;
                tx.execute(
                    "UPDATE chunks SET retried_at = $3 WHERE run = $1 AND seq = $2
                       AND retried_at IS NULL",
                    &[&run, &seq, &now],
                )
                .await?;
                tx.execute(
                    "UPDATE failures SET retried_at = $3 WHERE run = $1 AND seq = $2
                       AND class = 'chunk' AND retried_at IS NULL",
                    &[&run, &seq, &now],
                )
                .await?;
            }
            Retried::Failure(id) => {
                tx.execute(
                    "UPDATE failures SET retried_at = $3 WHERE run = $1 AND id = $2
                       AND retried_at IS NULL",
                    &[&run, &id, &now],
                )
                .await?;
            }
        }
    }
    Ok(())
}

pub(super) async fn mark_in_flight(tx: &Tx<'_>, fence: &Fence, seqs: &[u64]) -> Result<(), Fail> {
    let seqs: Vec<i64> = seqs.iter().map(|&s| s as i64).collect();
    let now = now_ms() as i64;
    let owner = super::runs::owner(tx).await?;
    let update = tx
        .prepare_cached(
            "UPDATE chunks SET status = 'in_flight', dispatched_at = $3
             WHERE run = $1 AND seq = ANY($2) AND status = 'pending'",
        )
        .await?;
    let mark = async {
        tx.execute(&update, &[&(fence.run as i64), &seqs, &now])
            .await?;
        Ok::<(), Fail>(())
    };
    // One pipeline, as in `record`.
    futures::try_join!(super::runs::owned(tx, &owner, fence), mark)?;
    Ok(())
}

pub(super) async fn open(tx: &Tx<'_>, run: RunId) -> Result<Vec<ChunkRecord>, Fail> {
    let rows = tx
        .query(
            "SELECT seq, line, start_offset, end_offset, items, status, attempts, keys
             FROM chunks WHERE run = $1 AND status IN ('pending', 'in_flight') ORDER BY seq",
            &[&(run as i64)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let status: String = r.try_get(5)?;
            let keys: Option<String> = r.try_get(7)?;
            Ok(ChunkRecord {
                seq: r.try_get::<_, i64>(0)? as u64,
                position: Position {
                    line: r.try_get::<_, i64>(1)? as u64,
                    offset: r.try_get::<_, i64>(2)? as u64,
                },
                end_offset: r.try_get::<_, i64>(3)? as u64,
                items: r.try_get::<_, i64>(4)? as u64,
                status: status.parse().map_err(Fail::Corrupt)?,
                attempts: r.try_get::<_, i64>(6)? as u32,
                keys: keys
                    .as_deref()
                    .map(Keys::parse)
                    .transpose()
                    .map_err(Fail::Corrupt)?,
            })
        })
        .collect()
}
