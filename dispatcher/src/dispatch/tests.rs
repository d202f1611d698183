//! The dispatch loop in-process, with no broker: the test plays the consumers over the local
//! transport, and a wrapper around it injects faults. Each test counts what was published and
//! checks that every chunk ends done exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use hopper_common::transport::{Confirm, Inbox};
use hopper_common::{
    codec, Chunk, Job, Label, LocalBroker, Outcome, Reply, Route, Transport, TransportError,
};
use tokio_util::sync::CancellationToken;

use super::{run_on, RunSummary, Start};
use crate::context::{ExecutionContext, RunState};
use crate::options::RunOptions;

/// A job over `records` JSON lines, `items` per chunk, its state in `dir`.
fn job(dir: &Path, records: u64, items: usize, window: usize) -> Job {
    let input: String = (1..=records).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    std::fs::write(dir.join("in.jsonl"), input).expect("write the input");
    let text = format!(
        "name = \"unit\"\n[broker]\nurl = \"amqp://127.0.0.1:1\"\n[state]\nurl = \"sqlite://state.db\"\n\
         [source]\nkind = \"file\"\npath = \"in.jsonl\"\n[chunking]\nitems = {items}\n\
         [throttle]\nwindow = {window}\n[processor]\nkind = \"noop\"\n"
    );
    Job::parse(&dir.join("job.toml"), &text, &|_| None).expect("a valid job")
}

/// Plays the consumers: takes every chunk, answers `Done` `copies` times (duplicates must be
/// applied once), acks it. Returns how often each seq was delivered.
fn consume(
    broker: &LocalBroker,
    copies: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<HashMap<u64, usize>> {
    let transport = broker.transport();
    tokio::spawn(async move {
        let mut seen: HashMap<u64, usize> = HashMap::new();
        let mut inbox = transport.receive(Route::Chunks, 8).await.expect("receive");
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                m = inbox.next() => match m {
                    Some(Ok(m)) => m,
                    _ => break,
                },
            };
            let chunk = codec::decode_chunk(&message.payload).expect("a chunk");
            *seen.entry(chunk.seq).or_default() += 1;
            let reply = Reply {
                job: chunk.job.clone(),
                run: chunk.run,
                seq: chunk.seq,
                attempt: chunk.attempt,
                consumer: "test/1".into(),
                outcome: Outcome::Done {
                    processed: chunk.items.len() as u64,
                    bad_items: Vec::new(),
                },
            };
            let payload = codec::encode_reply(&reply).expect("encode");
            for _ in 0..copies {
                let confirm = transport
                    .publish(Route::Replies, &payload, &Label::reply(&reply))
                    .await
                    .expect("publish a reply");
                confirm.await.expect("confirmed");
            }
            message.ack().await.expect("ack");
        }
        seen
    })
}

/// Runs the loop over `transport` to the end, within 30 s.
async fn dispatch(job: &Job, transport: Arc<dyn Transport>) -> RunSummary {
    let context = ExecutionContext::open(job).await.expect("context");
    let start = Start::new(&job.source, job.chunking.max_bytes).expect("source");
    let run = run_on(
        job,
        start,
        transport,
        &context,
        RunOptions::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends within 30 s")
        .expect("the run")
}

#[tokio::test]
async fn every_chunk_is_published_once_and_duplicate_replies_count_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = job(dir.path(), 1_000, 10, 4);
    let broker = LocalBroker::new(&job);
    let stop = CancellationToken::new();
    let consumer = consume(&broker, 2, stop.clone());
    let summary = dispatch(&job, Arc::new(broker.transport())).await;
    stop.cancel();
    let seen = consumer.await.expect("consumer");

    assert_eq!(summary.state, RunState::Completed);
    assert_eq!(summary.status.items.read, 1_000);
    assert_eq!(summary.status.items.processed, 1_000);
    assert_eq!(summary.status.chunks.done, 100);
    assert_eq!(seen.len(), 100);
    assert!(
        seen.values().all(|&n| n == 1),
        "a chunk was published twice"
    );
}

