//! The chunk pipeline end to end: the real dispatcher and consumers over the real RabbitMQ.

use std::time::Duration;

use hopper_tests::{failures, output_ids, require_broker, write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_hundred_thousand_records_through_two_consumers_arrive_exactly_once() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "pipeline",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 1000
[throttle]
window = 16
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 100_000, 120);
    let c1 = t.start_consumer(1, 4);
    let c2 = t.start_consumer(2, 4);

    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 0, "dispatcher failed: {}", out.stderr);

    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["read"], 100_000);
    assert_eq!(status["items"]["processed"], 100_000);
    assert_eq!(status["items"]["skipped"], 0);
    assert_eq!(status["chunks"]["total"], 100);
    assert_eq!(status["chunks"]["done"], 100);
    assert_eq!(status["failures"].as_array().map(Vec::len), Some(0));

    let ids = output_ids(&t.path("out"));
    let expected: Vec<u64> = (1..=100_000).collect();
    assert!(ids == expected, "every id once: got {} ids", ids.len());

    // Both consumers took part, and both stop cleanly on SIGTERM.
    for c in [c1, c2] {
        let log = c.log.clone();
        assert!(c.stop(Duration::from_secs(30)).await.success());
        let text = std::fs::read_to_string(&log).expect("consumer log");
        assert!(text.contains("consumer stopped"), "{text}");
    }
    assert_eq!(
        t.queue_depth(&conn, &format!("hopper.{}.chunks", t.name))
            .await,
        0
    );
    assert_eq!(
        t.queue_depth(&conn, &format!("hopper.{}.replies", t.name))
            .await,
        0
    );
}

#[tokio::test]
async fn a_chunk_whose_command_fails_comes_back_and_is_done_on_a_later_attempt() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "exec-retry",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[processor]
kind = "exec"
command = ["sh", "process.sh"]
[retry]
max_attempts = 3
backoff = "200ms..1s"
"#,
    );
    // Chunk 3 fails on its first attempt; every attempt that succeeds writes its own file, so
    // the output shows which attempt of which chunk did the work.
    std::fs::write(
        t.path("process.sh"),
        r#"set -e
if [ "$HOPPER_SEQ" = 3 ] && [ "$HOPPER_ATTEMPT" = 1 ]; then
  echo "simulated outage" >&2
  exit 75
fi
mkdir -p out
cat > "out/$HOPPER_SEQ.$HOPPER_ATTEMPT.tmp"
mv "out/$HOPPER_SEQ.$HOPPER_ATTEMPT.tmp" "out/$HOPPER_SEQ.$HOPPER_ATTEMPT.jsonl"
"#,
    )
    .expect("write the script");
    write_jsonl(&t.path("input.jsonl"), 50, 60);
    let consumer = t.start_consumer(1, 2);

    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 0, "dispatcher failed: {}", out.stderr);
    assert!(out.stderr.contains("it will be retried"), "{}", out.stderr);

    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], 50);
    assert_eq!(status["chunks"]["done"], 5);

    let ids = output_ids(&t.path("out"));
    assert_eq!(ids, (1..=50).collect::<Vec<u64>>());
    assert!(
        t.path("out/3.2.jsonl").exists(),
        "chunk 3 was done by attempt 2"
    );
    assert!(!t.path("out/3.1.jsonl").exists());

    let log = consumer.log.clone();
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
    let text = std::fs::read_to_string(&log).expect("consumer log");
    assert!(
        text.contains("simulated outage"),
        "the command's stderr is logged: {text}"
    );
    assert_eq!(
        t.queue_depth(&conn, &format!("hopper.{}.dead", t.name))
            .await,
        0
    );
}

#[tokio::test]
async fn a_chunk_that_fails_every_attempt_is_parked_and_the_run_says_so() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "exec-dead",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 5
[processor]
kind = "exec"
command = ["sh", "-c", "cat >/dev/null; if [ \"$HOPPER_SEQ\" = 2 ]; then echo 'db down' >&2; exit 1; fi"]
[retry]
max_attempts = 2
backoff = "100ms..100ms"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 15, 40);
    let consumer = t.start_consumer(1, 2);

    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(
        out.code(),
        1,
        "completed with failures exits 1: {}",
        out.stderr
    );
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["chunks"]["dead"], 1);
    assert_eq!(status["items"]["processed"], 10);
    assert_eq!(status["items"]["failed"], 5);
    let failures = status["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["seq"], 2);
    assert_eq!(failures[0]["position"], 6);
    assert_eq!(failures[0]["class"], "chunk");
    assert!(failures[0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("db down")));
    assert_eq!(
        t.queue_depth(&conn, &format!("hopper.{}.dead", t.name))
            .await,
        1
    );
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn bad_records_and_bad_items_are_skipped_and_listed_with_their_lines() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "skips",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 3
[processor]
kind = "exec"
command = ["python3", "-c", "import sys, json\nfor i, l in enumerate(sys.stdin):\n    if json.loads(l)['id'] == 4: print(json.dumps({'index': i, 'reason': 'no price'}))"]
[failures]
skip_limit = 5
"#,
    );
    std::fs::write(
        t.path("input.jsonl"),
        "{\"id\":1}\n{\"id\":2}\n{broken\n{\"id\":4}\n{\"id\":5}\n",
    )
    .expect("input");
    let consumer = t.start_consumer(1, 1);
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["items"]["read"], 5);
    assert_eq!(status["items"]["processed"], 3);
    assert_eq!(status["items"]["skipped"], 2);
    let failures = failures(&status, "class");
    assert_eq!(
        failures,
        vec![(3, "bad_data".to_string()), (4, "bad_item".to_string())]
    );
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn past_the_skip_limit_the_run_fails() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "skip-limit",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "noop"
"#,
    );
    std::fs::write(t.path("input.jsonl"), "{\"id\":1}\nnot json\n{\"id\":3}\n").expect("input");
    // Past the limit nothing more is sent, but the chunk already sent is waited for.
    let consumer = t.start_consumer(1, 1);
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("skip limit"), "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "failed");
    assert_eq!(s["items"]["read"], 3);
    assert_eq!(s["items"]["processed"], 2);
    assert_eq!(s["items"]["skipped"], 1);
    assert_eq!(s["chunks"]["in_flight"], 0);
    assert!(consumer.stop(LIMIT).await.success());
}

#[tokio::test]
async fn an_unreachable_broker_is_reported_without_its_password() {
    let t = TestJob::new("no-broker", "");
    let text = std::fs::read_to_string(t.file())
        .expect("job")
        .replace(&hopper_tests::broker_url(), "amqp://guest:s3cret@127.0.0.1:1/%2f")
        + "[state]\nurl = \"sqlite://state.db\"\n[source]\nkind = \"file\"\npath = \"in.jsonl\"\n[processor]\nkind = \"noop\"\n";
    std::fs::write(t.file(), text).expect("job");
    std::fs::write(t.path("in.jsonl"), "{\"id\":1}\n").expect("input");
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot connect to RabbitMQ"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("guest:***@127.0.0.1:1"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
}
