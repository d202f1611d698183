//! Sources: where a run's records come from, read once, as a stream.
//!
//! A [`Source`] yields [`Read`]s in order: an item, or a record that could not be read (bad
//! data, skipped and reported with its line). Each read carries where it starts, so a chunk
//! knows its position and the checkpoint after it is exact. Reading is blocking; the dispatcher
//! runs a source on its own thread.
//!
//! Two kinds: a file ([`FileSource`]), whose records are found again by byte offset and line,
//! and a PostgreSQL query ([`PostgresSource`]), whose rows are found again by key: each read of
//! a keyed source carries its key, which chunks and failures record beside their line (for a
//! query, the row's ordinal in the scan).

mod file;
mod fingerprint;
mod postgres;
mod reread;

use hopper_common::job::SourceSpec;
use hopper_common::{Item, Position};

pub use file::FileSource;
pub(crate) use fingerprint::Fingerprint;
pub(crate) use postgres::Bounds;
pub use postgres::PostgresSource;
pub(crate) use reread::reread;

/// A source that cannot go on. At the start of a run this is bad input (exit 2); mid-run the
/// run stops and can be resumed from its checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The input cannot be opened.
    #[error("cannot open input {path}: {source}")]
    Open {
        /// The input file.
        path: String,
        /// The system's reason.
        source: std::io::Error,
    },
    /// `retry` found the input moved: a failed record is no longer where the run read it, once
    /// the length changes of the fixed records are accounted for. Nothing was sent.
    #[error(
        "input {path} changed outside the failed records: {detail}; `retry` reads the \
             failed records at the byte offsets the run recorded, so fix them in place and do \
             not add, remove or edit other lines"
    )]
    Moved {
        /// The input file.
        path: String,
        /// What does not match.
        detail: String,
    },
    /// A chunk recorded before an interruption, read again to be published again, no longer
    /// holds what it held: the input changed under the run.
    #[error("the input changed: chunk {seq} at line {line} had {expected} items, now {found}; resume with the input the run started with")]
    Changed {
        /// The chunk that no longer matches.
        seq: u64,
        /// Its first line.
        line: u64,
        /// Items recorded when it was first read.
        expected: u64,
        /// Items read there now.
        found: u64,
    },
    /// `run --resume` found the input changed since the run started reading it: it reads on at
    /// byte offsets recorded from the input as it was. Nothing was sent.
    #[error("input {path} changed since run {run} started reading it: {detail}; `run --resume` reads on at the byte offsets it recorded, so it needs the input as it was: put it back, or start a new run (to fix failed records, let the run finish, then `retry` it)")]
    Edited {
        /// The input file.
        path: String,
        /// The run.
        run: u64,
        /// What changed.
        detail: String,
    },
    /// The source's query or key cannot be used (it does not prepare, a column cannot be
    /// mapped, a key column is missing or holds NULLs). Nothing was sent.
    #[error("field `{field}`: {message}")]
    Query {
        /// `source.query`, `source.key` or `source.url`.
        field: &'static str,
        /// What is wrong, with the database's own message.
        message: String,
    },
    /// The source's database cannot be reached.
    #[error("cannot connect to the source database at {place}: {message}")]
    Unreachable {
        /// Host and port (never the password).
        place: String,
        /// The driver's reason.
        message: String,
    },
    /// Reading the query's rows failed part-way, after retries.
    #[error("cannot read the rows of source.query after key {after}: {message}; `run --resume` reads on from the checkpoint")]
    Fetch {
        /// The key of the last row read.
        after: String,
        /// The database's reason.
        message: String,
    },
    /// `run --resume` found the source's query or key changed since the run started: it reads
    /// on after a key of the query as it was. Nothing was sent.
    #[error("source.query or source.key changed since run {run} started reading: `run --resume` reads on after the last key it read, which only means something for the same query; put them back, or start a new run")]
    QueryChanged {
        /// The run.
        run: u64,
    },
    /// Reading failed part-way.
    #[error("cannot read input {path} at byte {offset}: {message}")]
    Read {
        /// The input file.
        path: String,
        /// Where reading stopped: where `--resume` reads on from once it is fixed.
        offset: u64,
        /// The system's or the parser's reason.
        message: String,
    },
}

/// One record as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A good item.
    Item(Item),
    /// A record that could not be read; it is skipped and reported.
    Bad {
        /// Its line number.
        line: u64,
        /// Why it could not be read.
        reason: String,
    },
}

impl SourceError {
    /// True when trying again may work: the database went away.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. } | SourceError::Fetch { .. } => true,
            SourceError::Open { .. }
            | SourceError::Moved { .. }
            | SourceError::Changed { .. }
            | SourceError::Edited { .. }
            | SourceError::Query { .. }
            | SourceError::QueryChanged { .. }
            | SourceError::Read { .. } => false,
        }
    }
}