/// What goes wrong with one publish of the chunk queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The broker nacks it: the transport is fine, the message was not taken.
    Refused,
    /// The connection drops as it is published.
    PublishLost,
    /// The connection drops before its confirm comes.
    ConfirmLost,
}

/// The local transport, with faults injected into chunk publishes by their number (from 0),
/// and reconnections counted (failing the first `failed_reconnects` ones).
struct Faulty {
    inner: hopper_common::LocalTransport,
    faults: HashMap<usize, Fault>,
    publishes: AtomicUsize,
    reconnects: AtomicUsize,
    failed_reconnects: usize,
}

impl Faulty {
    fn new(broker: &LocalBroker, faults: &[(usize, Fault)]) -> Faulty {
        Faulty {
            inner: broker.transport(),
            faults: faults.iter().copied().collect(),
            publishes: AtomicUsize::new(0),
            reconnects: AtomicUsize::new(0),
            failed_reconnects: 0,
        }
    }
}

fn lost(what: &'static str) -> TransportError {
    TransportError::Broker {
        what,
        queue: "chunks".into(),
        source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
    }
}

#[async_trait]
impl Transport for Faulty {
    async fn publish(
        &self,
        route: Route,
        payload: &[u8],
        label: &Label,
    ) -> Result<Confirm, TransportError> {
        if route != Route::Chunks {
            return self.inner.publish(route, payload, label).await;
        }
        let n = self.publishes.fetch_add(1, Ordering::SeqCst);
        match self.faults.get(&n) {
            None => self.inner.publish(route, payload, label).await,
            Some(Fault::Refused) => Ok(Box::pin(async {
                Err(TransportError::Refused {
                    queue: "chunks".into(),
                    why: "nacked by the test".into(),
                })
            })),
            Some(Fault::PublishLost) => Err(lost("publish")),
            // The broker may or may not have taken it: here it did, so the copy published
            // again after recovery is a duplicate the consumer sees.
            Some(Fault::ConfirmLost) => {
                let _taken = self.inner.publish(route, payload, label).await?;
                Ok(Box::pin(async { Err(lost("confirm")) }))
            }
        }
    }

    async fn receive(&self, route: Route, prefetch: u16) -> Result<Inbox, TransportError> {
        self.inner.receive(route, prefetch).await
    }

    async fn stop_receiving(&self) {
        self.inner.stop_receiving().await
    }

    async fn repair(&self) -> Result<(), TransportError> {
        self.inner.repair().await
    }

    async fn reconnect(&self) -> Result<(), TransportError> {
        if self.reconnects.fetch_add(1, Ordering::SeqCst) < self.failed_reconnects {
            return Err(lost("reconnect"));
        }
        self.inner.reconnect().await
    }

    async fn withdraw(&self, run: u64) -> Result<Vec<u64>, TransportError> {
        self.inner.withdraw(run).await
    }

    async fn close(&self, why: &str) {
        self.inner.close(why).await
    }
}

/// Runs 200 records in chunks of 10 through `faulty`, window 32 and no rate (chunks are
/// recorded and published in batches), and checks that every chunk was processed: done once in
/// the context, every record counted once.
async fn survives(faulty: Faulty) -> (Arc<Faulty>, HashMap<u64, usize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = job(dir.path(), 200, 10, 32);
    let broker = LocalBroker::new(&job);
    let faulty = Arc::new(Faulty {
        inner: broker.transport(),
        ..faulty
    });
    let stop = CancellationToken::new();
    let consumer = consume(&broker, 1, stop.clone());
    let summary = dispatch(&job, faulty.clone()).await;
    stop.cancel();
    let seen = consumer.await.expect("consumer");
    assert_eq!(summary.state, RunState::Completed);
    assert_eq!(summary.status.items.read, 200);
    assert_eq!(summary.status.items.processed, 200);
    assert_eq!(summary.status.chunks.done, 20);
    assert_eq!(seen.len(), 20, "every chunk reached a consumer");
    (faulty, seen)
}

