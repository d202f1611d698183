//! The execution context in PostgreSQL: the same runs, chunks and failures as the SQLite store,
//! in tables of their own schema, so that `status`, `--resume` and `retry` work from any host
//! that reaches the database, and a dispatcher started by a scheduler on another host finds the
//! run where the last one left it.
//!
//! Invariants:
//! - Every write of a run's state locks the run's row (`FOR UPDATE`) and compares the owner's
//!   token in the same transaction ([`runs::check`]): a dispatcher that lost the run to another
//!   host stops at its next write, as with SQLite.
//! - Taking a run (create, resume, retry) holds a transaction-scoped advisory lock on the job
//!   while it checks for a live owner and claims: of two dispatchers of one job started at the
//!   same moment on two hosts, exactly one wins.
//! - `status` reads in one repeatable-read transaction: its counts are one snapshot.
//! - Connections set `search_path` to the store's schema: the SQL names its tables plainly, and
//!   the schema holds nothing but Hopper's tables.
//!
//! One file per concern, as for SQLite: [`schema`] (created on first use, versioned
//! migrations), [`runs`], [`chunks`], [`outcomes`], [`retry`], [`status`]. What both stores
//! decide the same way is in [`super::rules`].

mod chunks;
mod outcomes;
mod retry;
mod runs;
mod schema;
mod status;
#[cfg(test)]
mod tests;

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use hopper_common::job::redact_url;
use hopper_common::postgres::{describe, PgLink};
use hopper_common::Reply;

use super::{
    Alive, Applied, ChunkRecord, Claimed, ContextError, ContextStore, Fence, Moved, RecordBatch,
    Retryable, RunId, RunRecord, RunState, RunStatus, StuckAfter,
};

/// A transaction of the store's, on a pooled connection.
type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// How long the store waits for a connection before it says the database cannot be reached.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the database lets a session of the store sit inside a transaction with nothing
/// sent. The store's transactions take milliseconds; a dispatcher frozen in one (a stopped
/// process, a paused VM) would otherwise hold its run's row locked for ever, and the host that
/// takes the run over (after [`Alive`]'s 30 s) would wait on it for ever. Ended by the
/// database, the session's transaction is rolled back; the frozen dispatcher, woken, writes
/// again on a new connection and meets the fence.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// A transaction that took this long, against the milliseconds the store's take, was frozen in
/// the middle (half [`IDLE_IN_TRANSACTION`], a margin before the database ends the session): it
/// is rolled back and run once more instead of committed. Its session may have been ended
/// already without this process having seen it yet, and a commit sent into it would fail as
/// "connection closed", which cannot tell a commit never received from one applied before the
/// connection dropped.
const STALLED: Duration = Duration::from_secs(IDLE_IN_TRANSACTION.as_secs() / 2);

/// Connections a dispatcher holds: its writes are serial, beside them the heartbeat and a
/// `status` or control of its own.
const POOL_SIZE: usize = 4;

/// The PostgreSQL store.
#[derive(Clone)]
pub(crate) struct PostgresStore {
    pool: Pool,
    /// Where it is, for messages: the URL without its password, and the schema.
    place: String,
    /// How connections are made, to say why one could not be.
    link: PgLink,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("place", &self.place)
            .finish_non_exhaustive()
    }
}

/// Errors inside a store call, given the place on the way out.
#[derive(Debug)]
enum Fail {
    Sql(tokio_postgres::Error),
    Corrupt(String),
    Fenced { run: RunId, holder: String },
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Sql(e)
    }
}

impl Fail {
    fn at(self, place: &str) -> ContextError {
        let store = place.to_string();
        match self {
            Fail::Sql(e) => ContextError::Store {
                store,
                source: describe(&e).into(),
            },
            Fail::Corrupt(message) => ContextError::Corrupt { store, message },
            Fail::Fenced { run, holder } => ContextError::Fenced { run, holder },
        }
    }
}

