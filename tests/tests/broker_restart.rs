//! RabbitMQ stopped for a few seconds mid-run and started again: dispatcher and consumers
//! reconnect by themselves, and every record ends up in the output exactly once.
//!
//! This test stops the shared broker's app, so it lives in a test binary of its own: cargo runs
//! test binaries one after another, so no other test sees the broker go away.

use std::time::Duration;

use hopper_tests::{output_ids, require_broker, write_jsonl, TestJob};

const RECORDS: u64 = 30_000;

/// Starts the broker's app again when dropped, whatever the test's outcome, so the tests after
/// this one have a broker.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["start_app"])
            .status();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run rabbitmqctl (this test needs the local RabbitMQ)");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test]
async fn a_broker_stopped_and_started_mid_run_loses_and_duplicates_nothing() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "broker-restart",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 250
[throttle]
window = 8
rate = 6000
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), RECORDS, 60);
    let c1 = t.start_consumer(1, 2);
    let c2 = t.start_consumer(2, 2);
    let log = t.path("dispatcher.log");
    let mut dispatcher = t
        .dispatcher_command(&["run"])
        .stderr(std::fs::File::create(&log).expect("dispatcher log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start the dispatcher");
    // Stop the broker once the run is well under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = t
            .dispatcher(&["status", "--json"], Duration::from_secs(30))
            .await;
        let read = serde_json::from_str::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|s| s["items"]["processed"].as_u64())
            .unwrap_or(0);
        if read >= 5_000 {
            break;
        }
        if let Some(status) = dispatcher.try_wait().expect("poll the dispatcher") {
            panic!(
                "the dispatcher ended before the broker was stopped: {status}; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run made no progress; the dispatcher's log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restart = RestartOnDrop;
    rabbitmqctl(&["stop_app"]);
    // The outage itself: a few seconds with no broker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]);
    drop(restart);

    let logs = || {
        ["dispatcher.log", "consumer-1.log", "consumer-2.log"]
            .iter()
            .map(|f| {
                format!(
                    "== {f}\n{}",
                    std::fs::read_to_string(t.path(f)).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    let status = match tokio::time::timeout(Duration::from_secs(120), dispatcher.wait()).await {
        Ok(status) => status.expect("wait for the dispatcher"),
        Err(_) => panic!("the dispatcher did not finish within 120 s\n{}", logs()),
    };
    let stderr = std::fs::read_to_string(&log).expect("dispatcher log");
    assert!(status.success(), "{status}\n{}", logs());
    assert_eq!(stderr.matches("lost the broker").count(), 1, "{}", logs());
    assert_eq!(
        stderr.matches("reconnected to the broker").count(),
        1,
        "{}",
        logs()
    );
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], RECORDS);
    assert_eq!(
        output_ids(&t.path("out")),
        (1..=RECORDS).collect::<Vec<u64>>()
    );
    for c in [c1, c2] {
        // A consumer may still be in a reconnection attempt (a starting broker can accept a
        // connection and not answer; each attempt is bounded at 10 s) when the other one and
        // the dispatcher have finished the run: wait for it, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let reconnected = loop {
            let text = std::fs::read_to_string(&c.log).unwrap_or_default();
            if text.contains("reconnected to the broker") {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let log = c.log.clone();
        assert!(c.stop(Duration::from_secs(30)).await.success());
        let text = std::fs::read_to_string(&log).expect("consumer log");
        assert!(reconnected, "{text}");
    }
}
