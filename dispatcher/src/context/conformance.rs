//! One suite for every store: each test here runs against SQLite (a file of its own) and
//! against PostgreSQL (a schema of its own in the test database, dropped when the test ends),
//! so that the two stores cannot drift apart. A test that needs PostgreSQL and cannot reach it
//! fails, saying how to start it.
//!
//! Replies applied once, retries taken over in one transaction, stuck and open chunks, fencing,
//! one live owner per job.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::*;
use crate::context::{
    now_ms, BadData, Checkpoint, ChunkStatus, FailureClass, Fence, NewChunk, Retried, StuckAfter,
};
use hopper_common::{BadItem, Outcome, Position};

/// The database the PostgreSQL side of the suite uses.
pub(super) fn pg_url() -> String {
    std::env::var("HOPPER_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Where one test's store lives, removed when the test ends.
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

/// One test's store, and the means to open a second handle on the same storage (another
/// dispatcher, or a `status` in another process).
pub(super) struct Fixture {
    pub(super) store: Arc<dyn ContextStore>,
    place: Place,
}

impl Fixture {
    pub(super) fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.db")).expect("open");
        Fixture {
            store: Arc::new(store),
            place: Place::Sqlite(dir),
        }
    }

    /// A fresh schema of its own: `ctx_<pid>_<n>`.
    pub(super) async fn postgres() -> Fixture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let schema = format!(
            "ctx_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Dropped when the test ends, whatever it came to; also a leftover of a killed run.
        let place = Place::Postgres(schema.clone());
        drop_schema(&schema);
        let store = match PostgresStore::open(&pg_url(), &schema).await {
            Ok(store) => store,
            Err(e) => panic!(
                "these tests need PostgreSQL: {e}. Start it (`pg_ctlcluster \
                 --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or set \
                 HOPPER_TEST_PG_URL."
            ),
        };
        Fixture {
            store: Arc::new(store),
            place,
        }
    }

    /// Another handle on the same storage, as another process would open it.
    pub(super) async fn another(&self) -> Arc<dyn ContextStore> {
        match &self.place {
            Place::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("s.db")).expect("open"))
            }
            Place::Postgres(schema) => {
                Arc::new(PostgresStore::open(&pg_url(), schema).await.expect("open"))
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Place::Postgres(schema) = &self.place {
            drop_schema(schema);
        }
    }
}

/// Drops a test's schema, from a thread of its own (a test's runtime cannot block).
pub(super) fn drop_schema(schema: &str) {
    let schema = schema.to_string();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok((client, conn)) =
                tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await;
        });
    })
    .join();
}

/// Runs each test named against both stores: `conformance::sqlite::NAME` and
/// `conformance::postgres::NAME`.
macro_rules! for_each_store {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Fixture::sqlite()).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Fixture::postgres().await).await
            })*
        }
    };
}

for_each_store!(
    a_batch_applies_each_reply_once_in_order,
    replies_apply_once,
    an_older_attempt_never_overrides_a_newer_one_and_done_is_final,
    retrying_then_dead,
    a_retry_takes_failures_over_in_the_transaction_that_records_it,
    only_chunks_in_progress_can_be_stuck_and_queue_time_never_counts,
    open_chunks_are_the_unfinished_ones,
    latest_run_and_finish,
    a_live_owner_holds_the_job_for_every_way_of_taking_a_run,
    of_dispatchers_starting_at_once_exactly_one_wins,
    another_process_reads_what_the_owner_wrote,
    keys_controls_and_clean_up_round_trip,
);

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

async fn apply(store: &dyn ContextStore, reply: &Reply) -> Applied {
    let applied = store
        .apply_replies(&fence(1), std::slice::from_ref(reply))
        .await
        .expect("apply");
    applied[0]
}

