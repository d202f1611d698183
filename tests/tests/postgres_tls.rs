//! PostgreSQL over TLS as the URL's `sslmode` asks. Each test starts its own endpoint in front
//! of the local PostgreSQL: it answers the client's SSLRequest, terminates TLS with a
//! certificate for `localhost` from a CA the test generates, and passes the bytes on. A run
//! whose source, processor and execution context all go through it completes with the right
//! CA; a wrong CA, a host name the certificate is not for, or `sslmode=require` against a
//! server without TLS fail at once with exit 1, naming the host and what failed, never falling
//! back to plain text; TLS settings that cannot hold are a bad job file (exit 2).

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hopper_tests::{count, misfits, pg_url, require_postgres, Tables, TestJob};

mod support;
use support::tls::{pg_endpoint, pki, PgTls};

const LIMIT: Duration = Duration::from_secs(120);

/// The local PostgreSQL's host:port, user and database, from the tests' URL.
fn upstream() -> (String, String, String) {
    use tokio_postgres::config::Host;
    let config = tokio_postgres::Config::from_str(&pg_url()).expect("the tests' PostgreSQL URL");
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_string();
    let db = config.get_dbname().unwrap_or(&user).to_string();
    (format!("{host}:{port}"), user, db)
}

/// A URL for the endpoint on `port`, reached by `host`, with `params` (`sslmode=...`).
fn url(host: &str, port: u16, params: &str) -> String {
    let (_, user, db) = upstream();
    format!("postgres://{user}:s3cret@{host}:{port}/{db}?{params}")
}

/// A job reading `{SRC}` by `id` into `{DST}` in local mode, with these three URLs.
fn job(prefix: &str, source: &str, processor: &str, state: &str) -> (TestJob, String, String) {
    let t = TestJob::local(
        prefix,
        &format!(
            r#"
[state]
url = "{state}"
schema = "{{SCHEMA}}"
[source]
kind = "postgres"
url = "{source}"
query = "SELECT id, price FROM {{SRC}}"
key = "id"
[chunking]
items = 100
[processor]
kind = "postgres"
url = "{processor}"
statement = "INSERT INTO {{DST}} (id, price) VALUES ($1, $2)"
params = ["id", "price"]
"#
        ),
    );
    let (src, dst) = (Tables::name(&t, "src"), Tables::name(&t, "dst"));
    let text = std::fs::read_to_string(t.file())
        .expect("job")
        .replace("{SRC}", &src)
        .replace("{DST}", &dst)
        .replace("{SCHEMA}", &Tables::name(&t, "state"));
    std::fs::write(t.file(), text).expect("job");
    (t, src, dst)
}

/// The job's two tables, `n` rows in the source; dropped at the end with the job's state
/// schema (if it made one).
async fn tables(
    client: &tokio_postgres::Client,
    t: &TestJob,
    src: &str,
    dst: &str,
    n: i64,
) -> Tables {
    Tables::create(
        client,
        t,
        &[src, dst],
        &format!(
            "CREATE TABLE {src} (id bigint PRIMARY KEY, price numeric(12,2));
             INSERT INTO {src} SELECT i, i * 1.25 FROM generate_series(1, {n}) i;
             CREATE TABLE {dst} (id bigint, price numeric(12,2));"
        ),
    )
    .await
    .with_schema(&Tables::name(t, "state"))
}

/// Source and execution context verified in full (`localhost`), the processor verified to the
/// CA only (reached as 127.0.0.1, which the certificate does not name) and presenting a client
/// certificate the endpoint requires: 2,000 rows copied exactly once, `status` read over TLS
/// from another process, and every connection was a TLS session of the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_run_completes_through_verified_tls() {
    let client = require_postgres().await;
    let pki = pki();
    let (db, _, _) = upstream();
    let (open, open_sessions) = pg_endpoint(&pki, PgTls::Offer, false, db.clone()).await;
    let (strict, strict_sessions) = pg_endpoint(&pki, PgTls::Offer, true, db).await;
    let full = url("localhost", open, "sslmode=verify-full&sslrootcert=ca.pem");
    let ca_only = url(
        "127.0.0.1",
        strict,
        "sslmode=verify-ca&sslrootcert=ca.pem&sslcert=client.pem&sslkey=client.key",
    );
    let (t, src, dst) = job("pgtls", &full, &ca_only, &full);
    std::fs::write(t.path("ca.pem"), &pki.ca_pem).expect("write the CA");
    std::fs::write(t.path("client.pem"), &pki.client_pem).expect("write the certificate");
    std::fs::write(t.path("client.key"), &pki.client_key_pem).expect("write the key");
    let n = 2_000i64;
    let _tables = tables(&client, &t, &src, &dst, n).await;

    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 0, "the run failed: {}", out.stderr);
    assert_eq!(count(&client, &dst).await, (n, n));
    assert_eq!(misfits(&client, &src, &dst).await, 0);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], n);
    assert!(
        open_sessions.load(Ordering::SeqCst) >= 2,
        "source and state"
    );
    assert!(strict_sessions.load(Ordering::SeqCst) >= 1, "the processor");
    assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
}