/// A record and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// An item, or a record that could not be read.
    pub record: Record,
    /// Its start: line number and byte offset (for a query: its ordinal in the scan, for both).
    pub start: Position,
    /// For a keyed source, the record's key as JSON: how it is found again.
    pub key: Option<String>,
}

/// Where reading stands: the byte offset of the next record, and how many lines lie before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Byte offset of the next record.
    pub offset: u64,
    /// Lines consumed so far.
    pub lines: u64,
}

/// A stream of records.
pub trait Source: Send {
    /// The next record, or `None` at the end.
    ///
    /// # Errors
    /// [`SourceError::Read`] when the input cannot be read further.
    fn next(&mut self) -> Result<Option<Read>, SourceError>;

    /// Where the next record starts.
    fn cursor(&self) -> Cursor;

    /// The input's size in bytes, when known, for progress.
    fn size_bytes(&self) -> Option<u64>;

    /// What this source reads, for people: `file data/x.jsonl (jsonl)`.
    fn describe(&self) -> String;

    /// For a keyed source, the key of the last record read (before any: where reading
    /// started); `None` for a file.
    fn key(&self) -> Option<String> {
        None
    }
}

/// Checks what the job reads before anything is sent: for a query, that the database answers
/// and the query and its key can be used. A file is checked when it is opened.
///
/// # Errors
/// [`SourceError::Query`] (exit 2), [`SourceError::Unreachable`] (exit 1).
pub(crate) async fn check(spec: &SourceSpec) -> Result<(), SourceError> {
    match spec {
        SourceSpec::File { .. } => Ok(()),
        SourceSpec::Postgres { url, query, key } => postgres::inspect(url, query, key).await,
    }
}

/// The input a job names, for messages: the file's path.
pub(crate) fn input_name(spec: &SourceSpec) -> String {
    match spec {
        SourceSpec::File { path, .. } => path.display().to_string(),
        SourceSpec::Postgres { .. } => "source.query".to_string(),
    }
}

/// Opens the source a job names, at its beginning. A record longer than `max_record` bytes
/// (the job's `chunking.max_bytes`: no chunk could carry it) is bad data, skipped without being
/// held in memory.
///
/// # Errors
/// [`SourceError::Open`] when the input cannot be opened.
pub fn open(spec: &SourceSpec, max_record: u64) -> Result<Box<dyn Source>, SourceError> {
    open_at(spec, Cursor::default(), None, max_record)
}

/// Opens the source a job names, positioned at `at` (a checkpoint, or where a chunk starts);
/// a keyed source reads on after the key `after`.
///
/// # Errors
/// [`SourceError::Open`] when the input cannot be opened or positioned.
pub fn open_at(
    spec: &SourceSpec,
    at: Cursor,
    after: Option<String>,
    max_record: u64,
) -> Result<Box<dyn Source>, SourceError> {
    match spec {
        SourceSpec::File { path, format } => Ok(Box::new(
            FileSource::open_at(path, *format, at)?.with_max_record(max_record),
        )),
        SourceSpec::Postgres { url, query, key } => Ok(Box::new(PostgresSource::open(
            url,
            query,
            key,
            Bounds::Scan { after },
            at.lines,
        )?)),
    }
}

/// Opens a keyed source on `bounds` (a chunk's range, or rows by key), its first row numbered
/// `rows + 1`.
///
/// # Errors
/// [`SourceError::Query`] when the job's source has no keys (a file).
pub(crate) fn open_keyed(
    spec: &SourceSpec,
    bounds: Bounds,
    rows: u64,
) -> Result<Box<dyn Source>, SourceError> {
    match spec {
        SourceSpec::Postgres { url, query, key } => Ok(Box::new(PostgresSource::open(
            url, query, key, bounds, rows,
        )?)),
        SourceSpec::File { .. } => Err(SourceError::Query {
            field: "source.kind",
            message: "a file is not read by key".into(),
        }),
    }
}

/// Opens the source a job names at `at`, to read about `span` bytes from there (a chunk or a
/// record read again, rather than the rest of the input).
///
/// # Errors
/// [`SourceError::Open`] when the input cannot be opened or positioned.
pub fn open_span(
    spec: &SourceSpec,
    at: Cursor,
    span: u64,
    max_record: u64,
) -> Result<Box<dyn Source>, SourceError> {
    match spec {
        SourceSpec::File { path, format } => Ok(Box::new(
            FileSource::open_span(path, *format, at, span)?.with_max_record(max_record),
        )),
        SourceSpec::Postgres { .. } => Err(SourceError::Query {
            field: "source.kind",
            message: "a query is read again by key, not by byte offset".into(),
        }),
    }
}
