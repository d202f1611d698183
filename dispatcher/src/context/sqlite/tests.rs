//! The SQLite store against a real file: replies applied once, retries taken over in one
//! transaction, stuck and open chunks, schema versions.

use super::*;
use crate::context::{
    now_ms, BadData, Checkpoint, ChunkStatus, FailureClass, Fence, NewChunk, Retried, StuckAfter,
};
use hopper_common::{BadItem, Outcome, Position};

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

/// The write token of the test's dispatcher.
const TOKEN: &str = "h/1#0#0";

fn fence(run: RunId) -> Fence {
    Fence {
        run,
        token: TOKEN.into(),
    }
}

async fn apply(store: &SqliteStore, reply: &Reply) -> Applied {
    let applied = store
        .apply_replies(&fence(1), std::slice::from_ref(reply))
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
        .apply_replies(
            &fence(1),
            &[
                done.clone(),
                done,
                reply(7, 1, Outcome::Dead { error: "x".into() }),
            ],
        )
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
        .create_run("j", "file x", "v1:0:0", TOKEN, nobody_alive)
        .await
        .expect("run");
    let run = won(run).id;
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
            keys: None,
        };
        let ckpt = Checkpoint {
            offset: seq * 100 + 99,
            line: seq * 10 + 9,
            next_seq: seq + 1,
            exhausted: seq == 2,
            key: None,
        };
        let bad = [BadData {
            position: Position {
                line: 5,
                offset: 50,
            },
            end_offset: 60,
            end_line: 5,
            reason: "not JSON".into(),
            key: None,
        }];
        let bad: &[BadData] = if seq == 1 { &bad } else { &[] };
        store
            .record(
                &fence(run),
                RecordBatch {
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
    store
        .mark_in_flight(&fence(run), &[1])
        .await
        .expect("in flight");
    let done = reply(
        1,
        1,
        Outcome::Done {
            processed: 9,
            bad_items: vec![BadItem {
                line: 12,
                reason: "no price".into(),
                key: None,
            }],
        },
    );
    assert_eq!(apply(&store, &done).await, Applied::Recorded);
    assert_eq!(apply(&store, &done).await, Applied::Duplicate);
    let mut other_run = done.clone();
    other_run.run = 99;
    assert_eq!(apply(&store, &other_run).await, Applied::Unknown);

    let s = store.status(run, LENIENT).await.expect("status");
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

/// Regression (the protocol issue, finding 5): a late failure of an older attempt left the chunk
/// `failed` although a newer attempt succeeded.
#[tokio::test]
async fn an_older_attempt_never_overrides_a_newer_one_and_done_is_final() {
    let (_dir, store, run) = store_with_two_chunks().await;
    store
        .mark_in_flight(&fence(run), &[1, 2])
        .await
        .expect("in flight");
    let retrying = |seq| {
        reply(
            seq,
            1,
            Outcome::Retrying {
                error: "timeout".into(),
                next_attempt: 2,
            },
        )
    };
    let done = |seq, attempt| {
        reply(
            seq,
            attempt,
            Outcome::Done {
                processed: 10,
                bad_items: vec![],
            },
        )
    };
    let failed = |seq, attempt| {
        reply(
            seq,
            attempt,
            Outcome::Failed {
                error: "no table".into(),
            },
        )
    };
    // Chunk 1: attempt 2 is under way when a copy of attempt 1 fails late: ignored.
    assert_eq!(apply(&store, &retrying(1)).await, Applied::Recorded);
    assert_eq!(apply(&store, &failed(1, 1)).await, Applied::Stale);
    assert_eq!(apply(&store, &done(1, 2)).await, Applied::Recorded);
    // Done is final, whatever comes after, of any attempt.
    assert_eq!(apply(&store, &failed(1, 3)).await, Applied::Duplicate);
    assert_eq!(apply(&store, &retrying(1)).await, Applied::Duplicate);
    // Chunk 2: attempt 1 failed first; attempt 2 (a newer one) then succeeded: it stands.
    assert_eq!(apply(&store, &failed(2, 1)).await, Applied::Recorded);
    assert_eq!(apply(&store, &done(2, 1)).await, Applied::Duplicate);
    assert_eq!(apply(&store, &done(2, 2)).await, Applied::Recorded);

    let s = store.status(run, LENIENT).await.expect("status");
    assert_eq!((s.chunks.done, s.chunks.failed), (2, 0));
    assert_eq!(s.items.processed, 20);
    assert!(
        s.failures.iter().all(|f| f.class != FailureClass::Chunk),
        "{:?}",
        s.failures
    );
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
    let s = store.status(run, LENIENT).await.expect("status");
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
    assert_eq!(failed.chunks[0].end_line, 29);
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
        keys: None,
    };
    store
        .record(
            &fence(run),
            RecordBatch {
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
    let s = store.status(run, LENIENT).await.expect("status");
    assert_eq!(s.chunks.dead, 0);
    assert_eq!(s.chunks.retried, 1);
    // Records count as they stand: chunk 1's and the retry chunk's items. The bad record it
    // took over counts with whatever chunk holds it now (none here: the chunk is made up).
    assert_eq!(s.items.read, 20);
    assert_eq!(s.items.skipped, 0);
    assert_eq!(s.items.failed, 0);
    assert!(s.failures.is_empty(), "{:?}", s.failures);
    assert_eq!(s.chunks.pending, 2);
}

/// Rules under which nothing is stuck within a test.
const LENIENT: StuckAfter = StuckAfter {
    processing: Duration::from_secs(600),
    silent: Duration::from_secs(600),
};

/// Regression (the protocol issue): time waiting in the queue counted as processing, and a
/// chunk behind a backlog was taken for stuck and published again.
#[tokio::test]
async fn only_chunks_in_progress_can_be_stuck_and_queue_time_never_counts() {
    let (_dir, store, run) = store_with_two_chunks().await;
    store
        .mark_in_flight(&fence(run), &[1, 2])
        .await
        .expect("in flight");
    let tight = StuckAfter {
        processing: Duration::from_millis(1),
        silent: Duration::from_secs(600),
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    // In flight for longer than the limit, but nobody is processing them: waiting in a queue.
    let s = store.status(run, tight).await.expect("status");
    assert!(
        s.in_progress.is_empty() && s.stuck.is_empty(),
        "{:?}",
        s.stuck
    );

    // Chunk 2's consumer says it has been at it for 3 s.
    let note = reply(2, 1, Outcome::Processing { elapsed_ms: 3_000 });
    assert_eq!(apply(&store, &note).await, Applied::Recorded);
    let s = store.status(run, LENIENT).await.expect("status");
    assert_eq!(s.in_progress.len(), 1);
    assert_eq!(
        (s.in_progress[0].seq, s.in_progress[0].consumer.as_deref()),
        (2, Some("h/1"))
    );
    assert!(s.in_progress[0].since <= now_ms() - 3_000);
    assert!(s.stuck.is_empty());
    // Past the processing limit: stuck, with why.
    let s = store.status(run, tight).await.expect("status");
    assert_eq!(s.stuck.len(), 1);
    assert!(
        s.stuck[0].reason.contains("past chunk_timeout"),
        "{}",
        s.stuck[0].reason
    );
    // A consumer silent for longer than its notes allow: stuck too.
    let silent = StuckAfter {
        processing: Duration::from_secs(600),
        silent: Duration::from_millis(1),
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let s = store.status(run, silent).await.expect("status");
    assert!(
        s.stuck[0].reason.contains("no note"),
        "{}",
        s.stuck[0].reason
    );
    // Its outcome ends it being in progress.
    let done = reply(
        2,
        1,
        Outcome::Done {
            processed: 10,
            bad_items: vec![],
        },
    );
    assert_eq!(apply(&store, &done).await, Applied::Recorded);
    let s = store.status(run, tight).await.expect("status");
    assert!(s.in_progress.is_empty() && s.stuck.is_empty());
}

#[tokio::test]
async fn open_chunks_are_the_unfinished_ones() {
    let (_dir, store, run) = store_with_two_chunks().await;
    store
        .mark_in_flight(&fence(run), &[2])
        .await
        .expect("in flight");
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
    let other = Fence {
        run,
        token: "h/2#0#0".into(),
    };
    won(store.claim_run(&other, nobody_alive).await.expect("claim"));
    // The first dispatcher lost the run: its next write is refused, naming the new owner.
    match store.mark_in_flight(&fence(run), &[2]).await {
        Err(ContextError::Fenced { run: r, holder }) => {
            assert_eq!((r, holder.as_str()), (run, "h/2"))
        }
        other => panic!("expected the write to be fenced off, got {other:?}"),
    }
    assert!(store.heartbeat(&fence(run)).await.is_err());
    store.heartbeat(&other).await.expect("the new owner writes");
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
    reader.status(1, LENIENT).await.expect("status");
    assert_eq!(data_version(&store), before, "another connection committed");
}

/// A store of an earlier schema (4: no input fingerprint, no run throttle, no keys) is brought
/// up to date, step by step, and keeps its runs, which have none of them.
#[tokio::test]
async fn a_store_of_the_previous_schema_is_migrated() {
    let (dir, store, run) = store_with_two_chunks().await;
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

#[tokio::test]
async fn latest_run_and_finish() {
    let (_dir, store, run) = store_with_two_chunks().await;
    let second = won(store
        .create_run("j", "file x", "v1:0:0", TOKEN, nobody_alive)
        .await
        .expect("run"));
    assert_eq!(
        store.run("j", None).await.expect("run").map(|r| r.id),
        Some(second.id)
    );
    store
        .finish_run(&fence(run), RunState::Completed)
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

fn nobody_alive(_: &RunRecord) -> bool {
    false
}

fn everybody_alive(_: &RunRecord) -> bool {
    true
}

fn won<T>(claimed: Claimed<T>) -> T {
    match claimed {
        Claimed::Won(t) => t,
        Claimed::Held(run) => panic!("run {} is held by {:?}", run.id, run.owner),
    }
}

#[tokio::test]
async fn a_live_owner_holds_the_job_for_every_way_of_taking_a_run() {
    let (_dir, store, run) = store_with_two_chunks().await;
    let other = "h/2#0#0";
    // Run 1 is unfinished and its owner alive: no new run, no resume, no retry by another.
    match store
        .create_run("j", "file x", "v1:0:0", other, everybody_alive)
        .await
        .expect("create")
    {
        Claimed::Held(held) => assert_eq!(held.id, run),
        Claimed::Won(r) => panic!("run {} created beside a live one", r.id),
    }
    let theirs = Fence {
        run,
        token: other.into(),
    };
    for claimed in [
        store
            .claim_run(&theirs, everybody_alive)
            .await
            .expect("claim"),
        store
            .reopen_run(&theirs, everybody_alive)
            .await
            .expect("reopen"),
    ] {
        assert!(
            matches!(claimed, Claimed::Held(ref r) if r.id == run),
            "{claimed:?}"
        );
    }
    // Nothing changed: the run is still the first dispatcher's, and it is the only one.
    let now = store.run("j", None).await.expect("run").expect("exists");
    assert_eq!((now.id, now.owner_token.as_deref()), (run, Some(TOKEN)));
    // Its own owner is never held off by itself; another job is not held off at all.
    won(store
        .claim_run(&fence(run), everybody_alive)
        .await
        .expect("claim"));
    won(store
        .create_run("k", "file x", "v1:0:0", other, everybody_alive)
        .await
        .expect("create"));
}
