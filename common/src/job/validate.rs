//! From the raw job file to a [`Job`] that cannot be invalid: one function per section, each
//! returning the dotted field it refuses and why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::expand::redact_url;
use super::raw::{
    RawBroker, RawChunking, RawFailures, RawJob, RawKey, RawMetrics, RawNotify, RawProcessor,
    RawRetry, RawSource, RawState, RawThrottle,
};
use super::{
    BrokerTls, Chunking, CustomOptions, Failures, FileFormat, Job, MetricsSpec, Notify,
    ProcessorSpec, RetryPolicy, SourceSpec, StateSpec, Throttle, MAX_CHUNK_BYTES,
};

/// A refused field: its dotted path and what is wrong with it.
pub(super) type FieldResult<T> = Result<T, (&'static str, String)>;

pub(super) fn validate(raw: RawJob, file: &Path, dir: PathBuf) -> FieldResult<Job> {
    Ok(Job {
        name: name(raw.name)?,
        broker_heartbeat: heartbeat(raw.broker.heartbeat.as_deref())?,
        broker_tls: broker_tls(&raw.broker, &dir)?,
        broker_url: broker_url(raw.broker.url)?.into(),
        state: state(raw.state, &dir)?,
        source: source(raw.source, &dir)?,
        chunking: chunking(raw.chunking)?,
        throttle: throttle(raw.throttle)?,
        processor: processor(raw.processor, file, &dir)?,
        retry: retry(raw.retry)?,
        failures: failures(raw.failures),
        notify: notify(raw.notify)?,
        metrics: metrics(raw.metrics)?,
        file: file.to_path_buf(),
        dir,
    })
}

fn name(name: String) -> FieldResult<String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err((
            "name",
            format!(
                "{name:?} must be 1 to 100 characters of a-z, 0-9 and '-' (it names the queues)"
            ),
        ));
    }
    Ok(name)
}

fn broker_url(url: String) -> FieldResult<String> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err((
            "broker.url",
            format!("{} is not an amqp:// or amqps:// URL", redact_url(&url)),
        ));
    }
    Ok(url)
}

/// `broker.ca_file`, `cert_file` and `key_file`, read and checked: only with `amqps://` (a CA
/// file with a plain-text URL would be a promise of encryption not kept), a certificate with
/// its key, each file holding what its name says.
fn broker_tls(b: &RawBroker, dir: &Path) -> FieldResult<BrokerTls> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let tls_url = b.url.starts_with("amqps://");
    let read = |field: &'static str, name: &Option<String>| -> FieldResult<Option<Vec<u8>>> {
        let Some(name) = name else { return Ok(None) };
        if !tls_url {
            return Err((
                field,
                format!(
                    "is set, but broker.url is not amqps:// ({}): the connection would not be \
                     encrypted; use amqps://",
                    redact_url(&b.url)
                ),
            ));
        }
        let path = dir.join(name);
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| (field, format!("cannot read {}: {e}", path.display())))
    };
    let certs = |field: &'static str, pem: &[u8]| -> FieldResult<()> {
        let n = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (field, format!("is not PEM certificates: {e}")))?
            .len();
        if n == 0 {
            return Err((field, "holds no PEM certificate".to_string()));
        }
        Ok(())
    };
    let ca = match read("broker.ca_file", &b.ca_file)? {
        Some(pem) => {
            certs("broker.ca_file", &pem)?;
            Some(
                String::from_utf8(pem)
                    .map_err(|_| ("broker.ca_file", "is not PEM text (not UTF-8)".to_string()))?,
            )
        }
        None => None,
    };
    let identity = match (
        read("broker.cert_file", &b.cert_file)?,
        read("broker.key_file", &b.key_file)?,
    ) {
        (Some(cert), Some(key)) => {
            certs("broker.cert_file", &cert)?;
            PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| ("broker.key_file", format!("holds no PEM private key: {e}")))?;
            Some((cert, key))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                "broker.key_file",
                "is missing: broker.cert_file needs the key of its certificate".to_string(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                "broker.cert_file",
                "is missing: broker.key_file is the key of a certificate named there".to_string(),
            ))
        }
    };
    Ok(BrokerTls { ca, identity })
}

