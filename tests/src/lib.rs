//! Helpers shared by the end-to-end tests: a reachable broker (or a clear failure), the real
//! binaries, a job of its own per test (own name, queues, state file and directory), and
//! clean-up of the queues whatever the test's outcome.
//!
//! The broker is `HOPPER_TEST_AMQP_URL`, by default the local RabbitMQ with guest/guest; the
//! database is `HOPPER_TEST_PG_URL`, by default the local PostgreSQL's `test` database.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use hopper_common::transport::amqp::{connect, Topology};
use hopper_common::Job;
use tokio::process::{Child, Command};

/// The broker the tests use.
pub fn broker_url() -> String {
    std::env::var("HOPPER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Connects to the test broker, or panics saying how to start one: a test that needs a broker
/// never passes without one.
pub async fn require_broker() -> lapin::Connection {
    let url = broker_url();
    let connect = connect(&url, "hopper-tests", &PLAIN);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "these tests need RabbitMQ: {e}. Start it (`rabbitmq-server -detached`, or \
             `docker compose up -d rabbitmq`) or set HOPPER_TEST_AMQP_URL."
        ),
        Err(_) => panic!(
            "these tests need RabbitMQ at {}: no answer in 10 s",
            hopper_common::job::redact_url(&url)
        ),
    }
}

/// The PostgreSQL database the tests use.
pub fn pg_url() -> String {
    std::env::var("HOPPER_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Connects to the test database, or panics saying how to start one: a test that needs
/// PostgreSQL never passes without it.
pub async fn require_postgres() -> tokio_postgres::Client {
    let url = pg_url();
    let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            client
        }
        Ok(Err(e)) => panic!(
            "these tests need PostgreSQL: {e}. Start it (`pg_ctlcluster --skip-systemctl-redirect \
             $(ls /etc/postgresql) main start`, or `docker compose up -d postgres`) or set \
             HOPPER_TEST_PG_URL."
        ),
        Err(_) => panic!(
            "these tests need PostgreSQL at {}: no answer in 10 s",
            hopper_common::job::redact_url(&url)
        ),
    }
}

/// `GET /metrics` at `addr` (within 120 s): the whole response, head and body.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_string(&mut out))
        .await
        .expect("an answer in time")
        .expect("read");
    out
}

/// Rows in `table`, and distinct ids among them.
pub async fn count(client: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id) FROM {table}"),
            &[],
        )
        .await
        .expect("count");
    (row.get(0), row.get(1))
}

/// Kills the job's consumer `first` with SIGKILL once `table` holds a quarter of `n` rows, and
/// the next once it holds half, starting another after each (`--concurrency 4`); returns the
/// last one started. Fails if a consumer stops by itself, or a quarter does not arrive within
/// `limit`.
pub async fn kill_consumers_at_quarters(
    t: &TestJob,
    client: &tokio_postgres::Client,
    table: &str,
    n: i64,
    first: Consumer,
    limit: Duration,
) -> Consumer {
    let mut doomed = first;
    for round in 2..=3u32 {
        let deadline = tokio::time::Instant::now() + limit;
        let target = (i64::from(round) - 1) * n / 4;
        while count(client, table).await.0 < target {
            assert!(tokio::time::Instant::now() < deadline, "no progress");
            assert!(!doomed.exited(), "the consumer stopped by itself");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        doomed.signal("KILL");
        doomed = t.start_consumer(round, 4);
    }
    doomed
}

/// Rows of `src` missing from `dst` by id, or there more than once: 0 when the copy is exact.
pub async fn misfits(client: &tokio_postgres::Client, src: &str, dst: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT id, count(*) AS n FROM {dst} GROUP BY id) d
                 FULL JOIN {src} s USING (id) WHERE d.n IS DISTINCT FROM 1 OR s.id IS NULL"
            ),
            &[],
        )
        .await
        .expect("compare")
        .get(0)
}

