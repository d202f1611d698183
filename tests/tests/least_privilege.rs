//! Least-privilege RabbitMQ users, as `config/rabbitmq/hopper-users.sh` makes them: a job runs
//! end to end with a dispatcher user and a consumer user whose rights stop at the job's own
//! exchange and queues (`hopper.<job>.*`); a user without a right its side needs, or one used
//! for another job, stops at once with exit 1, the message naming the queue or exchange and the
//! right refused, never a reconnect loop. The users are made with `rabbitmqctl` on this host
//! and removed when the test ends.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hopper_tests::{assert_every_id_once, require_broker, write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(120);

/// The job's two users; removed when dropped, whatever the test's outcome.
struct Users {
    job: String,
    dispatcher: String,
    consumer: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/rabbitmq/hopper-users.sh")
}

fn users_script(args: &[&str]) -> std::process::Output {
    std::process::Command::new("sh")
        .arg(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()))
}

impl Users {
    /// Creates the users of `job` with the script, or fails saying what the test needs.
    fn add(job: &str) -> Users {
        let out = users_script(&["add", job]);
        assert!(
            out.status.success(),
            "this test makes RabbitMQ users with rabbitmqctl (config/rabbitmq/hopper-users.sh) \
             and needs it on this host, with the right to run it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let password = |user: String| {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{user} ")))
                .unwrap_or_else(|| panic!("no password for {user} in {text}"));
            let password = line[user.len() + 1..].to_string();
            format!("amqp://{user}:{password}@127.0.0.1:5672/%2f")
        };
        // The guard first: users made but not read are removed too.
        let mut users = Users {
            job: job.to_string(),
            dispatcher: String::new(),
            consumer: String::new(),
        };
        users.dispatcher = password(format!("hopper-{job}-dispatcher"));
        users.consumer = password(format!("hopper-{job}-consumer"));
        users
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let _ = users_script(&["remove", &self.job]);
    }
}

/// A job whose broker URL is `$LP_URL` (each process is given its user's), the local guest
/// otherwise: the test process itself uses that one to clean the queues up.
fn job(prefix: &str) -> TestJob {
    TestJob::with_broker(
        prefix,
        "${LP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 25
[processor]
kind = "file"
dir = "out"
"#,
    )
}

#[tokio::test]
async fn a_job_runs_with_a_user_per_side_limited_to_its_own_queues() {
    let _conn = require_broker().await;
    let t = job("lp");
    let users = Users::add(&t.name);
    write_jsonl(&t.path("input.jsonl"), 400, 40);

    let consumer = t.start_consumer_with(1, 2, &[("LP_URL", &users.consumer)]);
    let mut run = t.dispatcher_command(&["run"]);
    run.env("LP_URL", &users.dispatcher);
    let out = hopper_tests::run(run, LIMIT).await;
    assert_eq!(out.code(), 0, "the run failed: {}", out.stderr);
    assert_every_id_once(&t.path("out"), 400);

    // The operator's commands work with the dispatcher's user.
    let mut status = t.dispatcher_command(&["status", "--json"]);
    status.env("LP_URL", &users.dispatcher);
    let out = hopper_tests::run(status, LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(s["state"], "completed");
    assert_eq!(s["items"]["processed"], 400);
    assert!(consumer.stop(LIMIT).await.success());
}

#[tokio::test]
async fn a_user_without_a_right_stops_at_once_naming_the_queue_and_the_right() {
    let _conn = require_broker().await;
    let t = job("lp-refused");
    let users = Users::add(&t.name);
    write_jsonl(&t.path("input.jsonl"), 50, 40);
    hopper_tests::bin("hopper-dispatcher");

    // The consumer's user cannot read the replies: it cannot be a dispatcher.
    let started = Instant::now();
    let mut run = t.dispatcher_command(&["run"]);
    run.env("LP_URL", &users.consumer);
    let out = hopper_tests::run(run, LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let replies = format!("hopper.{}.replies", t.name);
    for needed in [replies.as_str(), "read right", "403"] {
        assert!(
            out.stderr.contains(needed),
            "no {needed:?} in {}",
            out.stderr
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    // Nor can either user touch another job: its exchange is refused at the first declare.
    let other = job("lp-other");
    write_jsonl(&other.path("input.jsonl"), 10, 40);
    let exchange = format!("hopper.{}.exchange", other.name);
    let consumer = other.start_consumer_with(1, 1, &[("LP_URL", &users.consumer)]);
    let status = consumer.wait(Duration::from_secs(15)).await;
    let log = std::fs::read_to_string(other.path("consumer-1.log")).expect("consumer log");
    assert_eq!(status.code(), Some(1), "{log}");
    for needed in [exchange.as_str(), "configure right"] {
        assert!(log.contains(needed), "no {needed:?} in {log}");
    }

    let mut run = other.dispatcher_command(&["run"]);
    run.env("LP_URL", &users.dispatcher);
    let out = hopper_tests::run(run, LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    for needed in [exchange.as_str(), "configure right"] {
        assert!(
            out.stderr.contains(needed),
            "no {needed:?} in {}",
            out.stderr
        );
    }
    // No password in either message.
    for secret in [&users.consumer, &users.dispatcher] {
        let password = secret
            .split(':')
            .nth(2)
            .and_then(|p| p.split('@').next())
            .expect("a password");
        assert!(!out.stderr.contains(password) && !log.contains(password));
    }
}