async fn a_batch_applies_each_reply_once_in_order(f: Fixture) {
    let store = &*f.store;
    two_chunks(store).await;
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

/// Run 1 of job `j`, owned by [`TOKEN`], with two chunks of 10 items recorded (lines 10-19
/// and 20-29) and a bad record at line 5; its input read to the end.
pub(super) async fn two_chunks(store: &dyn ContextStore) -> RunId {
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
    run
}

async fn replies_apply_once(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
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
    assert_eq!(apply(store, &done).await, Applied::Recorded);
    assert_eq!(apply(store, &done).await, Applied::Duplicate);
    let mut other_run = done.clone();
    other_run.run = 99;
    assert_eq!(apply(store, &other_run).await, Applied::Unknown);

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
async fn an_older_attempt_never_overrides_a_newer_one_and_done_is_final(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
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
    assert_eq!(apply(store, &retrying(1)).await, Applied::Recorded);
    assert_eq!(apply(store, &failed(1, 1)).await, Applied::Stale);
    assert_eq!(apply(store, &done(1, 2)).await, Applied::Recorded);
    // Done is final, whatever comes after, of any attempt.
    assert_eq!(apply(store, &failed(1, 3)).await, Applied::Duplicate);
    assert_eq!(apply(store, &retrying(1)).await, Applied::Duplicate);
    // Chunk 2: attempt 1 failed first; attempt 2 (a newer one) then succeeded: it stands.
    assert_eq!(apply(store, &failed(2, 1)).await, Applied::Recorded);
    assert_eq!(apply(store, &done(2, 1)).await, Applied::Duplicate);
    assert_eq!(apply(store, &done(2, 2)).await, Applied::Recorded);

    let s = store.status(run, LENIENT).await.expect("status");
    assert_eq!((s.chunks.done, s.chunks.failed), (2, 0));
    assert_eq!(s.items.processed, 20);
    assert!(
        s.failures.iter().all(|f| f.class != FailureClass::Chunk),
        "{:?}",
        s.failures
    );
}

async fn retrying_then_dead(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
    let retrying = reply(
        2,
        1,
        Outcome::Retrying {
            error: "exit 1".into(),
            next_attempt: 2,
        },
    );
    assert_eq!(apply(store, &retrying).await, Applied::Recorded);
    assert_eq!(apply(store, &retrying).await, Applied::Duplicate);
    let dead = reply(
        2,
        2,
        Outcome::Dead {
            error: "exit 1".into(),
        },
    );
    assert_eq!(apply(store, &dead).await, Applied::Recorded);
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

async fn a_retry_takes_failures_over_in_the_transaction_that_records_it(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
    let dead = reply(2, 1, Outcome::Dead { error: "x".into() });
    apply(store, &dead).await;
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
pub(super) const LENIENT: StuckAfter = StuckAfter {
    processing: Duration::from_secs(600),
    silent: Duration::from_secs(600),
};

/// Regression (the protocol issue): time waiting in the queue counted as processing, and a
/// chunk behind a backlog was taken for stuck and published again.
async fn only_chunks_in_progress_can_be_stuck_and_queue_time_never_counts(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
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
    assert_eq!(apply(store, &note).await, Applied::Recorded);
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
    assert_eq!(apply(store, &done).await, Applied::Recorded);
    let s = store.status(run, tight).await.expect("status");
    assert!(s.in_progress.is_empty() && s.stuck.is_empty());
}

async fn open_chunks_are_the_unfinished_ones(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
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
    apply(store, &done).await;
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
    // Its chunks and its replies are refused too, and leave nothing behind (the owner check
    // and the writes go in one transaction).
    let late = NewChunk {
        seq: 3,
        position: Position {
            line: 30,
            offset: 300,
        },
        end_offset: 399,
        items: 10,
        end_line: 39,
        keys: None,
    };
    let ckpt = Checkpoint {
        offset: 399,
        line: 39,
        next_seq: 4,
        exhausted: true,
        key: None,
    };
    let recorded = store
        .record(
            &fence(run),
            RecordBatch {
                chunks: &[late],
                checkpoint: &ckpt,
                bad_data: &[],
                retry: false,
                retried: &[],
            },
        )
        .await;
    assert!(
        matches!(recorded, Err(ContextError::Fenced { .. })),
        "{recorded:?}"
    );
    let finished = reply(
        2,
        1,
        Outcome::Done {
            processed: 10,
            bad_items: vec![],
        },
    );
    let applied = store
        .apply_replies(&fence(run), std::slice::from_ref(&finished))
        .await;
    assert!(
        matches!(applied, Err(ContextError::Fenced { .. })),
        "{applied:?}"
    );
    let open: Vec<(u64, ChunkStatus)> = store
        .open_chunks(run)
        .await
        .expect("open")
        .iter()
        .map(|c| (c.seq, c.status))
        .collect();
    assert_eq!(open, vec![(2, ChunkStatus::InFlight)]);
    store.heartbeat(&other).await.expect("the new owner writes");
    let r = store
        .run("j", Some(run))
        .await
        .expect("run")
        .expect("exists");
    assert_eq!(r.owner.as_deref(), Some("h/2"));
}

async fn latest_run_and_finish(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
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

async fn a_live_owner_holds_the_job_for_every_way_of_taking_a_run(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
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

/// Eight dispatchers of one job start at the same moment, each through its own handle on the
/// store, each seeing the others alive: one run is created, the seven others are held off.
async fn of_dispatchers_starting_at_once_exactly_one_wins(f: Fixture) {
    let mut handles = Vec::new();
    for i in 0..8 {
        let store = f.another().await;
        handles.push(tokio::spawn(async move {
            store
                .create_run(
                    "race",
                    "file x",
                    "v1:0:0",
                    &format!("h/{i}#0#0"),
                    everybody_alive,
                )
                .await
                .expect("create")
        }));
    }
    let mut won = 0;
    for h in handles {
        if let Claimed::Won(_) = h.await.expect("task") {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert_eq!(f.store.runs("race").await.expect("runs").len(), 1);
}

/// What the owner wrote is what another process reads, exactly: `status` from elsewhere.
async fn another_process_reads_what_the_owner_wrote(f: Fixture) {
    let store = &*f.store;
    let run = two_chunks(store).await;
    store
        .mark_in_flight(&fence(run), &[1, 2])
        .await
        .expect("in flight");
    let done = reply(
        1,
        1,
        Outcome::Done {
            processed: 10,
            bad_items: vec![],
        },
    );
    apply(store, &done).await;
    let mine = store.status(run, LENIENT).await.expect("status");
    let theirs = f
        .another()
        .await
        .status(run, LENIENT)
        .await
        .expect("status");
    assert_eq!(mine.items, theirs.items);
    assert_eq!(mine.chunks, theirs.chunks);
    assert_eq!(mine.failures, theirs.failures);
    assert_eq!(mine.run, theirs.run);
    assert_eq!(
        (
            theirs.items.read,
            theirs.items.processed,
            theirs.chunks.in_flight
        ),
        (21, 10, 1)
    );
}

/// Keys, a run's throttle and paused state, and the clean-up of ended runs come back as they
/// were written.
async fn keys_controls_and_clean_up_round_trip(f: Fixture) {
    let store = &*f.store;
    let run = won(store
        .create_run("j", "postgres db", "q1:abc", TOKEN, nobody_alive)
        .await
        .expect("run"))
    .id;
    let keys = Keys::Range {
        after: Some("[1,\"a\"]".into()),
        first: "[1,\"b\"]".into(),
        last: "[2,\"a\"]".into(),
    };
    let chunk = NewChunk {
        seq: 1,
        position: Position { line: 1, offset: 0 },
        end_offset: 0,
        items: 3,
        end_line: 3,
        keys: Some(keys.clone()),
    };
    let ckpt = Checkpoint {
        offset: 0,
        line: 3,
        next_seq: 2,
        exhausted: false,
        key: Some("[2,\"a\"]".into()),
    };
    let bad = BadData {
        position: Position { line: 4, offset: 0 },
        end_offset: 0,
        end_line: 4,
        reason: "no price".into(),
        key: Some("[2,\"b\"]".into()),
    };
    store
        .record(
            &fence(run),
            RecordBatch {
                chunks: &[chunk],
                checkpoint: &ckpt,
                bad_data: std::slice::from_ref(&bad),
                retry: false,
                retried: &[],
            },
        )
        .await
        .expect("record");
    let open = store.open_chunks(run).await.expect("open");
    assert_eq!(open[0].keys, Some(keys));
    let r = store
        .run("j", Some(run))
        .await
        .expect("run")
        .expect("exists");
    assert_eq!(r.checkpoint, ckpt);
    assert_eq!(r.input.as_deref(), Some("q1:abc"));
    let failed = store.retryable(run).await.expect("retryable");
    assert_eq!(failed.failures[0].key, bad.key);
    let dead = reply(1, 1, Outcome::Dead { error: "x".into() });
    apply(store, &dead).await;
    let s = store.status(run, LENIENT).await.expect("status");
    let chunk_failure = s.failures.iter().find(|f| f.class == FailureClass::Chunk);
    assert_eq!(
        chunk_failure.and_then(|f| f.key.as_deref()),
        Some("[1,\"b\"]")
    );

    let throttle = hopper_common::job::Throttle {
        window: 7,
        rate: 12.5,
        ramp_up: Duration::from_secs(3),
    };
    assert!(store
        .control(run, Some(RunState::Paused), Some(throttle))
        .await
        .expect("control"));
    let r = store
        .run("j", Some(run))
        .await
        .expect("run")
        .expect("exists");
    assert_eq!((r.state, r.throttle), (RunState::Paused, Some(throttle)));

    // Only ended runs go, and only those ended before the given time.
    assert_eq!(
        store
            .delete_runs("j", now_ms() + 1000)
            .await
            .expect("clean"),
        0
    );
    store
        .finish_run(&fence(run), RunState::CompletedWithFailures)
        .await
        .expect("finish");
    assert!(!store
        .control(run, Some(RunState::Running), None)
        .await
        .expect("control"));
    assert_eq!(store.delete_runs("j", 1).await.expect("clean"), 0);
    assert_eq!(
        store
            .delete_runs("j", now_ms() + 1000)
            .await
            .expect("clean"),
        1
    );
    assert!(store.runs("j").await.expect("runs").is_empty());
}
