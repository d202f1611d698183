//! The embedded execution context: one SQLite file in WAL mode.
//!
//! Each call runs in place on its caller's thread (tokio told first; the blocking pool on a
//! single-threaded runtime) behind one mutex-guarded connection: the dispatcher is
//! the only writer, and `status` readers open their own connection (WAL lets them read while it
//! writes). Write transactions are `IMMEDIATE`: they take the write lock up front and wait for
//! it, where a deferred one that read first could fail outright on a lock taken by another
//! connection in between. `synchronous = NORMAL` makes a commit survive a crash of the process
//! (SIGKILL) but not of the machine; losing the last commits on power loss means chunks are read
//! and published again, which idempotent processors absorb.
//!
//! One file per table or concern: [`schema`], [`runs`], [`chunks`] (recording and confirming),
//! [`outcomes`] (applying replies), [`status`], [`retry`] (what the `retry` command reads).

mod chunks;
mod outcomes;
mod retry;
mod runs;
mod schema;
mod status;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hopper_common::Reply;
use rusqlite::Connection;

use super::{
    Alive, Applied, ChunkRecord, Claimed, ContextError, ContextStore, Fence, Moved, RecordBatch,
    Retryable, RunId, RunRecord, RunState, RunStatus, StuckAfter,
};

/// The SQLite store.
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

/// Errors inside a blocking call, given the path on the way out.
enum Fail {
    Sql(rusqlite::Error),
    Corrupt(String),
    Fenced { run: RunId, holder: String },
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl Fail {
    fn at(self, path: &Path) -> ContextError {
        let store = path.display().to_string();
        match self {
            Fail::Sql(source) => ContextError::Store {
                store,
                source: Box::new(source),
            },
            Fail::Corrupt(message) => ContextError::Corrupt { store, message },
            Fail::Fenced { run, holder } => ContextError::Fenced { run, holder },
        }
    }
}

/// True for SQLite's "busy" and "locked" answers: another connection holds the lock now.
fn busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its schema.
    ///
    /// # Errors
    /// [`ContextError`] when the file cannot be opened or holds another schema.
    pub(crate) fn open(path: &Path) -> Result<SqliteStore, ContextError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(ContextError::NoDirectory {
                    store: path.display().to_string(),
                    directory: dir.display().to_string(),
                });
            }
        }
        let setup = || -> Result<Connection, Fail> {
            let mut conn = Connection::open(path)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            schema::prepare(&mut conn)?;
            Ok(conn)
        };
        // Two processes opening a new file together (two dispatchers, or `status` beside a
        // starting one) can meet SQLite's busy answers that skip the busy handler (the switch
        // to WAL, the WAL index being made): the open is tried again, within the busy timeout.
        let started = std::time::Instant::now();
        let conn = loop {
            match setup() {
                Err(Fail::Sql(e)) if busy(&e) && started.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.map_err(|f| f.at(path))?,
            }
        };
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, in place.
    ///
    /// A call is a few tens of microseconds of SQLite; handing it to the blocking pool and
    /// back cost several times that in thread wake-ups, three times per chunk (recorded,
    /// confirmed, answered), all on the dispatch loop's path. So on a multi-threaded runtime it
    /// runs on the calling thread, which tokio tells first (`block_in_place`) so that a worker
    /// thread's other tasks move elsewhere meanwhile. A single-threaded runtime (unit tests) has
    /// no thread to spare and keeps the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T, ContextError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Fail> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let call = move || {
            // A poisoned lock only means another call panicked mid-way; SQLite rolled its
            // transaction back, so the connection is still usable.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        };
        let joined = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => Ok(tokio::task::block_in_place(call)),
            _ => tokio::task::spawn_blocking(call).await,
        };
        match joined {
            Ok(result) => result.map_err(|f| f.at(&self.path)),
            Err(join) => Err(Fail::Corrupt(format!("a store task failed: {join}")).at(&self.path)),
        }
    }
}

