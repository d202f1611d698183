//! Prometheus metrics: each binary's registry, served at `GET /metrics` when asked
//! (`--metrics ADDR`, or the job file's `[metrics]`).
//!
//! The registry is [`prometheus_client`]'s (the Prometheus project's own Rust client), with the
//! `hopper_` prefix and a `job` label on every series; it encodes the OpenMetrics text format,
//! which Prometheus scrapes as is. Counters end in `_total`, durations are `_seconds`
//! histograms.
//!
//! The HTTP side is a few lines on tokio rather than a web framework: one route, one method, a
//! request read with a bound (8 KiB, 5 s) and answered with `Connection: close`. What a scrape
//! reads may first be brought up to date by a refresh hook (the dispatcher reads its run's
//! counts from the execution context then).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// The most a request may send before its headers end.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Brings the metrics up to date just before a scrape encodes them.
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A registry for `job`: every metric registered in it is named `hopper_...` and carries the
/// label `job="<job>"`.
pub fn registry(job: &str) -> Registry {
    Registry::with_prefix_and_labels(
        "hopper",
        [(
            std::borrow::Cow::Borrowed("job"),
            std::borrow::Cow::Owned(job.to_string()),
        )]
        .into_iter(),
    )
}

/// Why metrics cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct ServeError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the system said.
    pub source: std::io::Error,
}

/// Serves `registry` at `http://ADDR/metrics` until `stop` is cancelled; returns the address
/// bound (port 0 asks for any free port), which it also logs.
///
/// # Errors
/// [`ServeError`] when the address cannot be bound (in use, not this host's).
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    stop: CancellationToken,
) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError { addr, source })?;
    info!(addr = %bound, "serving Prometheus metrics at http://{bound}/metrics");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "metrics: accept failed");
                        continue;
                    }
                },
            };
            let (registry, refresh) = (Arc::clone(&registry), refresh.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &registry, refresh).await {
                    debug!(%peer, error = %e, "metrics: request not answered");
                }
            });
        }
    });
    Ok(bound)
}

/// Reads one request and answers it.
async fn answer(
    mut stream: TcpStream,
    registry: &Registry,
    refresh: Option<Refresh>,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            if request.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(true)
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let line = request
        .split(|&b| b == b'\r')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        )
    } else if path != "/metrics" && !path.starts_with("/metrics?") {
        (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_string(),
        )
    } else {
        if let Some(refresh) = refresh {
            refresh().await;
        }
        let mut text = String::new();
        match encode(&mut text, registry) {
            Ok(()) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("cannot encode the metrics: {e}\n"),
            ),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn a_scrape_gets_the_registry_with_prefix_and_job_label_and_nothing_else_is_served() {
        let mut registry = registry("demo");
        let counter: Counter = Counter::default();
        registry.register("things", "Things seen", counter.clone());
        counter.inc_by(3);
        let stop = CancellationToken::new();
        let refreshed = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = Arc::clone(&refreshed);
        let refresh: Refresh = Arc::new(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async {})
        });
        let addr = serve(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(registry),
            Some(refresh),
            stop.clone(),
        )
        .await
        .expect("serve");
        let out = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("hopper_things_total{job=\"demo\"} 3"), "{out}");
        assert!(out.contains("# TYPE hopper_things counter"), "{out}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::SeqCst), 1);
        let out = get(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        let out = get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        // A request that never ends its headers is cut off at the bound.
        let out = get(addr, &vec![b'a'; MAX_REQUEST + 2048]).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        // The address in use is a clear error.
        let err = serve(addr, Arc::new(Registry::default()), None, stop.clone())
            .await
            .expect_err("in use");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        stop.cancel();
    }
}
