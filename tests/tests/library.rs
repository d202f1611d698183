//! A processor written against the `hopper-consumer` library, run in-process against the real
//! broker, with the real dispatcher.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hopper_consumer::{async_trait, Chunk, ConsumerOptions, ProcessError, Processed, Processor};
use hopper_tests::{failures, require_broker, write_jsonl, TestJob};
use tokio_util::sync::CancellationToken;

/// Panics on the first attempt at chunk 2; counts the items it finished.
struct PanicsOnce {
    done: AtomicU32,
}

#[async_trait]
impl Processor for PanicsOnce {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        if chunk.seq == 2 && chunk.attempt == 1 {
            panic!("bug in a custom processor");
        }
        self.done
            .fetch_add(chunk.items.len() as u32, Ordering::SeqCst);
        Ok(Processed::all_done())
    }
}

#[tokio::test]
async fn a_panicking_processor_fails_its_chunk_transiently_and_keeps_its_slot() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "panic",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[processor]
kind = "custom"
[retry]
backoff = "100ms..100ms"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 40, 40);
    let processor = Arc::new(PanicsOnce {
        done: AtomicU32::new(0),
    });
    let shutdown = CancellationToken::new();
    let consumer = {
        let (job, processor, shutdown) = (t.job(), processor.clone(), shutdown.clone());
        // Concurrency 1: a lost slot would stall the run.
        tokio::spawn(async move {
            hopper_consumer::run(
                &job,
                processor,
                ConsumerOptions::default().with_concurrency(1),
                shutdown,
            )
            .await
        })
    };
    let out = t.dispatcher(&["run"], Duration::from_secs(120)).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the processor panicked: bug in a custom processor"),
        "{}",
        out.stderr
    );
    assert_eq!(t.status().await["state"], "completed");
    assert_eq!(processor.done.load(Ordering::SeqCst), 40);
    shutdown.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(30), consumer)
        .await
        .expect("the consumer stops")
        .expect("consumer task")
        .expect("consumer ran");
    assert_eq!(summary.chunks, 4);
    assert_eq!(summary.retried, 1);
}

/// The shipped example (`consumer/examples/custom_processor.rs`), built and run as a user runs
/// it, against the real broker and dispatcher: items done, bad items refused with their reason
/// and line, and a transient chunk failure retried.
#[tokio::test]
async fn the_custom_processor_example_audits_prices_end_to_end() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "example",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[processor]
kind = "custom"
[processor.options]
min_price = 0.0
max_price = 100.0
fail_seq = 2
[retry]
backoff = "100ms..100ms"
[failures]
skip_limit = 10
"#,
    );
    let input: String = (1..=40u64)
        .map(|id| match id {
            7 => "{\"id\":7}\n".to_string(),
            23 => "{\"id\":23,\"price\":250.0}\n".to_string(),
            _ => format!("{{\"id\":{id},\"price\":{id}.5}}\n"),
        })
        .collect();
    std::fs::write(t.path("input.jsonl"), input).expect("input");
    let example = hopper_tests::bin("examples/custom_processor");
    let consumer = t.start_program(&example, &[], 1);
    t.wait_for_consumers(&conn, 1).await;

    let out = t.dispatcher(&["run"], Duration::from_secs(60)).await;
    assert_eq!(
        out.code(),
        1,
        "bad items: completed with failures: {}",
        out.stderr
    );
    assert!(out.stderr.contains("it will be retried"), "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["items"]["processed"], 38);
    assert_eq!(status["chunks"]["done"], 4);
    let failures = failures(&status, "reason");
    assert_eq!(
        failures,
        vec![
            (7, "product 7: no price".to_string()),
            (23, "product 23: price 250 outside 0..=100".to_string())
        ]
    );
    let log = consumer.log.clone();
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
    let text = std::fs::read_to_string(log).expect("log");
    assert!(text.contains("the price service timed out"), "{text}");
}

/// Counts the items it is given, and refuses the ones whose id is a multiple of 100.
struct Counts {
    done: AtomicU32,
}

#[async_trait]
impl Processor for Counts {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        let mut out = Processed::all_done();
        for item in &chunk.items {
            let v: serde_json::Value = item
                .parse()
                .map_err(|e| ProcessError::Permanent(format!("{e}")))?;
            if v["id"].as_u64().is_some_and(|id| id % 100 == 0) {
                out.bad_item(item, "a round id");
            } else {
                self.done.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(out)
    }
}

/// A processor of one's own in local mode, through the library: dispatcher and workers in the
/// test's own process, no broker.
#[tokio::test]
async fn a_custom_processor_runs_in_local_mode_through_the_library() {
    let t = TestJob::local(
        "library-local",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 50
[processor]
kind = "custom"
[failures]
skip_limit = 100
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 5_000, 60);
    let job = t.job();
    let context = hopper_dispatcher::ExecutionContext::open(&job)
        .await
        .expect("execution context");
    let counts = Arc::new(Counts {
        done: AtomicU32::new(0),
    });
    let opts = hopper_dispatcher::RunOptions::default()
        .with_local(hopper_dispatcher::Local::new(3).with_processor(counts.clone()));
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        hopper_dispatcher::run(&job, &context, opts, CancellationToken::new()),
    )
    .await
    .expect("within 60 s")
    .expect("the run");
    assert_eq!(
        summary.state,
        hopper_dispatcher::RunState::CompletedWithFailures
    );
    assert_eq!(summary.status.items.processed, 4_950);
    assert_eq!(summary.status.items.skipped, 50);
    assert_eq!(counts.done.load(Ordering::SeqCst), 4_950);
}
