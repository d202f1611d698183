//! The embedded state store: one SQLite file in WAL mode.
//!
//! Each call runs on tokio's blocking pool behind one mutex-guarded connection: the dispatcher is
//! the only writer, and `status` readers open their own connection (WAL lets them read while it
//! writes; opening an up-to-date store writes nothing). Write transactions are `IMMEDIATE`: they
//! take the write lock up front and wait for it, where a deferred one that read first could
//! fail outright on a lock taken by another connection in between. `synchronous = NORMAL` makes a commit survive a crash of the process (SIGKILL) but
//! not of the machine; losing the last commits on power loss means chunks are read and
//! published again, which idempotent processors absorb.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    now_ms, Applied, Checkpoint, ChunkCounts, ChunkRecord, ChunkStatus, FailedChunk, FailureClass,
    FailureRecord, ItemCounts, Moved, OpenFailure, Progress, Retried, Retryable, RunId, RunRecord,
    RunState, RunStatus, StateError, StateStore, StuckChunk,
};
use crate::message::{Outcome, Position, Reply};

const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job           TEXT    NOT NULL,
    state         TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    heartbeat_at  INTEGER NOT NULL,
    owner         TEXT,
    ckpt_offset   INTEGER NOT NULL DEFAULT 0,
    ckpt_line     INTEGER NOT NULL DEFAULT 0,
    next_seq      INTEGER NOT NULL DEFAULT 1,
    exhausted     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, id);
CREATE TABLE IF NOT EXISTS chunks (
    run           INTEGER NOT NULL REFERENCES runs (id),
    seq           INTEGER NOT NULL,
    line          INTEGER NOT NULL,
    offset        INTEGER NOT NULL,
    end_offset    INTEGER NOT NULL,
    items         INTEGER NOT NULL,
    processed     INTEGER NOT NULL DEFAULT 0,
    status        TEXT    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 1,
    dispatched_at INTEGER,
    finished_at   INTEGER,
    last_error    TEXT,
    consumer      TEXT,
    end_line      INTEGER,
    retry         INTEGER NOT NULL DEFAULT 0,
    retried_at    INTEGER,
    PRIMARY KEY (run, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    run        INTEGER NOT NULL REFERENCES runs (id),
    seq        INTEGER,
    position   INTEGER NOT NULL,
    class      TEXT    NOT NULL,
    reason     TEXT    NOT NULL,
    offset     INTEGER,
    end_offset INTEGER,
    end_line   INTEGER,
    retry      INTEGER NOT NULL DEFAULT 0,
    retried_at INTEGER
);
CREATE INDEX IF NOT EXISTS failures_by_run ON failures (run, position);
";

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its schema.
    ///
    /// # Errors
    /// [`StateError`] when the file cannot be opened or holds a newer schema.
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        let name = path.display().to_string();
        let err = |source| StateError::Sqlite {
            path: name.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory is reported by open() below, with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(StateError::Corrupt {
                path: name,
                message: format!(
                    "schema version {version} is newer than this build's {SCHEMA_VERSION}"
                ),
            });
        }
        // Opening an up-to-date store writes nothing: `status` runs beside a dispatcher, and a
        // write here would make the dispatcher's next transaction start from a stale snapshot.
        if version < SCHEMA_VERSION {
            let tx = conn.transaction().map_err(err)?;
            // A new store gets the whole schema; an older one gets what it lacks.
            tx.execute_batch(if version == 0 { SCHEMA } else { "" })
                .map_err(err)?;
            if version == 1 {
                // Version 2 records which dispatcher process owns a run.
                tx.execute_batch("ALTER TABLE runs ADD COLUMN owner TEXT")
                    .map_err(err)?;
            }
            if (1..=2).contains(&version) {
                // Version 3 keeps what `retry` needs: where chunks and bad records end, and
                // what was dispatched again.
                tx.execute_batch(
                    "ALTER TABLE chunks ADD COLUMN end_line INTEGER;
                     ALTER TABLE chunks ADD COLUMN retry INTEGER NOT NULL DEFAULT 0;
                     ALTER TABLE chunks ADD COLUMN retried_at INTEGER;
                     ALTER TABLE failures ADD COLUMN offset INTEGER;
                     ALTER TABLE failures ADD COLUMN end_offset INTEGER;
                     ALTER TABLE failures ADD COLUMN end_line INTEGER;
                     ALTER TABLE failures ADD COLUMN retry INTEGER NOT NULL DEFAULT 0;
                     ALTER TABLE failures ADD COLUMN retried_at INTEGER;",
                )
                .map_err(err)?;
            }
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, on the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Fail> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let path = self.path.display().to_string();
        let joined = tokio::task::spawn_blocking(move || {
            // A poisoned lock only means another call panicked mid-way; SQLite rolled its
            // transaction back, so the connection is still usable.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await;
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Fail::Sql(source))) => Err(StateError::Sqlite { path, source }),
            Ok(Err(Fail::Corrupt(message))) => Err(StateError::Corrupt { path, message }),
            Err(join) => Err(StateError::Corrupt {
                path,
                message: format!("state store task failed: {join}"),
            }),
        }
    }
}

