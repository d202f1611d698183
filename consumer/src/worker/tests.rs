//! The worker loop in-process, with no broker: the test plays the dispatcher over the local
//! transport, publishing chunks and reading the replies, and checks each outcome and where the
//! chunk went.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use hopper_common::transport::Inbox;
use hopper_common::{
    codec, Chunk, Item, Job, Label, LocalBroker, Outcome, Position, Reply, Route, Transport,
};
use tokio_util::sync::CancellationToken;

use super::{run_on, ConsumerOptions};
use crate::processor::{ProcessError, Processed, Processor};

fn job() -> Job {
    job_with("")
}

/// The test job, with `retry` added to its `[retry]` section and `broker` to its `[broker]`.
fn job_with(extra: &str) -> Job {
    let text = format!(
        "name = \"unit\"\n[broker]\nurl = \"amqp://127.0.0.1:1\"\nheartbeat = \"2s\"\n\
         [source]\nkind = \"file\"\npath = \"x.jsonl\"\n[processor]\nkind = \"noop\"\n\
         [retry]\nmax_attempts = 2\nbackoff = \"10ms..10ms\"\n{extra}"
    );
    Job::parse(&std::env::temp_dir().join("job.toml"), &text, &|_| None).expect("a valid job")
}

fn chunk(seq: u64) -> Chunk {
    Chunk {
        job: "unit".into(),
        run: 1,
        seq,
        attempt: 1,
        position: Position {
            line: seq * 10 - 9,
            offset: 0,
        },
        key: Vec::new(),
        items: (0..10)
            .map(|i| Item {
                line: seq * 10 - 9 + i,
                data: format!("{{\"id\":{}}}", seq * 10 - 9 + i),
            })
            .collect(),
    }
}

/// Refuses line 3 as a bad item, panics on chunk 2's first attempt, fails chunk 3 for good,
/// and fails chunk 4 transiently on every attempt.
struct Picky {
    calls: AtomicU32,
}

#[async_trait]
impl Processor for Picky {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match (chunk.seq, chunk.attempt) {
            (2, 1) => panic!("a bug"),
            (3, _) => Err(ProcessError::Permanent("no such table".into())),
            (4, _) => Err(ProcessError::Transient("service down".into())),
            _ => {
                let mut out = Processed::all_done();
                for item in chunk.items.iter().filter(|i| i.line == 3) {
                    out.bad_item(item, "no price");
                }
                Ok(out)
            }
        }
    }
}

/// The replies the consumer sends, as the dispatcher reads them.
async fn replies_of(transport: &impl Transport) -> Inbox {
    transport
        .receive(Route::Replies, 64)
        .await
        .expect("receive")
}

/// Publishes the chunks `seqs` onto the chunk queue, as the dispatcher would.
async fn publish_chunks(transport: &impl Transport, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        let c = chunk(seq);
        let payload = codec::encode_chunk(&c).expect("encode");
        let confirm = transport
            .publish(Route::Chunks, &payload, &Label::chunk(&c))
            .await
            .expect("publish");
        confirm.await.expect("confirmed");
    }
}

async fn next_reply(inbox: &mut Inbox) -> Reply {
    let message = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .expect("a reply within 10 s")
        .expect("the inbox is open")
        .expect("a message");
    message.ack().await.expect("ack");
    codec::decode_reply(&message.payload).expect("a reply")
}

