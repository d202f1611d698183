//! The consumer's promises: SIGTERM finishes the chunk in hand; poison goes to the dead queue
//! and the consumer stays up.

use std::time::Duration;

use hopper_tests::{output_ids, require_broker, write_jsonl, TestJob};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::BasicProperties;

const LIMIT: Duration = Duration::from_secs(120);

/// A job of chunks of 10 records run by `slow.sh`, at most `window` chunks out at once.
fn slow_exec_job(window: u32) -> String {
    format!(
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
window = {window}
[processor]
kind = "exec"
command = ["sh", "slow.sh"]
"#
    )
}

#[tokio::test]
async fn sigterm_finishes_and_acks_the_chunk_in_hand_then_exits_0() {
    let _conn = require_broker().await;
    let t = TestJob::new("sigterm", &slow_exec_job(1));
    // The first chunk signals that it started, then takes a while; the others are quick.
    std::fs::write(
        t.path("slow.sh"),
        r#"mkdir -p out
if [ "$HOPPER_SEQ" = 1 ]; then touch started; sleep 2; fi
cat > "out/$HOPPER_SEQ.tmp" && mv "out/$HOPPER_SEQ.tmp" "out/$HOPPER_SEQ.jsonl"
"#,
    )
    .expect("script");
    write_jsonl(&t.path("input.jsonl"), 30, 40);
    let first = t.start_consumer(1, 1);
    let dispatcher = {
        let file = t.file();
        tokio::spawn(async move {
            let mut cmd = tokio::process::Command::new(hopper_tests::bin("hopper-dispatcher"));
            cmd.arg("run").arg(file);
            hopper_tests::run(cmd, LIMIT).await
        })
    };
    // Wait for the slow chunk to be in hand, then ask the consumer to stop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !t.path("started").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chunk 1 never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = first.log.clone();
    let status = first.stop(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("chunks=1"),
        "it finished the chunk in hand: {text}"
    );
    assert!(t.path("out/1.jsonl").exists());

    // Another consumer does the rest; chunk 1 is not done again.
    let second = t.start_consumer(2, 1);
    let out = dispatcher.await.expect("dispatcher task");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(output_ids(&t.path("out")), (1..=30).collect::<Vec<u64>>());
    let log2 = second.log.clone();
    assert!(second.stop(Duration::from_secs(30)).await.success());
    let text = std::fs::read_to_string(&log2).expect("log");
    assert!(
        text.contains("chunks=2"),
        "the second consumer did chunks 2 and 3: {text}"
    );
}

