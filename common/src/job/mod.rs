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

use serde::de::DeserializeOwned;

mod expand;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use expand::{expand, redact_url};

/// The largest encoded chunk a job may produce (see [`crate::codec::chunk_size_bound`]). RabbitMQ 4
/// refuses messages over 16 MiB by default
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

/// A URL that may hold a password. It dereferences to the URL itself (what a connection is made
/// with), and prints, with `{}` and `{:?}` alike, with its password replaced by `***`
/// ([`redact_url`]): a `Job` logged or shown in a panic never shows a password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL itself, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        SecretUrl(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        SecretUrl(url.to_string())
    }
}

impl PartialEq<&str> for SecretUrl {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// What an `amqps://` connection trusts and presents, read from the job's files when the job is
/// loaded (so that a missing or unreadable file is a bad job file, not a failed run).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BrokerTls {
    /// PEM certificates trusted besides the system's roots (`broker.ca_file`).
    pub ca: Option<String>,
    /// The client certificate chain and its private key, both PEM (`broker.cert_file`,
    /// `broker.key_file`), for a broker that asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("BrokerTls")
            .field("ca", &self.ca.as_ref().map(|_| "PEM"))
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "PEM, key redacted"),
            )
            .finish()
    }
}

/// A validated job: everything the dispatcher and the consumers need to know.
#[derive(Debug, Clone)]
pub struct Job {
    /// `[a-z0-9-]+`; names the queues.
    pub name: String,
    /// The job file this came from.
    pub file: PathBuf,
    /// The directory relative paths are resolved against (the job file's), so the same file
    /// works whatever directory a binary is started from.
    pub dir: PathBuf,
    /// The broker's URL, possibly with a password (which it never prints).
    pub broker_url: SecretUrl,
    /// `broker.ca_file`, `cert_file`, `key_file`: what an `amqps://` connection trusts besides
    /// the system's roots, and the certificate it presents.
    pub broker_tls: BrokerTls,
    /// `broker.heartbeat`: both sides' AMQP heartbeat. A consumer that freezes or vanishes
    /// loses its deliveries to the broker within about two of them; the same period paces a
    /// consumer's notes about chunks that run long ([`crate::message::NoteTiming`]).
    pub broker_heartbeat: Duration,
    /// `[state]`: where the execution context lives.
    pub state: StateSpec,
    /// `[source]`: what the dispatcher reads.
    pub source: SourceSpec,
    /// `[chunking]`: how items are cut into chunks.
    pub chunking: Chunking,
    /// `[throttle]`: the window of outstanding chunks and the item rate.
    pub throttle: Throttle,
    /// `[processor]`: what the consumers do with a chunk.
    pub processor: ProcessorSpec,
    /// `[retry]`: how often and how late a chunk that failed transiently is attempted again.
    pub retry: RetryPolicy,
    /// `[failures]`: how many skipped items a run tolerates.
    pub failures: Failures,
    /// `[notify]`: whom to tell when a run ends.
    pub notify: Notify,
    /// `[metrics]`: where each binary serves its Prometheus metrics, if anywhere.
    pub metrics: MetricsSpec,
}

/// Where the binaries serve Prometheus metrics (`GET /metrics`); `--metrics ADDR` overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSpec {
    /// The dispatcher's address (`run`, `retry`).
    pub dispatcher: Option<std::net::SocketAddr>,
    /// Each consumer's address (port 0: any free port, logged at start).
    pub consumer: Option<std::net::SocketAddr>,
}

/// Where the execution context is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSpec {
    /// An SQLite file (the embedded default).
    Sqlite {
        /// The database file, resolved against the job file's directory.
        path: PathBuf,
    },
    /// Tables in a PostgreSQL database, shared by dispatchers on any host.
    Postgres {
        /// The database (`postgres://...`); its password is never logged.
        url: SecretUrl,
        /// The schema that holds the tables (`hopper` by default): a plain lower-case SQL
        /// identifier, so that it needs no quoting anywhere.
        schema: String,
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
    /// The rows of a query in a PostgreSQL database, read by key, one page at a time.
    Postgres {
        /// The database (`postgres://...`); its password is never logged.
        url: SecretUrl,
        /// The user's query; Hopper wraps it, so it has no `ORDER BY` or `LIMIT` of its own to
        /// keep.
        query: String,
        /// The columns of the query's result that identify a row: unique, not null, orderable.
        /// The scan goes in their order, and a chunk's position is the key of its rows.
        key: Vec<String>,
    },
}

