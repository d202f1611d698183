//! Bad job files are refused with exit code 2 and a message naming the file and the field,
//! before anything reaches the broker.

use std::time::Duration;

use hopper_tests::{bin, require_broker, run, TestJob};
use tokio::process::Command;

const GOOD: &str = r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "noop"
"#;

/// Replaces `from` by `to` in the good body; each case must name `field` in its error.
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "unknown field",
        "[processor]",
        "[processor]\nspeed = 3",
        "processor.speed",
    ),
    (
        "wrong type",
        "[processor]",
        "[chunking]\nitems = \"many\"\n[processor]",
        "chunking.items",
    ),
    (
        "chunk size 0",
        "[processor]",
        "[chunking]\nitems = 0\n[processor]",
        "chunking.items",
    ),
    (
        "unknown source kind",
        "kind = \"file\"",
        "kind = \"ftp\"",
        "source.kind",
    ),
    (
        "missing input file",
        "input.jsonl",
        "missing.jsonl",
        "missing.jsonl",
    ),
    (
        "unknown processor kind",
        "kind = \"noop\"",
        "kind = \"teleport\"",
        "processor.kind",
    ),
    (
        "bad duration",
        "[processor]",
        "[retry]\nchunk_timeout = \"soon\"\n[processor]",
        "retry.chunk_timeout",
    ),
];

async fn assert_nothing_declared(conn: &lapin::Connection, job: &str) {
    let ch = conn.create_channel().await.expect("channel");
    let passive = ch
        .queue_declare(
            format!("hopper.{job}.chunks").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    assert!(passive.is_err(), "the chunk queue of {job} must not exist");
}

#[tokio::test]
async fn each_bad_job_file_exits_2_naming_its_field_and_sends_nothing() {
    let conn = require_broker().await;
    for (what, from, to, field) in CASES {
        let t = TestJob::new("badjob", &GOOD.replacen(from, to, 1));
        std::fs::write(t.path("input.jsonl"), "{\"id\":1}\n").expect("input");
        let out = t.dispatcher(&["run"], Duration::from_secs(30)).await;
        assert_eq!(out.code(), 2, "{what}: {}", out.stderr);
        assert!(
            out.stderr.contains(field),
            "{what}: expected {field:?} in {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&t.file().display().to_string()) || *what == "missing input file",
            "{what}: the message names the job file: {}",
            out.stderr
        );
        assert_nothing_declared(&conn, &t.name).await;
    }
}

#[tokio::test]
async fn a_bad_job_name_is_refused() {
    let t = TestJob::new("badname", GOOD);
    let text = std::fs::read_to_string(t.file()).expect("job").replacen(
        &format!("name = \"{}\"", t.name),
        "name = \"Bad Name!\"",
        1,
    );
    std::fs::write(t.file(), text).expect("job");
    let out = t.dispatcher(&["run"], Duration::from_secs(30)).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("field `name`"), "{}", out.stderr);
}

#[tokio::test]
async fn not_toml_and_a_missing_job_file_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, "name = = [").expect("write");
    let missing = dir.path().join("nope.toml");
    for (file, needle) in [
        (&garbage, "not valid TOML"),
        (&missing, "cannot read job file"),
    ] {
        for program in ["hopper-dispatcher", "hopper-consumer"] {
            let mut cmd = Command::new(bin(program));
            if program == "hopper-dispatcher" {
                cmd.arg("run");
            }
            cmd.arg(file);
            let out = run(cmd, Duration::from_secs(30)).await;
            assert_eq!(out.code(), 2, "{program}: {}", out.stderr);
            assert!(out.stderr.contains(needle), "{program}: {}", out.stderr);
            assert!(
                out.stderr.contains(&file.display().to_string()),
                "{}",
                out.stderr
            );
        }
    }
}

#[tokio::test]
async fn an_unset_variable_is_named() {
    let t = TestJob::new("envvar", GOOD);
    let text = std::fs::read_to_string(t.file()).expect("job").replacen(
        &hopper_tests::broker_url(),
        "${HOPPER_TEST_SURELY_UNSET}",
        1,
    );
    std::fs::write(t.file(), text).expect("job");
    let out = t.dispatcher(&["run"], Duration::from_secs(30)).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("broker.url"), "{}", out.stderr);
    assert!(
        out.stderr.contains("HOPPER_TEST_SURELY_UNSET"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_consumer_whose_command_is_missing_exits_2() {
    let t = TestJob::new(
        "nocommand",
        &GOOD.replacen(
            "kind = \"noop\"",
            "kind = \"exec\"\ncommand = [\"./no-such-script.sh\"]",
            1,
        ),
    );
    let mut cmd = Command::new(bin("hopper-consumer"));
    cmd.arg(t.file());
    let out = run(cmd, Duration::from_secs(30)).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("processor.command"), "{}", out.stderr);
    assert!(out.stderr.contains("no-such-script.sh"), "{}", out.stderr);
}
