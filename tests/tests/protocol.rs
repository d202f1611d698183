//! The chunk protocol under ordinary and hostile workloads, end to end: real broker, real
//! processes, executions counted, not only outputs.
//!
//! - a backlog (processing slower than the window): each chunk runs exactly once;
//! - a processor that hangs: cancelled at `chunk_timeout`, retried, then dead; the run ends;
//! - a chunk that kills its consumer on every delivery: dead-lettered by the broker, recorded
//!   dead with its reason, and every other chunk runs exactly once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hopper_tests::{require_broker, write_jsonl, TestJob};

/// `seq:attempt` lines the exec processor appended, one per execution that got that far.
fn executions(path: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(l.to_string()).or_default() += 1;
        m
    })
}

/// Regression (the protocol issue, "Seen"): a slow processor behind a large window ran most
/// chunks two or three times, because time waiting in the queue counted against
/// `chunk_timeout`.
#[tokio::test]
async fn a_backlog_runs_every_chunk_exactly_once_in_about_the_work_own_time() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "backlog",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 100
[throttle]
window = 16
[processor]
kind = "exec"
command = ["sh", "-c", "cat >/dev/null; sleep 0.5; echo $HOPPER_SEQ:$HOPPER_ATTEMPT >> executions.log"]
[retry]
chunk_timeout = "2s"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 2_000, 40);
    // One consumer taking one chunk at a time: 20 chunks of 0.5 s, all but one waiting in the
    // queue for up to ten times chunk_timeout.
    let consumer = t.start_consumer(1, 1);
    t.wait_for_consumers(&conn, 1).await;
    let started = Instant::now();
    let out = t.dispatcher(&["run"], Duration::from_secs(120)).await;
    let took = started.elapsed();
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let runs = executions(&t.path("executions.log"));
    let expected: BTreeMap<String, usize> = (1..=20).map(|seq| (format!("{seq}:1"), 1)).collect();
    assert_eq!(runs, expected, "each chunk once, on its first attempt");
    assert!(took < Duration::from_secs(25), "10 s of work took {took:?}");
    let status = t.status().await;
    assert_eq!(status["items"]["processed"], 2_000);
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn a_processor_that_hangs_is_cancelled_at_chunk_timeout_retried_then_dead() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "hang",
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
command = ["sh", "-c", "cat >/dev/null; echo $HOPPER_SEQ:$HOPPER_ATTEMPT >> executions.log; if [ $HOPPER_SEQ = 2 ]; then sleep 600; fi"]
[retry]
max_attempts = 2
backoff = "100ms..100ms"
chunk_timeout = "1s"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 40, 40);
    let consumer = t.start_consumer(1, 2);
    t.wait_for_consumers(&conn, 1).await;
    let started = Instant::now();
    let out = t.dispatcher(&["run"], Duration::from_secs(60)).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["items"]["processed"], 30);
    assert_eq!(status["chunks"]["dead"], 1);
    let reason = status["failures"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("passed retry.chunk_timeout (1s)"),
        "{reason}"
    );
    let runs = executions(&t.path("executions.log"));
    assert_eq!(runs.get("2:1"), Some(&1));
    assert_eq!(runs.get("2:2"), Some(&1));
    assert_eq!(runs.len(), 5, "{runs:?}");
    // Nothing of the hung commands is left running.
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "sleep 600"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(leftovers.trim().is_empty(), "still running: {leftovers}");
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

/// Regression (the protocol issue, finding 2): a chunk that crashed its consumer each time was
/// dead-lettered with no reply, taken for stuck and published again, for ever. Consumers with
/// `--prefetch` equal to `--concurrency`: every other chunk runs exactly once.
#[tokio::test]
async fn a_chunk_that_kills_its_consumer_ends_dead_and_the_rest_runs_once() {
    let runs = killer_run("killer", Some(1)).await;
    assert_eq!(runs, others_once());
}

/// The same with the default prefetch (twice the concurrency): the killer's first delivery may
/// come while another chunk's reply awaits its confirm, and that chunk, never acked, runs once
/// more; every later delivery of the killer runs alone, so no other chunk runs again.
#[tokio::test]
async fn a_chunk_that_kills_its_consumer_costs_at_most_one_rerun_with_the_default_prefetch() {
    let runs = killer_run("killer2", None).await;
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        others_once().keys().collect::<Vec<_>>()
    );
    let again: usize = runs.values().map(|n| n - 1).sum();
    assert!(again <= 1, "{runs:?}");
}

/// Each chunk but the killer (3), once, as `executions.log` counts them.
fn others_once() -> BTreeMap<String, usize> {
    (1..=10)
        .filter(|&s| s != 3)
        .map(|seq| (format!("{seq}:1"), 1))
        .collect()
}