/// Runs `$body` (an expression that borrows the transaction `$tx` and returns
/// `Result<T, Fail>`) in one transaction on a pooled connection, committed when it succeeds.
///
/// A connection found closed before the commit was sent (the database ended the session: a
/// restart, or [`IDLE_IN_TRANSACTION`] passed while this process was frozen) committed
/// nothing, so the transaction is run once more on a new connection: a dispatcher frozen in
/// the middle of a write and woken after another host took its run meets the fence there, as
/// at any other write, instead of a dead connection. The session's end shows either as a closed
/// connection or, when the database's last word reaches a statement still waiting, as that
/// word ([`session_ended`]): both are the same case. The commit is in that case too when the
/// connection was closed before it was sent, or when the database ended the session for
/// sitting idle in its transaction (it had received no commit); a commit lost in any other way
/// may have been applied, and is never run again blindly. So that it is not lost that way, a
/// transaction that stalled past [`STALLED`] is not committed but rolled back and run once more.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut again = true;
        loop {
            let mut client = $store.client().await?;
            // The error, and whether nothing can have been committed; `None`: rolled back for
            // having stalled.
            let done: Result<Option<_>, (Fail, bool)> = async {
                let began = std::time::Instant::now();
                let $tx = client.transaction().await.map_err(|e| (Fail::from(e), true))?;
                let out = $body.await.map_err(|f| (f, true))?;
                if again && began.elapsed() >= STALLED {
                    // Dropped uncommitted: rolled back, or already by the database.
                    return Ok(None);
                }
                // A connection already closed sends no commit; and a session ended for sitting
                // idle in its transaction never received one.
                let unsent = $tx.client().is_closed();
                $tx.commit().await.map_err(|e| {
                    use tokio_postgres::error::SqlState;
                    let idle = e.code() == Some(&SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT);
                    (Fail::from(e), unsent || idle)
                })?;
                Ok(Some(out))
            }
            .await;
            match done {
                Ok(Some(out)) => break Ok(out),
                Ok(None) => {
                    tracing::warn!(store = %$store.place,
                                   "this process stalled inside a transaction of the execution \
                                    context; rolled back, once more");
                    again = false;
                }
                Err((Fail::Sql(e), true)) if again && (e.is_closed() || session_ended(&e)) => {
                    tracing::warn!(store = %$store.place, error = %describe(&e),
                                   "the execution context's connection was closed; once more");
                    again = false;
                }
                Err((f, _)) => break Err(f.at(&$store.place)),
            }
        }
    }};
}

/// The database's error as it ends a session: the idle-in-transaction timeout, or an
/// administrator's or a shutdown's termination. Whatever the session had not committed is
/// rolled back.
fn session_ended(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|code| {
        *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
    })
}

impl PostgresStore {
    /// Connects to the store at `url` in `schema`, creating or migrating its tables.
    ///
    /// # Errors
    /// [`ContextError::Config`] for a URL that does not parse; [`ContextError::Store`] when the
    /// database cannot be reached or refuses; [`ContextError::Corrupt`] for a store of a newer
    /// schema version.
    pub(crate) async fn open(url: &str, schema: &str) -> Result<PostgresStore, ContextError> {
        match PostgresStore::connect(url, schema, true).await? {
            Some(store) => Ok(store),
            None => Err(ContextError::Corrupt {
                store: format!("{} (schema {schema})", redact_url(url)),
                message: "the schema was not created".to_string(),
            }),
        }
    }

    /// The store at `url` in `schema` if its tables exist: `None`, and nothing created,
    /// otherwise (`status` only reads).
    ///
    /// # Errors
    /// As [`PostgresStore::open`].
    pub(crate) async fn open_existing(
        url: &str,
        schema: &str,
    ) -> Result<Option<PostgresStore>, ContextError> {
        PostgresStore::connect(url, schema, false).await
    }

    /// Connects; creates or migrates the tables when `create`, and otherwise returns `None`
    /// for a schema that holds none.
    async fn connect(
        url: &str,
        schema: &str,
        create: bool,
    ) -> Result<Option<PostgresStore>, ContextError> {
        let place = format!("{} (schema {schema})", redact_url(url));
        let mut link = PgLink::parse(url).map_err(|message| ContextError::Config {
            store: place.clone(),
            message,
        })?;
        let config = link.config_mut();
        // The schema is a plain identifier (the job file's validation): no quoting needed.
        let ours = format!(
            "-c search_path={schema} -c idle_in_transaction_session_timeout={}s",
            IDLE_IN_TRANSACTION.as_secs()
        );
        let options = match config.get_options() {
            Some(given) => format!("{given} {ours}"),
            None => ours,
        };
        config.options(&options);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            // What an operator sees in pg_stat_activity.
            config.application_name("hopper-dispatcher (execution context)");
        }
        let address = link.place();
        let manager = Manager::from_config(
            link.config().clone(),
            link.tls(),
            // A pooled connection is tried before it is used again: one the database closed
            // (a restart, a terminated backend) is replaced, not handed to a write that would
            // fail on it and stop the run.
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(CONNECT_TIMEOUT * 3))
            .build()
            .map_err(|e| ContextError::Config {
                store: place.clone(),
                message: e.to_string(),
            })?;
        let store = PostgresStore { pool, place, link };
        let mut client = store.client().await.map_err(|e| match e {
            ContextError::Store { store, source } => ContextError::Store {
                store,
                source: format!("cannot connect to PostgreSQL at {address}: {source}").into(),
            },
            other => other,
        })?;
        let ready = schema::prepare(&mut client, schema, create)
            .await
            .map_err(|f| f.at(&store.place))?;
        Ok(ready.then_some(store))
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<Object, ContextError> {
        self.pool.get().await.map_err(|e| {
            let message = match e {
                deadpool_postgres::PoolError::Backend(e) => self.link.explain(&e),
                other => other.to_string(),
            };
            ContextError::Store {
                store: self.place.clone(),
                source: message.into(),
            }
        })
    }
}