/// A test's tables: created by the test, dropped (with the job's applied-chunk records, and the
/// schemas it names) when it ends, whatever its outcome.
pub struct Tables {
    job: String,
    names: Vec<String>,
    schemas: Vec<String>,
}

impl Tables {
    /// Runs `ddl`, which creates the tables `names` of job `t`, and drops them when the test
    /// ends (the guard is taken first, so a half-made set is dropped too).
    pub async fn create(
        client: &tokio_postgres::Client,
        t: &TestJob,
        names: &[&str],
        ddl: &str,
    ) -> Tables {
        let guard = Tables {
            job: t.name.clone(),
            names: names.iter().map(|n| n.to_string()).collect(),
            schemas: Vec::new(),
        };
        client.batch_execute(ddl).await.expect("create the tables");
        guard
    }

    /// Also drops the schema `name` (an execution context in PostgreSQL) when the test ends.
    pub fn with_schema(mut self, name: &str) -> Tables {
        self.schemas.push(name.to_string());
        self
    }

    /// The table name `<job>_<suffix>` (see [`Tables::name`]), written into the job file
    /// where it says `{TABLE}`.
    pub fn name_in_job(t: &TestJob, suffix: &str) -> String {
        let table = Tables::name(t, suffix);
        let text = std::fs::read_to_string(t.file())
            .expect("job")
            .replace("{TABLE}", &table);
        std::fs::write(t.file(), text).expect("job");
        table
    }

    /// A table name of this test's own: `<job>_<suffix>`, as an SQL identifier.
    pub fn name(t: &TestJob, suffix: &str) -> String {
        format!("{}_{suffix}", t.name.replace('-', "_"))
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        let (job, names, schemas) = (self.job.clone(), self.names.clone(), self.schemas.clone());
        // Drop runs inside the test's runtime: clean up from a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok((client, conn)) =
                    tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(conn);
                // A failed test may still hold a lock on a table from a connection of its own
                // runtime, which cannot run while this waits: give up rather than hang.
                let _ = client.batch_execute("SET lock_timeout = '20s'").await;
                for name in names {
                    let _ = client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                        .await;
                }
                let _ = client
                    .execute("DELETE FROM hopper.applied_chunks WHERE job = $1", &[&job])
                    .await;
                for schema in schemas {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The path of a workspace binary, built (once per test process) if needed.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."));
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = std::process::Command::new(cargo)
            // The same selection as `cargo test --workspace`, so that features unify the same
            // way and this build finds everything fresh instead of recompiling the dependencies.
            .args(["build", "--quiet", "--workspace", "--all-targets"])
            .current_dir(&root)
            .status()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("cargo build of the binaries failed: {status}"))
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug").join(name)
}

/// A job of the test's own: a unique name, a temporary directory holding the job file, its
/// input, state and output. Its queues are deleted when it is dropped.
pub struct TestJob {
    /// The job's name (unique per test and process).
    pub name: String,
    /// The directory of the job file; relative paths in it resolve here.
    pub dir: tempfile::TempDir,
    /// False for a local-mode job, whose broker URL points nowhere: nothing to clean up.
    uses_broker: bool,
}

/// The tests' own connections to the local broker are plain `amqp://`.
const PLAIN: hopper_common::job::BrokerTls = hopper_common::job::BrokerTls {
    ca: None,
    identity: None,
};

/// A broker URL where no broker listens, for local-mode tests that must not contact one.
pub const NO_BROKER: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

impl TestJob {
    /// A job named `<prefix>-<pid>-<n>`; `body` is the job file after its `name` and `[broker]`.
    pub fn new(prefix: &str, body: &str) -> TestJob {
        TestJob::with_broker(prefix, &broker_url(), body)
    }

    /// A job for local mode: its broker URL is [`NO_BROKER`], so a test passes only if no
    /// broker is contacted.
    pub fn local(prefix: &str, body: &str) -> TestJob {
        TestJob::with_broker(prefix, NO_BROKER, body)
    }

