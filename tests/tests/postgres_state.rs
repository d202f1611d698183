//! The execution context in PostgreSQL (`[state] url = "postgres://..."`) with everything else
//! in the database too: a query read by key into a table with no unique key. A killed
//! dispatcher resumed, and `status` read by another process from another directory, exactly;
//! a second host held off while the owner lives, taking over once its heartbeat is stale, and
//! the old owner fenced off when it wakes. Each test has its own tables and schema, dropped at
//! the end.

use std::path::Path;
use std::time::Duration;

use hopper_tests::{
    bin, count, misfits, pg_url, require_broker, require_postgres, run, Output, Tables, TestJob,
};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(180);

/// A job copying `n` rows from the test's source table to a target with no unique key, its
/// execution context in the schema `<job>_state`; the tables are made, and dropped (with the
/// schema) when the guard goes.
async fn copy_job(
    client: &tokio_postgres::Client,
    prefix: &str,
    local: bool,
    n: i64,
    extra: &str,
) -> (TestJob, Tables, String, String) {
    let url = pg_url();
    let body = format!(
        r#"
[state]
url = "{url}"
schema = "{{SCHEMA}}"
[source]
kind = "postgres"
url = "{url}"
query = "SELECT id, price FROM {{SRC}}"
key = "id"
[chunking]
items = 500
[processor]
kind = "postgres"
url = "{url}"
statement = "INSERT INTO {{DST}} (id, price) VALUES ($1, $2)"
params = ["id", "price"]
{extra}"#
    );
    let t = if local {
        TestJob::local(prefix, &body)
    } else {
        TestJob::new(prefix, &body)
    };
    let (src, dst) = (Tables::name(&t, "src"), Tables::name(&t, "dst"));
    let schema = Tables::name(&t, "state");
    let text = std::fs::read_to_string(t.file())
        .expect("job")
        .replace("{SRC}", &src)
        .replace("{DST}", &dst)
        .replace("{SCHEMA}", &schema);
    std::fs::write(t.file(), text).expect("job");
    let tables = Tables::create(
        client,
        &t,
        &[&src, &dst],
        &format!(
            "CREATE TABLE {src} (id bigint PRIMARY KEY, price numeric(12,2));
             INSERT INTO {src} SELECT i, i * 1.25 FROM generate_series(1, {n}) i;
             CREATE TABLE {dst} (id bigint, price numeric(12,2));"
        ),
    )
    .await
    .with_schema(&schema);
    (t, tables, src, dst)
}

/// Rows in the target, and source rows missing there or there more than once (0 when exact).
async fn copied(client: &tokio_postgres::Client, src: &str, dst: &str) -> (i64, i64) {
    (count(client, dst).await.0, misfits(client, src, dst).await)
}

/// `hopper-dispatcher ARGS...` on the job file `file`, on "another host": a UTS namespace of
/// its own whose host name is `other-host` (what a dispatcher takes for its host).
async fn on_other_host(file: &Path, args: &[&str], limit: Duration) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--uts",
        "sh",
        "-c",
        "hostname other-host && exec \"$0\" \"$@\"",
    ])
    .arg(bin("hopper-dispatcher"))
    .arg(args[0])
    .arg(file)
    .args(&args[1..]);
    run(cmd, limit).await
}

/// `status --json` of the job file `file`.
async fn status_of(file: &Path) -> serde_json::Value {
    let mut cmd = Command::new(bin("hopper-dispatcher"));
    cmd.arg("status").arg(file).arg("--json");
    let out = run(cmd, Duration::from_secs(30)).await;
    assert!(out.status.success(), "status failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status --json prints JSON")
}

/// The dispatcher SIGKILLed mid-run (local mode) and resumed with its state in PostgreSQL;
/// `status` and `runs` from another directory, with no file of the job's state there, read the
/// same run, exactly.
#[tokio::test]
async fn a_killed_dispatcher_resumes_from_its_state_in_postgres_and_status_reads_it_anywhere() {
    let client = require_postgres().await;
    let n = 60_000i64;
    let (t, _tables, src, dst) =
        copy_job(&client, "pgstate-kill", true, n, "[throttle]\nrate = 15000").await;
    let read = t
        .kill_after_progress(&["run", "--local", "2"], 0, 20_000)
        .await;
    assert!(read < n as u64, "killed after the end");

    // Another directory, another process: the job file alone leads to the same run.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let other = elsewhere.path().join("job.toml");
    std::fs::copy(t.file(), &other).expect("copy the job file");
    let here = t.status().await;
    let there = status_of(&other).await;
    for field in ["run", "state", "started_at", "items", "chunks", "failures"] {
        assert_eq!(here[field], there[field], "{field}");
    }
    assert_eq!(there["state"], "running");
    assert!(there["items"]["read"].as_u64() >= Some(read));

    let out = t
        .dispatcher(&["run", "--resume", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(copied(&client, &src, &dst).await, (n, 0));
    let s = status_of(&other).await;
    assert_eq!(s["state"], "completed");
    assert_eq!(s["items"]["read"], n);
    assert_eq!(s["items"]["processed"], n);
    assert_eq!(s["items"]["skipped"], 0);
    let mut runs = Command::new(bin("hopper-dispatcher"));
    runs.arg("runs").arg(&other).arg("--json");
    let out = run(runs, Duration::from_secs(30)).await;
    let runs: serde_json::Value = serde_json::from_str(&out.stdout).expect("runs --json");
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    // Nothing of the state went to a file.
    for dir in [t.dir.path(), elsewhere.path()] {
        let files: Vec<_> = std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".db"))
            .collect();
        assert!(files.is_empty(), "{files:?}");
    }
}