#[async_trait]
impl ContextStore for PostgresStore {
    async fn create_run(
        &self,
        job: &str,
        source: &str,
        input: &str,
        token: &str,
        alive: Alive,
    ) -> Result<Claimed<RunRecord>, ContextError> {
        in_tx!(self, |tx| runs::create(
            &tx, job, source, input, token, alive
        ))
    }

    async fn claim_run(&self, fence: &Fence, alive: Alive) -> Result<Claimed<()>, ContextError> {
        in_tx!(self, |tx| runs::take(&tx, fence, runs::Take::Resume, alive))
    }

    async fn reopen_run(&self, fence: &Fence, alive: Alive) -> Result<Claimed<()>, ContextError> {
        in_tx!(self, |tx| runs::take(&tx, fence, runs::Take::Retry, alive))
    }

    async fn retryable(&self, run: RunId) -> Result<Retryable, ContextError> {
        in_tx!(self, |tx| retry::retryable(&tx, run))
    }

    async fn rebase(
        &self,
        run: RunId,
        moves: &[Moved],
        checkpoint: u64,
        input: &str,
    ) -> Result<(), ContextError> {
        in_tx!(self, |tx| retry::rebase(&tx, run, moves, checkpoint, input))
    }

    async fn open_chunks(&self, run: RunId) -> Result<Vec<ChunkRecord>, ContextError> {
        in_tx!(self, |tx| chunks::open(&tx, run))
    }

    async fn delete_runs(&self, job: &str, before: u64) -> Result<u64, ContextError> {
        in_tx!(self, |tx| runs::delete_ended(&tx, job, before))
    }

    async fn control(
        &self,
        run: RunId,
        state: Option<RunState>,
        throttle: Option<hopper_common::job::Throttle>,
    ) -> Result<bool, ContextError> {
        in_tx!(self, |tx| runs::control(&tx, run, state, throttle.as_ref()))
    }

    async fn runs(&self, job: &str) -> Result<Vec<RunRecord>, ContextError> {
        in_tx!(self, |tx| runs::all(&tx, job))
    }

    async fn run(&self, job: &str, id: Option<RunId>) -> Result<Option<RunRecord>, ContextError> {
        in_tx!(self, |tx| runs::run_by(&tx, job, id))
    }

    async fn record(&self, fence: &Fence, batch: RecordBatch<'_>) -> Result<(), ContextError> {
        in_tx!(self, |tx| chunks::record(&tx, fence, batch))
    }

    async fn mark_in_flight(&self, fence: &Fence, seqs: &[u64]) -> Result<(), ContextError> {
        in_tx!(self, |tx| chunks::mark_in_flight(&tx, fence, seqs))
    }

    async fn apply_replies(
        &self,
        fence: &Fence,
        replies: &[Reply],
    ) -> Result<Vec<Applied>, ContextError> {
        in_tx!(self, |tx| outcomes::apply(&tx, fence, replies))
    }

    async fn heartbeat(&self, fence: &Fence) -> Result<(), ContextError> {
        in_tx!(self, |tx| runs::heartbeat(&tx, fence))
    }

    async fn finish_run(&self, fence: &Fence, state: RunState) -> Result<(), ContextError> {
        in_tx!(self, |tx| runs::finish(&tx, fence, state))
    }

    async fn status(&self, run: RunId, stuck: StuckAfter) -> Result<RunStatus, ContextError> {
        let mut client = self.client().await?;
        let done: Result<_, Fail> = async {
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let status = status::status(&tx, run, stuck).await?;
            tx.commit().await?;
            Ok(status)
        }
        .await;
        done.map_err(|f| f.at(&self.place))
    }
}