/// A first SIGTERM waits for the chunk in hand; when its command hangs, a second one stops the
/// consumer at once, killing the command's whole process group (a grandchild included). The
/// chunk, never acked, goes to the next consumer.
#[tokio::test]
async fn a_second_sigterm_stops_at_once_and_kills_the_command_group() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "secondterm",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
window = 1
[processor]
kind = "exec"
command = ["sh", "hang.sh"]
"#,
    );
    // The first chunk, the first time, starts a grandchild and hangs on it.
    std::fs::write(
        t.path("hang.sh"),
        r#"mkdir -p out
if [ "$HOPPER_SEQ" = 1 ] && [ ! -e grandchild.pid ]; then
  sleep 300 & echo $! > grandchild.tmp; mv grandchild.tmp grandchild.pid; wait
fi
cat > "out/$HOPPER_SEQ.tmp" && mv "out/$HOPPER_SEQ.tmp" "out/$HOPPER_SEQ.jsonl"
"#,
    )
    .expect("script");
    write_jsonl(&t.path("input.jsonl"), 30, 40);
    let mut first = t.start_consumer(1, 1);
    let dispatcher = {
        let file = t.file();
        tokio::spawn(async move {
            let mut cmd = tokio::process::Command::new(hopper_tests::bin("hopper-dispatcher"));
            cmd.arg("run").arg(file);
            hopper_tests::run(cmd, LIMIT).await
        })
    };
    let pid_file = t.path("grandchild.pid");
    hopper_tests::await_file(&pid_file, "chunk 1 never started", Duration::from_secs(60)).await;
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    first.signal("TERM");
    // The clean stop waits for the chunk in hand, which hangs: the consumer stays.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !first.exited(),
        "the first SIGTERM must wait for the chunk in hand"
    );
    first.signal("TERM");
    let status = first.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1), "a forced stop is not a clean one");
    hopper_tests::await_process_end(
        grandchild,
        "the command's grandchild",
        Duration::from_secs(5),
    )
    .await;

    // The chunk was never acked: the next consumer does it, and the run completes.
    let second = t.start_consumer(2, 1);
    let out = dispatcher.await.expect("dispatcher task");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(output_ids(&t.path("out")), (1..=30).collect::<Vec<u64>>());
    assert!(second.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn an_undecodable_message_is_parked_with_its_reason_and_the_consumer_goes_on() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "poison",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 25, 40);
    let consumer = t.start_consumer(1, 2);
    // Declared by the consumer; wait for it, then publish poison onto the chunk queue.
    t.wait_for_consumers(&conn, 1).await;
    let chunks = format!("hopper.{}.chunks", t.name);
    let ch = conn.create_channel().await.expect("channel");
    let oversized = vec![0u8; 3 * 1024 * 1024];
    for (i, payload) in [
        &b"not msgpack at all"[..],
        &[0x92, 0x07, 0xc0][..],
        &oversized[..],
    ]
    .iter()
    .enumerate()
    {
        ch.basic_publish(
            "".into(),
            chunks.as_str().into(),
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("poison-{i}").into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }

    // The consumer is still up: a whole run goes through it.
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(output_ids(&t.path("out")), (1..=25).collect::<Vec<u64>>());

    let dead = format!("hopper.{}.dead", t.name);
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let msg = ch
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a parked message");
        let headers = msg
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = match headers.inner().get("x-hopper-dead-reason") {
            Some(lapin::types::AMQPValue::LongString(s)) => {
                String::from_utf8_lossy(s.as_bytes()).into_owned()
            }
            other => panic!("no dead reason header: {other:?}"),
        };
        reasons.push(reason);
    }
    reasons.sort();
    assert!(
        reasons[0].starts_with("chunk has schema version 7"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("oversized: 3145728 bytes"),
        "{reasons:?}"
    );
    assert!(reasons[2].starts_with("undecodable chunk"), "{reasons:?}");
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn csv_records_become_objects_named_by_the_header() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "csv",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.csv"
[chunking]
items = 2
[processor]
kind = "file"
dir = "out"
"#,
    );
    std::fs::write(
        t.path("input.csv"),
        "id,name,note\n1,\"Smith, J\",\"said \"\"hi\"\"\"\n2,Lee,\"two\nlines\"\n3,Kim,\n",
    )
    .expect("input");
    let consumer = t.start_consumer(1, 1);
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let run = t.status().await["run"].as_u64().expect("a run id");
    let mut lines: Vec<serde_json::Value> = ["1.jsonl", "2.jsonl"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(t.path(&format!("out/{run}/{f}")))
                .expect("output")
                .lines()
                .map(|l| serde_json::from_str(l).expect("json"))
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort_by_key(|v| v["id"].as_str().map(str::to_string));
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["name"], "Smith, J");
    assert_eq!(lines[0]["note"], "said \"hi\"");
    assert_eq!(lines[1]["note"], "two\nlines");
    assert_eq!(lines[2]["note"], "");
    assert!(consumer.stop(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn a_consumer_killed_mid_chunk_loses_nothing_and_duplicates_nothing() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "sigkill",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 20
[throttle]
window = 4
[processor]
kind = "exec"
command = ["sh", "work.sh"]
"#,
    );
    // Every chunk marks that it started, takes a moment, then writes its file atomically.
    std::fs::write(
        t.path("work.sh"),
        r#"mkdir -p out started
touch "started/$HOPPER_SEQ.$$"
sleep 0.2
cat > "out/$HOPPER_SEQ.tmp.$$" && mv "out/$HOPPER_SEQ.tmp.$$" "out/$HOPPER_SEQ.jsonl"
"#,
    )
    .expect("script");
    write_jsonl(&t.path("input.jsonl"), 400, 40);
    let doomed = t.start_consumer(1, 2);
    t.wait_for_consumers(&conn, 1).await;
    let dispatcher = {
        let cmd = t.dispatcher_command(&["run"]);
        tokio::spawn(hopper_tests::run(cmd, Duration::from_secs(120)))
    };
    // Kill the first consumer once it is in the middle of its chunks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(t.path("started")).map_or(0, |d| d.count()) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no chunk started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.signal("KILL");
    let survivor = t.start_consumer(2, 2);

    let out = dispatcher.await.expect("dispatcher task");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], 400);
    assert_eq!(output_ids(&t.path("out")), (1..=400).collect::<Vec<u64>>());
    assert!(survivor.stop(Duration::from_secs(30)).await.success());
}

