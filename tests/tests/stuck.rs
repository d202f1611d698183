//! A consumer frozen while holding chunks (SIGSTOP): its chunks are listed as stuck once past
//! `chunk_timeout`, published again, and the run completes without it.

use std::time::Duration;

use hopper_tests::{output_ids, require_broker, write_jsonl, TestJob};

#[tokio::test]
async fn chunks_held_by_a_frozen_consumer_are_published_again_and_the_run_completes() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "stuck",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
window = 6
[processor]
kind = "file"
dir = "out"
[retry]
chunk_timeout = "2s"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 100, 40);
    // The first consumer attaches, then freezes: the chunks the broker hands it are stuck.
    let frozen = t.start_consumer(1, 2);
    t.wait_for_consumers(&conn, 1).await;
    frozen.signal("STOP");
    let healthy = t.start_consumer(2, 2);

    let out = t.dispatcher(&["run"], Duration::from_secs(120)).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("chunk stuck"), "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], 100);
    assert_eq!(output_ids(&t.path("out")), (1..=100).collect::<Vec<u64>>());

    // Thawed, the frozen consumer finishes its copies: they replace the same files.
    frozen.signal("CONT");
    assert!(frozen.stop(Duration::from_secs(30)).await.success());
    assert_eq!(output_ids(&t.path("out")), (1..=100).collect::<Vec<u64>>());
    assert!(healthy.stop(Duration::from_secs(30)).await.success());
}
