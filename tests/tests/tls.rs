//! `amqps://` end to end. Each test starts its own TLS endpoint in front of the local RabbitMQ:
//! a proxy that terminates TLS with a server certificate for `localhost`, issued by a CA the
//! test generates (and, where asked, wants a client certificate from that CA), and passes the
//! bytes on to 127.0.0.1:5672. A run completes through it with the right CA; a wrong CA, a host
//! name the certificate is not for, or a missing client certificate fail at once with exit 1
//! and a message that names the broker and says what to check, never falling back to plain
//! text.

use std::time::Duration;

use hopper_tests::{output_ids, require_broker, write_jsonl, TestJob};

mod support;
use support::tls::{amqp_endpoint as tls_endpoint, pki};

const LIMIT: Duration = Duration::from_secs(60);

const BODY: &str = r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 50
[processor]
kind = "file"
dir = "out"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_completes_through_tls_with_the_right_ca_and_a_client_certificate() {
    let _conn = require_broker().await;
    let pki = pki();
    let port = tls_endpoint(&pki, true).await;
    let t = TestJob::with_broker(
        "tls",
        &format!("amqps://guest:guest@localhost:{port}/%2f"),
        &format!(
            "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"\n{BODY}"
        ),
    );
    std::fs::write(t.path("ca.pem"), &pki.ca_pem).expect("write the CA");
    std::fs::write(t.path("client.pem"), &pki.client_pem).expect("write the certificate");
    std::fs::write(t.path("client.key"), &pki.client_key_pem).expect("write the key");
    write_jsonl(&t.path("input.jsonl"), 500, 60);
    // The job holds the key, and never prints it.
    let shown = format!("{:?}", t.job());
    let key_body = pki.client_key_pem.lines().nth(1).expect("a PEM body line");
    assert!(!shown.contains(key_body), "{shown}");

    let consumer = t.start_consumer(1, 2);
    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 0, "dispatcher failed: {}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["processed"], 500);
    let expected: Vec<u64> = (1..=500).collect();
    assert_eq!(output_ids(&t.path("out")), expected);
    assert!(consumer.stop(LIMIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_another_host_name_or_no_client_certificate_fails_at_once() {
    let _conn = require_broker().await;
    let (pki, other) = (pki(), pki());
    let open = tls_endpoint(&pki, false).await;
    let strict = tls_endpoint(&pki, true).await;
    // (URL host, the CA the job trusts, endpoint port, what the failure must name)
    let cases = [
        ("localhost", &other.ca_pem, open, "UnknownIssuer"),
        ("127.0.0.1", &pki.ca_pem, open, "not valid for name"),
        ("localhost", &pki.ca_pem, strict, "TLS"),
    ];
    for (host, ca, port, why) in cases {
        let t = TestJob::with_broker(
            "tls-refused",
            &format!("amqps://guest:s3cret@{host}:{port}/%2f"),
            &format!("ca_file = \"ca.pem\"\n{BODY}"),
        );
        std::fs::write(t.path("ca.pem"), ca).expect("write the CA");
        write_jsonl(&t.path("input.jsonl"), 10, 60);

        let out = t.dispatcher(&["run"], LIMIT).await;
        assert_eq!(out.code(), 1, "{host}:{port}: {}", out.stderr);
        for needed in [format!("{host}:{port}"), "broker.ca_file".to_string()] {
            assert!(
                out.stderr.contains(&needed),
                "{host}: no {needed:?} in {}",
                out.stderr
            );
        }
        assert!(
            out.stderr.contains(why),
            "{host}: no {why:?} in {}",
            out.stderr
        );
        assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);

        let consumer = t.start_consumer(1, 1);
        let code = consumer.wait(LIMIT).await.code();
        assert_eq!(code, Some(1), "the consumer of {host}:{port}");
    }
}

#[tokio::test]
async fn tls_settings_that_cannot_hold_are_a_bad_job_file() {
    let dir = tempfile::tempdir().expect("a directory");
    let pki = pki();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).expect("write the CA");
    std::fs::write(dir.path().join("client.pem"), &pki.client_pem).expect("write the cert");
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").expect("write junk");
    let cases = [
        (
            "amqp://guest:guest@localhost:5672/%2f",
            "ca_file = \"ca.pem\"",
            "broker.ca_file",
        ),
        (
            "amqps://guest:guest@localhost:5671/%2f",
            "cert_file = \"client.pem\"",
            "broker.key_file",
        ),
        (
            "amqps://guest:guest@localhost:5671/%2f",
            "ca_file = \"junk.pem\"",
            "broker.ca_file",
        ),
        (
            "amqps://guest:guest@localhost:5671/%2f",
            "ca_file = \"nowhere.pem\"",
            "broker.ca_file",
        ),
    ];
    for (url, line, field) in cases {
        let t = TestJob::with_broker("tls-bad", url, &format!("{line}\n{BODY}"));
        for f in ["ca.pem", "client.pem", "junk.pem"] {
            std::fs::copy(dir.path().join(f), t.path(f)).expect("copy");
        }
        let out = t.dispatcher(&["run"], LIMIT).await;
        assert_eq!(out.code(), 2, "{line}: {}", out.stderr);
        assert!(
            out.stderr.contains(field),
            "{line}: no {field} in {}",
            out.stderr
        );
    }
}
