//! The job file: TOML in, a validated [`Job`] out, once.
//!
//! Loading goes in three steps so that every error can name the file and the field:
//! 1. the text is parsed as a TOML table (syntax errors carry line and column);
//! 2. `${VAR}` and `${VAR:-default}` are expanded in every string value (an unset variable
//!    without a default is an error naming the field);
//! 3. the table is deserialized into raw structs that refuse unknown fields, then validated
//!    into a [`Job`] that cannot be invalid (chunk size 0, a bad name, a missing `path`...).
//!
//! Relative paths in a job file (source path, state file, output directory, the `exec` command's
//! working directory) are relative to the directory of the job file, so the same file works
//! whatever directory the dispatcher or a consumer is started from.
//!
//! Nothing here touches the network or the input file: the dispatcher checks that its input
//! exists, the consumer that its command exists, each before it sends anything.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The largest chunk a job may ask for. RabbitMQ 4 refuses messages over 16 MiB by default
/// (`max_message_size`), and a chunk is one message.
pub const MAX_CHUNK_BYTES: u64 = 16 * 1024 * 1024;

/// A job file that cannot be used. Always refused before anything is sent to the broker; the
/// binaries exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job file could not be read at all.
    #[error("cannot read job file {path}: {source}")]
    Read {
        /// The job file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("job file {path} is not valid TOML: {message}")]
    Syntax {
        /// The job file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field is unknown, missing, of the wrong type or has a value that makes no sense.
    #[error("job file {path}: field `{field}`: {message}")]
    Field {
        /// The job file.
        path: PathBuf,
        /// The dotted path of the field, such as `chunking.items`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A validated job: everything the dispatcher and the consumers need to know.
#[derive(Debug, Clone)]
pub struct Job {
    /// `[a-z0-9-]+`; names the queues.
    pub name: String,
    /// The job file this came from.
    pub file: PathBuf,
    /// The directory relative paths are resolved against (the job file's).
    pub dir: PathBuf,
    /// The broker's URL, possibly with a password; print it with [`redact_url`].
    pub broker_url: String,
    /// Where the execution context lives.
    pub state: StateSpec,
    /// What the dispatcher reads.
    pub source: SourceSpec,
    /// How items are cut into chunks.
    pub chunking: Chunking,
    /// The throttling window and item rate.
    pub throttle: Throttle,
    /// What the consumers do with a chunk.
    pub processor: ProcessorSpec,
    /// How transient failures are retried.
    pub retry: Retry,
    /// How many bad items a run tolerates.
    pub failures: Failures,
}

/// Where the execution context is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSpec {
    /// An SQLite file (the embedded default).
    Sqlite {
        /// The database file, resolved against the job file's directory.
        path: PathBuf,
    },
}

/// The input of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A local file read as a stream.
    File {
        /// The file, resolved against the job file's directory.
        path: PathBuf,
        /// How records are laid out in it.
        format: FileFormat,
    },
}

/// The record layout of a file source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON value per line.
    Jsonl,
    /// Comma-separated values; the header row names the fields of each item.
    Csv,
    /// Each line is one item, a JSON string.
    Lines,
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileFormat::Jsonl => "jsonl",
            FileFormat::Csv => "csv",
            FileFormat::Lines => "lines",
        })
    }
}

/// How items are cut into chunks: a chunk closes at `items` items or `max_bytes` bytes of item
/// data, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Items per chunk, at least 1.
    pub items: usize,
    /// Bytes of item data per chunk; a single item larger than this is bad data.
    pub max_bytes: u64,
}

/// The dispatcher's throttle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttle {
    /// Chunks outstanding (published, no final reply yet) at the most.
    pub window: usize,
    /// Items per second, 0 for unlimited.
    pub rate: f64,
    /// How long the rate takes to climb linearly from 0 to `rate`.
    pub ramp_up: Duration,
}

/// What the consumers do with each chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessorSpec {
    /// Run a command per chunk (no shell), items as JSON lines on its standard input.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
    /// Write each chunk's items to `DIR/RUN/SEQ.jsonl`, atomically.
    File {
        /// The output directory, resolved against the job file's directory.
        dir: PathBuf,
    },
    /// Count the items and do nothing else.
    Noop,
    /// A processor written in Rust against the `hopper-consumer` library; `options` is the
    /// `[processor.options]` table, for that processor to read.
    Custom {
        /// The `[processor.options]` table, as written.
        options: toml::Table,
    },
}

