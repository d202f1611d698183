//! A processor written against the `hopper-consumer` library, run in-process against the real
//! broker, with the real dispatcher.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hopper_consumer::{async_trait, Chunk, ConsumerOptions, ProcessError, Processed, Processor};
use hopper_tests::{require_broker, write_jsonl, TestJob};
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
                ConsumerOptions { concurrency: 1 },
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