/// Runs 10 chunks of which chunk 3 kills its consumer while `killer` exists, through two
/// consumers of concurrency 1 (and `prefetch`, if set) restarted whenever one dies: the run
/// ends with chunk 3 dead and the rest done; then, disarmed, `retry` completes it. Returns how
/// often each chunk ran before the retry.
async fn killer_run(prefix: &str, prefetch: Option<u16>) -> BTreeMap<String, usize> {
    // Checked now, connected again later: on a busy machine the run outlasts twice the
    // heartbeat, and this idle connection, driven by the test's one thread, may miss it.
    drop(require_broker().await);
    let t = TestJob::new(
        prefix,
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
command = ["sh", "-c", "if [ $HOPPER_SEQ = 3 ] && [ -e killer ]; then kill -9 $PPID; exit 1; fi; cat > out-$HOPPER_SEQ.jsonl; echo $HOPPER_SEQ:$HOPPER_ATTEMPT >> executions.log"]
"#,
    );
    let prefetch = prefetch.map(|p| p.to_string());
    let start = |n: u32| match &prefetch {
        None => t.start_consumer(n, 1),
        Some(p) => t.start_program(
            &hopper_tests::bin("hopper-consumer"),
            &["--concurrency", "1", "--prefetch", p],
            n,
        ),
    };
    write_jsonl(&t.path("input.jsonl"), 100, 40);
    std::fs::write(t.path("killer"), "").expect("arm the killer");
    let mut dispatcher = t.spawn_dispatcher(&["run"], "dispatcher.log");
    // Two consumers, one chunk at a time each, restarted whenever one dies.
    let mut consumers = vec![start(0), start(1)];
    let mut restarts = 0u32;
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(status) = dispatcher.try_wait().expect("poll the dispatcher") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the run did not end");
        for c in consumers.iter_mut() {
            if c.exited() {
                restarts += 1;
                *c = start(2 + restarts);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(t.path("dispatcher.log")).unwrap_or_default();
    assert_eq!(code, Some(1), "{log}");
    assert!(restarts >= 10, "only {restarts} consumer deaths");
    let status = t.status().await;
    let dump = format!(
        "{status:#}\nexecutions:\n{}",
        std::fs::read_to_string(t.path("executions.log")).unwrap_or_default()
    );
    assert_eq!(status["state"], "completed_with_failures", "{dump}");
    assert_eq!(status["chunks"]["dead"], 1, "{dump}");
    assert_eq!(status["items"]["processed"], 90, "{dump}");
    let failure = &status["failures"][0];
    assert_eq!(failure["seq"], 3);
    let reason = failure["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("dead-lettered"), "{reason}");
    assert!(reason.contains("died or lost its connection"), "{reason}");
    // The killer stays inspectable on the dead queue.
    let runs = executions(&t.path("executions.log"));
    let dead = format!("hopper.{}.dead", t.name);
    let conn = require_broker().await;
    assert_eq!(t.queue_depth(&conn, &dead).await, 1);

    // Disarmed, `retry` sends it again and the run completes.
    std::fs::remove_file(t.path("killer")).expect("disarm");
    for c in consumers.iter_mut() {
        if c.exited() {
            restarts += 1;
            *c = start(2 + restarts);
        }
    }
    let out = t
        .dispatcher(&["retry", "--run", "1"], Duration::from_secs(60))
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(t.status().await["items"]["processed"], 100);
    for c in consumers {
        assert!(c.stop(Duration::from_secs(30)).await.success());
    }
    runs
}

/// Regression (the protocol issue, finding 6): hostile input was held in memory. A 200 MB line
/// (a one-line JSON array) with `max_bytes = 1 MiB` is skipped with its line number while the
/// reader skips past it, the rest is processed, and the dispatcher's peak memory stays under
/// 64 MiB. Local mode: the workers run in the dispatcher's own process, so they count too.
#[tokio::test]
async fn a_200_mb_line_is_skipped_without_being_held() {
    use std::io::Write;
    let t = TestJob::local(
        "hugeline",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 100
max_bytes = 1048576
[processor]
kind = "noop"
[failures]
skip_limit = 1
"#,
    );
    {
        let mut w =
            std::io::BufWriter::new(std::fs::File::create(t.path("input.jsonl")).expect("input"));
        for id in 1..=500u64 {
            writeln!(w, "{{\"id\":{id}}}").expect("write");
            if id == 250 {
                // Line 251: a JSON array of 200 MB.
                w.write_all(b"[").expect("write");
                let piece = "1234567,".repeat(8192);
                for _ in 0..(200 * 1024 * 1024 / piece.len()) {
                    w.write_all(piece.as_bytes()).expect("write");
                }
                w.write_all(b"0]\n").expect("write");
            }
        }
        w.flush().expect("flush");
    }
    let mut child = t.spawn_dispatcher(&["run", "--local", "2"], "dispatcher.log");
    let pid = child.id().expect("pid");
    let mut peak_kib = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().expect("poll") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the run did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let log = std::fs::read_to_string(t.path("dispatcher.log")).unwrap_or_default();
    assert_eq!(code, Some(1), "{log}");
    assert!(peak_kib < 64 * 1024, "peak memory {peak_kib} KiB");
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["items"]["processed"], 500);
    assert_eq!(status["items"]["skipped"], 1);
    assert_eq!(status["items"]["read"], 501);
    assert_eq!(status["failures"][0]["position"], 251);
    eprintln!(
        "dispatcher peak memory: {:.1} MiB",
        peak_kib as f64 / 1024.0
    );
}