impl ProcessorSpec {
    /// The `kind` as written in the job file.
    pub fn kind(&self) -> &'static str {
        match self {
            ProcessorSpec::Exec { .. } => "exec",
            ProcessorSpec::File { .. } => "file",
            ProcessorSpec::Noop => "noop",
            ProcessorSpec::Custom { .. } => "custom",
        }
    }
}

/// How transient chunk failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts per chunk, the first included; at least 1.
    pub max_attempts: u32,
    /// The delay before the second attempt; it doubles for each further attempt.
    pub backoff_min: Duration,
    /// The delay never grows past this.
    pub backoff_max: Duration,
    /// A chunk in flight longer than this is reported stuck.
    pub chunk_timeout: Duration,
}

impl Retry {
    /// The delay before attempt `next` (2 for the first retry): `backoff_min * 2^(next-2)`,
    /// capped at `backoff_max`.
    pub fn delay_before(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(31);
        self.backoff_min
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// How many bad items a run tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    /// Skipped items (bad data and bad items) allowed; one more fails the run.
    pub skip_limit: u64,
}

// ---- raw, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    broker: RawBroker,
    #[serde(default)]
    state: RawState,
    source: RawSource,
    #[serde(default)]
    chunking: RawChunking,
    #[serde(default)]
    throttle: RawThrottle,
    processor: RawProcessor,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    failures: RawFailures,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: String,
    path: Option<String>,
    format: Option<String>,
    url: Option<String>,
    query: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawChunking {
    items: Option<u64>,
    max_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawThrottle {
    window: Option<u64>,
    rate: Option<f64>,
    ramp_up: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcessor {
    kind: String,
    command: Option<Vec<String>>,
    dir: Option<String>,
    options: Option<toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    backoff: Option<String>,
    chunk_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFailures {
    skip_limit: Option<u64>,
}

impl Job {
    /// Reads, expands and validates a job file.
    ///
    /// # Errors
    /// A [`JobError`] naming the file and, where there is one, the field.
    pub fn load(path: &Path) -> Result<Job, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Job::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Validates a job file's text; `env` looks up variables for `${VAR}`. `path` names the file
    /// in errors and anchors relative paths.
    ///
    /// # Errors
    /// A [`JobError`] naming the file and, where there is one, the field.
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Job, JobError> {
        let field_err = |field: &str, message: String| JobError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| JobError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        expand_table(&mut table, "", env).map_err(|(field, message)| field_err(&field, message))?;
        let raw: RawJob = serde_path_to_error::deserialize(table).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde reports a missing field at its parent; name the field itself.
            match inner.strip_prefix("missing field `") {
                Some(rest) => {
                    let name = rest.split('`').next().unwrap_or(rest);
                    let full = if field == "." || field.is_empty() {
                        name.to_string()
                    } else {
                        format!("{field}.{name}")
                    };
                    field_err(&full, "is required".to_string())
                }
                None => field_err(&field, inner),
            }
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        validate(raw, path, dir).map_err(|(field, message)| field_err(field, message))
    }

    /// Resolves a path from the job file against the job file's directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

type FieldResult<T> = Result<T, (&'static str, String)>;

fn validate(raw: RawJob, file: &Path, dir: PathBuf) -> FieldResult<Job> {
    let name = raw.name;
    if name.is_empty()
        || name.len() > 100
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err((
            "name",
            format!(
                "{name:?} must be 1 to 100 characters of a-z, 0-9 and '-' (it names the queues)"
            ),
        ));
    }

    let broker_url = raw.broker.url;
    if !(broker_url.starts_with("amqp://") || broker_url.starts_with("amqps://")) {
        return Err((
            "broker.url",
            format!(
                "{} is not an amqp:// or amqps:// URL",
                redact_url(&broker_url)
            ),
        ));
    }

    let state_url = raw
        .state
        .url
        .unwrap_or_else(|| "sqlite://hopper-state.db".to_string());
    let state = if let Some(p) = state_url.strip_prefix("sqlite://") {
        if p.is_empty() {
            return Err(("state.url", "sqlite:// needs a file path".to_string()));
        }
        StateSpec::Sqlite { path: dir.join(p) }
    } else if state_url.starts_with("postgres://") || state_url.starts_with("postgresql://") {
        return Err((
            "state.url",
            "the PostgreSQL state store is not available yet; use sqlite://FILE".to_string(),
        ));
    } else {
        return Err((
            "state.url",
            format!(
                "{} is neither sqlite://FILE nor postgres://...",
                redact_url(&state_url)
            ),
        ));
    };

    let s = raw.source;
    let source = match s.kind.as_str() {
        "file" => {
            for (field, set) in [
                ("source.url", s.url.is_some()),
                ("source.query", s.query.is_some()),
                ("source.key", s.key.is_some()),
            ] {
                if set {
                    return Err((field, "is only for kind = \"postgres\"".to_string()));
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
            SourceSpec::File {
                path: dir.join(p),
                format,
            }
        }
        "postgres" => {
            return Err((
                "source.kind",
                "the postgres source is not available yet; use kind = \"file\"".to_string(),
            ))
        }
        other => {
            return Err((
                "source.kind",
                format!("unknown source kind {other:?}; expected \"file\" or \"postgres\""),
            ))
        }
    };

    let items = raw.chunking.items.unwrap_or(1000);
    if items == 0 || items > 1_000_000 {
        return Err((
            "chunking.items",
            format!("{items} must be between 1 and 1000000"),
        ));
    }
    let max_bytes = raw.chunking.max_bytes.unwrap_or(1024 * 1024);
    if max_bytes == 0 || max_bytes > MAX_CHUNK_BYTES {
        return Err((
            "chunking.max_bytes",
            format!("{max_bytes} must be between 1 and {MAX_CHUNK_BYTES} (16 MiB, RabbitMQ's default message limit)"),
        ));
    }

    let window = raw.throttle.window.unwrap_or(32);
    if window == 0 || window > 100_000 {
        return Err((
            "throttle.window",
            format!("{window} must be between 1 and 100000 (to pause a run, use `hopper-dispatcher pause`)"),
        ));
    }
    let rate = raw.throttle.rate.unwrap_or(0.0);
    if !rate.is_finite() || rate < 0.0 {
        return Err((
            "throttle.rate",
            format!("{rate} must be 0 (unlimited) or more"),
        ));
    }
    let ramp_up = duration(
        "throttle.ramp_up",
        raw.throttle.ramp_up.as_deref().unwrap_or("0s"),
    )?;

    let p = raw.processor;
    let only = |field: &'static str, set: bool, kind: &str| -> FieldResult<()> {
        if set {
            Err((field, format!("is not used by kind = {kind:?}")))
        } else {
            Ok(())
        }
    };
    let processor = match p.kind.as_str() {
        "exec" => {
            only("processor.dir", p.dir.is_some(), "exec")?;
            only("processor.options", p.options.is_some(), "exec")?;
            match p.command {
                Some(c) if !c.is_empty() && !c[0].is_empty() => ProcessorSpec::Exec { command: c },
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
            only("processor.dir", p.dir.is_some(), "noop")?;
            only("processor.options", p.options.is_some(), "noop")?;
            ProcessorSpec::Noop
        }
        "custom" => {
            only("processor.command", p.command.is_some(), "custom")?;
            only("processor.dir", p.dir.is_some(), "custom")?;
            ProcessorSpec::Custom {
                options: p.options.unwrap_or_default(),
            }
        }
        "postgres" => {
            return Err((
                "processor.kind",
                "the postgres processor is not available yet".to_string(),
            ))
        }
        other => {
            return Err((
                "processor.kind",
                format!("unknown processor kind {other:?}; expected exec, file, noop or custom"),
            ))
        }
    };

    let max_attempts = raw.retry.max_attempts.unwrap_or(5);
    if max_attempts == 0 || max_attempts > 100 {
        return Err((
            "retry.max_attempts",
            format!("{max_attempts} must be between 1 and 100"),
        ));
    }
    let backoff = raw.retry.backoff.as_deref().unwrap_or("1s..5m");
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
        raw.retry.chunk_timeout.as_deref().unwrap_or("10m"),
    )?;
    if chunk_timeout.is_zero() {
        return Err(("retry.chunk_timeout", "must be above zero".to_string()));
    }

    Ok(Job {
        name,
        file: file.to_path_buf(),
        dir,
        broker_url,
        state,
        source,
        chunking: Chunking {
            items: items as usize,
            max_bytes,
        },
        throttle: Throttle {
            window: window as usize,
            rate,
            ramp_up,
        },
        processor,
        retry: Retry {
            max_attempts,
            backoff_min,
            backoff_max,
            chunk_timeout,
        },
        failures: Failures {
            skip_limit: raw.failures.skip_limit.unwrap_or(0),
        },
    })
}

fn duration(field: &'static str, text: &str) -> FieldResult<Duration> {
    humantime::parse_duration(text).map_err(|e| {
        (
            field,
            format!("{text:?} is not a duration such as \"30s\" or \"5m\": {e}"),
        )
    })
}

/// Expands `${VAR}` and `${VAR:-default}` in every string of the table, in place. Errors carry the
/// dotted path of the field.
fn expand_table(
    table: &mut toml::Table,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        expand_value(value, &path, env)?;
    }
    Ok(())
}

fn expand_value(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => {
            *s = expand(s, env).map_err(|m| (path.to_string(), m))?;
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                expand_value(v, &format!("{path}[{i}]"), env)?;
            }
        }
        toml::Value::Table(t) => expand_table(t, path, env)?,
        _ => {}
    }
    Ok(())
}

/// Expands `${VAR}` and `${VAR:-default}` in one string; `$$` is a literal `$`.
pub fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            let inner = &r[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("${{{inner}}} is not a variable name"));
            }
            match (env(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                    ))
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The URL with its password replaced by `***`, for logs and messages.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            // Only fails for URLs that cannot have a password, and this one has one.
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "inflate-prices"
[broker]
url = "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
[source]
kind = "file"
path = "data/products.jsonl"
[processor]
kind = "file"
dir = "out"
"#;

    fn parse(text: &str) -> Result<Job, JobError> {
        Job::parse(Path::new("jobs/x.toml"), text, &|_| None)
    }

    fn field_of(text: &str) -> String {
        match parse(text) {
            Err(JobError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn a_good_file_gets_defaults_and_resolved_paths() {
        let job = parse(GOOD).expect("valid");
        assert_eq!(job.name, "inflate-prices");
        assert_eq!(job.broker_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            job.source,
            SourceSpec::File {
                path: PathBuf::from("jobs/data/products.jsonl"),
                format: FileFormat::Jsonl
            }
        );
        assert_eq!(job.chunking.items, 1000);
        assert_eq!(job.throttle.window, 32);
        assert_eq!(job.retry.max_attempts, 5);
        assert_eq!(job.retry.backoff_min, Duration::from_secs(1));
        assert_eq!(
            job.state,
            StateSpec::Sqlite {
                path: PathBuf::from("jobs/hopper-state.db")
            }
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            field_of(&GOOD.replace("inflate-prices", "Bad_Name")),
            "name"
        );
        assert_eq!(
            field_of(&format!("{GOOD}\n[chunking]\nitems = 0\n")),
            "chunking.items"
        );
        assert_eq!(
            field_of(&format!("{GOOD}\n[chunking]\nitems = \"many\"\n")),
            "chunking.items"
        );
        assert_eq!(
            field_of(&format!("{GOOD}\n[throttle]\nwindoe = 3\n")),
            "throttle.windoe"
        );
        assert_eq!(
            field_of(&GOOD.replace("kind = \"file\"\npath", "kind = \"ftp\"\npath")),
            "source.kind"
        );
        assert_eq!(
            field_of(&GOOD.replace("dir = \"out\"", "")),
            "processor.dir"
        );
        assert_eq!(
            field_of(&GOOD.replace("name = \"inflate-prices\"", "")),
            "name"
        );
        assert_eq!(
            field_of(&format!("{GOOD}\n[retry]\nbackoff = \"5m..1s\"\n")),
            "retry.backoff"
        );
    }

    #[test]
    fn unknown_field_message_names_it() {
        let err = parse(&format!("{GOOD}\n[throttle]\nwindoe = 3\n")).expect_err("unknown field");
        assert!(err.to_string().contains("windoe"), "{err}");
    }

    #[test]
    fn not_toml_is_a_syntax_error() {
        assert!(matches!(parse("name = = 3"), Err(JobError::Syntax { .. })));
    }

    #[test]
    fn unset_variable_without_default_names_the_field() {
        let text = GOOD.replace(
            "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}",
            "${NOPE}",
        );
        let err = parse(&text).expect_err("unset var");
        assert!(err.to_string().contains("broker.url"), "{err}");
        assert!(err.to_string().contains("NOPE"), "{err}");
    }

    #[test]
    fn expansion() {
        let env = |n: &str| (n == "A").then(|| "x".to_string());
        assert_eq!(expand("a${A}b", &env).as_deref(), Ok("axb"));
        assert_eq!(expand("${B:-d}", &env).as_deref(), Ok("d"));
        assert_eq!(expand("$$5 $x", &env).as_deref(), Ok("$5 $x"));
        assert!(expand("${B}", &env).is_err());
        assert!(expand("${A", &env).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://u:secret@h:5672/%2f"),
            "amqp://u:***@h:5672/%2f"
        );
        assert!(!redact_url("postgres://u:pw@h/db").contains("pw"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let job = parse(&format!("{GOOD}\n[retry]\nbackoff = \"1s..5s\"\n")).expect("valid");
        let d: Vec<u64> = (2..=6)
            .map(|n| job.retry.delay_before(n).as_secs())
            .collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
    }
}
