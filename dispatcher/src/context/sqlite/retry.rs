//! What the `retry` command reads: the failures still standing with where they lie, and, once
//! the operator fixed the input, where they lie now.

use rusqlite::{params, Connection, TransactionBehavior};

use super::Fail;
use crate::context::{
    FailedChunk, FailureClass, Keys, Moved, OpenFailure, Retried, Retryable, RunId,
};
use hopper_common::Position;

pub(super) fn retryable(conn: &mut Connection, run: RunId) -> Result<Retryable, Fail> {
    let failed_chunk = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(FailedChunk, Option<String>)> {
        Ok((
            FailedChunk {
                seq: r.get::<_, i64>(0)? as u64,
                position: Position {
                    line: r.get::<_, i64>(1)? as u64,
                    offset: r.get::<_, i64>(2)? as u64,
                },
                end_offset: r.get::<_, i64>(3)? as u64,
                end_line: r.get::<_, i64>(4)? as u64,
                keys: None,
            },
            r.get(5)?,
        ))
    };
    let with_keys = |rows: Vec<(FailedChunk, Option<String>)>| -> Result<Vec<FailedChunk>, Fail> {
        rows.into_iter()
            .map(|(mut c, keys)| {
                c.keys = keys
                    .as_deref()
                    .map(Keys::parse)
                    .transpose()
                    .map_err(Fail::Corrupt)?;
                Ok(c)
            })
            .collect()
    };
    let chunks = with_keys(
        conn.prepare(
            "SELECT seq, line, offset, end_offset, end_line, keys FROM chunks
             WHERE run = ?1 AND status IN ('failed', 'dead') AND retried_at IS NULL
             ORDER BY seq",
        )?
        .query_map(params![run as i64], failed_chunk)?
        .collect::<Result<Vec<_>, _>>()?,
    )?;
    let hosts = with_keys(
        conn.prepare(
            "SELECT seq, line, offset, end_offset, end_line, keys FROM chunks
             WHERE run = ?1 AND seq IN (SELECT seq FROM failures WHERE run = ?1
               AND class = 'bad_item' AND retried_at IS NULL)
             ORDER BY seq",
        )?
        .query_map(params![run as i64], failed_chunk)?
        .collect::<Result<Vec<_>, _>>()?,
    )?;
    let mut failures = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT rowid, seq, position, class, offset, end_offset, end_line, key FROM failures
         WHERE run = ?1 AND class IN ('bad_data', 'bad_item') AND retried_at IS NULL
         ORDER BY position, rowid",
    )?;
    let rows = stmt.query_map(params![run as i64], |r| {
        let line = r.get::<_, i64>(2)? as u64;
        let offset = r.get::<_, Option<i64>>(4)?;
        let end_offset = r.get::<_, Option<i64>>(5)?;
        let end_line = r.get::<_, Option<i64>>(6)?;
        let span = match (offset, end_offset, end_line) {
            (Some(o), Some(e), Some(l)) => Some((
                Position {
                    line,
                    offset: o as u64,
                },
                e as u64,
                l as u64,
            )),
            _ => None,
        };
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
            line,
            r.get::<_, String>(3)?,
            span,
            r.get::<_, Option<String>>(7)?,
        ))
    })?;
    for row in rows {
        let (id, seq, line, class, span, key) = row?;
        let class: FailureClass = class.parse().map_err(Fail::Corrupt)?;
        if class == FailureClass::BadData && span.is_none() {
            return Err(Fail::Corrupt(format!(
                "the bad record at line {line} was recorded without where it lies"
            )));
        }
        failures.push(OpenFailure {
            id,
            seq,
            line,
            class,
            span,
            key,
        });
    }
    Ok(Retryable {
        chunks,
        failures,
        hosts,
    })
}

pub(super) fn rebase(
    conn: &mut Connection,
    run: RunId,
    moves: &[Moved],
    checkpoint: u64,
    input: &str,
) -> Result<(), Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut chunk = tx.prepare_cached(
            "UPDATE chunks SET offset = ?3, end_offset = ?4 WHERE run = ?1 AND seq = ?2",
        )?;
        let mut failure = tx.prepare_cached(
            "UPDATE failures SET offset = ?3, end_offset = ?4 WHERE run = ?1 AND rowid = ?2",
        )?;
        for m in moves {
            let (offset, end) = (m.offset as i64, m.end_offset as i64);
            match m.row {
                Retried::Chunk(seq) => {
                    chunk.execute(params![run as i64, seq as i64, offset, end])?
                }
                Retried::Failure(id) => failure.execute(params![run as i64, id, offset, end])?,
            };
        }
    }
    tx.execute(
        "UPDATE runs SET ckpt_offset = ?2, input = ?3 WHERE id = ?1",
        params![run as i64, checkpoint as i64, input],
    )?;
    tx.commit()?;
    Ok(())
}