/// The AMQP heartbeat: a frozen or vanished peer is noticed within about two of them, so its
/// chunks come back. Whole seconds (the protocol's unit), never 0 (which turns it off).
fn heartbeat(text: Option<&str>) -> FieldResult<Duration> {
    let d = duration("broker.heartbeat", text.unwrap_or("10s"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(600) || d.subsec_nanos() != 0 {
        return Err((
            "broker.heartbeat",
            format!(
                "{} must be whole seconds from 1s to 600s (0 would turn heartbeats off, and a frozen consumer would hold its chunks for good)",
                humantime::format_duration(d)
            ),
        ));
    }
    Ok(d)
}

fn state(raw: RawState, dir: &Path) -> FieldResult<StateSpec> {
    let url = raw
        .url
        .unwrap_or_else(|| "sqlite://hopper-state.db".to_string());
    if let Some(p) = url.strip_prefix("sqlite://") {
        if p.is_empty() {
            return Err(("state.url", "sqlite:// needs a file path".to_string()));
        }
        if raw.schema.is_some() {
            return Err((
                "state.schema",
                "is for a postgres:// store; an SQLite file has no schemas".to_string(),
            ));
        }
        Ok(StateSpec::Sqlite { path: dir.join(p) })
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let url = postgres_url("state.url", Some(url), dir)?;
        let schema = raw.schema.unwrap_or_else(|| "hopper".to_string());
        let plain = schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !schema.starts_with("pg_");
        if !plain {
            return Err((
                "state.schema",
                format!(
                    "{schema:?} must be a plain SQL name: a-z, 0-9 and _, not starting with a \
                     digit or pg_, at most 63 characters"
                ),
            ));
        }
        Ok(StateSpec::Postgres {
            url: url.into(),
            schema,
        })
    } else {
        Err((
            "state.url",
            format!(
                "{} is neither sqlite://FILE nor postgres://...",
                redact_url(&url)
            ),
        ))
    }
}

fn source(s: RawSource, dir: &Path) -> FieldResult<SourceSpec> {
    match s.kind.as_str() {
        "file" => {
            only("source.url", s.url.is_some(), "file")?;
            only("source.query", s.query.is_some(), "file")?;
            only("source.key", s.key.is_some(), "file")?;
        }
        "postgres" => return postgres_source(s, dir),
        other => {
            return Err((
                "source.kind",
                format!("unknown source kind {other:?}; expected \"file\" or \"postgres\""),
            ))
        }
    }
    let Some(p) = s.path else {
        return Err(("source.path", "is required for kind = \"file\"".to_string()));
    };
    let format = match s.format.as_deref() {
        Some("jsonl") => FileFormat::Jsonl,
        Some("csv") => FileFormat::Csv,
        Some("lines") => FileFormat::Lines,
        Some(other) => {
            return Err((
                "source.format",
                format!("unknown format {other:?}; expected jsonl, csv or lines"),
            ))
        }
        None => match Path::new(&p).extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => FileFormat::Jsonl,
            Some("csv") => FileFormat::Csv,
            Some("txt") => FileFormat::Lines,
            _ => {
                return Err((
                    "source.format",
                    format!("is required: cannot tell it from {p:?} (jsonl, csv or lines)"),
                ))
            }
        },
    };
    Ok(SourceSpec::File {
        path: dir.join(p),
        format,
    })
}

fn postgres_source(s: RawSource, dir: &Path) -> FieldResult<SourceSpec> {
    only("source.path", s.path.is_some(), "postgres")?;
    only("source.format", s.format.is_some(), "postgres")?;
    let url = postgres_url("source.url", s.url, dir)?;
    let query = match s.query {
        Some(q) if !q.trim().is_empty() => q.trim().trim_end_matches(';').trim_end().to_string(),
        _ => {
            return Err((
                "source.query",
                "is required for kind = \"postgres\": the SELECT whose rows are the items"
                    .to_string(),
            ))
        }
    };
    let key = match s.key {
        Some(RawKey::One(k)) => vec![k],
        Some(RawKey::Many(ks)) => ks,
        None => {
            return Err((
                "source.key",
                "is required for kind = \"postgres\": the column (or list of columns) of the \
                 query that identifies a row, unique and not null; the scan goes in its order"
                    .to_string(),
            ))
        }
    };
    if key.is_empty() {
        return Err(("source.key", "names no column".to_string()));
    }
    if let Some(blank) = key.iter().find(|k| k.trim().is_empty()) {
        return Err(("source.key", format!("{blank:?} names no column")));
    }
    for (i, k) in key.iter().enumerate() {
        if key[..i].contains(k) {
            return Err(("source.key", format!("names column {k:?} twice")));
        }
    }
    Ok(SourceSpec::Postgres {
        url: url.into(),
        query,
        key,
    })
}

/// Refuses `field`, set but not used by this `kind`.
fn only(field: &'static str, set: bool, kind: &str) -> FieldResult<()> {
    if set {
        Err((field, format!("is not used by kind = {kind:?}")))
    } else {
        Ok(())
    }
}

/// A `postgres://` URL in `field`, required, with its TLS settings checked and the relative
/// paths of its certificate files made relative to the job file's directory.
fn postgres_url(field: &'static str, url: Option<String>, dir: &Path) -> FieldResult<String> {
    match url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            crate::postgres::link::resolve(&u, dir).map_err(|e| (field, e))
        }
        Some(u) => Err((
            field,
            format!("{} is not a postgres:// URL", redact_url(&u)),
        )),
        None => Err((field, "is required for kind = \"postgres\"".to_string())),
    }
}

