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

/// A RabbitMQ user of the test's own, with a known password, removed when the test ends.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    /// Creates `name` with `password` and every right on vhost `/` (`rabbitmqctl`, on the
    /// machine that runs the broker).
    fn create(name: &str, password: &str) -> BrokerUser {
        let user = BrokerUser {
            name: name.to_string(),
        };
        let ctl = |args: &[&str]| {
            let out = std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("this test needs rabbitmqctl beside the broker: {e}"));
            assert!(
                out.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ctl(&["add_user", name, password]);
        ctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// A run over the broker with known passwords in every URL (broker, source, processor, state):
/// no password in any output: the binaries' logs, `status` and `runs` as tables and as JSON,
/// both metrics endpoints, the notification, and the error of a store that cannot be reached.
#[tokio::test]
async fn no_password_appears_in_any_output() {
    let _conn = hopper_tests::require_broker().await;
    let client = hopper_tests::require_postgres().await;
    let pid = std::process::id();
    let (amqp_pw, pg_pw) = (format!("amqp-s3cret-{pid}"), format!("pg-s3cret-{pid}"));
    let user = BrokerUser::create(&format!("hopper-secrets-{pid}"), &amqp_pw);
    // Trust authentication takes any password: the database's URL carries one all the same.
    let pg = hopper_tests::pg_url().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{pg_pw}@"),
        1,
    );
    assert!(
        pg.contains(&pg_pw),
        "the test database URL is not postgres://postgres@...: {pg}"
    );
    let amqp = format!("amqp://{}:{amqp_pw}@127.0.0.1:5672/%2f", user.name);
    let body = format!(
        r#"
[state]
url = "{pg}"
schema = "{{SCHEMA}}"
[source]
kind = "postgres"
url = "{pg}"
query = "SELECT id, price FROM {{SRC}}"
key = "id"
[chunking]
items = 100
[processor]
kind = "postgres"
url = "{pg}"
statement = "INSERT INTO {{DST}} (id, price) VALUES ($1, $2)"
params = ["id", "price"]
[metrics]
consumer = "127.0.0.1:0"
[notify]
command = ["sh", "-c", "cat > notified.json"]
"#
    );
    let t = TestJob::new("secrets", &body);
    // The job's own broker URL, with the test's user.
    let text = std::fs::read_to_string(t.file()).expect("job");
    let text = text.replacen(&hopper_tests::broker_url(), &amqp, 1);
    let (src, dst, schema) = (
        hopper_tests::Tables::name(&t, "src"),
        hopper_tests::Tables::name(&t, "dst"),
        hopper_tests::Tables::name(&t, "state"),
    );
    let text = text
        .replace("{SRC}", &src)
        .replace("{DST}", &dst)
        .replace("{SCHEMA}", &schema);
    assert!(
        text.contains(&amqp_pw),
        "the job does not use the test's broker user"
    );
    std::fs::write(t.file(), text).expect("job");
    let _tables = hopper_tests::Tables::create(
        &client,
        &t,
        &[&src, &dst],
        &format!(
            "CREATE TABLE {src} (id bigint PRIMARY KEY, price numeric(10,2));
             INSERT INTO {src} SELECT i, i FROM generate_series(1, 2000) i;
             CREATE TABLE {dst} (id bigint, price numeric(10,2));"
        ),
    )
    .await
    .with_schema(&schema);

    let consumer = t.start_consumer(1, 2);
    let mut outputs = Vec::new();
    let run = t.spawn_dispatcher(&["run", "--metrics", "127.0.0.1:0"], "run.log");
    let c_addr = t.metrics_addr("consumer-1.log").await;
    let d_addr = t.metrics_addr("run.log").await;
    outputs.push(hopper_tests::scrape(&d_addr).await);
    outputs.push(hopper_tests::scrape(&c_addr).await);
    t.await_success(run, "run.log", LIMIT).await;
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["runs"],
        &["runs", "--json"],
    ] {
        let out = t.dispatcher(args, LIMIT).await;
        assert_eq!(out.code(), 0, "{args:?}: {}", out.stderr);
        outputs.push(format!("{}{}", out.stdout, out.stderr));
    }
    outputs.push(hopper_tests::scrape(&c_addr).await);
    assert!(consumer.stop(LIMIT).await.success());
    t.await_status("the run completed", |s| s["state"] == "completed")
        .await;
    // The notification is told once the run has ended.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !t.path("notified.json").exists() {
        assert!(tokio::time::Instant::now() < deadline, "never notified");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A store that does not answer: its error names the place, not the password.
    let text = std::fs::read_to_string(t.file()).expect("job");
    std::fs::write(t.file(), text.replacen("127.0.0.1:5432", "127.0.0.1:1", 1)).expect("job");
    let out = t.dispatcher(&["status"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    outputs.push(out.stderr);
    for file in ["run.log", "consumer-1.log", "notified.json"] {
        outputs.push(std::fs::read_to_string(t.path(file)).unwrap_or_default());
    }
    let all = outputs.join("\n");
    assert!(all.contains("***"), "no URL was shown at all?");
    for secret in [&amqp_pw, &pg_pw] {
        assert!(!all.contains(secret.as_str()), "{secret} appeared:\n{all}");
    }
}
