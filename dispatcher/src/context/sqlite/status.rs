//! `status`: a run's counts, derived from its chunk and failure rows (never kept twice), its
//! standing failures and its stuck chunks.

use rusqlite::{params, Connection};

use super::runs::run_by;
use super::Fail;
use crate::context::{
    now_ms, rules, ChunkCounts, FailureClass, FailureRecord, InProgress, ItemCounts, RunId,
    RunStatus, StuckAfter,
};

pub(super) fn status(
    conn: &mut Connection,
    run: RunId,
    stuck_after: StuckAfter,
) -> Result<RunStatus, Fail> {
    let job: String = conn.query_row(
        "SELECT job FROM runs WHERE id = ?1",
        params![run as i64],
        |r| r.get(0),
    )?;
    let record = run_by(conn, &job, Some(run))?
        .ok_or_else(|| Fail::Corrupt(format!("run {run} vanished")))?;
    // A chunk dispatched again by `retry` counts as `retried`, not failed or dead. Records read
    // count as they stand: the items of chunks not dispatched again, and the bad records still
    // listed (a fixed record that turns out to be several counts as several).
    let (chunks, mut items) = conn.query_row(
        "SELECT COUNT(*),
                COALESCE(SUM(status = 'pending'), 0),
                COALESCE(SUM(status = 'in_flight'), 0),
                COALESCE(SUM(status = 'done'), 0),
                COALESCE(SUM(status = 'failed' AND retried_at IS NULL), 0),
                COALESCE(SUM(status = 'dead' AND retried_at IS NULL), 0),
                COALESCE(SUM(CASE WHEN retried_at IS NULL THEN items END), 0),
                COALESCE(SUM(processed), 0),
                COALESCE(SUM(CASE WHEN status IN ('failed', 'dead') AND retried_at IS NULL
                                  THEN items END), 0),
                COALESCE(SUM(retried_at IS NOT NULL), 0)
         FROM chunks WHERE run = ?1",
        params![run as i64],
        |r| {
            let n = |i: usize| r.get::<_, i64>(i).map(|v| v as u64);
            Ok((
                ChunkCounts {
                    total: n(0)?,
                    pending: n(1)?,
                    in_flight: n(2)?,
                    done: n(3)?,
                    failed: n(4)?,
                    dead: n(5)?,
                    retried: n(9)?,
                },
                ItemCounts {
                    read: n(6)?,
                    processed: n(7)?,
                    skipped: 0,
                    failed: n(8)?,
                },
            ))
        },
    )?;
    let mut failures = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT seq, position, class, reason, retried_at IS NOT NULL, key
         FROM failures WHERE run = ?1 ORDER BY position, seq",
    )?;
    let rows = stmt.query_map(params![run as i64], |r| {
        Ok((
            r.get::<_, Option<i64>>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, bool>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    for row in rows {
        let (seq, position, class, reason, retried, key) = row?;
        let class: FailureClass = class.parse().map_err(Fail::Corrupt)?;
        if !rules::count_failure(&mut items, class, retried) {
            continue;
        }
        failures.push(FailureRecord {
            seq: seq.map(|s| s as u64),
            position: position as u64,
            key,
            class,
            reason,
        });
    }
    let now = now_ms();
    let mut stmt = conn.prepare(
        "SELECT seq, attempts, consumer, processing_since, noted_at FROM chunks
         WHERE run = ?1 AND status = 'in_flight' AND processing_since IS NOT NULL ORDER BY seq",
    )?;
    let in_progress = stmt
        .query_map(params![run as i64], |r| {
            Ok(InProgress {
                seq: r.get::<_, i64>(0)? as u64,
                attempt: r.get::<_, i64>(1)? as u32,
                consumer: r.get(2)?,
                since: r.get::<_, i64>(3)? as u64,
                noted_at: r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let stuck = rules::stuck(&in_progress, stuck_after, now);
    let since = now.saturating_sub(rules::RECENT_MS) as i64;
    let recent = conn.query_row(
        "SELECT MIN(offset), MAX(end_offset), MIN(dispatched_at) FROM chunks
             WHERE run = ?1 AND retry = 0 AND dispatched_at >= ?2",
        params![run as i64, since],
        |r| {
            Ok((
                r.get::<_, Option<i64>>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        },
    )?;
    let recent = rules::recent(recent.0, recent.1, recent.2, now);
    Ok(RunStatus {
        run: record,
        items,
        chunks,
        failures,
        in_progress,
        stuck,
        recent,
    })
}