    /// A job named `<prefix>-<pid>-<n>` on the broker at `url` (a TLS endpoint of the test, say);
    /// `body` is the job file after its `[broker]` url, so it may add to that section first.
    pub fn with_broker(prefix: &str, url: &str, body: &str) -> TestJob {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "test-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let text = format!("name = \"{name}\"\n[broker]\nurl = \"{url}\"\n{body}");
        std::fs::write(dir.path().join("job.toml"), text).expect("write the job file");
        TestJob {
            name,
            dir,
            uses_broker: url != NO_BROKER,
        }
    }

    /// The job file.
    pub fn file(&self) -> PathBuf {
        self.dir.path().join("job.toml")
    }

    /// A path in the job's directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The validated job.
    pub fn job(&self) -> Job {
        Job::load(&self.file()).expect("the test's job file is valid")
    }

    /// Starts a `hopper-consumer` on this job; its stderr goes to `consumer-<n>.log`.
    pub fn start_consumer(&self, n: u32, concurrency: u16) -> Consumer {
        self.start_consumer_with(n, concurrency, &[])
    }

    /// [`TestJob::start_consumer`] with these environment variables besides the test's (a
    /// broker URL of its own, say).
    pub fn start_consumer_with(&self, n: u32, concurrency: u16, env: &[(&str, &str)]) -> Consumer {
        self.spawn_consumer(
            &bin("hopper-consumer"),
            &["--concurrency", &concurrency.to_string()],
            n,
            env,
        )
    }

    /// Starts `program JOB.toml ARGS...` (a consumer of one's own, such as an example built on
    /// the library); its stderr goes to `consumer-<n>.log`.
    pub fn start_program(&self, program: &Path, args: &[&str], n: u32) -> Consumer {
        self.spawn_consumer(program, args, n, &[])
    }

    fn spawn_consumer(
        &self,
        program: &Path,
        args: &[&str],
        n: u32,
        env: &[(&str, &str)],
    ) -> Consumer {
        let log = self.path(&format!("consumer-{n}.log"));
        let err = std::fs::File::create(&log).expect("consumer log");
        let child = Command::new(program)
            .arg(self.file())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Consumer { child, log }
    }