/// Errors inside a blocking call, given the path on the way out.
enum Fail {
    Sql(rusqlite::Error),
    Corrupt(String),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

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
            checkpoint: Checkpoint {
                offset: row.get::<_, i64>("ckpt_offset")? as u64,
                line: row.get::<_, i64>("ckpt_line")? as u64,
                next_seq: row.get::<_, i64>("next_seq")? as u64,
                exhausted: row.get::<_, i64>("exhausted")? != 0,
            },
        },
        state,
    ))
}

fn run_by(conn: &Connection, job: &str, id: Option<RunId>) -> Result<Option<RunRecord>, Fail> {
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

fn insert_failures(
    tx: &rusqlite::Transaction<'_>,
    run: RunId,
    failures: &[FailureRecord],
) -> Result<(), Fail> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO failures (run, seq, position, class, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for f in failures {
        stmt.execute(params![
            run as i64,
            f.seq.map(|s| s as i64),
            f.position as i64,
            f.class.as_str(),
            f.reason
        ])?;
    }
    Ok(())
}

/// Applies one reply inside `tx`: at most once per chunk, and a retry only once per attempt.
fn apply_one(tx: &rusqlite::Transaction<'_>, reply: &Reply) -> Result<Applied, Fail> {
    let found: Option<(String, i64, i64)> = tx
        .query_row(
            "SELECT c.status, c.attempts, c.line FROM chunks c JOIN runs r ON r.id = c.run
             WHERE c.run = ?1 AND c.seq = ?2 AND r.job = ?3",
            params![reply.run as i64, reply.seq as i64, reply.job],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((status, attempts, line)) = found else {
        return Ok(Applied::Unknown);
    };
    if matches!(status.as_str(), "done" | "failed" | "dead") {
        return Ok(Applied::Duplicate);
    }
    let (run, seq, now) = (reply.run as i64, reply.seq as i64, now_ms() as i64);
    let attempt = i64::from(reply.attempt);
    let finish =
        |tx: &rusqlite::Transaction<'_>, status: &str, processed: u64, error: Option<&str>| {
            tx.execute(
                "UPDATE chunks SET status = ?3, processed = ?4, attempts = MAX(attempts, ?5),
             finished_at = ?6, last_error = COALESCE(?7, last_error), consumer = ?8
             WHERE run = ?1 AND seq = ?2",
                params![
                    run,
                    seq,
                    status,
                    processed as i64,
                    attempt,
                    now,
                    error,
                    reply.consumer
                ],
            )
        };
    match &reply.outcome {
        Outcome::Done {
            processed,
            bad_items,
        } => {
            finish(tx, "done", *processed, None)?;
            let failures: Vec<FailureRecord> = bad_items
                .iter()
                .map(|b| FailureRecord {
                    seq: Some(reply.seq),
                    position: b.line,
                    class: FailureClass::BadItem,
                    reason: b.reason.clone(),
                })
                .collect();
            insert_failures(tx, reply.run, &failures)?;
        }
        Outcome::Retrying {
            error,
            next_attempt,
        } => {
            if attempts >= i64::from(*next_attempt) {
                return Ok(Applied::Duplicate);
            }
            // The chunk comes back after its delay; its stuck clock starts again.
            tx.execute(
                "UPDATE chunks SET status = 'in_flight', attempts = ?3, last_error = ?4,
                 consumer = ?5, dispatched_at = ?6 WHERE run = ?1 AND seq = ?2",
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
        Outcome::Dead { error } | Outcome::Failed { error } => {
            let (status, reason) = match &reply.outcome {
                Outcome::Dead { .. } => (
                    "dead",
                    format!(
                        "parked on the dead queue after {} attempts: {error}",
                        reply.attempt
                    ),
                ),
                _ => ("failed", format!("failed permanently: {error}")),
            };
            finish(tx, status, 0, Some(error))?;
            insert_failures(
                tx,
                reply.run,
                &[FailureRecord {
                    seq: Some(reply.seq),
                    position: line as u64,
                    class: FailureClass::Chunk,
                    reason,
                }],
            )?;
        }
    }
    Ok(Applied::Recorded)
}

#[async_trait]
impl StateStore for SqliteStore {
    async fn create_run(
        &self,
        job: &str,
        source: &str,
        owner: &str,
    ) -> Result<RunRecord, StateError> {
        let (job, source, owner) = (job.to_string(), source.to_string(), owner.to_string());
        self.with(move |conn| {
            let now = now_ms() as i64;
            conn.execute(
                "INSERT INTO runs (job, state, source, started_at, heartbeat_at, owner)
                 VALUES (?1, 'running', ?2, ?3, ?3, ?4)",
                params![job, source, now, owner],
            )?;
            let id = conn.last_insert_rowid() as u64;
            run_by(conn, &job, Some(id))?
                .ok_or_else(|| Fail::Corrupt(format!("run {id} vanished after insert")))
        })
        .await
    }

    async fn claim_run(&self, run: RunId, owner: &str) -> Result<(), StateError> {
        let owner = owner.to_string();
        self.with(move |conn| {
            conn.execute(
                "UPDATE runs SET owner = ?2, heartbeat_at = ?3 WHERE id = ?1",
                params![run as i64, owner, now_ms() as i64],
            )?;
            Ok(())
        })
        .await
    }

    async fn open_chunks(&self, run: RunId) -> Result<Vec<ChunkRecord>, StateError> {
        self.with(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, line, offset, end_offset, items, status, attempts FROM chunks
                 WHERE run = ?1 AND status IN ('pending', 'in_flight') ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![run as i64], |r| {
                Ok((
                    ChunkRecord {
                        seq: r.get::<_, i64>(0)? as u64,
                        position: crate::message::Position {
                            line: r.get::<_, i64>(1)? as u64,
                            offset: r.get::<_, i64>(2)? as u64,
                        },
                        end_offset: r.get::<_, i64>(3)? as u64,
                        items: r.get::<_, i64>(4)? as u64,
                        status: ChunkStatus::Pending,
                        attempts: r.get::<_, i64>(6)? as u32,
                    },
                    r.get::<_, String>(5)?,
                ))
            })?;
            let mut open = Vec::new();
            for row in rows {
                let (mut chunk, status) = row?;
                chunk.status = status.parse().map_err(Fail::Corrupt)?;
                open.push(chunk);
            }
            Ok(open)
        })
        .await
    }

    async fn run(&self, job: &str, id: Option<RunId>) -> Result<Option<RunRecord>, StateError> {
        let job = job.to_string();
        self.with(move |conn| run_by(conn, &job, id)).await
    }

    async fn record(&self, run: RunId, progress: Progress<'_>) -> Result<(), StateError> {
        let chunks = progress.chunks.to_vec();
        let ckpt = *progress.checkpoint;
        let bad = progress.bad_data.to_vec();
        let retried = progress.retried.to_vec();
        let retry = progress.retry;
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ms() as i64;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO chunks (run, seq, line, offset, end_offset, items, status,
                                         end_line, retry)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8)",
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
                        retry
                    ])?;
                }
                let mut insert = tx.prepare_cached(
                    "INSERT INTO failures (run, seq, position, class, reason, offset, end_offset,
                                           end_line, retry)
                     VALUES (?1, NULL, ?2, 'bad_data', ?3, ?4, ?5, ?6, ?7)",
                )?;
                for b in &bad {
                    insert.execute(params![
                        run as i64,
                        b.position.line as i64,
                        b.reason,
                        b.position.offset as i64,
                        b.end_offset as i64,
                        b.end_line as i64,
                        retry
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
                 heartbeat_at = ?6 WHERE id = ?1",
            )?
            .execute(params![
                run as i64,
                ckpt.offset as i64,
                ckpt.line as i64,
                ckpt.next_seq as i64,
                ckpt.exhausted,
                now
            ])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn rebase(&self, run: RunId, moves: &[Moved], size: u64) -> Result<(), StateError> {
        let moves = moves.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut chunk = tx.prepare_cached(
                    "UPDATE chunks SET offset = ?3, end_offset = ?4 WHERE run = ?1 AND seq = ?2",
                )?;
                let mut failure = tx.prepare_cached(
                    "UPDATE failures SET offset = ?3, end_offset = ?4 WHERE run = ?1 AND rowid = ?2",
                )?;
                for m in &moves {
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
                "UPDATE runs SET ckpt_offset = ?2 WHERE id = ?1",
                params![run as i64, size as i64],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn reopen_run(&self, run: RunId, owner: &str) -> Result<(), StateError> {
        let owner = owner.to_string();
        self.with(move |conn| {
            conn.execute(
                "UPDATE runs SET state = 'running', finished_at = NULL, owner = ?2,
                 heartbeat_at = ?3 WHERE id = ?1",
                params![run as i64, owner, now_ms() as i64],
            )?;
            Ok(())
        })
        .await
    }

    async fn retryable(&self, run: RunId) -> Result<Retryable, StateError> {
        self.with(move |conn| {
            let failed_chunk = |r: &rusqlite::Row<'_>| -> rusqlite::Result<FailedChunk> {
                Ok(FailedChunk {
                    seq: r.get::<_, i64>(0)? as u64,
                    position: Position {
                        line: r.get::<_, i64>(1)? as u64,
                        offset: r.get::<_, i64>(2)? as u64,
                    },
                    end_offset: r.get::<_, i64>(3)? as u64,
                    end_line: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                })
            };
            let chunks = conn
                .prepare(
                    "SELECT seq, line, offset, end_offset, end_line FROM chunks
                     WHERE run = ?1 AND status IN ('failed', 'dead') AND retried_at IS NULL
                     ORDER BY seq",
                )?
                .query_map(params![run as i64], failed_chunk)?
                .collect::<Result<Vec<_>, _>>()?;
            let hosts = conn
                .prepare(
                    "SELECT seq, line, offset, end_offset, end_line FROM chunks
                     WHERE run = ?1 AND seq IN (SELECT seq FROM failures WHERE run = ?1
                       AND class = 'bad_item' AND retried_at IS NULL)
                     ORDER BY seq",
                )?
                .query_map(params![run as i64], failed_chunk)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut failures = Vec::new();
            let mut stmt = conn.prepare(
                "SELECT rowid, seq, position, class, offset, end_offset, end_line FROM failures
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
                ))
            })?;
            for row in rows {
                let (id, seq, line, class, span) = row?;
                failures.push(OpenFailure {
                    id,
                    seq,
                    line,
                    class: class.parse().map_err(Fail::Corrupt)?,
                    span,
                });
            }
            Ok(Retryable {
                chunks,
                failures,
                hosts,
            })
        })
        .await
    }

    async fn mark_in_flight(&self, run: RunId, seqs: &[u64]) -> Result<(), StateError> {
        let seqs = seqs.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE chunks SET status = 'in_flight', dispatched_at = ?3
                     WHERE run = ?1 AND seq = ?2 AND status = 'pending'",
                )?;
                let now = now_ms() as i64;
                for seq in seqs {
                    update.execute(params![run as i64, seq as i64, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn apply_replies(&self, replies: &[Reply]) -> Result<Vec<Applied>, StateError> {
        let replies = replies.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let applied = replies
                .iter()
                .map(|r| apply_one(&tx, r))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok(applied)
        })
        .await
    }

    async fn heartbeat(&self, run: RunId) -> Result<(), StateError> {
        self.with(move |conn| {
            conn.execute(
                "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1",
                params![run as i64, now_ms() as i64],
            )?;
            Ok(())
        })
        .await
    }

    async fn finish_run(&self, run: RunId, state: RunState) -> Result<(), StateError> {
        self.with(move |conn| {
            let now = now_ms() as i64;
            let finished = state.is_final().then_some(now);
            conn.execute(
                "UPDATE runs SET state = ?2, finished_at = ?3, heartbeat_at = ?4 WHERE id = ?1",
                params![run as i64, state.as_str(), finished, now],
            )?;
            Ok(())
        })
        .await
    }

    async fn status(&self, run: RunId, chunk_timeout: Duration) -> Result<RunStatus, StateError> {
        self.with(move |conn| {
            let job: String = conn.query_row(
                "SELECT job FROM runs WHERE id = ?1",
                params![run as i64],
                |r| r.get(0),
            )?;
            let record = run_by(conn, &job, Some(run))?
                .ok_or_else(|| Fail::Corrupt(format!("run {run} vanished")))?;
            // A chunk dispatched again by `retry` counts as `retried`, not failed or dead; the items
            // of retry chunks were counted as read the first time.
            let (chunks, mut items) = conn.query_row(
                "SELECT COUNT(*),
                        COALESCE(SUM(status = 'pending'), 0),
                        COALESCE(SUM(status = 'in_flight'), 0),
                        COALESCE(SUM(status = 'done'), 0),
                        COALESCE(SUM(status = 'failed' AND retried_at IS NULL), 0),
                        COALESCE(SUM(status = 'dead' AND retried_at IS NULL), 0),
                        COALESCE(SUM(CASE WHEN retry = 0 THEN items END), 0),
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
                "SELECT seq, position, class, reason, retry, retried_at IS NOT NULL
                 FROM failures WHERE run = ?1 ORDER BY position, seq",
            )?;
            let rows = stmt.query_map(params![run as i64], |r| {
                Ok((
                    r.get::<_, Option<i64>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, bool>(5)?,
                ))
            })?;
            for row in rows {
                let (seq, position, class, reason, found_by_retry, retried) = row?;
                let class: FailureClass = class.parse().map_err(Fail::Corrupt)?;
                if class == FailureClass::BadData && !found_by_retry {
                    // Bad records are read but never put in a chunk.
                    items.read += 1;
                }
                if retried {
                    continue;
                }
                match class {
                    FailureClass::BadData | FailureClass::BadItem => items.skipped += 1,
                    FailureClass::Chunk => {}
                }
                failures.push(FailureRecord {
                    seq: seq.map(|s| s as u64),
                    position: position as u64,
                    class,
                    reason,
                });
            }
            let cutoff = now_ms().saturating_sub(chunk_timeout.as_millis() as u64) as i64;
            let mut stmt = conn.prepare(
                "SELECT seq, consumer, dispatched_at, attempts FROM chunks
                 WHERE run = ?1 AND status = 'in_flight' AND dispatched_at < ?2 ORDER BY seq",
            )?;
            let stuck = stmt
                .query_map(params![run as i64, cutoff], |r| {
                    Ok(StuckChunk {
                        seq: r.get::<_, i64>(0)? as u64,
                        consumer: r.get(1)?,
                        since: r.get::<_, i64>(2)? as u64,
                        attempt: r.get::<_, i64>(3)? as u32,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(RunStatus {
                run: record,
                items,
                chunks,
                failures,
                stuck,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::BadItem;
    use crate::state::{BadData, NewChunk};

    fn reply(seq: u64, attempt: u32, outcome: Outcome) -> Reply {
        Reply {
            job: "j".into(),
            run: 1,
            seq,
            attempt,
            consumer: "h/1".into(),
            outcome,
        }
    }

    async fn apply(store: &SqliteStore, reply: &Reply) -> Applied {
        let applied = store
            .apply_replies(std::slice::from_ref(reply))
            .await
            .expect("apply");
        applied[0]
    }

    #[tokio::test]
    async fn a_batch_applies_each_reply_once_in_order() {
        let (_dir, store, _run) = store_with_two_chunks().await;
        let done = reply(
            1,
            1,
            Outcome::Done {
                processed: 10,
                bad_items: vec![],
            },
        );
        let applied = store
            .apply_replies(&[
                done.clone(),
                done,
                reply(7, 1, Outcome::Dead { error: "x".into() }),
            ])
            .await
            .expect("apply");
        assert_eq!(
            applied,
            vec![Applied::Recorded, Applied::Duplicate, Applied::Unknown]
        );
    }

    async fn store_with_two_chunks() -> (tempfile::TempDir, SqliteStore, RunId) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.db")).expect("open");
        let run = store
            .create_run("j", "file x", "h/1")
            .await
            .expect("run")
            .id;
        for seq in 1..=2u64 {
            let chunk = NewChunk {
                seq,
                position: Position {
                    line: seq * 10,
                    offset: seq * 100,
                },
                end_offset: seq * 100 + 99,
                items: 10,
                end_line: seq * 10 + 9,
            };
            let ckpt = Checkpoint {
                offset: seq * 100 + 99,
                line: seq * 10 + 9,
                next_seq: seq + 1,
                exhausted: seq == 2,
            };
            let bad = [BadData {
                position: Position {
                    line: 5,
                    offset: 50,
                },
                end_offset: 60,
                end_line: 5,
                reason: "not JSON".into(),
            }];
            let bad: &[BadData] = if seq == 1 { &bad } else { &[] };
            store
                .record(
                    run,
                    Progress {
                        chunks: &[chunk],
                        checkpoint: &ckpt,
                        bad_data: bad,
                        retry: false,
                        retried: &[],
                    },
                )
                .await
                .expect("record");
        }
        (dir, store, run)
    }

    #[tokio::test]
    async fn replies_apply_once() {
        let (_dir, store, run) = store_with_two_chunks().await;
        store.mark_in_flight(run, &[1]).await.expect("in flight");
        let done = reply(
            1,
            1,
            Outcome::Done {
                processed: 9,
                bad_items: vec![BadItem {
                    line: 12,
                    reason: "no price".into(),
                }],
            },
        );
        assert_eq!(apply(&store, &done).await, Applied::Recorded);
        assert_eq!(apply(&store, &done).await, Applied::Duplicate);
        let mut other_run = done.clone();
        other_run.run = 99;
        assert_eq!(apply(&store, &other_run).await, Applied::Unknown);

        let s = store
            .status(run, Duration::from_secs(600))
            .await
            .expect("status");
        assert_eq!(s.chunks.total, 2);
        assert_eq!(s.chunks.done, 1);
        assert_eq!(s.chunks.pending, 1);
        assert_eq!(s.items.read, 21);
        assert_eq!(s.items.processed, 9);
        assert_eq!(s.items.skipped, 2);
        assert_eq!(s.failures.len(), 2);
        assert_eq!(s.failures[0].class, FailureClass::BadData);
        assert_eq!(s.failures[1].position, 12);
        assert_eq!(s.run.checkpoint.next_seq, 3);
        assert!(s.run.checkpoint.exhausted);
    }

    #[tokio::test]
    async fn retrying_then_dead() {
        let (_dir, store, run) = store_with_two_chunks().await;
        let retrying = reply(
            2,
            1,
            Outcome::Retrying {
                error: "exit 1".into(),
                next_attempt: 2,
            },
        );
        assert_eq!(apply(&store, &retrying).await, Applied::Recorded);
        assert_eq!(apply(&store, &retrying).await, Applied::Duplicate);
        let dead = reply(
            2,
            2,
            Outcome::Dead {
                error: "exit 1".into(),
            },
        );
        assert_eq!(apply(&store, &dead).await, Applied::Recorded);
        let s = store
            .status(run, Duration::from_secs(600))
            .await
            .expect("status");
        assert_eq!(s.chunks.dead, 1);
        assert_eq!(s.items.failed, 10);
        let chunk_failure = s
            .failures
            .iter()
            .find(|f| f.class == FailureClass::Chunk)
            .expect("chunk failure");
        assert_eq!(chunk_failure.seq, Some(2));
        assert_eq!(chunk_failure.position, 20);
    }

    #[tokio::test]
    async fn a_retry_takes_failures_over_in_the_transaction_that_records_it() {
        let (_dir, store, run) = store_with_two_chunks().await;
        let dead = reply(2, 1, Outcome::Dead { error: "x".into() });
        apply(&store, &dead).await;
        let failed = store.retryable(run).await.expect("retryable");
        assert_eq!(failed.chunks.len(), 1);
        assert_eq!(failed.chunks[0].end_line, Some(29));
        assert_eq!(failed.failures.len(), 1);
        let bad_id = failed.failures[0].id;
        assert_eq!(
            failed.failures[0].span,
            Some((
                Position {
                    line: 5,
                    offset: 50
                },
                60,
                5
            ))
        );
        let ckpt = store
            .run("j", Some(run))
            .await
            .expect("run")
            .expect("exists")
            .checkpoint;
        let retry_chunk = NewChunk {
            seq: 3,
            position: Position {
                line: 20,
                offset: 200,
            },
            end_offset: 299,
            items: 10,
            end_line: 29,
        };
        store
            .record(
                run,
                Progress {
                    chunks: &[retry_chunk],
                    checkpoint: &Checkpoint {
                        next_seq: 4,
                        ..ckpt
                    },
                    bad_data: &[],
                    retry: true,
                    retried: &[Retried::Chunk(2), Retried::Failure(bad_id)],
                },
            )
            .await
            .expect("record");
        assert_eq!(
            store.retryable(run).await.expect("retryable"),
            Retryable::default()
        );
        let s = store
            .status(run, Duration::from_secs(600))
            .await
            .expect("status");
        assert_eq!(s.chunks.dead, 0);
        assert_eq!(s.chunks.retried, 1);
        assert_eq!(s.items.read, 21, "a retry reads nothing new");
        assert_eq!(s.items.skipped, 0);
        assert_eq!(s.items.failed, 0);
        assert!(s.failures.is_empty(), "{:?}", s.failures);
        assert_eq!(s.chunks.pending, 2);
    }

    #[tokio::test]
    async fn chunks_in_flight_past_their_timeout_are_stuck() {
        let (_dir, store, run) = store_with_two_chunks().await;
        store.mark_in_flight(run, &[2]).await.expect("in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let s = store
            .status(run, Duration::from_millis(1))
            .await
            .expect("status");
        assert_eq!(s.stuck.len(), 1);
        assert_eq!(s.stuck[0].seq, 2);
        let s = store
            .status(run, Duration::from_secs(600))
            .await
            .expect("status");
        assert!(s.stuck.is_empty());
    }

    #[tokio::test]
    async fn open_chunks_are_the_unfinished_ones() {
        let (_dir, store, run) = store_with_two_chunks().await;
        store.mark_in_flight(run, &[2]).await.expect("in flight");
        let open = store.open_chunks(run).await.expect("open");
        let statuses: Vec<(u64, ChunkStatus)> = open.iter().map(|c| (c.seq, c.status)).collect();
        assert_eq!(
            statuses,
            vec![(1, ChunkStatus::Pending), (2, ChunkStatus::InFlight)]
        );
        assert_eq!(open[1].position.offset, 200);
        assert_eq!(open[1].end_offset, 299);
        let done = reply(
            1,
            1,
            Outcome::Done {
                processed: 10,
                bad_items: vec![],
            },
        );
        apply(&store, &done).await;
        assert_eq!(store.open_chunks(run).await.expect("open").len(), 1);
        store.claim_run(run, "h/2").await.expect("claim");
        let r = store
            .run("j", Some(run))
            .await
            .expect("run")
            .expect("exists");
        assert_eq!(r.owner.as_deref(), Some("h/2"));
    }

    /// Regression: `status` opened the store with writes (schema, user_version), which failed
    /// the running dispatcher's next deferred transaction with SQLITE_BUSY (exit 1 mid-run).
    #[tokio::test]
    async fn opening_an_up_to_date_store_writes_nothing() {
        let (dir, store, _run) = store_with_two_chunks().await;
        let data_version = |s: &SqliteStore| -> i64 {
            let conn = s.conn.lock().unwrap_or_else(|p| p.into_inner());
            conn.pragma_query_value(None, "data_version", |r| r.get(0))
                .expect("data_version")
        };
        let before = data_version(&store);
        let reader = SqliteStore::open(&dir.path().join("s.db")).expect("second open");
        reader
            .status(1, Duration::from_secs(1))
            .await
            .expect("status");
        assert_eq!(data_version(&store), before, "another connection committed");
    }

    /// A store written by the previous version (schema 2) opens, keeps its runs, and can record
    /// what `retry` needs from then on.
    #[tokio::test]
    async fn a_version_2_store_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v2.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL,
                   state TEXT NOT NULL, source TEXT NOT NULL, started_at INTEGER NOT NULL,
                   finished_at INTEGER, heartbeat_at INTEGER NOT NULL, owner TEXT,
                   ckpt_offset INTEGER NOT NULL DEFAULT 0, ckpt_line INTEGER NOT NULL DEFAULT 0,
                   next_seq INTEGER NOT NULL DEFAULT 1, exhausted INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE chunks (run INTEGER NOT NULL, seq INTEGER NOT NULL,
                   line INTEGER NOT NULL, offset INTEGER NOT NULL, end_offset INTEGER NOT NULL,
                   items INTEGER NOT NULL, processed INTEGER NOT NULL DEFAULT 0,
                   status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1,
                   dispatched_at INTEGER, finished_at INTEGER, last_error TEXT, consumer TEXT,
                   PRIMARY KEY (run, seq)) WITHOUT ROWID;
                 CREATE TABLE failures (run INTEGER NOT NULL, seq INTEGER,
                   position INTEGER NOT NULL, class TEXT NOT NULL, reason TEXT NOT NULL);
                 INSERT INTO runs (job, state, source, started_at, heartbeat_at)
                   VALUES ('j', 'completed_with_failures', 'file x', 1, 1);
                 INSERT INTO chunks (run, seq, line, offset, end_offset, items, status)
                   VALUES (1, 1, 1, 0, 100, 10, 'dead');
                 INSERT INTO failures (run, seq, position, class, reason)
                   VALUES (1, NULL, 11, 'bad_data', 'not JSON');
                 PRAGMA user_version = 2;",
            )
            .expect("v2 schema");
        }
        let store = SqliteStore::open(&path).expect("migrate");
        let s = store
            .status(1, Duration::from_secs(1))
            .await
            .expect("status");
        assert_eq!((s.chunks.dead, s.items.read, s.items.skipped), (1, 11, 1));
        // Rows from before cannot say where they end: `retry` is told, and lists them.
        let failed = store.retryable(1).await.expect("retryable");
        assert_eq!(failed.chunks[0].end_line, None);
        assert_eq!(failed.failures[0].span, None);
    }

    #[tokio::test]
    async fn latest_run_and_finish() {
        let (_dir, store, run) = store_with_two_chunks().await;
        let second = store.create_run("j", "file x", "h/1").await.expect("run");
        assert_eq!(
            store.run("j", None).await.expect("run").map(|r| r.id),
            Some(second.id)
        );
        store
            .finish_run(run, RunState::Completed)
            .await
            .expect("finish");
        let first = store
            .run("j", Some(run))
            .await
            .expect("run")
            .expect("exists");
        assert_eq!(first.state, RunState::Completed);
        assert!(first.finished_at.is_some());
        assert!(store.run("other", None).await.expect("run").is_none());
    }
}
