//! The `runs` table: a run's life (created, claimed by a dispatcher, heartbeats, ended, taken
//! up again by `retry`) and how it is read.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::Fail;
use hopper_common::job::Throttle as ThrottleSpec;

use crate::context::{
    now_ms, rules, Alive, Checkpoint, Claimed, Fence, RunId, RunRecord, RunState,
};

fn read_run(row: &rusqlite::Row<'_>) -> rusqlite::Result<(RunRecord, String)> {
    let state: String = row.get("state")?;
    Ok((
        RunRecord {
            id: row.get::<_, i64>("id")? as u64,
            job: row.get("job")?,
            state: RunState::Running,
            source: row.get("source")?,
            started_at: row.get::<_, i64>("started_at")? as u64,
            finished_at: row.get::<_, Option<i64>>("finished_at")?.map(|v| v as u64),
            heartbeat_at: row.get::<_, i64>("heartbeat_at")? as u64,
            owner: row.get("owner")?,
            owner_token: row.get("owner_token")?,
            checkpoint: Checkpoint {
                offset: row.get::<_, i64>("ckpt_offset")? as u64,
                line: row.get::<_, i64>("ckpt_line")? as u64,
                next_seq: row.get::<_, i64>("next_seq")? as u64,
                exhausted: row.get::<_, i64>("exhausted")? != 0,
                key: row.get("ckpt_key")?,
            },
            input: row.get("input")?,
            throttle: row
                .get::<_, Option<String>>("throttle")?
                .as_deref()
                .and_then(rules::throttle_from_json),
        },
        state,
    ))
}

pub(super) fn run_by(
    conn: &Connection,
    job: &str,
    id: Option<RunId>,
) -> Result<Option<RunRecord>, Fail> {
    let found = match id {
        Some(id) => conn
            .query_row(
                "SELECT * FROM runs WHERE job = ?1 AND id = ?2",
                params![job, id as i64],
                read_run,
            )
            .optional()?,
        None => conn
            .query_row(
                "SELECT * FROM runs WHERE job = ?1 ORDER BY id DESC LIMIT 1",
                params![job],
                read_run,
            )
            .optional()?,
    };
    found
        .map(|(mut run, state)| {
            run.state = state.parse().map_err(Fail::Corrupt)?;
            Ok(run)
        })
        .transpose()
}

/// Removes the runs of `job` that ended before `before`, with their rows.
pub(super) fn delete_ended(conn: &mut Connection, job: &str, before: u64) -> Result<u64, Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let ended =
        "SELECT id FROM runs WHERE job = ?1 AND finished_at IS NOT NULL AND finished_at < ?2";
    let args = params![job, before as i64];
    tx.execute(
        &format!("DELETE FROM failures WHERE run IN ({ended})"),
        args,
    )?;
    tx.execute(&format!("DELETE FROM chunks WHERE run IN ({ended})"), args)?;
    let n = tx.execute(&format!("DELETE FROM runs WHERE id IN ({ended})"), args)?;
    tx.commit()?;
    Ok(n as u64)
}

/// Sets what an operator controls of a run not ended: `state` (running or paused) and its own
/// throttle. Returns false when the run has ended (nothing written).
pub(super) fn control(
    conn: &mut Connection,
    run: RunId,
    state: Option<RunState>,
    throttle: Option<&ThrottleSpec>,
) -> Result<bool, Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut changed = 0;
    if let Some(state) = state {
        changed += tx.execute(
            "UPDATE runs SET state = ?2 WHERE id = ?1 AND finished_at IS NULL",
            params![run as i64, state.as_str()],
        )?;
    }
    if let Some(t) = throttle {
        changed += tx.execute(
            "UPDATE runs SET throttle = ?2 WHERE id = ?1 AND finished_at IS NULL",
            params![run as i64, rules::throttle_to_json(t)],
        )?;
    }
    tx.commit()?;
    Ok(changed > 0)
}

/// Every run of `job`, newest first.
pub(super) fn all(conn: &Connection, job: &str) -> Result<Vec<RunRecord>, Fail> {
    let mut stmt = conn.prepare("SELECT * FROM runs WHERE job = ?1 ORDER BY id DESC")?;
    let rows = stmt.query_map(params![job], read_run)?;
    rows.map(|row| {
        let (mut run, state) = row?;
        run.state = state.parse().map_err(Fail::Corrupt)?;
        Ok(run)
    })
    .collect()
}