    /// `hopper-dispatcher SUBCOMMAND JOB.toml OPTIONS...`, as the contract orders them.
    pub fn dispatcher_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("hopper-dispatcher"));
        if let Some((subcommand, options)) = args.split_first() {
            cmd.arg(subcommand).arg(self.file()).args(options);
        }
        cmd
    }

    /// Starts `hopper-dispatcher SUBCOMMAND JOB.toml OPTIONS...` in the background, its stderr
    /// in `log` (a file in the job's directory); killed if dropped.
    pub fn spawn_dispatcher(&self, args: &[&str], log: &str) -> Child {
        self.dispatcher_command(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path(log)).expect("dispatcher log"))
            .kill_on_drop(true)
            .spawn()
            .expect("start the dispatcher")
    }

    /// Waits, at most `limit`, for a dispatcher started with [`TestJob::spawn_dispatcher`] to
    /// end, and fails the test with its log (`log`) unless it succeeded.
    pub async fn await_success(&self, dispatcher: Child, log: &str, limit: Duration) {
        let out = tokio::time::timeout(limit, dispatcher.wait_with_output())
            .await
            .expect("the run ends")
            .expect("wait for the dispatcher");
        assert!(
            out.status.success(),
            "{}",
            std::fs::read_to_string(self.path(log)).unwrap_or_default()
        );
    }

    /// Starts the dispatcher, waits until the run has read `beyond` more records than `read`, and
    /// kills it with SIGKILL. Returns how far the run had read.
    pub async fn kill_after_progress(&self, args: &[&str], read: u64, beyond: u64) -> u64 {
        let t = self;
        let log = t.path(&format!("dispatcher-{read}.log"));
        let mut child = t.spawn_dispatcher(args, &format!("dispatcher-{read}.log"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the run made no progress"
            );
            if let Some(status) = child.try_wait().expect("poll the dispatcher") {
                panic!(
                    "the dispatcher ended before it was killed: {status}; its log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let out = t
                .dispatcher(&["status", "--json"], Duration::from_secs(30))
                .await;
            if out.status.success() {
                let status: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
                let now = status["items"]["read"].as_u64().unwrap_or(0);
                if now >= read + beyond {
                    child.kill().await.expect("SIGKILL the dispatcher");
                    return now;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `hopper-dispatcher SUBCOMMAND JOB.toml OPTIONS...` to its end, within `limit`.
    pub async fn dispatcher(&self, args: &[&str], limit: Duration) -> Output {
        run(self.dispatcher_command(args), limit).await
    }

    /// Waits (at most 120 s) until the file `log` in the job's directory says `text`.
    pub async fn await_log(&self, log: &str, text: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let now = std::fs::read_to_string(self.path(log)).unwrap_or_default();
            if now.contains(text) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{log} never said {text:?}: {now}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 120 s) until the latest run's `status --json` satisfies `ready`, and
    /// returns it; the run may not exist yet.
    pub async fn await_status(
        &self,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let out = self
                .dispatcher(&["status", "--json"], Duration::from_secs(30))
                .await;
            if let Ok(s) = serde_json::from_str::<serde_json::Value>(&out.stdout) {
                if ready(&s) {
                    return s;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address a process of the job logged, in `log`, that it serves metrics at.
    pub async fn metrics_addr(&self, log: &str) -> String {
        const SAYS: &str = "serving Prometheus metrics at http://";
        self.await_log(log, SAYS).await;
        let text = std::fs::read_to_string(self.path(log)).unwrap_or_default();
        text.split_once(SAYS)
            .and_then(|(_, rest)| rest.split_once("/metrics"))
            .map(|(addr, _)| addr.to_string())
            .unwrap_or_else(|| panic!("{log} does not say where its metrics are: {text}"))
    }

    /// `status --json` of the latest run.
    pub async fn status(&self) -> serde_json::Value {
        let out = self
            .dispatcher(&["status", "--json"], Duration::from_secs(30))
            .await;
        assert!(out.status.success(), "status failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).expect("status --json prints JSON")
    }

    /// Waits (at most 30 s) until `n` consumers are attached to the job's chunk queue.
    pub async fn wait_for_consumers(&self, conn: &lapin::Connection, n: u32) {
        let chunks = format!("hopper.{}.chunks", self.name);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // A passive declare of a missing queue closes its channel: a new one each time.
            let ch = conn.create_channel().await.expect("channel");
            let q = ch
                .queue_declare(
                    chunks.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await;
            if matches!(&q, Ok(q) if q.consumer_count() == n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} consumers never attached to {chunks}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages waiting in one of the job's queues.
    pub async fn queue_depth(&self, conn: &lapin::Connection, queue: &str) -> u32 {
        self.try_queue_depth(conn, queue)
            .await
            .expect("the queue exists")
    }

    /// Messages waiting in one of the job's queues, or `None` while it is not declared yet.
    pub async fn try_queue_depth(&self, conn: &lapin::Connection, queue: &str) -> Option<u32> {
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()?;
        Some(q.message_count())
    }
}

impl Drop for TestJob {
    fn drop(&mut self) {
        // Delete the job's queues, whatever the test's outcome, from a thread of its own (Drop
        // may run inside the test's runtime, which must not be blocked on).
        if !self.uses_broker {
            return;
        }
        let Ok(job) = Job::load(&self.file()) else {
            return;
        };
        let topology = Topology::for_job(&job);
        let url = broker_url();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let connect = connect(&url, "hopper-tests cleanup", &PLAIN);
                if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), connect).await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = topology.delete(&ch).await;
                    }
                    let _ = conn.close(200, "cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// A running `hopper-consumer`; killed if dropped while running.
pub struct Consumer {
    child: Child,
    /// Its stderr.
    pub log: PathBuf,
}

impl Consumer {
    /// Sends the signal `name` (`STOP`, `CONT`, `KILL`...) to the consumer process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the consumer is running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// True once the consumer process has exited (it was killed, or stopped on an error).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (at most `limit`) for the consumer to exit, however it was asked to.
    pub async fn wait(mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for the consumer: {e}"),
            Err(_) => panic!(
                "the consumer did not exit within {limit:?}; its log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }

    /// Sends SIGTERM and waits (at most `limit`) for it to finish the chunks in hand and exit.
    pub async fn stop(mut self, limit: Duration) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for the consumer: {e}"),
            Err(_) => panic!(
                "the consumer did not stop within {limit:?} of SIGTERM; its log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }
}

/// True when process `pid` has ended (gone, or a zombie waiting for its parent to reap it).
pub fn process_ended(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state is the field after the command name, which is in parentheses.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
}

/// Waits (at most `limit`) until process `pid` has ended; panics naming `what` otherwise.
pub async fn await_process_end(pid: u32, what: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !process_ended(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} (pid {pid}) still runs after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most `limit`) until `path` exists; panics naming `what` otherwise.
pub async fn await_file(path: &Path, what: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: no {} after {limit:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A finished process.
#[derive(Debug)]
pub struct Output {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Output {
    /// The exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Runs a command to its end, or kills it after `limit` and panics.
pub async fn run(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("start the command");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("running {cmd:?}: {e}"),
        Err(_) => panic!("{cmd:?} did not finish within {limit:?}"),
    }
}

/// Writes `n` JSON lines `{"id": 1..=n, ...}` of about `width` bytes each.
pub fn write_jsonl(path: &Path, n: u64, width: usize) {
    use std::io::Write;
    let file = std::fs::File::create(path).expect("create input");
    let mut w = std::io::BufWriter::new(file);
    for id in 1..=n {
        let head = format!("{{\"id\":{id},\"name\":\"product {id}\",\"pad\":\"");
        let pad = width.saturating_sub(head.len() + 3);
        writeln!(w, "{head}{}\"}}", "x".repeat(pad)).expect("write input");
    }
    w.flush().expect("flush input");
}

/// Every JSON line in every `*.jsonl` file under `dir` (what the `file` processor wrote).
pub fn output_items(dir: &Path) -> Vec<serde_json::Value> {
    let mut items = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                let text = std::fs::read_to_string(&p).expect("read output");
                for line in text.lines() {
                    items.push(serde_json::from_str(line).expect("output is JSON"));
                }
            }
        }
    }
    items
}

/// The `id` of every JSON line in every `*.jsonl` file under `dir`, sorted.
pub fn output_ids(dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = output_items(dir)
        .iter()
        .map(|v| v["id"].as_u64().expect("an id"))
        .collect();
    ids.sort_unstable();
    ids
}

/// Asserts that the outputs under `dir` hold every id from 1 to `n` exactly once.
pub fn assert_every_id_once(dir: &Path, n: u64) {
    let ids = output_ids(dir);
    let missing = (1..=n).filter(|id| ids.binary_search(id).is_err()).count();
    let twice = ids.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(
        ids.len() as u64 == n && missing == 0,
        "expected ids 1..={n} once each: got {} ids, {missing} missing, {twice} repeated",
        ids.len()
    );
}

/// `status --json`'s failures as (position, `field`) pairs, in the order listed: `field` is
/// `class` or `reason`.
pub fn failures(status: &serde_json::Value, field: &str) -> Vec<(u64, String)> {
    status["failures"]
        .as_array()
        .expect("failures is a list")
        .iter()
        .map(|f| {
            (
                f["position"].as_u64().expect("a position"),
                f[field].as_str().expect("a string field").to_string(),
            )
        })
        .collect()
}