#[tokio::test]
async fn each_outcome_is_replied_and_the_chunk_goes_where_it_belongs() {
    let job = job();
    let broker = LocalBroker::new(&job);
    let dispatcher = broker.transport();
    let mut replies = replies_of(&dispatcher).await;
    publish_chunks(&dispatcher, 1..=4).await;
    let processor = Arc::new(Picky {
        calls: AtomicU32::new(0),
    });
    let stop = CancellationToken::new();
    let worker = {
        let (job, processor, stop) = (job.clone(), processor.clone(), stop.clone());
        let transport = Arc::new(broker.transport());
        tokio::spawn(async move {
            let opts = ConsumerOptions::default().with_concurrency(2);
            run_on(&job, processor, transport, opts, stop).await
        })
    };

    // Chunk 1 done with one bad item; chunk 2 retried after its panic, then done; chunk 3
    // failed; chunk 4 retried, then dead. Six replies in all, in whatever order.
    let mut outcomes: Vec<(u64, u32, String)> = Vec::new();
    for _ in 0..6 {
        let r = next_reply(&mut replies).await;
        let what = match &r.outcome {
            Outcome::Done {
                processed,
                bad_items,
            } => {
                format!(
                    "done {processed} bad {:?}",
                    bad_items.iter().map(|b| b.line).collect::<Vec<_>>()
                )
            }
            Outcome::Retrying { next_attempt, .. } => format!("retrying as {next_attempt}"),
            Outcome::Processing { .. } => "processing".to_string(),
            Outcome::Dead { .. } => "dead".to_string(),
            Outcome::Failed { .. } => "failed".to_string(),
        };
        outcomes.push((r.seq, r.attempt, what));
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        vec![
            (1, 1, "done 9 bad [3]".to_string()),
            (2, 1, "retrying as 2".to_string()),
            (2, 2, "done 10 bad []".to_string()),
            (3, 1, "failed".to_string()),
            (4, 1, "retrying as 2".to_string()),
            (4, 2, "dead".to_string()),
        ]
    );
    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker stops")
        .expect("the worker task")
        .expect("the worker ran");
    assert_eq!((summary.chunks, summary.retried, summary.dead), (4, 2, 2));
    assert_eq!(processor.calls.load(Ordering::SeqCst), 6);
    // The failed and the dead chunk are parked; nothing is left on the chunk queue.
    assert_eq!(broker.dead(), 2);
}

/// Sleeps `first` on a chunk's first attempt, then finishes at once.
struct Slow {
    first: Duration,
}

#[async_trait]
impl Processor for Slow {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        if chunk.attempt == 1 {
            tokio::time::sleep(self.first).await;
        }
        Ok(Processed::all_done())
    }
}

/// Publishes chunk 1 and, `queued` later, starts a worker running `processor`.
async fn start(
    job: &Job,
    broker: &LocalBroker,
    processor: Arc<dyn Processor>,
    queued: Duration,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<Result<super::ConsumerSummary, super::ConsumerError>> {
    publish_chunks(&broker.transport(), 1..=1).await;
    tokio::time::sleep(queued).await;
    let (job, transport, stop) = (job.clone(), Arc::new(broker.transport()), stop.clone());
    tokio::spawn(async move {
        let opts = ConsumerOptions::default().with_concurrency(1);
        run_on(&job, processor, transport, opts, stop).await
    })
}

/// A chunk that runs long is noted (first after the heartbeat, at most 5 s, then every
/// heartbeat), and cancelled at `chunk_timeout`: its attempt fails transiently, saying so, and
/// the next attempt finishes it. The clock is tokio's paused one.
#[tokio::test(start_paused = true)]
async fn a_long_chunk_is_noted_then_cancelled_at_its_timeout_and_retried() {
    let job = job_with("chunk_timeout = \"7s\"\n");
    let broker = LocalBroker::new(&job);
    let mut replies = replies_of(&broker.transport()).await;
    let stop = CancellationToken::new();
    let slow = Arc::new(Slow {
        first: Duration::from_secs(3600),
    });
    let worker = start(&job, &broker, slow, Duration::ZERO, &stop).await;

    let mut seen = Vec::new();
    loop {
        let r = next_reply(&mut replies).await;
        let what = match r.outcome {
            Outcome::Processing { elapsed_ms } => format!("note at {}s", elapsed_ms / 1000),
            Outcome::Retrying { error, .. } => format!("retrying: {error}"),
            Outcome::Done { .. } => "done".into(),
            Outcome::Dead { .. } | Outcome::Failed { .. } => "failed".into(),
        };
        seen.push((r.attempt, what));
        if r.attempt == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        vec![
            (1, "note at 2s".to_string()),
            (1, "note at 4s".to_string()),
            (1, "note at 6s".to_string()),
            (
                1,
                "retrying: processing passed retry.chunk_timeout (7s); the processor was cancelled"
                    .to_string()
            ),
            (2, "done".to_string()),
        ]
    );
    stop.cancel();
    worker.await.expect("worker").expect("ran");
}

/// A chunk that waited in the queue and then runs fast is never noted, and never cancelled:
/// only processing counts against `chunk_timeout`.
#[tokio::test(start_paused = true)]
async fn a_fast_chunk_sends_no_note_however_long_it_waited() {
    let job = job_with("chunk_timeout = \"1s\"\n");
    let broker = LocalBroker::new(&job);
    let mut replies = replies_of(&broker.transport()).await;
    let stop = CancellationToken::new();
    let fast = Arc::new(Slow {
        first: Duration::from_millis(500),
    });
    // The chunk waits in the queue for ten times its timeout before a consumer comes.
    let worker = start(&job, &broker, fast, Duration::from_secs(10), &stop).await;
    let r = next_reply(&mut replies).await;
    assert!(matches!(r.outcome, Outcome::Done { .. }), "{:?}", r.outcome);
    assert_eq!(r.attempt, 1);
    stop.cancel();
    worker.await.expect("worker").expect("ran");
}

/// Tells the test which chunk it starts, then waits for the test's leave to finish it.
struct Gate {
    started: tokio::sync::mpsc::UnboundedSender<u64>,
    leave: tokio::sync::Semaphore,
}

#[async_trait]
impl Processor for Gate {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        let _ = self.started.send(chunk.seq);
        self.leave
            .acquire()
            .await
            .map_err(|e| ProcessError::Transient(e.to_string()))?
            .forget();
        Ok(Processed::all_done())
    }
}

