//! Prometheus metrics of both binaries, scraped during a run over the real broker: at a moment
//! when nothing moves (the run paused, every chunk in hand answered), the dispatcher's and the
//! consumer's counts equal `status`'s exactly.

use std::time::Duration;

use hopper_tests::{require_broker, write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(120);

/// `GET /metrics` at `addr`: the body, after checking the status and content type.
async fn scrape(addr: &str) -> String {
    let out = hopper_tests::scrape(addr).await;
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the series `name` whose labels include `labels` (and the job's).
fn value(body: &str, job: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let job_label = format!("job=\"{job}\"");
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains(&job_label))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{body}"))
}

#[tokio::test]
async fn both_binaries_serve_metrics_that_match_status() {
    let _conn = require_broker().await;
    let t = TestJob::new(
        "metrics",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 100
[throttle]
rate = 4000
[processor]
kind = "noop"
[failures]
skip_limit = 10
[metrics]
consumer = "127.0.0.1:0"
"#,
    );
    // 100,000 records, three of them malformed (bad data, skipped). At 4,000 a second the run
    // lasts 25 s, so the pause after 4,000 lands well before its end however slowly a loaded
    // machine answers `status` (20,000 records once ended the run first); the rate is lifted
    // before `resume` so that the rest goes at full speed.
    write_jsonl(&t.path("input.jsonl"), 100_000, 60);
    let text = std::fs::read_to_string(t.path("input.jsonl")).expect("input");
    let mut lines: Vec<&str> = text.lines().collect();
    for at in [10, 5_000, 12_345] {
        lines[at] = "{not json";
    }
    std::fs::write(t.path("input.jsonl"), lines.join("\n") + "\n").expect("input");

    let consumer = t.start_consumer(1, 4);
    let mut dispatcher = t.spawn_dispatcher(&["run", "--metrics", "127.0.0.1:0"], "run.log");
    let (d_addr, c_addr) = (
        t.metrics_addr("run.log").await,
        t.metrics_addr("consumer-1.log").await,
    );
    // A few thousand records in, pause, and wait until every chunk in hand is answered.
    t.await_status("4,000 records read", |s| {
        s["items"]["read"].as_u64() >= Some(4_000)
    })
    .await;
    let out = t.dispatcher(&["pause"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    // The dispatcher takes the pause up at its next tick; from then on nothing new goes out.
    t.await_log("run.log", "paused: nothing new is published")
        .await;
    let s = t
        .await_status("paused, and every chunk answered", |s| {
            let c = &s["chunks"];
            s["state"] == "paused" && c["pending"] == 0 && c["in_flight"] == 0
        })
        .await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let job = t.name.as_str();
    // The loop sets its gauges each tick: once it shows nothing outstanding, every reply it
    // applied is in its counters.
    let d = loop {
        let d = scrape(&d_addr).await;
        if value(&d, job, "hopper_chunks_outstanding", &[]) == 0.0 {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still outstanding:\n{d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (metric, field) in [
        ("hopper_items_read_total", "read"),
        ("hopper_items_processed_total", "processed"),
        ("hopper_items_skipped_total", "skipped"),
        ("hopper_items_failed_total", "failed"),
    ] {
        assert_eq!(
            value(&d, job, metric, &[]),
            s["items"][field].as_f64().expect("count"),
            "{metric}:\n{d}"
        );
    }
    for state in ["pending", "in_flight", "done", "failed", "dead"] {
        assert_eq!(
            value(&d, job, "hopper_chunks", &[("state", state)]),
            s["chunks"][state].as_f64().expect("count"),
            "chunks {state}"
        );
    }
    assert!(s["items"]["skipped"].as_u64() >= Some(1), "{s}");
    assert_eq!(
        value(&d, job, "hopper_run_state", &[("state", "paused")]),
        1.0
    );
    assert_eq!(
        value(&d, job, "hopper_run_state", &[("state", "running")]),
        0.0
    );
    assert_eq!(value(&d, job, "hopper_run", &[]), 1.0);
    assert_eq!(value(&d, job, "hopper_chunks_outstanding", &[]), 0.0);
    assert_eq!(value(&d, job, "hopper_window", &[]), 32.0);
    assert_eq!(
        value(&d, job, "hopper_chunk_outcome_seconds_count", &[]),
        s["chunks"]["done"].as_f64().expect("done")
    );
    assert_eq!(value(&d, job, "hopper_reconnects_total", &[]), 0.0);

    let c = scrape(&c_addr).await;
    assert_eq!(
        value(
            &c,
            job,
            "hopper_consumer_chunks_total",
            &[("outcome", "done")]
        ),
        s["chunks"]["done"].as_f64().expect("done"),
        "{c}"
    );
    assert_eq!(
        value(
            &c,
            job,
            "hopper_consumer_chunk_processing_seconds_count",
            &[]
        ),
        s["chunks"]["done"].as_f64().expect("done")
    );
    assert_eq!(
        value(&c, job, "hopper_consumer_chunks_in_progress", &[]),
        0.0
    );
    assert_eq!(value(&c, job, "hopper_consumer_reconnects_total", &[]), 0.0);

    // Resumed without its rate limit, the run ends; every record once.
    let out = t.dispatcher(&["throttle", "--rate", "0"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let out = t.dispatcher(&["resume"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let ended = tokio::time::timeout(LIMIT, dispatcher.wait())
        .await
        .expect("the run ends")
        .expect("wait");
    assert_eq!(ended.code(), Some(1), "three records were skipped");
    let s = t.status().await;
    assert_eq!(s["state"], "completed_with_failures");
    assert_eq!(s["items"]["read"], 100_000);
    assert_eq!(s["items"]["processed"], 99_997);
    assert_eq!(s["items"]["skipped"], 3);
    let c = scrape(&c_addr).await;
    assert_eq!(
        value(
            &c,
            job,
            "hopper_consumer_chunks_total",
            &[("outcome", "done")]
        ),
        s["chunks"]["done"].as_f64().expect("done")
    );
    assert!(consumer.stop(LIMIT).await.success());
}

/// A metrics address already taken is a clear error before anything is sent (exit 2).
#[tokio::test]
async fn a_metrics_address_in_use_is_refused_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let t = TestJob::local(
        "metrics-taken",
        "[source]\nkind = \"file\"\npath = \"input.jsonl\"\n[processor]\nkind = \"noop\"\n",
    );
    write_jsonl(&t.path("input.jsonl"), 10, 40);
    let out = t
        .dispatcher(&["run", "--local", "1", "--metrics", &addr], LIMIT)
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(&addr) && out.stderr.contains("--metrics"),
        "{}",
        out.stderr
    );
    let out = t.dispatcher(&["status"], LIMIT).await;
    assert!(out.stderr.contains("has no runs yet"), "{}", out.stderr);
}