/// Each refusal: exit 1 at once, naming host:port and what failed; the password nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_another_host_name_or_no_tls_fails_at_once() {
    let client = require_postgres().await;
    let (pki, other) = (pki(), pki());
    let (db, _, _) = upstream();
    let (tls, _) = pg_endpoint(&pki, PgTls::Offer, false, db.clone()).await;
    let (plain, _) = pg_endpoint(&pki, PgTls::Refuse, false, db).await;
    // Built before the clock starts: the time asserted is the binary's own.
    hopper_tests::bin("hopper-dispatcher");
    // (URL host, port, sslmode, the CA the job trusts, what the failure must say)
    let cases = [
        (
            "localhost",
            tls,
            "verify-full",
            &other.ca_pem,
            "UnknownIssuer",
        ),
        (
            "127.0.0.1",
            tls,
            "verify-full",
            &pki.ca_pem,
            "not valid for name",
        ),
        ("localhost", plain, "require", &pki.ca_pem, "TLS"),
        ("localhost", plain, "verify-ca", &pki.ca_pem, "TLS"),
    ];
    for (host, port, mode, ca, why) in cases {
        let refused = url(host, port, &format!("sslmode={mode}&sslrootcert=ca.pem"));
        let (t, src, dst) = job("pgtls-refused", &refused, &pg_url(), "sqlite://state.db");
        let text = std::fs::read_to_string(t.file()).expect("job");
        std::fs::write(t.file(), text.replace("schema = ", "# schema = ")).expect("job");
        std::fs::write(t.path("ca.pem"), ca).expect("write the CA");
        let _tables = tables(&client, &t, &src, &dst, 0).await;

        let started = std::time::Instant::now();
        let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
        let case = format!("{host}:{port} sslmode={mode}");
        assert_eq!(out.code(), 1, "{case}: {}", out.stderr);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{case}: took {:?}: {}",
            started.elapsed(),
            out.stderr
        );
        for needed in [format!("{host}:{port}"), why.to_string()] {
            assert!(
                out.stderr.contains(&needed),
                "{case}: no {needed:?} in {}",
                out.stderr
            );
        }
        if mode.starts_with("verify") {
            assert!(out.stderr.contains("sslrootcert"), "{case}: {}", out.stderr);
        }
        assert!(!out.stderr.contains("s3cret"), "{case}: {}", out.stderr);
    }
}

/// TLS settings that cannot hold: exit 2 naming the field, before any connection (for the
/// file the side that connects reads).
#[tokio::test]
async fn tls_settings_that_cannot_hold_are_a_bad_job_file() {
    let client = require_postgres().await;
    let local = pg_url();
    let with = |params: &str| {
        let sep = if local.contains('?') { '&' } else { '?' };
        format!("{local}{sep}{params}")
    };
    let cases = [
        (
            with("sslmode=sideways"),
            local.clone(),
            "source.url",
            "sideways",
        ),
        (
            local.clone(),
            with("sslcert=client.pem"),
            "processor.url",
            "sslkey",
        ),
        (
            with("sslmode=verify-full&sslrootcert=nowhere.pem"),
            local.clone(),
            "source.url",
            "nowhere.pem",
        ),
        (
            local.clone(),
            with("sslmode=verify-ca&sslrootcert=junk.pem"),
            "processor.url",
            "no PEM certificate",
        ),
    ];
    for (source, processor, field, why) in cases {
        let (t, src, dst) = job("pgtls-bad", &source, &processor, "sqlite://state.db");
        let text = std::fs::read_to_string(t.file()).expect("job");
        std::fs::write(t.file(), text.replace("schema = ", "# schema = ")).expect("job");
        std::fs::write(t.path("junk.pem"), "not a certificate").expect("junk");
        let _tables = tables(&client, &t, &src, &dst, 0).await;
        let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
        assert_eq!(out.code(), 2, "{field} {why}: {}", out.stderr);
        for needed in [field, why] {
            assert!(
                out.stderr.contains(needed),
                "no {needed:?} in {}",
                out.stderr
            );
        }
    }
}