/// Checks, inside the write's own transaction, that `fence` still holds its run: the compare
/// of compare-and-set. Another dispatcher's token there means it took the run over.
pub(super) fn check(conn: &Connection, fence: &Fence) -> Result<(), Fail> {
    // Cached: every write of a run checks its fence first, hundreds of times a second.
    let token: Option<Option<String>> = conn
        .prepare_cached("SELECT owner_token FROM runs WHERE id = ?1")?
        .query_row(params![fence.run as i64], |r| r.get(0))
        .optional()?;
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

/// The first run of `job` that has not ended and whose owner `alive` calls alive, but for a
/// run `token` itself owns.
fn live_run(
    conn: &Connection,
    job: &str,
    token: &str,
    alive: Alive,
) -> Result<Option<RunRecord>, Fail> {
    let mut stmt = conn.prepare(
        "SELECT * FROM runs WHERE job = ?1 AND finished_at IS NULL
         AND owner_token IS NOT NULL AND owner_token <> ?2 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![job, token], read_run)?;
    for row in rows {
        let (mut run, state) = row?;
        run.state = state.parse().map_err(Fail::Corrupt)?;
        if !run.state.is_final() && alive(&run) {
            return Ok(Some(run));
        }
    }
    Ok(None)
}

/// Creates a run, unless a live dispatcher owns one of the job: check and claim in one
/// transaction.
pub(super) fn create(
    conn: &mut Connection,
    job: &str,
    source: &str,
    input: &str,
    token: &str,
    alive: Alive,
) -> Result<Claimed<RunRecord>, Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(held) = live_run(&tx, job, token, alive)? {
        return Ok(Claimed::Held(Box::new(held)));
    }
    let now = now_ms() as i64;
    tx.execute(
        "INSERT INTO runs (job, state, source, started_at, heartbeat_at, owner, owner_token, input)
         VALUES (?1, 'running', ?2, ?3, ?3, ?4, ?5, ?6)",
        params![job, source, now, Fence::holder(token), token, input],
    )?;
    let id = tx.last_insert_rowid() as u64;
    let run = run_by(&tx, job, Some(id))?
        .ok_or_else(|| Fail::Corrupt(format!("run {id} vanished after insert")))?;
    tx.commit()?;
    Ok(Claimed::Won(run))
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
/// one included): check and claim in one transaction.
pub(super) fn take(
    conn: &mut Connection,
    fence: &Fence,
    how: Take,
    alive: Alive,
) -> Result<Claimed<()>, Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let job: Option<String> = tx
        .query_row(
            "SELECT job FROM runs WHERE id = ?1",
            params![fence.run as i64],
            |r| r.get(0),
        )
        .optional()?;
    let job = job.ok_or_else(|| Fail::Corrupt(format!("run {} vanished", fence.run)))?;
    if let Some(held) = live_run(&tx, &job, &fence.token, alive)? {
        return Ok(Claimed::Held(Box::new(held)));
    }
    let sql = match how {
        Take::Resume => {
            "UPDATE runs SET owner = ?2, owner_token = ?3, heartbeat_at = ?4 WHERE id = ?1"
        }
        Take::Retry => {
            "UPDATE runs SET state = 'running', finished_at = NULL, owner = ?2, owner_token = ?3,
             heartbeat_at = ?4 WHERE id = ?1"
        }
    };
    tx.execute(
        sql,
        params![
            fence.run as i64,
            Fence::holder(&fence.token),
            fence.token,
            now_ms() as i64
        ],
    )?;
    tx.commit()?;
    Ok(Claimed::Won(()))
}

pub(super) fn heartbeat(conn: &mut Connection, fence: &Fence) -> Result<(), Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    check(&tx, fence)?;
    tx.execute(
        "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1",
        params![fence.run as i64, now_ms() as i64],
    )?;
    tx.commit()?;
    Ok(())
}

pub(super) fn finish(conn: &mut Connection, fence: &Fence, state: RunState) -> Result<(), Fail> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    check(&tx, fence)?;
    let now = now_ms() as i64;
    let finished = state.is_final().then_some(now);
    tx.execute(
        "UPDATE runs SET state = ?2, finished_at = ?3, heartbeat_at = ?4 WHERE id = ?1",
        params![fence.run as i64, state.as_str(), finished, now],
    )?;
    tx.commit()?;
    Ok(())
}
