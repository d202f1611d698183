//! `status`: a run's counts, derived from its chunk and failure rows (never kept twice), its
//! standing failures and its stuck chunks, read in one snapshot.

use super::runs::read_run;
use super::{Fail, Tx};
use crate::context::{
    now_ms, rules, ChunkCounts, FailureClass, FailureRecord, InProgress, ItemCounts, RunId,
    RunStatus, StuckAfter,
};

pub(super) async fn status(
    tx: &Tx<'_>,
    run: RunId,
    stuck_after: StuckAfter,
) -> Result<RunStatus, Fail> {
    let id = run as i64;
    let record = match tx
        .query_opt("SELECT * FROM runs WHERE id = $1", &[&id])
        .await?
    {
        Some(row) => read_run(&row)?,
        None => return Err(Fail::Corrupt(format!("run {run} vanished"))),
    };
    // A chunk dispatched again by `retry` counts as `retried`, not failed or dead.
    let r = tx
        .query_one(
            "SELECT COUNT(*),
                COUNT(*) FILTER (WHERE status = 'pending'),
                COUNT(*) FILTER (WHERE status = 'in_flight'),
                COUNT(*) FILTER (WHERE status = 'done'),
                COUNT(*) FILTER (WHERE status = 'failed' AND retried_at IS NULL),
                COUNT(*) FILTER (WHERE status = 'dead' AND retried_at IS NULL),
                COALESCE(SUM(items) FILTER (WHERE retried_at IS NULL), 0)::bigint,
                COALESCE(SUM(processed), 0)::bigint,
                COALESCE(SUM(items) FILTER (WHERE status IN ('failed', 'dead')
                                            AND retried_at IS NULL), 0)::bigint,
                COUNT(*) FILTER (WHERE retried_at IS NOT NULL)
             FROM chunks WHERE run = $1",
            &[&id],
        )
        .await?;
    let n = |i: usize| r.try_get::<_, i64>(i).map(|v| v as u64);
    let chunks = ChunkCounts {
        total: n(0)?,
        pending: n(1)?,
        in_flight: n(2)?,
        done: n(3)?,
        failed: n(4)?,
        dead: n(5)?,
        retried: n(9)?,
    };
    let mut items = ItemCounts {
        read: n(6)?,
        processed: n(7)?,
        skipped: 0,
        failed: n(8)?,
    };
    let mut failures = Vec::new();
    for row in tx
        .query(
            "SELECT seq, position, class, reason, retried_at IS NOT NULL, key
             FROM failures WHERE run = $1 ORDER BY position, seq",
            &[&id],
        )
        .await?
    {
        let class: FailureClass = row
            .try_get::<_, String>(2)?
            .parse()
            .map_err(Fail::Corrupt)?;
        if !rules::count_failure(&mut items, class, row.try_get(4)?) {
            continue;
        }
        failures.push(FailureRecord {
            seq: row.try_get::<_, Option<i64>>(0)?.map(|s| s as u64),
            position: row.try_get::<_, i64>(1)? as u64,
            key: row.try_get(5)?,
            class,
            reason: row.try_get(3)?,
        });
    }
    let now = now_ms();
    let in_progress = tx
        .query(
            "SELECT seq, attempts, consumer, processing_since, noted_at FROM chunks
             WHERE run = $1 AND status = 'in_flight' AND processing_since IS NOT NULL
             ORDER BY seq",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(InProgress {
                seq: r.try_get::<_, i64>(0)? as u64,
                attempt: r.try_get::<_, i64>(1)? as u32,
                consumer: r.try_get(2)?,
                since: r.try_get::<_, i64>(3)? as u64,
                noted_at: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
            })
        })
        .collect::<Result<Vec<_>, Fail>>()?;
    let stuck = rules::stuck(&in_progress, stuck_after, now);
    let since = now.saturating_sub(rules::RECENT_MS) as i64;
    let r = tx
        .query_one(
            "SELECT MIN(start_offset), MAX(end_offset), MIN(dispatched_at) FROM chunks
             WHERE run = $1 AND NOT retry AND dispatched_at >= $2",
            &[&id, &since],
        )
        .await?;
    let recent = rules::recent(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, now);
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