#[tokio::test]
async fn a_refused_chunk_is_published_again_and_the_run_completes_exactly() {
    let broker = LocalBroker::new(&job(tempfile::tempdir().expect("tmp").path(), 1, 1, 1));
    let (faulty, seen) = survives(Faulty::new(&broker, &[(5, Fault::Refused)])).await;
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(faulty.publishes.load(Ordering::SeqCst), 21);
    assert_eq!(faulty.reconnects.load(Ordering::SeqCst), 0);
}

/// Regression (the protocol issue, finding 1): a publish that failed in the middle of a batch
/// left the rest of the batch recorded `pending`, never sent, and the run ended `completed`.
#[tokio::test]
async fn a_connection_lost_in_the_middle_of_a_batch_loses_no_chunk() {
    let broker = LocalBroker::new(&job(tempfile::tempdir().expect("tmp").path(), 1, 1, 1));
    let (faulty, seen) = survives(Faulty::new(&broker, &[(3, Fault::PublishLost)])).await;
    assert_eq!(faulty.reconnects.load(Ordering::SeqCst), 1);
    // Chunks published before the drop had no confirm yet: they went again, and a consumer saw
    // them twice (the context counted them once, above). None went more than twice.
    assert!(seen.values().all(|&n| n <= 2), "{seen:?}");
}

#[tokio::test]
async fn a_lost_confirm_publishes_the_chunk_again_and_its_duplicate_counts_once() {
    let broker = LocalBroker::new(&job(tempfile::tempdir().expect("tmp").path(), 1, 1, 1));
    let (faulty, seen) = survives(Faulty::new(
        &broker,
        &[(2, Fault::ConfirmLost), (7, Fault::ConfirmLost)],
    ))
    .await;
    assert_eq!(faulty.reconnects.load(Ordering::SeqCst), 2);
    // The chunks whose confirm was lost (and those unconfirmed with them) reached a consumer
    // twice; the context counted them once (above).
    assert!(seen.values().filter(|&&n| n == 2).count() >= 2, "{seen:?}");
    assert!(seen.values().all(|&n| n <= 3), "{seen:?}");
}

/// One thing a scripted consumer sends for a chunk it received.
enum Step {
    /// A reply about the chunk.
    Reply(Reply),
    /// The chunk itself onto the replies queue, as the broker dead-letters one past its delivery
    /// limit.
    DeadLetter,
    /// The chunk again onto the chunk queue, as its next attempt.
    Again(u32),
}

fn reply_to(chunk: &Chunk, attempt: u32, outcome: Outcome) -> Step {
    Step::Reply(Reply {
        job: chunk.job.clone(),
        run: chunk.run,
        seq: chunk.seq,
        attempt,
        consumer: "test/1".into(),
        outcome,
    })
}

fn done(chunk: &Chunk) -> Outcome {
    Outcome::Done {
        processed: chunk.items.len() as u64,
        bad_items: Vec::new(),
    }
}

