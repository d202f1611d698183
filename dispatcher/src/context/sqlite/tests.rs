//! What only the SQLite store does: its file's schema versions and migrations, and opening it
//! without writing. What every store does is in the conformance suite
//! (`context::conformance`), which runs against this store too.

use super::*;
use crate::context::conformance::{two_chunks, LENIENT};

/// Regression: `status` opened the store with writes (schema, user_version), which failed
/// the running dispatcher's next deferred transaction with SQLITE_BUSY (exit 1 mid-run).
#[tokio::test]
async fn opening_an_up_to_date_store_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("s.db")).expect("open");
    two_chunks(&store).await;
    let data_version = |s: &SqliteStore| -> i64 {
        let conn = s.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.pragma_query_value(None, "data_version", |r| r.get(0))
            .expect("data_version")
    };
    let before = data_version(&store);
    let reader = SqliteStore::open(&dir.path().join("s.db")).expect("second open");
    reader.status(1, LENIENT).await.expect("status");
    assert_eq!(data_version(&store), before, "another connection committed");
}

/// A store of an earlier schema (4: no input fingerprint, no run throttle, no keys) is brought
/// up to date, step by step, and keeps its runs, which have none of them.
#[tokio::test]
async fn a_store_of_the_previous_schema_is_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("s.db")).expect("open");
    let run = two_chunks(&store).await;
    drop(store);
    let path = dir.path().join("s.db");
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "ALTER TABLE runs DROP COLUMN input; ALTER TABLE runs DROP COLUMN throttle;
             ALTER TABLE runs DROP COLUMN ckpt_key; ALTER TABLE chunks DROP COLUMN keys;
             ALTER TABLE failures DROP COLUMN key; PRAGMA user_version = 4;",
        )
        .expect("back to schema 4");
    }
    let store = SqliteStore::open(&path).expect("migrated");
    let old = store.run("j", Some(run)).await.expect("run").expect("kept");
    assert_eq!((old.input, old.throttle), (None, None));
    assert_eq!(old.checkpoint.key, None);
    let open = store.open_chunks(run).await.expect("chunks");
    assert_eq!(open.len(), 2);
    assert!(open.iter().all(|c| c.keys.is_none()));
}

#[tokio::test]
async fn a_store_of_another_schema_version_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("CREATE TABLE runs (id INTEGER); PRAGMA user_version = 2;")
            .expect("an old schema");
    }
    let err = SqliteStore::open(&path).expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, ContextError::Corrupt { .. }), "{text}");
    assert!(
        text.contains("old.db") && text.contains("move the file away"),
        "{text}"
    );
}

/// Regression: two dispatchers started together on a new state file; one failed at once with
/// "database is locked" (a busy answer of SQLite's that skips the busy handler) instead of
/// opening the store and being told the other holds the job.
#[test]
fn processes_opening_a_new_file_together_all_open_it() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let opened: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|_| scope.spawn(|| SqliteStore::open(&path).is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(false))
                .collect()
        });
        assert!(opened.iter().all(|ok| *ok), "{opened:?}");
    }
}
