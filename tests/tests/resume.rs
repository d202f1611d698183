//! A dispatcher killed at any point (SIGKILL) is resumed with `run --resume`: nothing lost,
//! nothing processed twice by the `file` processor, one run that ends `completed`.

use std::time::Duration;

use hopper_tests::{assert_every_id_once, require_broker, write_jsonl, TestJob};

const RECORDS: u64 = 60_000;

#[tokio::test]
async fn a_dispatcher_killed_three_times_resumes_to_every_record_exactly_once() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "resume",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 500
[throttle]
window = 8
rate = 12000
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), RECORDS, 80);
    let c1 = t.start_consumer(1, 2);
    let c2 = t.start_consumer(2, 2);

    let mut read = t.kill_after_progress(&["run"], 0, 5_000).await;
    let run = t.status().await["run"].clone();
    for _ in 0..2 {
        read = t
            .kill_after_progress(&["run", "--resume"], read, 8_000)
            .await;
        assert!(read < RECORDS, "killed before the end");
    }
    let out = t
        .dispatcher(&["run", "--resume"], Duration::from_secs(120))
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("run resumed"), "{}", out.stderr);

    let status = t.status().await;
    assert_eq!(status["run"], run, "one run, resumed");
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["read"], RECORDS);
    assert_eq!(status["items"]["processed"], RECORDS);
    assert_eq!(status["chunks"]["total"], RECORDS / 500);
    assert_eq!(status["chunks"]["done"], RECORDS / 500);
    assert_every_id_once(&t.path("out"), RECORDS);
    assert!(c1.stop(Duration::from_secs(30)).await.success());
    assert!(c2.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn resume_refuses_a_run_that_has_ended_and_a_run_that_does_not_exist() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "resume-refused",
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
    write_jsonl(&t.path("input.jsonl"), 10, 40);
    let out = t
        .dispatcher(&["run", "--resume"], Duration::from_secs(30))
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("no runs to resume"), "{}", out.stderr);

    let consumer = t.start_consumer(1, 1);
    let out = t.dispatcher(&["run"], Duration::from_secs(60)).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let out = t
        .dispatcher(&["run", "--resume"], Duration::from_secs(30))
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("has ended (completed)"),
        "{}",
        out.stderr
    );
    let out = t
        .dispatcher(&["run", "--resume", "999999"], Duration::from_secs(30))
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("no run 999999"), "{}", out.stderr);
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

/// Regression: a resumed run started counting skipped items from zero, so skips before the
/// interruption no longer counted against the skip limit.
#[tokio::test]
async fn skips_before_an_interruption_still_count_against_the_skip_limit() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "resume-skips",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 100
[throttle]
window = 2
rate = 600
[processor]
kind = "noop"
[failures]
skip_limit = 1
"#,
    );
    // One bad line early, one late: two skips in all, one more than the limit. At 600 records
    // a second the run lasts 10 s, so that a loaded machine's slow `status` calls still see it
    // at 1,000 records and kill it long before the end.
    write_jsonl(&t.path("input.jsonl"), 6000, 40);
    let text = std::fs::read_to_string(t.path("input.jsonl")).expect("input");
    let mut lines: Vec<&str> = text.lines().collect();
    lines[10] = "{not json";
    lines[5900] = "{not json either";
    std::fs::write(t.path("input.jsonl"), lines.join("\n") + "\n").expect("input");
    let consumer = t.start_consumer(1, 2);

    t.kill_after_progress(&["run"], 0, 1_000).await;
    assert_eq!(t.status().await["items"]["skipped"], 1);
    let out = t
        .dispatcher(&["run", "--resume"], Duration::from_secs(120))
        .await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("skip limit"), "{}", out.stderr);
    assert_eq!(t.status().await["state"], "failed");
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}
