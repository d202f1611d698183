//! The SQLite schema, created whole when a store is new. A store of the previous version is
//! brought up to date ([`MIGRATIONS`]); one of another version (written by an earlier
//! development build, or a newer release) is refused, not guessed at.

use rusqlite::{Connection, TransactionBehavior};

use super::Fail;

/// Bumped with every change to [`SCHEMA`].
const SCHEMA_VERSION: i64 = 7;

/// How a store of an earlier version is brought to the next one: (from version, statements).
const MIGRATIONS: &[(i64, &str)] = &[
    // 5: the input's fingerprint, so that `run --resume` can tell an edited input.
    (4, "ALTER TABLE runs ADD COLUMN input TEXT;"),
    // 6: a run's own throttle, set by `throttle` while it runs.
    (5, "ALTER TABLE runs ADD COLUMN throttle TEXT;"),
    // 7: keys, for a source read by key (a query): the checkpoint's, each chunk's range, each
    // failed row's.
    (
        6,
        "ALTER TABLE runs ADD COLUMN ckpt_key TEXT;
         ALTER TABLE chunks ADD COLUMN keys TEXT;
         ALTER TABLE failures ADD COLUMN key TEXT;",
    ),
];

/// The whole schema of a new store.
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
    owner_token   TEXT,
    ckpt_offset   INTEGER NOT NULL DEFAULT 0,
    ckpt_line     INTEGER NOT NULL DEFAULT 0,
    next_seq      INTEGER NOT NULL DEFAULT 1,
    exhausted     INTEGER NOT NULL DEFAULT 0,
    input         TEXT,
    throttle      TEXT,
    ckpt_key      TEXT
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
    processing_since INTEGER,
    noted_at      INTEGER,
    keys          TEXT,
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
    retried_at INTEGER,
    key        TEXT
);
CREATE INDEX IF NOT EXISTS failures_by_run ON failures (run, position);
";

/// Creates the schema in a new store; checks the version of an existing one. Opening an
/// up-to-date store writes nothing: `status` runs beside a dispatcher, and a write here would
/// make the dispatcher's next transaction start from a stale snapshot.
pub(super) fn prepare(conn: &mut Connection) -> Result<(), Fail> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        // Another process (a `status` beside a starting dispatcher) may create it at the same
        // time: take the write lock first (waiting for it), then look again.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let again: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let now = if again == 0 {
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            SCHEMA_VERSION
        } else {
            again
        };
        tx.commit()?;
        return check(now);
    }
    if version < SCHEMA_VERSION && MIGRATIONS.iter().any(|(from, _)| *from == version) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut now: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        while let Some((_, step)) = MIGRATIONS.iter().find(|(from, _)| *from == now) {
            tx.execute_batch(step)?;
            now += 1;
        }
        tx.pragma_update(None, "user_version", now)?;
        tx.commit()?;
        return check(now);
    }
    check(version)
}

/// Refuses a store of another schema version, saying what to do.
fn check(version: i64) -> Result<(), Fail> {
    match version {
        SCHEMA_VERSION => Ok(()),
        v if v > SCHEMA_VERSION => Err(Fail::Corrupt(format!(
            "schema version {v} is newer than this build's {SCHEMA_VERSION}; use a newer hopper-dispatcher"
        ))),
        v => Err(Fail::Corrupt(format!(
            "schema version {v} was written by a development build before the first release; \
             this build reads version {SCHEMA_VERSION}: move the file away to start afresh"
        ))),
    }
}