/// The prefetch holds more chunks than the concurrency, but no more than the concurrency are
/// processed at once; on stop, the chunks that waited for a slot go back unprocessed, and
/// another consumer does each of them once.
#[tokio::test(start_paused = true)]
async fn only_concurrency_chunks_are_processed_and_the_waiting_ones_go_back_on_stop() {
    let job = job();
    let broker = LocalBroker::new(&job);
    let mut replies = replies_of(&broker.transport()).await;
    publish_chunks(&broker.transport(), 1..=6).await;
    let consumer = |leave: usize, stop: &CancellationToken| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(Gate {
            started: tx,
            leave: tokio::sync::Semaphore::new(leave),
        });
        let (job, transport, stop) = (job.clone(), Arc::new(broker.transport()), stop.clone());
        let processor: Arc<dyn Processor> = gate.clone();
        let task = tokio::spawn(async move {
            let opts = ConsumerOptions::default()
                .with_concurrency(2)
                .with_prefetch(4);
            run_on(&job, processor, transport, opts, stop).await
        });
        (gate, rx, task)
    };
    let first_stop = CancellationToken::new();
    let (gate, mut started, first) = consumer(0, &first_stop);
    let mut first_seqs = Vec::new();
    for _ in 0..2 {
        let seq = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .expect("a chunk starts")
            .expect("the processor is alive");
        first_seqs.push(seq);
    }
    // Four are in hand, two are processed: no third starts (the clock is paused, so this
    // minute passes as soon as every task waits).
    let third = tokio::time::timeout(Duration::from_secs(60), started.recv()).await;
    assert!(third.is_err(), "a third chunk started: {third:?}");
    first_stop.cancel();
    gate.leave.add_permits(2);
    let summary = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the first consumer stops")
        .expect("its task")
        .expect("it ran");
    assert_eq!(summary.chunks, 2);

    let second_stop = CancellationToken::new();
    let (_gate, _started, second) = consumer(100, &second_stop);
    let mut done = Vec::new();
    while done.len() < 6 {
        let r = next_reply(&mut replies).await;
        match r.outcome {
            // The first two ran long enough to be noted.
            Outcome::Processing { .. } => {}
            Outcome::Done { .. } => done.push(r.seq),
            other => panic!("chunk {}: {other:?}", r.seq),
        }
    }
    done.sort_unstable();
    assert_eq!(done, vec![1, 2, 3, 4, 5, 6], "each chunk once");
    second_stop.cancel();
    let summary = second.await.expect("second").expect("ran");
    assert_eq!(summary.chunks, 4);
    let mut again = Vec::new();
    while let Ok(seq) = started.try_recv() {
        again.push(seq);
    }
    assert!(
        again.is_empty(),
        "the first consumer started {again:?} after stopping"
    );
}

#[test]
fn the_prefetch_is_twice_the_concurrency_unless_set_or_chunks_are_long_and_never_less() {
    let minutes = |m: u64| Duration::from_secs(m * 60);
    let opts = ConsumerOptions::default().with_concurrency(3);
    assert_eq!(opts.prefetch(minutes(10)), 6);
    assert_eq!(opts.clone().with_prefetch(3).prefetch(minutes(10)), 3);
    assert_eq!(opts.clone().with_prefetch(1).prefetch(minutes(10)), 3);
    // Waiting a chunk_timeout for a slot, then another processing, could pass the broker's
    // consumer_timeout: the concurrency alone, unless asked.
    assert_eq!(opts.prefetch(minutes(20)), 3);
    assert_eq!(opts.with_prefetch(5).prefetch(minutes(20)), 5);
}
