//! The `chunks` table as the dispatch loop writes it: chunks recorded (with the checkpoint and
//! bad records, in one transaction) before they are published, confirmed by the broker, and
//! those without a final outcome read back on resume.

use rusqlite::{params, Connection, TransactionBehavior};

use super::Fail;
use crate::context::{
    now_ms, BadData, Checkpoint, ChunkRecord, ChunkStatus, Fence, Keys, NewChunk, Retried, RunId,
};
use hopper_common::Position;

/// What [`crate::context::RecordBatch`] holds, owned, to cross to the thread that runs the call.
pub(super) struct Batch {
    pub(super) chunks: Vec<NewChunk>,
    pub(super) ckpt: Checkpoint,
    pub(super) bad: Vec<BadData>,
    pub(super) retried: Vec<Retried>,
    pub(super) retry: bool,
}

pub(super) fn record(conn: &mut Connection, fence: &Fence, batch: Batch) -> Result<(), Fail> {
    let run = fence.run;
    let Batch {
        chunks,
        ckpt,
        bad,
        retried,
        retry,
    } = batch;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    super::runs::check(&tx, fence)?;
    let now = now_ms() as i64;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO chunks (run, seq, line, offset, end_offset, items, status,
                                 end_line, retry, keys)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8, ?9)",
        )?;
        for c in &chunks {
            insert.execute(params![
                run as i64,
                c.seq as i64,
                c.position.line as i64,
                c.position.offset as i64,
                c.end_offset as i64,
                c.items as i64,
                c.end_line as i64,
                retry,
                c.keys.as_ref().map(Keys::to_text)
            ])?;
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO failures (run, seq, position, class, reason, offset, end_offset,
                                   end_line, retry, key)
             VALUES (?1, NULL, ?2, 'bad_data', ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for b in &bad {
            insert.execute(params![
                run as i64,
                b.position.line as i64,
                b.reason,
                b.position.offset as i64,
                b.end_offset as i64,
                b.end_line as i64,
                retry,
                b.key
            ])?;
        }
        let mut chunk = tx.prepare_cached(
            "UPDATE chunks SET retried_at = ?3 WHERE run = ?1 AND seq = ?2
               AND retried_at IS NULL",
        )?;
        let mut chunk_failure = tx.prepare_cached(
            "UPDATE failures SET retried_at = ?3 WHERE run = ?1 AND seq = ?2
               AND class = 'chunk' AND retried_at IS NULL",
        )?;
        let mut failure = tx.prepare_cached(
            "UPDATE failures SET retried_at = ?3 WHERE run = ?1 AND rowid = ?2
               AND retried_at IS NULL",
        )?;
        for r in &retried {
            match *r {
                Retried::Chunk(seq) => {
                    chunk.execute(params![run as i64, seq as i64, now])?;
                    chunk_failure.execute(params![run as i64, seq as i64, now])?;
                }
                Retried::Failure(id) => {
                    failure.execute(params![run as i64, id, now])?;
                }
            }
        }
    }
    tx.prepare_cached(
        "UPDATE runs SET ckpt_offset = ?2, ckpt_line = ?3, next_seq = ?4, exhausted = ?5,
         heartbeat_at = ?6, ckpt_key = ?7 WHERE id = ?1",
    )?
    .execute(params![
        run as i64,
        ckpt.offset as i64,
        ckpt.line as i64,
        ckpt.next_seq as i64,
        ckpt.exhausted,
        now,
        ckpt.key
    ])?;
    tx.commit()?;
    Ok(())
}

pub(super) fn mark_in_flight(
    conn: &mut Connection,
    fence: &Fence,
    seqs: &[u64],
) -> Result<(), Fail> {
    let run = fence.run;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    super::runs::check(&tx, fence)?;
    {
        let mut update = tx.prepare_cached(
            "UPDATE chunks SET status = 'in_flight', dispatched_at = ?3
             WHERE run = ?1 AND seq = ?2 AND status = 'pending'",
        )?;
        let now = now_ms() as i64;
        for seq in seqs {
            update.execute(params![run as i64, *seq as i64, now])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn open(conn: &mut Connection, run: RunId) -> Result<Vec<ChunkRecord>, Fail> {
    let mut stmt = conn.prepare(
        "SELECT seq, line, offset, end_offset, items, status, attempts, keys FROM chunks
         WHERE run = ?1 AND status IN ('pending', 'in_flight') ORDER BY seq",
    )?;
    let rows = stmt.query_map(params![run as i64], |r| {
        Ok((
            ChunkRecord {
                seq: r.get::<_, i64>(0)? as u64,
                position: Position {
                    line: r.get::<_, i64>(1)? as u64,
                    offset: r.get::<_, i64>(2)? as u64,
                },
                end_offset: r.get::<_, i64>(3)? as u64,
                items: r.get::<_, i64>(4)? as u64,
                status: ChunkStatus::Pending,
                attempts: r.get::<_, i64>(6)? as u32,
                keys: None,
            },
            r.get::<_, String>(5)?,
            r.get::<_, Option<String>>(7)?,
        ))
    })?;
    let mut open = Vec::new();
    for row in rows {
        let (mut chunk, status, keys) = row?;
        chunk.status = status.parse().map_err(Fail::Corrupt)?;
        chunk.keys = keys
            .as_deref()
            .map(Keys::parse)
            .transpose()
            .map_err(Fail::Corrupt)?;
        open.push(chunk);
    }
    Ok(open)
}
