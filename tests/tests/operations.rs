//! Operating Hopper: what a scheduler runs (`run --continue`), and the list of a job's runs.

use std::time::Duration;

use hopper_tests::{assert_every_id_once, write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(120);

fn job(prefix: &str) -> TestJob {
    TestJob::local(
        prefix,
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
rate = 1000
ramp_up = "0s"
[processor]
kind = "file"
dir = "out"
"#,
    )
}

fn runs_json(t: &TestJob, out: &hopper_tests::Output) -> Vec<serde_json::Value> {
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("runs --json prints JSON");
    let _ = t;
    v.as_array().expect("an array").clone()
}

/// `run --continue` finishes the latest run when its dispatcher is gone, starts a new run when
/// the latest has ended, and changes nothing (exit 3) while a dispatcher of the job is alive.
#[tokio::test]
async fn run_continue_finishes_an_interrupted_run_or_starts_a_new_one() {
    let t = job("continue");
    write_jsonl(&t.path("input.jsonl"), 2_000, 30);
    t.kill_after_progress(&["run", "--local", "1"], 0, 200)
        .await;

    let out = t
        .dispatcher(&["run", "--continue", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("run 1 of"), "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(
        (s["run"].as_u64(), s["state"].as_str()),
        (Some(1), Some("completed"))
    );
    assert_every_id_once(&t.path("out/1"), 2_000);

    // The latest run has ended: a new one.
    let out = t
        .dispatcher(&["run", "--continue", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("run 2 of"), "{}", out.stderr);

    // A dispatcher alive: exit 3, nothing changed.
    let mut live = t.spawn_dispatcher(&["run", "--local", "1"], "live.log");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while t.status().await["run"] != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "run 3 never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = t
        .dispatcher(&["run", "--continue", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("already running: run 3 "),
        "{}",
        out.stderr
    );
    let status = tokio::time::timeout(LIMIT, live.wait())
        .await
        .expect("run 3 ends")
        .expect("wait");
    assert!(status.success());
    let out = t.dispatcher(&["runs", "--json"], LIMIT).await;
    assert_eq!(runs_json(&t, &out).len(), 3, "nothing changed");
}

/// `runs` lists every run, newest first, with its state and counts; a job never run has none,
/// and `runs` creates nothing.
#[tokio::test]
async fn runs_lists_every_run_newest_first() {
    let t = job("runslist");
    let out = t.dispatcher(&["runs", "--json"], LIMIT).await;
    assert!(runs_json(&t, &out).is_empty());
    assert!(!t.path("state.db").exists());

    write_jsonl(&t.path("input.jsonl"), 100, 30);
    for _ in 0..2 {
        let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
    }
    let out = t.dispatcher(&["runs", "--json"], LIMIT).await;
    let lines = runs_json(&t, &out);
    let ids: Vec<u64> = lines.iter().filter_map(|l| l["run"].as_u64()).collect();
    assert_eq!(ids, [2, 1]);
    for l in &lines {
        assert_eq!(l["state"], "completed");
        assert_eq!(l["items"]["processed"], 100);
        assert_eq!(l["dispatcher_alive"], false);
        assert!(l["finished_at"].is_string());
    }
    let out = t.dispatcher(&["runs"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let table: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(table.len(), 3, "{}", out.stdout);
    assert!(table[1].trim_start().starts_with("2 ") && table[1].contains("completed"));
}

/// A noop job of 100 records run to completion over the broker, and its consumer, still
/// attached.
async fn completed_over_broker(prefix: &str) -> (TestJob, hopper_tests::Consumer) {
    let t = TestJob::new(
        prefix,
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
    write_jsonl(&t.path("input.jsonl"), 100, 30);
    let consumer = t.start_consumer(1, 2);
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    (t, consumer)
}

/// `clean --older-than` removes ended runs with their rows, never one that has not ended.
#[tokio::test]
async fn clean_removes_ended_runs_only() {
    let t = job("cleanruns");
    write_jsonl(&t.path("input.jsonl"), 2_000, 30);
    // Run 1 interrupted, runs 2 and 3 ended.
    t.kill_after_progress(&["run", "--local", "1"], 0, 200)
        .await;
    for _ in 0..2 {
        let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
    }
    let out = t.dispatcher(&["clean", "--older-than", "1h"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("removed 0 run(s)"), "{}", out.stderr);
    let out = t.dispatcher(&["clean", "--older-than", "0s"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("removed 2 run(s)"), "{}", out.stderr);
    let out = t.dispatcher(&["runs", "--json"], LIMIT).await;
    let left: Vec<u64> = runs_json(&t, &out)
        .iter()
        .filter_map(|l| l["run"].as_u64())
        .collect();
    assert_eq!(left, [1], "the interrupted run stays");
    let out = t.dispatcher(&["status", "--run", "2"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    // The interrupted run is still whole: it finishes.
    let out = t
        .dispatcher(&["run", "--resume", "1", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_every_id_once(&t.path("out/1"), 2_000);
}

/// `clean --queues` deletes the job's queues once its runs have ended; it keeps them while the
/// dead queue holds a chunk, unless `--force`.
#[tokio::test]
async fn clean_queues_keeps_them_while_chunks_are_dead_unless_forced() {
    let conn = hopper_tests::require_broker().await;
    let (t, consumer) = completed_over_broker("cleanqueues").await;
    assert!(consumer.stop(LIMIT).await.success());

    // A chunk parked on the dead queue (as a consumer would park one).
    let channel = conn.create_channel().await.expect("channel");
    let dead = format!("hopper.{}.dead", t.name);
    channel
        .basic_publish(
            "".into(),
            dead.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"parked",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while t.queue_depth(&conn, &dead).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = t.dispatcher(&["clean", "--queues"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("holds 1 chunk"), "{}", out.stderr);
    assert_eq!(t.queue_depth(&conn, &dead).await, 1, "nothing deleted");

    let out = t.dispatcher(&["clean", "--queues", "--force"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("hopper.{}.chunks", t.name)),
        "{}",
        out.stderr
    );
    let states = hopper_common::transport::amqp::admin::inspect(&t.job())
        .await
        .expect("inspect");
    assert!(states.iter().all(|q| q.messages.is_none()), "{states:?}");
}

/// `status` adds the broker's side when it can be asked (each queue's messages and consumers),
/// and says so when it cannot, without failing; `--watch` of an ended run prints it once.
#[tokio::test]
async fn status_shows_the_broker_side_of_the_job() {
    let _conn = hopper_tests::require_broker().await;
    let (t, consumer) = completed_over_broker("statusbroker").await;
    let s = t.status().await;
    assert_eq!(s["broker"]["reachable"], true, "{s}");
    let chunks = s["broker"]["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == format!("hopper.{}.chunks", t.name))
        .cloned()
        .expect("the chunk queue");
    assert_eq!(
        (chunks["messages"].as_u64(), chunks["consumers"].as_u64()),
        (Some(0), Some(1))
    );
    let out = t.dispatcher(&["status", "--watch"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(
        out.stdout.matches("state    completed").count(),
        1,
        "{}",
        out.stdout
    );
    assert!(consumer.stop(LIMIT).await.success());

    // A job whose broker cannot be reached (local mode): said, not fatal.
    let local = job("statusnobroker");
    write_jsonl(&local.path("input.jsonl"), 10, 30);
    let out = local.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = local.status().await;
    assert_eq!(s["broker"]["reachable"], false);
    assert!(
        s["broker"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1:1")),
        "{s}"
    );
}

/// A tiny HTTP server for one test: answers each POST with the next status of `statuses`
/// (200 once they run out), and hands over each body it received.
async fn http_server(statuses: Vec<u16>) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head, then as many body bytes as content-length says.
            let body = loop {
                let n = socket.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(body.to_string());
                    }
                }
            };
            let Some(body) = body else { continue };
            let status = statuses.next().unwrap_or(200);
            let _ = tx.send(body);
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = socket.write_all(reply.as_bytes()).await;
        }
    });
    (url, rx)
}

/// `[notify]`: when a run ends, the command gets the `status --json` object on stdin and the
/// webhook gets it as a POST; a failing notification is tried again and never changes the
/// run's outcome.
#[tokio::test]
async fn a_run_that_ends_is_told_to_the_command_and_the_webhook() {
    let (url, mut bodies) = http_server(vec![500]).await;
    let t = TestJob::local(
        "notify",
        &format!(
            r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "noop"
[notify]
command = ["sh", "-c", "cat > notified.json"]
webhook = "{url}"
"#
        ),
    );
    write_jsonl(&t.path("input.jsonl"), 10, 30);
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let told: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path("notified.json")).expect("the command ran"),
    )
    .expect("the command got JSON");
    assert_eq!(
        (told["run"].as_u64(), told["state"].as_str()),
        (Some(1), Some("completed"))
    );
    assert_eq!(told["items"]["processed"], 10);
    // The webhook answered 500 first: tried again, then told.
    let first = bodies.recv().await.expect("a first POST");
    let second = bodies.recv().await.expect("a second POST");
    assert_eq!(first, second);
    let posted: serde_json::Value = serde_json::from_str(&second).expect("JSON");
    assert_eq!(posted, told);
    assert!(out.stderr.contains("HTTP status 500"), "{}", out.stderr);

    // A command that fails every time: logged, given up, the run's outcome stands.
    let text = std::fs::read_to_string(t.file())
        .expect("job")
        .replace("cat > notified.json", "exit 7");
    std::fs::write(t.file(), text).expect("job");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("giving up"), "{}", out.stderr);
}

/// `HOPPER_LOG_FORMAT=json`: every line on stderr is a JSON object, the run's own result line
/// and an error included, for a log shipper.
#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let t = job("jsonlogs");
    write_jsonl(&t.path("input.jsonl"), 50, 30);
    let mut cmd = t.dispatcher_command(&["run", "--local", "1"]);
    cmd.env("HOPPER_LOG_FORMAT", "json");
    let out = hopper_tests::run(cmd, LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["message"].is_string()));
    assert!(
        lines.iter().any(|l| l["job"] == t.name.as_str()),
        "structured fields"
    );
    let last = lines.last().expect("a line");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("run 1 of ")),
        "{last}"
    );
    std::fs::remove_file(t.path("input.jsonl")).expect("remove the input");
    let mut cmd = t.dispatcher_command(&["run", "--local", "1"]);
    cmd.env("HOPPER_LOG_FORMAT", "json");
    let out = hopper_tests::run(cmd, LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    let error: serde_json::Value =
        serde_json::from_str(out.stderr.lines().last().expect("a line")).expect("JSON");
    assert_eq!(error["level"], "ERROR");
}

fn read_so_far(s: &serde_json::Value) -> u64 {
    s["items"]["read"].as_u64().unwrap_or(0)
}

/// `pause` stops a running run's publishing within a tick (chunks in hand finish), `throttle`
/// changes its rate and window, `resume` lets it go on: it ends with every record once. What
/// they set stays with the run: a paused run killed and resumed later stays paused.
#[tokio::test]
async fn pause_throttle_and_resume_a_running_run() {
    let t = TestJob::local(
        "controls",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
rate = 300
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 3_000, 30);
    let mut first = t.spawn_dispatcher(&["run", "--local", "1"], "first.log");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        // The run may not exist yet.
        let out = t.dispatcher(&["status", "--json"], LIMIT).await;
        let s: Option<serde_json::Value> = serde_json::from_str(&out.stdout).ok();
        if s.as_ref().is_some_and(|s| read_so_far(s) >= 100) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While it reads: how far, and the time left at the recent pace.
    let s = t.status().await;
    let fraction = s["eta"]["fraction_read"].as_f64().expect("an estimate");
    assert!(fraction > 0.0 && fraction < 1.0, "{s}");
    assert!(s["eta"]["seconds"].is_u64(), "{s}");
    let out = t.dispatcher(&["pause"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("paused"), "{}", out.stderr);
    t.await_log("first.log", "paused: nothing new is published")
        .await;
    let s = t.status().await;
    assert_eq!(s["state"], "paused");
    let before = read_so_far(&s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        read_so_far(&t.status().await),
        before,
        "nothing new while paused"
    );

    // Killed while paused: resumed later, it stays paused.
    first.kill().await.expect("SIGKILL");
    let _ = first.wait().await;
    let mut second = t.spawn_dispatcher(&["run", "--resume", "--local", "1"], "second.log");
    t.await_log("second.log", "the run is paused").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read_so_far(&t.status().await), before);

    let out = t
        .dispatcher(&["throttle", "--rate", "0", "--window", "8"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("window 8, rate unlimited"),
        "{}",
        out.stderr
    );
    let out = t.dispatcher(&["resume"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let status = tokio::time::timeout(LIMIT, second.wait())
        .await
        .expect("the run ends")
        .expect("wait");
    assert!(status.success());
    let log = std::fs::read_to_string(t.path("second.log")).unwrap_or_default();
    assert!(
        log.contains("throttle changed") && log.contains("resumed"),
        "{log}"
    );
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert!(s.get("eta").is_none(), "no estimate once it ended: {s}");
    assert_every_id_once(&t.path("out/1"), 3_000);

    // Bad use: exit 2, saying why.
    for (args, says) in [
        (vec!["pause"], "has ended (completed)"),
        (
            vec!["throttle", "--run", "1", "--window", "0"],
            "at least 1",
        ),
        (vec!["resume", "--run", "9"], "no run 9"),
    ] {
        let out = t.dispatcher(&args, LIMIT).await;
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
}

/// A job whose chunks each take a while (`sleep`), ten items a chunk, eight chunks out: most of
/// them wait on the queue, one is in hand.
fn slow_job(t: &TestJob) {
    write_jsonl(&t.path("input.jsonl"), 300, 30);
}

const SLOW: &str = r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
window = 8
[processor]
kind = "exec"
command = ["sh", "-c", "cat > /dev/null; sleep 0.3"]
"#;

/// `cancel`, in local mode and over the broker: the chunks still waiting are taken back and
/// listed as cancelled, the one in hand finishes, the run ends `cancelled` (exit 1) with every
/// record read accounted for; `--resume` and `retry` refuse it.
#[tokio::test]
async fn cancel_takes_back_what_waits_and_ends_the_run_cancelled() {
    let _conn = hopper_tests::require_broker().await;
    let local = TestJob::local("cancellocal", SLOW);
    let broker = TestJob::new("cancelbroker", SLOW);
    for t in [&local, &broker] {
        slow_job(t);
        let over_broker = std::ptr::eq(t, &broker);
        let consumer = over_broker.then(|| t.start_consumer(1, 1));
        let args: &[&str] = if over_broker {
            &["run"]
        } else {
            &["run", "--local", "1"]
        };
        let mut dispatcher = t.spawn_dispatcher(args, "dispatcher.log");
        t.await_status("two chunks done and some waiting", |s| {
            s["chunks"]["done"].as_u64() >= Some(2) && s["chunks"]["in_flight"].as_u64() >= Some(4)
        })
        .await;
        let out = t.dispatcher(&["cancel"], LIMIT).await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
        let status = tokio::time::timeout(LIMIT, dispatcher.wait())
            .await
            .expect("the run ends")
            .expect("wait");
        assert_eq!(status.code(), Some(1));
        let s = t.status().await;
        assert_eq!(s["state"], "cancelled", "{s}");
        let items = &s["items"];
        assert_eq!(
            items["read"],
            items["processed"].as_u64().unwrap_or(0) + items["failed"].as_u64().unwrap_or(0),
            "{s}"
        );
        assert_eq!(
            (
                s["chunks"]["pending"].as_u64(),
                s["chunks"]["in_flight"].as_u64()
            ),
            (Some(0), Some(0))
        );
        let cancelled = hopper_tests::failures(&s, "reason")
            .iter()
            .filter(|(_, r)| r.starts_with("cancelled"))
            .count();
        assert!(
            cancelled >= 2,
            "the waiting chunks are listed as cancelled: {s}"
        );
        assert!(read_so_far(&s) < 300, "it read no further: {s}");
        for args in [
            vec!["run", "--resume", "--local", "1"],
            vec!["retry", "--run", "1", "--local", "1"],
        ] {
            let out = t.dispatcher(&args, LIMIT).await;
            assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr);
            assert!(out.stderr.contains("cancelled"), "{}", out.stderr);
        }
        if let Some(c) = consumer {
            assert!(c.stop(LIMIT).await.success());
        }
    }
}
