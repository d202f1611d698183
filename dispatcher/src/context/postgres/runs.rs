//! The `runs` table: a run's life (created, claimed by a dispatcher, heartbeats, ended, taken
//! up again by `retry`) and how it is read.

use hopper_common::job::Throttle as ThrottleSpec;
use tokio_postgres::{Row, Statement};

use super::{Fail, Tx};
use crate::context::{
    now_ms, rules, Alive, Checkpoint, Claimed, Fence, RunId, RunRecord, RunState,
};

/// A run's row, as stored.
pub(super) fn read_run(row: &Row) -> Result<RunRecord, Fail> {
    let state: String = row.try_get("state")?;
    Ok(RunRecord {
        id: row.try_get::<_, i64>("id")? as u64,
        job: row.try_get("job")?,
        state: state.parse().map_err(Fail::Corrupt)?,
        source: row.try_get("source")?,
        started_at: row.try_get::<_, i64>("started_at")? as u64,
        finished_at: row
            .try_get::<_, Option<i64>>("finished_at")?
            .map(|v| v as u64),
        heartbeat_at: row.try_get::<_, i64>("heartbeat_at")? as u64,
        owner: row.try_get("owner")?,
        owner_token: row.try_get("owner_token")?,
        checkpoint: Checkpoint {
            offset: row.try_get::<_, i64>("ckpt_offset")? as u64,
            line: row.try_get::<_, i64>("ckpt_line")? as u64,
            next_seq: row.try_get::<_, i64>("next_seq")? as u64,
            exhausted: row.try_get("exhausted")?,
            key: row.try_get("ckpt_key")?,
        },
        input: row.try_get("input")?,
        throttle: row
            .try_get::<_, Option<String>>("throttle")?
            .as_deref()
            .and_then(rules::throttle_from_json),
    })
}

pub(super) async fn run_by(
    tx: &Tx<'_>,
    job: &str,
    id: Option<RunId>,
) -> Result<Option<RunRecord>, Fail> {
    let row = match id {
        Some(id) => {
            tx.query_opt(
                "SELECT * FROM runs WHERE job = $1 AND id = $2",
                &[&job, &(id as i64)],
            )
            .await?
        }
        None => {
            tx.query_opt(
                "SELECT * FROM runs WHERE job = $1 ORDER BY id DESC LIMIT 1",
                &[&job],
            )
            .await?
        }
    };
    row.as_ref().map(read_run).transpose()
}

/// Removes the runs of `job` that ended before `before`, with their rows.
pub(super) async fn delete_ended(tx: &Tx<'_>, job: &str, before: u64) -> Result<u64, Fail> {
    let ended =
        "SELECT id FROM runs WHERE job = $1 AND finished_at IS NOT NULL AND finished_at < $2";
    let (job, before) = (&job, &(before as i64));
    tx.execute(
        &format!("DELETE FROM failures WHERE run IN ({ended})"),
        &[job, before],
    )
    .await?;
    tx.execute(
        &format!("DELETE FROM chunks WHERE run IN ({ended})"),
        &[job, before],
    )
    .await?;
    let n = tx
        .execute(
            &format!("DELETE FROM runs WHERE id IN ({ended})"),
            &[job, before],
        )
        .await?;
    Ok(n)
}

/// Sets what an operator controls of a run not ended: `state` (running or paused) and its own
/// throttle. Returns false when the run has ended (nothing written).
pub(super) async fn control(
    tx: &Tx<'_>,
    run: RunId,
    state: Option<RunState>,
    throttle: Option<&ThrottleSpec>,
) -> Result<bool, Fail> {
    let mut changed = 0;
    if let Some(state) = state {
        changed += tx
            .execute(
                "UPDATE runs SET state = $2 WHERE id = $1 AND finished_at IS NULL",
                &[&(run as i64), &state.as_str()],
            )
            .await?;
    }
    if let Some(t) = throttle {
        changed += tx
            .execute(
                "UPDATE runs SET throttle = $2 WHERE id = $1 AND finished_at IS NULL",
                &[&(run as i64), &rules::throttle_to_json(t)],
            )
            .await?;
    }
    Ok(changed > 0)
}

/// Every run of `job`, newest first.
pub(super) async fn all(tx: &Tx<'_>, job: &str) -> Result<Vec<RunRecord>, Fail> {
    tx.query(
        "SELECT * FROM runs WHERE job = $1 ORDER BY id DESC",
        &[&job],
    )
    .await?
    .iter()
    .map(read_run)
    .collect()
}

/// Checks, inside the write's own transaction, that `fence` still holds its run, and locks the
/// run's row until the transaction ends: the compare of compare-and-set. A dispatcher taking the
/// run over waits for the lock, so it cannot slip in between the check and the write.
pub(super) async fn check(tx: &Tx<'_>, fence: &Fence) -> Result<(), Fail> {
    let owner = owner(tx).await?;
    owned(tx, &owner, fence).await
}

/// The statement of [`check`], prepared once per connection: every write of a run starts
/// with it.
pub(super) async fn owner(tx: &Tx<'_>) -> Result<Statement, Fail> {
    Ok(tx
        .prepare_cached("SELECT owner_token FROM runs WHERE id = $1 FOR UPDATE")
        .await?)
}

