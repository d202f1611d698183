//! The dispatch loop in-process, with no broker: the test plays the consumers over the local
//! transport, and a wrapper around it injects faults. Each test counts what was published and
//! checks that every chunk ends done exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use hopper_common::transport::{Confirm, Inbox};
use hopper_common::{
    codec, Job, Label, LocalBroker, Outcome, Reply, Route, Transport, TransportError,
};
use tokio_util::sync::CancellationToken;

use super::{run_on, RunSummary, Start};
use crate::context::{ExecutionContext, RunState};
use crate::options::RunOptions;
use crate::source;

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
    let context = ExecutionContext::open(job).expect("context");
    let source = source::open(&job.source).expect("source");
    let run = run_on(
        job,
        Start::New(source),
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

/// The local transport, but the broker refuses publish number `refuse` of the chunk queue once
/// (a nack): the dispatcher must publish that chunk again from the bytes it kept.
struct RefusesOnce {
    inner: hopper_common::LocalTransport,
    refuse: usize,
    publishes: AtomicUsize,
    refused: Mutex<Vec<String>>,
}

#[async_trait]
impl Transport for RefusesOnce {
    async fn publish(
        &self,
        route: Route,
        payload: &[u8],
        label: &Label,
    ) -> Result<Confirm, TransportError> {
        if route == Route::Chunks && self.publishes.fetch_add(1, Ordering::SeqCst) == self.refuse {
            let id = label.message_id.clone().unwrap_or_default();
            self.refused.lock().expect("lock").push(id);
            return Ok(Box::pin(async {
                Err(TransportError::Refused {
                    queue: "chunks".into(),
                    why: "nacked by the test".into(),
                })
            }));
        }
        self.inner.publish(route, payload, label).await
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
        self.inner.reconnect().await
    }

    async fn close(&self, why: &str) {
        self.inner.close(why).await
    }
}

#[tokio::test]
async fn a_refused_chunk_is_published_again_and_the_run_completes_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = job(dir.path(), 200, 10, 32);
    let broker = LocalBroker::new(&job);
    let stop = CancellationToken::new();
    let consumer = consume(&broker, 1, stop.clone());
    let faulty = Arc::new(RefusesOnce {
        inner: broker.transport(),
        refuse: 5,
        publishes: AtomicUsize::new(0),
        refused: Mutex::new(Vec::new()),
    });
    let summary = dispatch(&job, faulty.clone()).await;
    stop.cancel();
    let seen = consumer.await.expect("consumer");

    assert_eq!(summary.state, RunState::Completed);
    assert_eq!(summary.status.items.processed, 200);
    let refused = faulty.refused.lock().expect("lock").clone();
    assert_eq!(refused.len(), 1);
    // 20 chunks reached the consumer, each once; the refused one went out a second time.
    assert_eq!(seen.len(), 20);
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(faulty.publishes.load(Ordering::SeqCst), 21);
}
