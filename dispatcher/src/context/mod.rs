//! The execution context: every run, every chunk and every failure, kept so that a run can be
//! watched (`status`), resumed and retried.
//!
//! Invariants the dispatcher relies on:
//! - [`ContextStore::record`] writes chunks (status `pending`) together with the source
//!   checkpoint after them in one transaction, *before* they are published (record, then
//!   publish).
//! - [`ContextStore::apply_replies`] applies a reply at most once per chunk: a reply for a chunk
//!   that already has a final status, or an older attempt, is an [`Applied::Duplicate`]; a reply
//!   for a chunk the store does not know is [`Applied::Unknown`]. Neither changes anything.
//! - Counters are derived from the chunk and failure rows, never kept twice.
//!
//! [`model`] holds what is stored, [`report`] what `status` reads, [`rules`] what every store
//! decides the same way; [`sqlite`] is the embedded store, [`postgres`] the shared one. A
//! library user holds an
//! [`ExecutionContext`] and never sees the store behind it.

#[cfg(test)]
mod conformance;
mod model;
mod postgres;
mod report;
mod rules;
mod sqlite;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hopper_common::{Job, Reply, StateSpec};

pub(crate) use model::{
    Alive, Applied, BadData, ChunkRecord, ChunkStatus, Claimed, FailedChunk, Fence, Keys, Moved,
    NewChunk, OpenFailure, RecordBatch, Retried, Retryable, CANCELLED_BY,
};
pub use model::{Checkpoint, FailureClass, FailureRecord, RunId, RunRecord, RunState};
use postgres::PostgresStore;
pub(crate) use report::StuckAfter;
pub use report::{ChunkCounts, InProgress, ItemCounts, RecentReading, RunStatus, StuckChunk};
use sqlite::SqliteStore;

/// The execution context cannot be read or written. The dispatcher cannot go on without it: it
/// stops, and the run can be resumed once the store is reachable again.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The store could not be opened, read or written.
    #[error("execution context {store}: {source}")]
    Store {
        /// Which store: the SQLite file, or the database (without its password) and schema.
        store: String,
        /// The database's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The directory the job's `state.url` names does not exist. Hopper does not create it, so
    /// that a mistyped path is refused rather than made (exit 2).
    #[error("execution context {store}: its directory {directory} does not exist; create it, or correct state.url")]
    NoDirectory {
        /// Which store: the SQLite file.
        store: String,
        /// The missing directory.
        directory: String,
    },
    /// The job's `[state]` cannot be used as written (a URL that does not parse): nothing was
    /// sent (exit 2).
    #[error("execution context {store}: {message}; correct state.url")]
    Config {
        /// Which store, without its password.
        store: String,
        /// What is wrong with it.
        message: String,
    },
    /// Another dispatcher took the run over: this one must stop writing it (and does, at once).
    #[error("run {run} was taken over by the dispatcher {holder}; this one stops")]
    Fenced {
        /// The run.
        run: RunId,
        /// The dispatcher that owns it now (`host/pid`).
        holder: String,
    },
    /// The store holds something this build cannot read (another schema, an unknown state).
    #[error("execution context {store}: {message}")]
    Corrupt {
        /// Which store: the SQLite file.
        store: String,
        /// What cannot be read, and what to do about it.
        message: String,
    },
}

impl ContextError {
    /// The exit code of the contract: 2 for a `state.url` that names a missing directory or
    /// does not parse (bad job file: nothing was sent), 1 when the store failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            ContextError::NoDirectory { .. } | ContextError::Config { .. } => 2,
            ContextError::Store { .. }
            | ContextError::Fenced { .. }
            | ContextError::Corrupt { .. } => 1,
        }
    }
}

/// A job's execution context, opened: what `run`, `resume`, `retry` and `status` read and
/// write. Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct ExecutionContext {
    store: Arc<dyn ContextStore>,
}

impl std::fmt::Debug for ExecutionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionContext").finish_non_exhaustive()
    }
}

impl ExecutionContext {
    /// Opens (creating if needed) the execution context the job file's `[state]` names: an
    /// SQLite file, or a schema in a PostgreSQL database (created on first use).
    ///
    /// # Errors
    /// [`ContextError`] when the store cannot be opened or reached, or holds another schema.
    pub async fn open(job: &Job) -> Result<ExecutionContext, ContextError> {
        let store: Arc<dyn ContextStore> = match &job.state {
            StateSpec::Sqlite { path } => Arc::new(SqliteStore::open(path)?),
            StateSpec::Postgres { url, schema } => {
                Arc::new(PostgresStore::open(url, schema).await?)
            }
        };
        Ok(ExecutionContext { store })
    }

    /// The execution context the job file names, if it exists: `None` for a job never run,
    /// without creating anything (`status` only reads).
    ///
    /// # Errors
    /// [`ContextError`] when the store exists but cannot be opened or holds another schema,
    /// or its database cannot be reached.
    pub async fn open_existing(job: &Job) -> Result<Option<ExecutionContext>, ContextError> {
        match &job.state {
            StateSpec::Sqlite { path } if !path.exists() => Ok(None),
            StateSpec::Sqlite { .. } => ExecutionContext::open(job).await.map(Some),
            StateSpec::Postgres { url, schema } => {
                let store = PostgresStore::open_existing(url, schema).await?;
                Ok(store.map(|s| ExecutionContext { store: Arc::new(s) }))
            }
        }
    }

