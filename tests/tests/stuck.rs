//! A consumer frozen while holding chunks (SIGSTOP): the broker notices its silence through the
//! AMQP heartbeat and delivers its chunks to another consumer; the dispatcher publishes nothing
//! again on a timer. Once thawed, nothing it does is counted twice.

use std::time::{Duration, Instant};

use hopper_tests::{output_ids, require_broker, write_jsonl, TestJob};

#[tokio::test]
async fn chunks_held_by_a_frozen_consumer_come_back_through_the_broker_and_count_once() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "stuck",
        r#"heartbeat = "1s"
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
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 100, 40);
    // The first consumer attaches, then freezes: the chunks the broker hands it are held.
    let frozen = t.start_consumer(1, 2);
    t.wait_for_consumers(&conn, 1).await;
    frozen.signal("STOP");
    let healthy = t.start_consumer(2, 2);

    let started = Instant::now();
    let out = t.dispatcher(&["run"], Duration::from_secs(120)).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    // The broker gave the frozen consumer's chunks back within a few heartbeats.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !out.stderr.contains("publishing it again"),
        "{}",
        out.stderr
    );
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], 100);
    assert_eq!(status["chunks"]["done"], 10);
    assert_eq!(output_ids(&t.path("out")), (1..=100).collect::<Vec<u64>>());

    // Thawed, the frozen consumer finds its connection closed: its acks are void, and whatever
    // it finishes replaces the same files. The run's counts do not move.
    frozen.signal("CONT");
    assert!(frozen.stop(Duration::from_secs(30)).await.success());
    assert_eq!(output_ids(&t.path("out")), (1..=100).collect::<Vec<u64>>());
    let again = t.status().await;
    assert_eq!(again["items"], status["items"]);
    assert_eq!(again["chunks"], status["chunks"]);
    assert!(healthy.stop(Duration::from_secs(30)).await.success());
}