/// A consumer that sends what `script` says for each chunk, then acks it.
fn scripted(
    broker: &LocalBroker,
    stop: CancellationToken,
    script: impl Fn(&Chunk) -> Vec<Step> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let transport = broker.transport();
    tokio::spawn(async move {
        let mut inbox = transport.receive(Route::Chunks, 8).await.expect("receive");
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                m = inbox.next() => match m {
                    Some(Ok(m)) => m,
                    _ => break,
                },
            };
            let chunk = codec::decode_chunk(&message.payload).expect("a chunk");
            for send in script(&chunk) {
                let (route, payload, label) = match send {
                    Step::Reply(r) => {
                        let payload = codec::encode_reply(&r).expect("encode");
                        (Route::Replies, payload, Label::reply(&r))
                    }
                    Step::DeadLetter => {
                        let mut label = message.label.clone();
                        label.dead_lettered = Some("delivery_limit".into());
                        label.deliveries = Some(11);
                        (Route::Replies, message.payload.clone(), label)
                    }
                    Step::Again(attempt) => {
                        let mut again = chunk.clone();
                        again.attempt = attempt;
                        let payload = codec::encode_chunk(&again).expect("encode");
                        (Route::Chunks, payload, Label::chunk(&again))
                    }
                };
                let confirm = transport
                    .publish(route, &payload, &label)
                    .await
                    .expect("publish");
                confirm.await.expect("confirmed");
            }
            message.ack().await.expect("ack");
        }
    })
}

/// Runs 100 records in chunks of 10 against `script`.
async fn scripted_run(
    script: impl Fn(&Chunk) -> Vec<Step> + Send + 'static,
) -> (RunSummary, LocalBroker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = job(dir.path(), 100, 10, 4);
    let broker = LocalBroker::new(&job);
    let stop = CancellationToken::new();
    let consumer = scripted(&broker, stop.clone(), script);
    let summary = dispatch(&job, Arc::new(broker.transport())).await;
    stop.cancel();
    consumer.await.expect("consumer");
    (summary, broker)
}

/// Replies duplicated, notes before them, and each chunk's replies sent in reverse order (the
/// final one first): every chunk counts once, and the run completes.
#[tokio::test]
async fn duplicated_and_reordered_replies_count_once() {
    let (summary, _) = scripted_run(|c| {
        vec![
            reply_to(c, 1, done(c)),
            reply_to(c, 1, Outcome::Processing { elapsed_ms: 10 }),
            reply_to(c, 1, done(c)),
        ]
    })
    .await;
    assert_eq!(summary.state, RunState::Completed);
    assert_eq!(summary.status.items.processed, 100);
    assert_eq!(summary.status.chunks.done, 10);
    assert!(summary.status.in_progress.is_empty());
}

/// Regression (the protocol issue, finding 5): attempt 2 succeeds, then a copy of attempt 1
/// fails late. The chunk stays done, and the late failure does not end the run early either.
#[tokio::test]
async fn an_old_attempt_failing_after_a_newer_success_changes_nothing() {
    let (summary, _) = scripted_run(|c| match (c.seq, c.attempt) {
        (5, 1) => vec![
            reply_to(
                c,
                1,
                Outcome::Retrying {
                    error: "timeout".into(),
                    next_attempt: 2,
                },
            ),
            Step::Again(2),
        ],
        (5, 2) => vec![
            reply_to(c, 2, done(c)),
            reply_to(
                c,
                1,
                Outcome::Failed {
                    error: "late".into(),
                },
            ),
        ],
        _ => vec![reply_to(c, c.attempt, done(c))],
    })
    .await;
    assert_eq!(summary.state, RunState::Completed);
    assert_eq!(summary.status.chunks.done, 10);
    assert_eq!(summary.status.items.processed, 100);
    assert!(summary.status.failures.is_empty());
}

/// A chunk the broker dead-letters (past its delivery limit) comes to the dispatcher: recorded
/// dead with why, parked on the dead queue, and the run ends.
#[tokio::test]
async fn a_dead_lettered_chunk_is_recorded_dead_and_parked_and_the_run_ends() {
    let (summary, broker) = scripted_run(|c| match c.seq {
        4 => vec![Step::DeadLetter],
        _ => vec![reply_to(c, 1, done(c))],
    })
    .await;
    assert_eq!(summary.state, RunState::CompletedWithFailures);
    assert_eq!(summary.status.chunks.dead, 1);
    assert_eq!(summary.status.items.processed, 90);
    let failure = &summary.status.failures[0];
    assert_eq!(failure.seq, Some(4));
    assert!(
        failure.reason.contains("after 11 deliveries"),
        "{}",
        failure.reason
    );
    assert_eq!(broker.dead(), 1);
}