/// Over the broker: while the owner lives, a dispatcher on another host is held off (exit 3,
/// naming the owner). The owner is frozen (SIGSTOP) in the middle of a transaction of its
/// execution context, its run's row locked (regression: the other host then waited on that lock
/// for ever): once its heartbeat is stale the other host takes the run over and finishes it;
/// the old owner, woken, is fenced off at its next write (exit 1) and changes nothing. Every
/// row once.
#[tokio::test]
async fn another_host_takes_over_a_stalled_owner_which_is_fenced_off_when_it_wakes() {
    let _conn = require_broker().await;
    let client = require_postgres().await;
    let n = 30_000i64;
    let (t, _tables, src, dst) = copy_job(
        &client,
        "pgstate-fence",
        false,
        n,
        // Slow enough that the run is still going while the owner is caught in a transaction.
        "[throttle]\nrate = 1500",
    )
    .await;
    // The owner's sessions carry a name of their own, to be found in pg_stat_activity.
    let app = format!("hopper-fence-{}", std::process::id());
    let url = pg_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let text = std::fs::read_to_string(t.file()).expect("job").replacen(
        &format!("url = \"{url}\""),
        &format!("url = \"{url}{sep}application_name={app}\""),
        1,
    );
    assert!(text.contains(&app), "the state URL is the job's first");
    std::fs::write(t.file(), text).expect("job");
    let consumer = t.start_consumer(1, 2);
    let mut owner = t.spawn_dispatcher(&["run"], "owner.log");
    let owner_pid = owner.id().expect("the owner runs");
    t.await_status("3,000 rows read", |s| {
        s["items"]["read"].as_u64() >= Some(3_000)
    })
    .await;
    // The owner lives: held off, naming it, and nothing changed.
    for args in [&["run"][..], &["run", "--resume"]] {
        let out = on_other_host(&t.file(), args, LIMIT).await;
        assert_eq!(out.code(), 3, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("/{owner_pid}")),
            "{}",
            out.stderr
        );
    }

    // Frozen: from another host it can only be told by its heartbeat going stale (30 s).
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &owner_pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    // Stopped until it is caught inside a transaction (it is in one a good part of the time).
    let in_transaction = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'
         AND state LIKE 'idle in transaction%'"
    );
    let mut tries = 0;
    loop {
        signal("STOP");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let row = client
            .query_one(&in_transaction, &[])
            .await
            .expect("activity");
        if row.get::<_, i64>(0) > 0 {
            break;
        }
        tries += 1;
        assert!(
            tries < 300,
            "the owner was never caught inside a transaction"
        );
        signal("CONT");
        tokio::time::sleep(Duration::from_millis(37 * (tries % 7))).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let out = loop {
        let out = on_other_host(&t.file(), &["run", "--resume"], LIMIT).await;
        if out.code() != 3 {
            break out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never taken over: {}",
            out.stderr
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(copied(&client, &src, &dst).await, (n, 0));

    signal("CONT");
    let woke = tokio::time::timeout(Duration::from_secs(60), owner.wait())
        .await
        .expect("the old owner stops")
        .expect("wait");
    let log = std::fs::read_to_string(t.path("owner.log")).unwrap_or_default();
    assert_eq!(woke.code(), Some(1), "{log}");
    assert!(
        log.contains("taken over by the dispatcher other-host/"),
        "{log}"
    );
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_eq!(s["items"]["read"], n);
    assert_eq!(s["items"]["processed"], n);
    assert_eq!(copied(&client, &src, &dst).await, (n, 0));
    assert!(consumer.stop(LIMIT).await.success());
}

/// The operator's commands with the execution context in PostgreSQL, each from a process of
/// its own: a second start held off (exit 3), `pause`, `throttle`, `resume` and `cancel`
/// followed by the running dispatcher, `retry` of a cancelled run refused, `runs` and `clean`.
#[tokio::test]
async fn the_live_controls_runs_and_clean_work_with_the_state_in_postgres() {
    let client = require_postgres().await;
    let (t, _tables, _src, _dst) = copy_job(
        &client,
        "pgstate-ops",
        true,
        40_000,
        "[throttle]\nrate = 4000",
    )
    .await;
    let mut dispatcher = t.spawn_dispatcher(&["run", "--local", "2"], "run.log");
    t.await_log("run.log", "run started").await;
    let out = t
        .dispatcher(&["run", "--continue", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 3, "{}", out.stderr);

    let out = t.dispatcher(&["pause"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    t.await_log("run.log", "paused: nothing new is published")
        .await;
    assert_eq!(t.status().await["state"], "paused");
    let out = t
        .dispatcher(&["throttle", "--window", "4", "--rate", "8000"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    t.await_log("run.log", "throttle changed").await;
    let out = t.dispatcher(&["resume"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    t.await_log("run.log", "resumed: publishing again").await;
    assert_eq!(t.status().await["state"], "running");

    let out = t.dispatcher(&["cancel"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let ended = tokio::time::timeout(LIMIT, dispatcher.wait())
        .await
        .expect("the run ends")
        .expect("wait");
    assert_eq!(ended.code(), Some(1));
    let s = t.status().await;
    assert_eq!(s["state"], "cancelled", "{s}");
    let items = &s["items"];
    assert_eq!(
        items["read"].as_u64(),
        Some(items["processed"].as_u64().unwrap_or(0) + items["failed"].as_u64().unwrap_or(0)),
        "{s}"
    );
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);

    let out = t.dispatcher(&["runs", "--json"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.contains("cancelled"), "{}", out.stdout);
    let out = t.dispatcher(&["clean", "--older-than", "0s"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("removed 1 run(s)"), "{}", out.stderr);
    let out = t.dispatcher(&["status"], LIMIT).await;
    assert!(out.stderr.contains("has no runs yet"), "{}", out.stderr);
}