impl SourceSpec {
    /// The key columns of a keyed source (a database); empty for a file, whose records are
    /// identified by their line.
    pub fn key(&self) -> &[String] {
        match self {
            SourceSpec::File { .. } => &[],
            SourceSpec::Postgres { key, .. } => key,
        }
    }
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

impl Chunking {
    /// Why `item` is bad data when it is larger than `max_bytes`: no chunk could carry it. The
    /// one place this rule is written; a first reading, a reading again and `retry` all ask it.
    pub fn too_large(&self, item: &crate::message::Item) -> Option<String> {
        let size = item.data.len() as u64;
        (size > self.max_bytes).then(|| {
            format!(
                "item of {size} bytes is larger than chunking.max_bytes ({})",
                self.max_bytes
            )
        })
    }
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
        /// The consumer's environment variables the command gets, by name, beside `PATH`,
        /// `HOME`, `LANG` and the chunk's `HOPPER_*`: nothing else of the consumer's
        /// environment (its secrets) reaches it.
        env: Vec<String>,
    },
    /// Write each chunk's items to `DIR/RUN/SEQ.jsonl`, atomically.
    File {
        /// The output directory, resolved against the job file's directory.
        dir: PathBuf,
    },
    /// Count the items and do nothing else.
    Noop,
    /// Run `statement` once per item in the job's PostgreSQL database, one transaction per
    /// chunk, with a record of the applied chunk in the same transaction.
    Postgres {
        /// The database (`postgres://...`); its password is never logged.
        url: SecretUrl,
        /// The SQL statement, with `$1`, `$2`, ... for the parameters.
        statement: String,
        /// The item fields bound to `$1`, `$2`, ..., in order.
        params: Vec<String>,
    },
    /// A processor written in Rust against the `hopper-consumer` library; it reads its own
    /// settings with [`Job::processor_options`].
    Custom {
        /// The `[processor.options]` table, as written.
        options: CustomOptions,
    },
}

impl ProcessorSpec {
    /// The `kind` as written in the job file.
    pub fn kind(&self) -> &'static str {
        match self {
            ProcessorSpec::Exec { .. } => "exec",
            ProcessorSpec::File { .. } => "file",
            ProcessorSpec::Noop => "noop",
            ProcessorSpec::Postgres { .. } => "postgres",
            ProcessorSpec::Custom { .. } => "custom",
        }
    }
}

/// The `[processor.options]` table of a `custom` processor, kept as written until that
/// processor reads it into its own type with [`Job::processor_options`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CustomOptions {
    /// The job file, for errors.
    file: PathBuf,
    table: toml::Table,
}

/// How a chunk that failed transiently is attempted again (the job file's `[retry]`; not to be
/// confused with the `retry` command, which dispatches again what a run failed on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per chunk, the first included; at least 1.
    pub max_attempts: u32,
    /// The delay before the second attempt; it doubles for each further attempt.
    pub backoff_min: Duration,
    /// The delay never grows past this.
    pub backoff_max: Duration,
    /// The limit on processing one attempt, enforced by the consumer: past it the processor is
    /// cancelled and the attempt fails transiently. Time spent waiting in a queue never counts.
    pub chunk_timeout: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `next` (2 for the first retry): `backoff_min * 2^(next-2)`,
    /// capped at `backoff_max`.
    pub fn delay_before(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(31);
        self.backoff_min
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// Whom to tell when a run ends, whatever its state: each gets the `status --json` object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notify {
    /// A program and its arguments (no shell), run in the job file's directory with the object
    /// on its standard input.
    pub command: Option<Vec<String>>,
    /// An `http://` or `https://` URL that receives the object as a JSON POST.
    pub webhook: Option<String>,
}

/// How many bad items a run tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    /// Skipped items (bad data and bad items) allowed; one more fails the run.
    pub skip_limit: u64,
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
        expand::expand_table(&mut table, "", env)
            .map_err(|(field, message)| field_err(&field, message))?;
        let raw: raw::RawJob = deserialize(table, path, "")?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        validate::validate(raw, path, dir).map_err(|(field, message)| field_err(field, message))
    }

    /// The `[processor.options]` table of a `custom` processor, read into the processor's own
    /// type.
    ///
    /// # Errors
    /// [`JobError::Field`] naming `processor.kind` when the job's processor is not `custom`, or
    /// the option that does not fit `T`.
    pub fn processor_options<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        match &self.processor {
            ProcessorSpec::Custom { options } => {
                deserialize(options.table.clone(), &options.file, "processor.options")
            }
            other => Err(JobError::Field {
                path: self.file.clone(),
                field: "processor.kind".to_string(),
                message: format!(
                    "is {:?}; processor options are for kind = \"custom\"",
                    other.kind()
                ),
            }),
        }
    }
}

/// Deserializes `table` (found at `prefix` in the job file `path`) into `T`, naming the field
/// that does not fit.
fn deserialize<T: DeserializeOwned>(
    table: toml::Table,
    path: &Path,
    prefix: &str,
) -> Result<T, JobError> {
    serde_path_to_error::deserialize(table).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner().to_string();
        let join = |a: &str, b: &str| match (a, b) {
            ("" | ".", b) => b.to_string(),
            (a, "" | ".") => a.to_string(),
            (a, b) => format!("{a}.{b}"),
        };
        let field = join(prefix, &at);
        // serde reports a missing field at its parent; name the field itself.
        let (field, message) = match inner.strip_prefix("missing field `") {
            Some(rest) => {
                let name = rest.split('`').next().unwrap_or(rest);
                (join(&field, name), "is required".to_string())
            }
            None => (field, inner),
        };
        JobError::Field {
            path: path.to_path_buf(),
            field,
            message,
        }
    })
}
