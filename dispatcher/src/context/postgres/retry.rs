//! What the `retry` command reads: the failures still standing with where they lie, and, once
//! the operator fixed the input, where they lie now.

use hopper_common::Position;
use tokio_postgres::Row;

use super::{Fail, Tx};
use crate::context::{
    FailedChunk, FailureClass, Keys, Moved, OpenFailure, Retried, Retryable, RunId,
};

fn failed_chunk(r: &Row) -> Result<FailedChunk, Fail> {
    let keys: Option<String> = r.try_get(5)?;
    Ok(FailedChunk {
        seq: r.try_get::<_, i64>(0)? as u64,
        position: Position {
            line: r.try_get::<_, i64>(1)? as u64,
            offset: r.try_get::<_, i64>(2)? as u64,
        },
        end_offset: r.try_get::<_, i64>(3)? as u64,
        end_line: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
        keys: keys
            .as_deref()
            .map(Keys::parse)
            .transpose()
            .map_err(Fail::Corrupt)?,
    })
}

fn open_failure(r: &Row) -> Result<OpenFailure, Fail> {
    let line = r.try_get::<_, i64>(2)? as u64;
    let span = match (
        r.try_get::<_, Option<i64>>(4)?,
        r.try_get::<_, Option<i64>>(5)?,
        r.try_get::<_, Option<i64>>(6)?,
    ) {
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
    let class: FailureClass = r.try_get::<_, String>(3)?.parse().map_err(Fail::Corrupt)?;
    if class == FailureClass::BadData && span.is_none() {
        return Err(Fail::Corrupt(format!(
            "the bad record at line {line} was recorded without where it lies"
        )));
    }
    Ok(OpenFailure {
        id: r.try_get(0)?,
        seq: r.try_get::<_, Option<i64>>(1)?.map(|v| v as u64),
        line,
        class,
        span,
        key: r.try_get(7)?,
    })
}

pub(super) async fn retryable(tx: &Tx<'_>, run: RunId) -> Result<Retryable, Fail> {
    let run = run as i64;
    let chunks = tx
        .query(
            "SELECT seq, line, start_offset, end_offset, end_line, keys FROM chunks
             WHERE run = $1 AND status IN ('failed', 'dead') AND retried_at IS NULL
             ORDER BY seq",
            &[&run],
        )
        .await?;
    let hosts = tx
        .query(
            "SELECT seq, line, start_offset, end_offset, end_line, keys FROM chunks
             WHERE run = $1 AND seq IN (SELECT seq FROM failures WHERE run = $1
               AND class = 'bad_item' AND retried_at IS NULL)
             ORDER BY seq",
            &[&run],
        )
        .await?;
    let failures = tx
        .query(
            "SELECT id, seq, position, class, start_offset, end_offset, end_line, key
             FROM failures
             WHERE run = $1 AND class IN ('bad_data', 'bad_item') AND retried_at IS NULL
             ORDER BY position, id",
            &[&run],
        )
        .await?;
    Ok(Retryable {
        chunks: chunks.iter().map(failed_chunk).collect::<Result<_, _>>()?,
        failures: failures
            .iter()
            .map(open_failure)
            .collect::<Result<_, _>>()?,
        hosts: hosts.iter().map(failed_chunk).collect::<Result<_, _>>()?,
    })
}

pub(super) async fn rebase(
    tx: &Tx<'_>,
    run: RunId,
    moves: &[Moved],
    checkpoint: u64,
    input: &str,
) -> Result<(), Fail> {
    let run = run as i64;
    for m in moves {
        let (offset, end) = (m.offset as i64, m.end_offset as i64);
        match m.row {
            Retried::Chunk(seq) => {
                tx.execute(
                    "UPDATE chunks SET start_offset = $3, end_offset = $4
                     WHERE run = $1 AND seq = $2",
                    &[&run, &(seq as i64), &offset, &end],
                )
                .await?
            }
            Retried::Failure(id) => {
                tx.execute(
                    "UPDATE failures SET start_offset = $3, end_offset = $4
                     WHERE run = $1 AND id = $2",
                    &[&run, &id, &offset, &end],
                )
                .await?
            }
        };
    }
    tx.execute(
        "UPDATE runs SET ckpt_offset = $2, input = $3 WHERE id = $1",
        &[&run, &(checkpoint as i64), &input],
    )
    .await?;
    Ok(())
}