/// [`check`] with its statement prepared ([`owner`]): its first poll sends the query, so that
/// it can lead a pipeline of the transaction's writes (the database runs them in the order
/// sent, so the run's row is locked first all the same).
pub(super) async fn owned(tx: &Tx<'_>, owner: &Statement, fence: &Fence) -> Result<(), Fail> {
    let row = tx.query_opt(owner, &[&(fence.run as i64)]).await?;
    let token: Option<Option<String>> = row.map(|r| r.try_get(0)).transpose()?;
    match token {
        Some(Some(t)) if t == fence.token => Ok(()),
        Some(Some(t)) => Err(Fail::Fenced {
            run: fence.run,
            holder: Fence::holder(&t).to_string(),
        }),
        Some(None) | None => Err(Fail::Fenced {
            run: fence.run,
            holder: "nobody (the run was removed or reset)".to_string(),
        }),
    }
}

/// Serialises every taking of a run of `job` (on any host) until the transaction ends.
async fn lock_job(tx: &Tx<'_>, job: &str) -> Result<(), Fail> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('hopper-run:' || current_schema() || ':' || $1, 0))",
        &[&job],
    )
    .await?;
    Ok(())
}

/// The first run of `job` that has not ended and whose owner `alive` calls alive, but for a
/// run `token` itself owns.
async fn live_run(
    tx: &Tx<'_>,
    job: &str,
    token: &str,
    alive: Alive,
) -> Result<Option<RunRecord>, Fail> {
    let rows = tx
        .query(
            "SELECT * FROM runs WHERE job = $1 AND finished_at IS NULL
             AND owner_token IS NOT NULL AND owner_token <> $2 ORDER BY id",
            &[&job, &token],
        )
        .await?;
    for row in &rows {
        let run = read_run(row)?;
        if !run.state.is_final() && alive(&run) {
            return Ok(Some(run));
        }
    }
    Ok(None)
}

/// Creates a run, unless a live dispatcher owns one of the job: check and claim in one
/// transaction, under the job's lock.
pub(super) async fn create(
    tx: &Tx<'_>,
    job: &str,
    source: &str,
    input: &str,
    token: &str,
    alive: Alive,
) -> Result<Claimed<RunRecord>, Fail> {
    lock_job(tx, job).await?;
    if let Some(held) = live_run(tx, job, token, alive).await? {
        return Ok(Claimed::Held(Box::new(held)));
    }
    let now = now_ms() as i64;
    let row = tx
        .query_one(
            "INSERT INTO runs (job, state, source, started_at, heartbeat_at, owner, owner_token,
                               input)
             VALUES ($1, 'running', $2, $3, $3, $4, $5, $6) RETURNING *",
            &[&job, &source, &now, &Fence::holder(token), &token, &input],
        )
        .await?;
    Ok(Claimed::Won(read_run(&row)?))
}

/// How a dispatcher takes an existing run.
#[derive(Debug, Clone, Copy)]
pub(super) enum Take {
    /// `run --resume`: the run is unfinished; it only changes hands.
    Resume,
    /// `retry`: the run may have ended; it is `running` again.
    Retry,
}

/// Takes run `fence.run` for `fence.token`, unless a live dispatcher owns a run of its job (this
/// one included): check and claim in one transaction, under the job's lock.
pub(super) async fn take(
    tx: &Tx<'_>,
    fence: &Fence,
    how: Take,
    alive: Alive,
) -> Result<Claimed<()>, Fail> {
    let row = tx
        .query_opt("SELECT job FROM runs WHERE id = $1", &[&(fence.run as i64)])
        .await?;
    let job: String = match row {
        Some(row) => row.try_get(0)?,
        None => return Err(Fail::Corrupt(format!("run {} vanished", fence.run))),
    };
    lock_job(tx, &job).await?;
    if let Some(held) = live_run(tx, &job, &fence.token, alive).await? {
        return Ok(Claimed::Held(Box::new(held)));
    }
    let sql = match how {
        Take::Resume => {
            "UPDATE runs SET owner = $2, owner_token = $3, heartbeat_at = $4 WHERE id = $1"
        }
        Take::Retry => {
            "UPDATE runs SET state = 'running', finished_at = NULL, owner = $2, owner_token = $3,
             heartbeat_at = $4 WHERE id = $1"
        }
    };
    tx.execute(
        sql,
        &[
            &(fence.run as i64),
            &Fence::holder(&fence.token),
            &fence.token,
            &(now_ms() as i64),
        ],
    )
    .await?;
    Ok(Claimed::Won(()))
}

pub(super) async fn heartbeat(tx: &Tx<'_>, fence: &Fence) -> Result<(), Fail> {
    check(tx, fence).await?;
    tx.execute(
        "UPDATE runs SET heartbeat_at = $2 WHERE id = $1",
        &[&(fence.run as i64), &(now_ms() as i64)],
    )
    .await?;
    Ok(())
}

pub(super) async fn finish(tx: &Tx<'_>, fence: &Fence, state: RunState) -> Result<(), Fail> {
    check(tx, fence).await?;
    let now = now_ms() as i64;
    let finished = state.is_final().then_some(now);
    tx.execute(
        "UPDATE runs SET state = $2, finished_at = $3, heartbeat_at = $4 WHERE id = $1",
        &[&(fence.run as i64), &state.as_str(), &finished, &now],
    )
    .await?;
    Ok(())
}
