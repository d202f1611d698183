//! The connection layer: one side's two connections to RabbitMQ and its publishing channel.
//!
//! Publishing and consuming use separate connections: a publisher connection blocked by a
//! memory or disk alarm (`connection.blocked`) stops every frame on it, acks included.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection, ConnectionProperties};

use super::topology::Topology;
use crate::job::{redact_url, BrokerTls, Job};
use crate::transport::TransportError;

/// The broker could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to RabbitMQ at {url} ({name}): {source}")]
pub struct ConnectError {
    /// The broker URL, password redacted, so the error can be logged as it is.
    pub url: String,
    /// The connection name we asked for, as the management UI's Connections tab shows it.
    pub name: String,
    /// The client's error.
    pub source: Box<dyn std::error::Error + Send + Sync>,
    /// The broker's reply code and text when it refused us for a reason that retrying will not
    /// cure (wrong credentials, no access to the vhost).
    pub refusal: Option<(u16, String)>,
}

/// How long opening a connection (TCP, TLS, the AMQP handshake) may take. A broker that is
/// starting or stuck can accept the TCP connection and never read from it (seen here: the
/// protocol header sat unread in the broker's socket); without a bound, a dispatcher started by
/// a scheduler would wait for ever, saying nothing.
const OPEN_WITHIN: Duration = Duration::from_secs(20);

/// Opens a connection named `name` (shown in the management UI's Connections tab); an
/// `amqps://` one verifies the broker's certificate against the system's roots and `tls.ca`,
/// and presents `tls.identity` when the broker asks for a client certificate. A certificate
/// that does not verify fails the connection: there is no fallback to plain text.
///
/// # Errors
/// [`ConnectError`], with the URL's password redacted; also when the broker has not finished
/// opening the connection within 20 seconds.
pub async fn connect(url: &str, name: &str, tls: &BrokerTls) -> Result<Connection, ConnectError> {
    connect_within(url, name, tls, OPEN_WITHIN).await
}

async fn connect_within(
    url: &str,
    name: &str,
    tls: &BrokerTls,
    limit: Duration,
) -> Result<Connection, ConnectError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let config = OwnedTLSConfig {
        identity: tls
            .identity
            .as_ref()
            .map(|(pem, key)| OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: key.clone(),
            }),
        cert_chain: tls.ca.clone(),
    };
    let connected = match lapin::runtime::default_runtime() {
        Ok(runtime) => tokio::time::timeout(
            limit,
            Connection::connect_with_config(url, props, config, runtime),
        )
        .await
        .map_err(|_| ConnectError {
            url: redact_url(url),
            name: name.to_string(),
            source: format!(
                "no answer within {}: the broker took the connection but did not finish \
                 opening it (a broker that is starting, overloaded or stuck, or a port that \
                 is not RabbitMQ's)",
                humantime::format_duration(limit)
            )
            .into(),
            refusal: None,
        })?,
        Err(e) => Err(e),
    };
    connected.map_err(|source| {
        let refusal = super::rejection(&source);
        let text = source.to_string();
        let source: Box<dyn std::error::Error + Send + Sync> = if tls_failure(&text) {
            format!(
                "the TLS handshake failed: {text}; the broker's certificate must verify \
                 against the system's roots or broker.ca_file, for the host named in \
                 broker.url (and a broker that asks for a client certificate needs \
                 broker.cert_file and broker.key_file)"
            )
            .into()
        } else {
            Box::new(source)
        };
        ConnectError {
            url: redact_url(url),
            name: name.to_string(),
            refusal,
            source,
        }
    })
}

/// True when a connection error is about TLS (a certificate, the handshake), as rustls words
/// it: the one place a person must act on the job's certificate settings.
fn tls_failure(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    [
        "certificate",
        "handshake",
        "tls",
        "unknownissuer",
        "notvalidforname",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// One side's link to the broker: a connection to publish on, with a channel in confirm mode,
/// and a separate connection to consume on, the job's queues declared.
#[derive(Debug)]
pub(crate) struct Link {
    publish: Connection,
    /// Kept apart so that a publisher blocked by a broker alarm does not stop acks.
    pub(crate) consume: Connection,
    /// A channel on the publishing connection, in confirm mode.
    pub(crate) channel: Channel,
}

impl Link {
    /// Connects `role` (`hopper-dispatcher`, `hopper-consumer`) for `job`, naming the connections
    /// after the role, the job and this process, and declares the job's queues.
    ///
    /// # Errors
    /// [`TransportError::Connect`], or [`TransportError::Broker`] naming the step and queue.
    pub(crate) async fn open(
        job: &Job,
        topology: &Topology,
        role: &str,
    ) -> Result<Link, TransportError> {
        let me = crate::process::identity();
        let step = |what: &'static str| super::broker(what, &topology.chunks);
        let name = |side: &str| format!("{role} {} {side} {me}", job.name);
        let url = with_heartbeat(&job.broker_url, job.broker_heartbeat);
        let publish = connect(&url, &name("publish"), &job.broker_tls).await?;
        let consume = connect(&url, &name("consume"), &job.broker_tls).await?;
        let channel = publish
            .create_channel()
            .await
            .map_err(step("open channel"))?;
        topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(step("enable publisher confirms"))?;
        Ok(Link {
            publish,
            consume,
            channel,
        })
    }

    /// Closes both connections. Best effort: what matters was confirmed and recorded already.
    /// Bounded, because closing a connection the broker dropped can wait forever for its
    /// close-ok.
    pub(crate) async fn close(&self, why: &str) {
        let limit = std::time::Duration::from_secs(1);
        let _ = tokio::time::timeout(limit, self.publish.close(200, why.into())).await;
        let _ = tokio::time::timeout(limit, self.consume.close(200, why.into())).await;
    }
}

/// The broker URL with the job's heartbeat in its query (`heartbeat=SECONDS`, as lapin reads
/// it), replacing any there: the job file's `broker.heartbeat` is the one setting. A URL that
/// does not parse is left as it is, for the connection to report.
fn with_heartbeat(url: &str, heartbeat: std::time::Duration) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_string();
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k != "heartbeat")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("heartbeat", &heartbeat.as_secs().to_string());
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broker_that_never_answers_fails_the_connection_in_time() {
        // Takes the TCP connection and never reads from it, as a stuck broker did.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let port = silent.local_addr().expect("its port").port();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let url = format!("amqp://guest:secret@127.0.0.1:{port}/%2f");
        let started = std::time::Instant::now();
        let limit = Duration::from_millis(300);
        let err = connect_within(&url, "hopper-test", &BrokerTls::default(), limit)
            .await
            .expect_err("no broker answered");
        assert!(started.elapsed() < limit * 10, "{:?}", started.elapsed());
        let text = err.to_string();
        assert!(text.contains("no answer within 300ms"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(!text.contains("secret"), "{text}");
        held.abort();
    }

    #[test]
    fn the_job_heartbeat_goes_into_the_url_once() {
        let d = Duration::from_secs(7);
        assert_eq!(
            with_heartbeat("amqp://u:p@h:5672/%2f", d),
            "amqp://u:p@h:5672/%2f?heartbeat=7"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?heartbeat=60&frame_max=8192", d),
            "amqp://h/%2f?frame_max=8192&heartbeat=7"
        );
    }
}
