//! What Hopper keeps from its children and its job files: an `exec` command gets a clean
//! environment (never the consumer's own secrets), and `${VAR}` expansion cannot change a job
//! file's structure.

use std::time::Duration;

use hopper_tests::{write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(120);

/// The command sees `PATH`, `HOME`, `LANG`, the chunk's `HOPPER_*` and the variables the job
/// names; a variable it does not name (a secret of the consumer's) never reaches it.
#[tokio::test]
async fn an_exec_command_gets_only_the_variables_the_job_names() {
    let t = TestJob::local(
        "exec-env",
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
command = ["sh", "-c", "cat > /dev/null; env > env-$HOPPER_SEQ.txt"]
env = ["HOPPER_TEST_NAMED"]
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 30, 30);
    let out = run_with_env(
        &t,
        &["run", "--local", "2"],
        &[
            ("HOPPER_TEST_NAMED", "visible"),
            ("HOPPER_TEST_SECRET", "s3cret-not-named"),
            ("DATABASE_URL", "postgres://app:db-s3cret@db/app"),
        ],
    )
    .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    for seq in 1..=3 {
        let env = std::fs::read_to_string(t.path(&format!("env-{seq}.txt"))).expect("env file");
        for wanted in [
            "HOPPER_TEST_NAMED=visible",
            "PATH=",
            "HOME=",
            &format!("HOPPER_SEQ={seq}"),
        ] {
            assert!(env.contains(wanted), "{wanted} missing:\n{env}");
        }
        for secret in [
            "s3cret-not-named",
            "db-s3cret",
            "HOPPER_TEST_SECRET",
            "DATABASE_URL",
        ] {
            assert!(
                !env.contains(secret),
                "{secret} reached the command:\n{env}"
            );
        }
    }
}

/// `hopper-dispatcher ARGS...` of the job, with `vars` added to its environment.
async fn run_with_env(t: &TestJob, args: &[&str], vars: &[(&str, &str)]) -> hopper_tests::Output {
    let mut cmd = t.dispatcher_command(args);
    cmd.envs(vars.iter().copied());
    hopper_tests::run(cmd, LIMIT).await
}

/// A variable whose value holds quotes, a newline and a table header stays one string where it
/// is used: it cannot add a field or a table, or end the string early.
#[tokio::test]
async fn an_expanded_variable_cannot_inject_job_file_structure() {
    let t = TestJob::local(
        "expand-inject",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "${HOPPER_TEST_INPUT}"
format = "jsonl"
[processor]
kind = "noop"
"#,
    );
    let hostile = "x.jsonl\"\n[processor]\nkind = \"exec\"\ncommand = [\"touch\", \"pwned\"]\n#";
    let mut cmd = t.dispatcher_command(&["run", "--local", "1"]);
    cmd.env("HOPPER_TEST_INPUT", hostile);
    let out = hopper_tests::run(cmd, LIMIT).await;
    // The whole value is one path, which does not exist: the input is missing (exit 2), and
    // no `exec` processor was ever made from it.
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("[processor]"),
        "the path is named whole: {}",
        out.stderr
    );
    assert!(!t.path("pwned").exists());
    let job = hopper_common::Job::parse(
        &t.file(),
        &std::fs::read_to_string(t.file()).expect("job"),
        &|name| (name == "HOPPER_TEST_INPUT").then(|| hostile.to_string()),
    )
    .expect("the job parses");
    assert_eq!(job.processor.kind(), "noop");
    match job.source {
        hopper_common::SourceSpec::File { path, .. } => {
            assert!(
                path.to_string_lossy().ends_with(hostile),
                "{}",
                path.display()
            )
        }
        other => panic!("expected the file source, got {other:?}"),
    }
}