/// A consumer holds more chunks than it processes (`--prefetch` over `--concurrency`): the ones
/// waiting for a slot are not started, and on SIGTERM they go back to the queue at once while
/// the chunk in hand is finished; another consumer does them, every record once.
#[tokio::test]
async fn chunks_prefetched_but_not_started_go_back_at_once_on_sigterm() {
    let conn = require_broker().await;
    let t = TestJob::new("prefetch", &slow_exec_job(3));
    // Every chunk leaves a mark; the first one to start (whichever: a consumer's chunks may
    // start in any order) signals it, then takes a while.
    std::fs::write(
        t.path("slow.sh"),
        r#"mkdir -p out marks
touch "marks/$HOPPER_SEQ"
if mkdir first 2>/dev/null; then touch started; sleep 3; fi
cat > "out/$HOPPER_SEQ.tmp" && mv "out/$HOPPER_SEQ.tmp" "out/$HOPPER_SEQ.jsonl"
"#,
    )
    .expect("script");
    write_jsonl(&t.path("input.jsonl"), 30, 40);
    let dispatcher = t.spawn_dispatcher(&["run"], "run.log");
    // All three chunks wait in the queue before the consumer comes, so that it takes them all.
    let chunks = format!("hopper.{}.chunks", t.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while t.try_queue_depth(&conn, &chunks).await.unwrap_or(0) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the three chunks were never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = t.start_program(
        &hopper_tests::bin("hopper-consumer"),
        &["--concurrency", "1", "--prefetch", "3"],
        1,
    );
    // One chunk runs, and the other two are in the same consumer's hands: none is ready.
    while !t.path("started").exists() || t.queue_depth(&conn, &chunks).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no chunk started with the others in hand"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let marks = std::fs::read_dir(t.path("marks")).expect("marks").count();
    assert_eq!(
        marks, 1,
        "one chunk at a time: the others wait in the prefetch"
    );
    let log = first.log.clone();
    let status = first.stop(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("chunks=1"),
        "it finished chunk 1 only: {text}"
    );
    assert_eq!(
        t.queue_depth(&conn, &chunks).await,
        2,
        "chunks 2 and 3 are back in the queue"
    );

    let second = t.start_consumer(2, 2);
    t.await_success(dispatcher, "run.log", LIMIT).await;
    assert_eq!(t.status().await["state"], "completed");
    assert_eq!(output_ids(&t.path("out")), (1..=30).collect::<Vec<u64>>());
    let log2 = second.log.clone();
    assert!(second.stop(Duration::from_secs(30)).await.success());
    let text = std::fs::read_to_string(&log2).expect("log");
    assert!(
        text.contains("chunks=2"),
        "the second consumer did 2 and 3: {text}"
    );
}

/// `--prefetch` below `--concurrency` could never hold the chunks being processed: refused.
#[tokio::test]
async fn a_prefetch_below_the_concurrency_is_refused() {
    let t = TestJob::new(
        "prefetchbad",
        "[source]\nkind = \"file\"\npath = \"input.jsonl\"\n[processor]\nkind = \"noop\"\n",
    );
    let mut cmd = tokio::process::Command::new(hopper_tests::bin("hopper-consumer"));
    cmd.arg(t.file())
        .args(["--concurrency", "4", "--prefetch", "2"]);
    let out = hopper_tests::run(cmd, LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("--prefetch 2 is less than --concurrency 4"),
        "{}",
        out.stderr
    );
}