/// A second drop while recovering from the first is retried, after a pause.
#[tokio::test]
async fn a_drop_during_recovery_is_recovered_from_too() {
    let broker = LocalBroker::new(&job(tempfile::tempdir().expect("tmp").path(), 1, 1, 1));
    let faulty = Faulty {
        failed_reconnects: 1,
        ..Faulty::new(&broker, &[(3, Fault::PublishLost)])
    };
    let (faulty, _) = survives(faulty).await;
    assert_eq!(faulty.reconnects.load(Ordering::SeqCst), 2);
}

/// A broker that never comes back stops the run with a clear error, after a bounded number of
/// recoveries with growing pauses, and leaves it resumable.
///
/// The clock is paused (the pauses add up to 15 s); the input fits the reader's channel, so no
/// blocking reader thread holds the paused clock still.
#[tokio::test(start_paused = true)]
async fn recovery_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = job(dir.path(), 30, 10, 4);
    let broker = LocalBroker::new(&job);
    let faulty = Arc::new(Faulty {
        failed_reconnects: usize::MAX,
        ..Faulty::new(&broker, &[(0, Fault::PublishLost)])
    });
    let context = ExecutionContext::open(&job).await.expect("context");
    let start = Start::new(&job.source, job.chunking.max_bytes).expect("source");
    let err = run_on(
        &job,
        start,
        faulty.clone(),
        &context,
        RunOptions::default(),
        CancellationToken::new(),
    )
    .await
    .expect_err("the run stops");
    assert!(
        matches!(err, crate::error::DispatchError::Unrecoverable { times: 5 }),
        "{err}"
    );
    assert_eq!(faulty.reconnects.load(Ordering::SeqCst), 5);
}

/// Regression (the protocol issue, finding 4): state writes did not check the owner, so two
/// dispatchers could drive one run. Another dispatcher claims the run while chunk 5 is still out:
/// this one stops at its next write (its heartbeat, within seconds), naming the new owner.
#[tokio::test]
async fn a_dispatcher_that_lost_its_run_stops_at_its_next_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = job(dir.path(), 100, 10, 4);
    let broker = LocalBroker::new(&job);
    let stop = CancellationToken::new();
    // Chunk 5 is taken and never answered: the run cannot end by itself.
    let consumer = scripted(&broker, stop.clone(), |c| match c.seq {
        5 => vec![],
        _ => vec![reply_to(c, 1, done(c))],
    });
    let context = ExecutionContext::open(&job).await.expect("context");
    let start = Start::new(&job.source, job.chunking.max_bytes).expect("source");
    let transport: Arc<dyn Transport> = Arc::new(broker.transport());
    let run = run_on(
        &job,
        start,
        transport,
        &context,
        RunOptions::default(),
        CancellationToken::new(),
    );
    let takeover = async {
        let other = ExecutionContext::open(&job)
            .await
            .expect("a second dispatcher's context");
        // Wait until the run exists, then take it over.
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(Some(r)) = other.store().run("unit", None).await {
                let fence = crate::context::Fence {
                    run: r.id,
                    token: "elsewhere/42#0#0".into(),
                };
                // Taken over by force, as if its owner were dead.
                let claimed = other.store().claim_run(&fence, |_| false).await;
                assert!(matches!(claimed, Ok(crate::context::Claimed::Won(()))));
                return;
            }
        }
    };
    let (result, ()) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(run, takeover)
    })
    .await
    .expect("the dispatcher stops within 20 s");
    stop.cancel();
    consumer.await.expect("consumer");
    match result {
        Err(crate::error::DispatchError::Context(crate::context::ContextError::Fenced {
            holder,
            ..
        })) => assert_eq!(holder, "elsewhere/42"),
        other => panic!("expected the run to be fenced off, got {other:?}"),
    }
}