fn chunking(raw: RawChunking) -> FieldResult<Chunking> {
    let items = raw.items.unwrap_or(1000);
    if items == 0 || items > 1_000_000 {
        return Err((
            "chunking.items",
            format!("{items} must be between 1 and 1000000"),
        ));
    }
    let max_bytes = raw.max_bytes.unwrap_or(1024 * 1024);
    if max_bytes == 0 {
        return Err(("chunking.max_bytes", "must be at least 1".to_string()));
    }
    let chunking = Chunking {
        items: items as usize,
        max_bytes,
    };
    // A chunk is one message: its encoding must stay under the broker's message limit, or the
    // broker closes the channel on it every time it is published.
    let bound = crate::codec::chunk_size_bound(&chunking);
    if bound > MAX_CHUNK_BYTES {
        let room = MAX_CHUNK_BYTES - (bound - max_bytes).min(MAX_CHUNK_BYTES);
        return Err((
            "chunking.max_bytes",
            format!(
                "{max_bytes}: with items = {items}, a chunk can encode to {bound} bytes, over \
                 {MAX_CHUNK_BYTES} (16 MiB, RabbitMQ's default message limit); at most {room}"
            ),
        ));
    }
    Ok(chunking)
}

fn throttle(raw: RawThrottle) -> FieldResult<Throttle> {
    let window = raw.window.unwrap_or(32);
    if window == 0 || window > 100_000 {
        return Err((
            "throttle.window",
            format!("{window} must be between 1 and 100000"),
        ));
    }
    let rate = raw.rate.unwrap_or(0.0);
    if !rate.is_finite() || rate < 0.0 {
        return Err((
            "throttle.rate",
            format!("{rate} must be 0 (unlimited) or more"),
        ));
    }
    let ramp_up = duration("throttle.ramp_up", raw.ramp_up.as_deref().unwrap_or("0s"))?;
    Ok(Throttle {
        window: window as usize,
        rate,
        ramp_up,
    })
}

