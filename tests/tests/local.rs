//! Local mode (`run --local N`): the same job in one process, with no broker. Every job here
//! points at a broker URL where nothing listens, so a test passes only if none is contacted.

use std::time::Duration;

use hopper_tests::{assert_every_id_once, output_ids, write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn two_hundred_thousand_records_in_local_mode_arrive_exactly_once_without_a_broker() {
    let t = TestJob::local(
        "local",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 200_000, 100);
    let out = t.dispatcher(&["run", "--local", "4"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("local mode"), "{}", out.stderr);

    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["read"], 200_000);
    assert_eq!(status["items"]["processed"], 200_000);
    assert_eq!(status["chunks"]["done"], 200);
    assert_every_id_once(&t.path("out"), 200_000);
}

/// Bad data, a chunk that fails every attempt, then `retry` once the input is fixed: the same
/// classification, backoff and retry as over the broker.
#[tokio::test]
async fn failures_retries_and_retry_behave_as_over_the_broker() {
    let t = TestJob::local(
        "local-retry",
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
backoff = "50ms..100ms"
[failures]
skip_limit = 5
"#,
    );
    std::fs::write(
        t.path("process.sh"),
        r#"set -e
if [ -e outage ] && [ "$HOPPER_SEQ" = 2 ]; then
  echo "the API is down (attempt $HOPPER_ATTEMPT)" >&2
  exit 1
fi
mkdir -p "out/$HOPPER_RUN"
cat > "out/$HOPPER_RUN/$HOPPER_SEQ.tmp"
mv "out/$HOPPER_RUN/$HOPPER_SEQ.tmp" "out/$HOPPER_RUN/$HOPPER_SEQ.jsonl"
"#,
    )
    .expect("script");
    std::fs::write(t.path("outage"), "").expect("outage");
    let input = |fixed: bool| -> String {
        (1..=50u64)
            .map(|id| match id {
                33 if !fixed => "{\"id\":33,\n".to_string(),
                _ => format!("{{\"id\":{id}}}\n"),
            })
            .collect()
    };
    std::fs::write(t.path("input.jsonl"), input(false)).expect("input");

    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("it will be retried"), "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["chunks"]["dead"], 1);
    assert_eq!(status["items"]["skipped"], 1);
    assert_eq!(status["items"]["failed"], 10);
    assert_eq!(output_ids(&t.path("out")).len(), 39);

    std::fs::remove_file(t.path("outage")).expect("outage over");
    std::fs::write(t.path("input.jsonl"), input(true)).expect("input");
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], 50);
    assert_eq!(status["failures"].as_array().map(Vec::len), Some(0));
    assert_eq!(output_ids(&t.path("out")), (1..=50).collect::<Vec<u64>>());
}

/// The in-process queue dies with the process: a local run killed with SIGKILL is finished by
/// `run --resume --local N`, which reads the unfinished chunks again.
#[tokio::test]
async fn a_local_run_killed_mid_way_is_resumed_to_every_record_exactly_once() {
    const RECORDS: u64 = 40_000;
    let t = TestJob::local(
        "local-resume",
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
rate = 10000
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), RECORDS, 80);
    let read = t
        .kill_after_progress(&["run", "--local", "2"], 0, 8_000)
        .await;
    assert!(read < RECORDS, "killed before the end");
    let out = t
        .dispatcher(&["run", "--resume", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], RECORDS);
    assert_every_id_once(&t.path("out"), RECORDS);
}

/// The README's first command: the shipped example in local mode, on the shipped sample, on a
/// machine with no broker (run from a copy, so the repository stays clean).
#[tokio::test]
async fn the_quickstart_example_runs_in_local_mode_without_a_broker() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        examples.join("hello-local.toml"),
        dir.path().join("hello-local.toml"),
    )
    .expect("copy the job");
    std::fs::create_dir(dir.path().join("sample")).expect("sample dir");
    // The repository holds the (otherwise ignored) data directory the job's state lives in.
    assert!(examples.join("data/README.md").exists());
    std::fs::create_dir(dir.path().join("data")).expect("data dir");
    std::fs::copy(
        examples.join("sample/products.jsonl"),
        dir.path().join("sample/products.jsonl"),
    )
    .expect("copy the sample");
    let mut cmd = tokio::process::Command::new(hopper_tests::bin("hopper-dispatcher"));
    cmd.arg("run")
        .arg(dir.path().join("hello-local.toml"))
        .args(["--local", "4"])
        .env("AMQP_URL", hopper_tests::NO_BROKER);
    let out = hopper_tests::run(cmd, LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("completed (2000 processed"),
        "{}",
        out.stderr
    );
    assert_every_id_once(&dir.path().join("data/hello-local"), 2000);
}