    /// The store, for the dispatcher's own modules.
    pub(crate) fn store(&self) -> &Arc<dyn ContextStore> {
        &self.store
    }
}

/// The execution context's storage: SQLite, the embedded default, or PostgreSQL, shared between
/// dispatcher hosts. Both pass one conformance suite (`conformance`).
#[async_trait]
pub(crate) trait ContextStore: Send + Sync {
    /// Starts a run of `job` reading `source` (a description for people) whose input has the
    /// fingerprint `input`, in state `running`, owned by this process and writable with `token`
    /// ([`Fence::token`]).
    ///
    /// This and the two calls below take a run only when no dispatcher `alive` calls alive
    /// owns a run of the job that has not ended ([`Claimed::Held`] otherwise): one job, one live
    /// dispatcher. The check and the claim are one transaction, so of two dispatchers started
    /// at the same moment exactly one wins.
    async fn create_run(
        &self,
        job: &str,
        source: &str,
        input: &str,
        token: &str,
        alive: Alive,
    ) -> Result<Claimed<RunRecord>, ContextError>;

    /// A dispatcher takes over an interrupted run: `fence` becomes its token, with a fresh
    /// heartbeat. Whoever held it before is fenced off.
    async fn claim_run(&self, fence: &Fence, alive: Alive) -> Result<Claimed<()>, ContextError>;

    /// `retry` takes an ended run up again: it is `running` again, owned through `fence`.
    async fn reopen_run(&self, fence: &Fence, alive: Alive) -> Result<Claimed<()>, ContextError>;

    /// The failed and dead chunks and the skipped items of a run that `retry` has not
    /// dispatched again yet.
    async fn retryable(&self, run: RunId) -> Result<Retryable, ContextError>;

    /// Before a `retry` reads the fixed input: moves the recorded spans of what it will read,
    /// and the checkpoint, to where they lie now, and records the input's fingerprint now, in
    /// one transaction.
    async fn rebase(
        &self,
        run: RunId,
        moves: &[Moved],
        checkpoint: u64,
        input: &str,
    ) -> Result<(), ContextError>;

    /// The run's chunks without a final outcome (`pending` and `in_flight`), in seq order.
    async fn open_chunks(&self, run: RunId) -> Result<Vec<ChunkRecord>, ContextError>;

    /// Removes the runs of `job` that ended before `before` (ms since the Unix epoch), with
    /// their chunks and failures, in one transaction; returns how many. Runs not ended stay.
    async fn delete_runs(&self, job: &str, before: u64) -> Result<u64, ContextError>;

    /// What an operator controls of run `run` while it has not ended: its `state` (running or
    /// paused) and its own throttle; the run's dispatcher reads them ([`ContextStore::run`]).
    /// Returns false when the run has ended (nothing written).
    async fn control(
        &self,
        run: RunId,
        state: Option<RunState>,
        throttle: Option<hopper_common::job::Throttle>,
    ) -> Result<bool, ContextError>;

    /// Every run of `job`, newest first.
    async fn runs(&self, job: &str) -> Result<Vec<RunRecord>, ContextError>;

    /// The run `id` of `job`, or its latest run when `id` is `None`.
    async fn run(&self, job: &str, id: Option<RunId>) -> Result<Option<RunRecord>, ContextError>;

    /// Records chunks (as `pending`), the checkpoint after them and the bad records met on the
    /// way, in one transaction; for a retry, also marks what they take over from as retried.
    /// Called before the chunks are published.
    async fn record(&self, fence: &Fence, batch: RecordBatch<'_>) -> Result<(), ContextError>;

    /// The broker confirmed these chunks: `pending` becomes `in_flight`. A chunk that already
    /// has a reply is left as it is. One transaction.
    async fn mark_in_flight(&self, fence: &Fence, seqs: &[u64]) -> Result<(), ContextError>;

    /// Applies consumers' replies, each at most once per chunk and attempt, in one transaction;
    /// one [`Applied`] per reply, in order. The fence is the dispatcher's own run: replies of
    /// other runs (late ones) are applied to their runs' records all the same.
    async fn apply_replies(
        &self,
        fence: &Fence,
        replies: &[Reply],
    ) -> Result<Vec<Applied>, ContextError>;

    /// The owner is alive: a fresh heartbeat, so no other dispatcher takes the run over.
    async fn heartbeat(&self, fence: &Fence) -> Result<(), ContextError>;

    /// Ends a run in `state`.
    async fn finish_run(&self, fence: &Fence, state: RunState) -> Result<(), ContextError>;

    /// Counts, failures, chunks in progress and stuck chunks of a run, `stuck` telling which.
    async fn status(&self, run: RunId, stuck: StuckAfter) -> Result<RunStatus, ContextError>;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