#[async_trait]
impl ContextStore for SqliteStore {
    async fn create_run(
        &self,
        job: &str,
        source: &str,
        input: &str,
        token: &str,
        alive: Alive,
    ) -> Result<Claimed<RunRecord>, ContextError> {
        let (job, source, token) = (job.to_string(), source.to_string(), token.to_string());
        let input = input.to_string();
        self.with(move |conn| runs::create(conn, &job, &source, &input, &token, alive))
            .await
    }

    async fn claim_run(&self, fence: &Fence, alive: Alive) -> Result<Claimed<()>, ContextError> {
        let fence = fence.clone();
        self.with(move |conn| runs::take(conn, &fence, runs::Take::Resume, alive))
            .await
    }

    async fn reopen_run(&self, fence: &Fence, alive: Alive) -> Result<Claimed<()>, ContextError> {
        let fence = fence.clone();
        self.with(move |conn| runs::take(conn, &fence, runs::Take::Retry, alive))
            .await
    }

    async fn retryable(&self, run: RunId) -> Result<Retryable, ContextError> {
        self.with(move |conn| retry::retryable(conn, run)).await
    }

    async fn rebase(
        &self,
        run: RunId,
        moves: &[Moved],
        checkpoint: u64,
        input: &str,
    ) -> Result<(), ContextError> {
        let (moves, input) = (moves.to_vec(), input.to_string());
        self.with(move |conn| retry::rebase(conn, run, &moves, checkpoint, &input))
            .await
    }

    async fn open_chunks(&self, run: RunId) -> Result<Vec<ChunkRecord>, ContextError> {
        self.with(move |conn| chunks::open(conn, run)).await
    }

    async fn delete_runs(&self, job: &str, before: u64) -> Result<u64, ContextError> {
        let job = job.to_string();
        self.with(move |conn| runs::delete_ended(conn, &job, before))
            .await
    }

    async fn control(
        &self,
        run: RunId,
        state: Option<RunState>,
        throttle: Option<hopper_common::job::Throttle>,
    ) -> Result<bool, ContextError> {
        self.with(move |conn| runs::control(conn, run, state, throttle.as_ref()))
            .await
    }

    async fn runs(&self, job: &str) -> Result<Vec<RunRecord>, ContextError> {
        let job = job.to_string();
        self.with(move |conn| runs::all(conn, &job)).await
    }

    async fn run(&self, job: &str, id: Option<RunId>) -> Result<Option<RunRecord>, ContextError> {
        let job = job.to_string();
        self.with(move |conn| runs::run_by(conn, &job, id)).await
    }

    async fn record(&self, fence: &Fence, batch: RecordBatch<'_>) -> Result<(), ContextError> {
        let fence = fence.clone();
        let batch = chunks::Batch {
            chunks: batch.chunks.to_vec(),
            ckpt: batch.checkpoint.clone(),
            bad: batch.bad_data.to_vec(),
            retried: batch.retried.to_vec(),
            retry: batch.retry,
        };
        self.with(move |conn| chunks::record(conn, &fence, batch))
            .await
    }

    async fn mark_in_flight(&self, fence: &Fence, seqs: &[u64]) -> Result<(), ContextError> {
        let (fence, seqs) = (fence.clone(), seqs.to_vec());
        self.with(move |conn| chunks::mark_in_flight(conn, &fence, &seqs))
            .await
    }

    async fn apply_replies(
        &self,
        fence: &Fence,
        replies: &[Reply],
    ) -> Result<Vec<Applied>, ContextError> {
        let (fence, replies) = (fence.clone(), replies.to_vec());
        self.with(move |conn| outcomes::apply(conn, &fence, &replies))
            .await
    }

    async fn heartbeat(&self, fence: &Fence) -> Result<(), ContextError> {
        let fence = fence.clone();
        self.with(move |conn| runs::heartbeat(conn, &fence)).await
    }

    async fn finish_run(&self, fence: &Fence, state: RunState) -> Result<(), ContextError> {
        let fence = fence.clone();
        self.with(move |conn| runs::finish(conn, &fence, state))
            .await
    }

    async fn status(&self, run: RunId, stuck: StuckAfter) -> Result<RunStatus, ContextError> {
        self.with(move |conn| status::status(conn, run, stuck))
            .await
    }
}