fn processor(p: RawProcessor, file: &Path, dir: &Path) -> FieldResult<ProcessorSpec> {
    Ok(match p.kind.as_str() {
        "exec" => {
            only("processor.dir", p.dir.is_some(), "exec")?;
            only("processor.options", p.options.is_some(), "exec")?;
            let env = p.env.unwrap_or_default();
            let name = |v: &str| {
                v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            if let Some(bad) = env.iter().find(|v| !name(v)) {
                return Err((
                    "processor.env",
                    format!("{bad:?} is not an environment variable's name (A-Z, a-z, 0-9, _)"),
                ));
            }
            match p.command {
                Some(c) if !c.is_empty() && !c[0].is_empty() => {
                    ProcessorSpec::Exec { command: c, env }
                }
                Some(_) => return Err(("processor.command", "must name a program".to_string())),
                None => {
                    return Err((
                        "processor.command",
                        "is required for kind = \"exec\", as a list: [\"program\", \"arg\"]"
                            .to_string(),
                    ))
                }
            }
        }
        "file" => {
            only("processor.command", p.command.is_some(), "file")?;
            only("processor.env", p.env.is_some(), "file")?;
            only("processor.options", p.options.is_some(), "file")?;
            match p.dir {
                Some(d) if !d.is_empty() => ProcessorSpec::File { dir: dir.join(d) },
                _ => {
                    return Err((
                        "processor.dir",
                        "is required for kind = \"file\"".to_string(),
                    ))
                }
            }
        }
        "noop" => {
            only("processor.command", p.command.is_some(), "noop")?;
            only("processor.env", p.env.is_some(), "noop")?;
            only("processor.dir", p.dir.is_some(), "noop")?;
            only("processor.options", p.options.is_some(), "noop")?;
            ProcessorSpec::Noop
        }
        "custom" => {
            only("processor.command", p.command.is_some(), "custom")?;
            only("processor.env", p.env.is_some(), "custom")?;
            only("processor.dir", p.dir.is_some(), "custom")?;
            ProcessorSpec::Custom {
                options: CustomOptions {
                    file: file.to_path_buf(),
                    table: p.options.unwrap_or_default(),
                },
            }
        }
        "postgres" => {
            only("processor.command", p.command.is_some(), "postgres")?;
            only("processor.env", p.env.is_some(), "postgres")?;
            only("processor.dir", p.dir.is_some(), "postgres")?;
            only("processor.options", p.options.is_some(), "postgres")?;
            let url = postgres_url("processor.url", p.url, dir)?;
            let statement = match p.statement {
                Some(s) if !s.trim().is_empty() => s,
                _ => {
                    return Err((
                        "processor.statement",
                        "is required for kind = \"postgres\": the SQL run for each item, \
                         with $1, $2, ... for processor.params"
                            .to_string(),
                    ))
                }
            };
            let params = p.params.unwrap_or_default();
            if let Some(empty) = params.iter().position(|f| f.is_empty()) {
                return Err((
                    "processor.params",
                    format!("parameter ${} names no field", empty + 1),
                ));
            }
            ProcessorSpec::Postgres {
                url: url.into(),
                statement,
                params,
            }
        }
        other => {
            return Err((
                "processor.kind",
                format!(
                "unknown processor kind {other:?}; expected exec, file, noop, postgres or custom"
            ),
            ))
        }
    })
}

fn retry(raw: RawRetry) -> FieldResult<RetryPolicy> {
    let max_attempts = raw.max_attempts.unwrap_or(5);
    if max_attempts == 0 || max_attempts > 100 {
        return Err((
            "retry.max_attempts",
            format!("{max_attempts} must be between 1 and 100"),
        ));
    }
    let backoff = raw.backoff.as_deref().unwrap_or("1s..5m");
    let (min, max) = backoff.split_once("..").ok_or((
        "retry.backoff",
        format!("{backoff:?} must be MIN..MAX, such as \"1s..5m\""),
    ))?;
    let backoff_min = duration("retry.backoff", min.trim())?;
    let backoff_max = duration("retry.backoff", max.trim())?;
    if backoff_min.is_zero() || backoff_min > backoff_max {
        return Err((
            "retry.backoff",
            format!("{backoff:?}: MIN must be above zero and not above MAX"),
        ));
    }
    let chunk_timeout = duration(
        "retry.chunk_timeout",
        raw.chunk_timeout.as_deref().unwrap_or("10m"),
    )?;
    if chunk_timeout.is_zero() {
        return Err(("retry.chunk_timeout", "must be above zero".to_string()));
    }
    Ok(RetryPolicy {
        max_attempts,
        backoff_min,
        backoff_max,
        chunk_timeout,
    })
}

fn failures(raw: RawFailures) -> Failures {
    Failures {
        skip_limit: raw.skip_limit.unwrap_or(0),
    }
}

fn duration(field: &'static str, text: &str) -> FieldResult<Duration> {
    humantime::parse_duration(text).map_err(|e| {
        (
            field,
            format!("{text:?} is not a duration such as \"30s\" or \"5m\": {e}"),
        )
    })
}

fn metrics(raw: RawMetrics) -> FieldResult<MetricsSpec> {
    let addr = |field: &'static str, value: Option<String>| -> FieldResult<_> {
        value
            .map(|v| {
                v.parse::<std::net::SocketAddr>().map_err(|_| {
                    (
                        field,
                        format!("{v:?} is not an IP:PORT to listen on (\"0.0.0.0:9464\")"),
                    )
                })
            })
            .transpose()
    };
    Ok(MetricsSpec {
        dispatcher: addr("metrics.dispatcher", raw.dispatcher)?,
        consumer: addr("metrics.consumer", raw.consumer)?,
    })
}

fn notify(raw: RawNotify) -> FieldResult<Notify> {
    if let Some(c) = &raw.command {
        if c.first().is_none_or(|p| p.is_empty()) {
            return Err(("notify.command", "must name a program".to_string()));
        }
    }
    if let Some(w) = &raw.webhook {
        let ok = url::Url::parse(w)
            .map(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .unwrap_or(false);
        if !ok {
            return Err((
                "notify.webhook",
                format!("{} is not an http:// or https:// URL", redact_url(w)),
            ));
        }
    }
    Ok(Notify {
        command: raw.command,
        webhook: raw.webhook,
    })
}
