//! `postgres`: runs the job's statement once per item in its PostgreSQL database, one
//! transaction per chunk.
//!
//! Invariants:
//! - **Exactly-once effect.** The transaction that applies a chunk starts by inserting a row
//!   in `hopper.applied_chunks` (job, run, seq; the chunk's bad items are set on it before the
//!   commit), sent in one pipeline with the chunk's statement. A chunk delivered again after it
//!   committed finds that row (the insert does nothing): its work is rolled back and the
//!   recorded outcome returned, without anything applied twice: the target table needs no
//!   unique key. Two consumers applying one chunk at once (a redelivery while the first still
//!   works): the second's insert waits for the first's transaction, then does nothing once it
//!   committed, or claims the chunk if it rolled back.
//! - **Bad items are the database's refusals of their data.** SQLSTATE class 22 (data
//!   exception) and 23 (integrity constraint) for one item make it a bad item, listed with the
//!   database's message; the rest of the chunk commits. A missing field, or an item that is not
//!   a JSON object, is a bad item before the database sees it.
//! - **Failures are classified by SQLSTATE, never by message**: connection loss, serialization
//!   failures, deadlocks, lock timeouts, cancellation and a restarting server are transient
//!   (retried with backoff); a statement the database cannot run (class 42: a missing table, a
//!   permission) is permanent.
//! - **Fast path first.** The items of a chunk go as one statement ([`batch`]: a plain
//!   `INSERT ... VALUES` as one set-based `INSERT ... SELECT` over arrays, any other statement
//!   as a temporary function called once per item from one query over arrays), or,
//!   where that cannot be used, pipelined; only when the database refuses one of them is the
//!   chunk done again item by item, each under a savepoint, to find which.
//!
//! Parameters are sent in PostgreSQL's text format and converted by the database to the types
//! the statement declares ([`hopper_common::postgres::text_for`] says how each JSON value goes).
//! Batched, a chunk's values go straight from the items' JSON into one array per parameter,
//! in the binary format where a value's binary form is exactly what the database makes of its
//! text ([`columns`]).

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::join_all;
use hopper_common::postgres::{describe, into_text, PgLink, Text};
use hopper_common::{Chunk, Item};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use super::{BuildError, ProcessError, Processed, Processor};

mod batch;
mod columns;
mod fields;

use batch::Batch;
use fields::Fields;

/// Where each applied chunk is recorded, created on first use.
const APPLIED: &str = "
CREATE SCHEMA IF NOT EXISTS hopper;
CREATE TABLE IF NOT EXISTS hopper.applied_chunks (
    job        text        NOT NULL,
    run        bigint      NOT NULL,
    seq        bigint      NOT NULL,
    bad        jsonb       NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, run, seq)
);";

/// Records a chunk as applied, in the transaction that applies it; 0 rows when it was already.
/// Its outcome's bad items are set afterwards, if there are any.
const CLAIM: &str =
    "INSERT INTO hopper.applied_chunks (job, run, seq, bad) VALUES ($1, $2, $3, '[]')
                     ON CONFLICT DO NOTHING";

/// The `postgres` processor: a pool of connections to the job's database.
pub struct PostgresProcessor {
    pool: Pool,
    statement: String,
    params: Vec<String>,
    /// Batched execution, when the statement allows it and the database took it at start.
    batch: Option<Batch>,
}

impl std::fmt::Debug for PostgresProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresProcessor")
            .field("statement", &self.statement)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// What the database did with an item or a chunk, from its SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The item's data was refused: skip it.
    BadItem,
    /// Might work later: retry the chunk.
    Transient,
    /// Will not work however often it is tried.
    Permanent,
}

/// Decides what a database error means, by its SQLSTATE class.
fn verdict(e: &tokio_postgres::Error) -> Verdict {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed.
        return Verdict::Transient;
    };
    if code == &SqlState::LOCK_NOT_AVAILABLE {
        // A lock timeout (55P03) passes.
        return Verdict::Transient;
    }
    match &code.code()[..2] {
        "22" | "23" => Verdict::BadItem,
        // Connection, transaction rollback (serialization, deadlock), resources, operator
        // intervention (shutdown, cancel), system errors.
        "08" | "40" | "53" | "57" | "58" | "XX" => Verdict::Transient,
        // Syntax or access rule, feature not supported, invalid catalog or schema names, the
        // statement's own definition.
        "42" | "0A" | "3D" | "3F" | "26" | "34" => Verdict::Permanent,
        _ => Verdict::Transient,
    }
}

fn chunk_failure(e: &tokio_postgres::Error) -> ProcessError {
    let reason = format!("the database: {}", describe(e));
    match verdict(e) {
        Verdict::Permanent => ProcessError::Permanent(reason),
        Verdict::Transient | Verdict::BadItem => ProcessError::Transient(reason),
    }
}

impl PostgresProcessor {
    /// Connects to `url`, creates `hopper.applied_chunks` if needed and prepares `statement`,
    /// so that a consumer that cannot do its work says so at start.
    ///
    /// # Errors
    /// [`BuildError::Database`]: the URL is invalid or the statement cannot be prepared
    /// (`statement` says which), or the database cannot be reached.
    pub async fn connect(
        url: &str,
        statement: &str,
        params: Vec<String>,
        file: &str,
    ) -> Result<PostgresProcessor, BuildError> {
        let fail = |field: &'static str, unreachable: bool, message: String| BuildError::Database {
            file: file.to_string(),
            field,
            unreachable,
            message,
        };
        let link = PgLink::parse(url).map_err(|e| fail("processor.url", false, e))?;
        let place = link.place();
        let manager = Manager::from_config(
            link.config().clone(),
            link.tls(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Connections are made as chunks need them: at most the consumer's concurrency.
        let pool = Pool::builder(manager)
            .max_size(1000)
            .build()
            .map_err(|e| fail("processor.url", false, e.to_string()))?;
        let mut client = pool.get().await.map_err(|e| {
            let why = match e {
                deadpool_postgres::PoolError::Backend(e) => link.explain(&e),
                other => other.to_string(),
            };
            fail(
                "processor.url",
                true,
                format!("cannot connect to PostgreSQL at {place}: {why}"),
            )
        })?;
        // Consumers starting together must not race on creating the table.
        let tx = client
            .transaction()
            .await
            .map_err(|e| fail("processor.url", true, describe(&e)))?;
        tx.batch_execute("SELECT pg_advisory_xact_lock(7208443);")
            .await
            .and(tx.batch_execute(APPLIED).await)
            .map_err(|e| {
                fail(
                    "processor.url",
                    false,
                    format!(
                        "cannot create hopper.applied_chunks at {place}: {}",
                        describe(&e)
                    ),
                )
            })?;
        tx.commit()
            .await
            .map_err(|e| fail("processor.url", true, describe(&e)))?;
        let prepared = client.prepare_cached(statement).await.map_err(|e| {
            fail(
                "processor.statement",
                false,
                format!("the database cannot prepare it: {}", describe(&e)),
            )
        })?;
        if prepared.params().len() != params.len() {
            return Err(fail(
                "processor.params",
                false,
                format!(
                    "names {} field(s), but processor.statement takes {} parameter(s)",
                    params.len(),
                    prepared.params().len()
                ),
            ));
        }
        let batch = match Batch::new(statement, prepared.params()) {
            Ok(mut batch) => {
                // The set-based insert where the database takes it; the function otherwise.
                if let Some(insert) = &batch.insert {
                    match client.prepare(insert).await {
                        Ok(_) => batch.prefer_insert(),
                        Err(e) => tracing::info!(
                            why = %describe(&e),
                            "the insert is not set-based: the statement runs once per item"
                        ),
                    }
                }
                match &batch.create {
                    None => Some(batch),
                    Some(create) => match client.batch_execute(create).await {
                        Ok(()) => Some(batch),
                        Err(e) => {
                            tracing::info!(
                                why = %describe(&e),
                                "items are pipelined one statement each: the statement cannot \
                                 be batched"
                            );
                            None
                        }
                    },
                }
            }
            Err(why) => {
                tracing::info!(%why, "items are pipelined one statement each");
                None
            }
        };
        Ok(PostgresProcessor {
            pool,
            statement: statement.to_string(),
            params,
            batch,
        })
    }

    /// The item's parameters in the statement's order, or why it is a bad item.
    fn bind(&self, item: &Item, types: &[Type]) -> Result<Vec<Text>, String> {
        let fields = match fields::read::<Value>(&item.data, &self.params) {
            Ok(Fields::Object(fields)) => fields,
            Ok(Fields::NotObject) => return Err(NOT_OBJECT.into()),
            Err(e) => return Err(format!("not valid JSON: {e}")),
        };
        self.params
            .iter()
            .zip(types)
            .zip(fields)
            .map(|((name, ty), value)| match value {
                None => Err(missing(name)),
                Some(v) => into_text(v, ty)
                    .map(Text)
                    .map_err(|why| unbound(name, ty, &why)),
            })
            .collect()
    }
}

/// Why an item that is valid JSON but not an object is bad.
const NOT_OBJECT: &str = "not a JSON object: processor.params names the fields to bind";

/// Why an item without the field `name` is bad.
fn missing(name: &str) -> String {
    format!("field `{name}` is missing (processor.params)")
}

/// Why an item whose field `name` cannot be bound to a parameter of type `ty` is bad.
fn unbound(name: &str, ty: &Type, why: &str) -> String {
    format!("field `{name}` ({ty}): {why}")
}

/// What applying a chunk came to.
enum Applied {
    /// Committed now, or found committed before: the chunk's outcome.
    Done(Processed),
    /// The fast path met an item the database refused: do it item by item.
    Refused,
}

/// Why an attempt at a chunk failed.
enum Failure {
    /// The database's error.
    Db(tokio_postgres::Error),
    /// No connection from the pool (a timeout, the pool closed): try later.
    Pool(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

impl Failure {
    fn decide(self) -> ProcessError {
        match self {
            Failure::Db(e) => chunk_failure(&e),
            Failure::Pool(why) => ProcessError::Transient(format!("no database connection: {why}")),
        }
    }
}

/// `params` as the client takes them.
fn as_params(params: &[Text]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// Whether the database refused an item's data among `results` (the chunk is then done item
/// by item); any other error fails the attempt.
fn refused(
    results: impl IntoIterator<Item = Result<u64, tokio_postgres::Error>>,
) -> Result<bool, Failure> {
    for result in results {
        match result {
            Ok(_) => {}
            Err(e) if verdict(&e) == Verdict::BadItem => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// The outcome recorded for a chunk applied before, if it was.
async fn recorded(
    client: &impl deadpool_postgres::GenericClient,
    key: (&str, i64, i64),
) -> Result<Option<Processed>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT bad::text FROM hopper.applied_chunks WHERE job = $1 AND run = $2 AND seq = $3",
            &[&key.0, &key.1, &key.2],
        )
        .await?;
    Ok(row.map(|r| {
        let text: String = r.get(0);
        let bad: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
        Processed {
            bad_items: bad
                .iter()
                .map(|b| hopper_common::BadItem {
                    line: b["line"].as_u64().unwrap_or(0),
                    reason: b["reason"].as_str().unwrap_or_default().to_string(),
                    key: None,
                })
                .collect(),
        }
    }))
}

/// The batched call on `client`, the function created first on a connection that has not got
/// it; `None` (pipeline the items) if the connection will not take it.
async fn batched(client: &deadpool_postgres::Object, batch: &Batch) -> Option<Statement> {
    match client.prepare_cached(&batch.call).await {
        Ok(call) => Some(call),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
            let create = batch.create.as_ref()?;
            if let Err(e) = client.batch_execute(create).await {
                tracing::debug!(why = %describe(&e), "batched execution refused on a connection");
                return None;
            }
            client.prepare_cached(&batch.call).await.ok()
        }
        Err(_) => None,
    }
}

impl PostgresProcessor {
    /// One attempt at the chunk in one transaction: `careful` puts each item under a savepoint
    /// and skips the ones the database refuses; otherwise the items go pipelined and the first
    /// refusal gives [`Applied::Refused`].
    async fn apply(&self, chunk: &Chunk, careful: bool) -> Result<Applied, Failure> {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(deadpool_postgres::PoolError::Backend(e)) => return Err(Failure::Db(e)),
            Err(other) => return Err(Failure::Pool(other.to_string())),
        };
        let stmt: Statement = client.prepare_cached(&self.statement).await?;
        let claim: Statement = client.prepare_cached(CLAIM).await?;
        let call = match (&self.batch, careful) {
            (Some(batch), false) => batched(&client, batch).await,
            (Some(_), true) | (None, _) => None,
        };
        let key: (&str, i64, i64) = (&chunk.job, chunk.run as i64, chunk.seq as i64);
        let key_params: [&(dyn ToSql + Sync); 3] = [&key.0, &key.1, &key.2];
        let mut outcome = Processed::default();
        // Batched: the items straight into the call's arrays. Otherwise: each item's parameters.
        let (batch, bound) = match call {
            Some(call) => {
                let columns = columns::build(&chunk.items, &self.params, stmt.params());
                for (item, why) in columns.bad {
                    outcome.bad_item(item, why);
                }
                let arrays = (columns.rows > 0).then_some(columns.arrays);
                (arrays.map(|arrays| (call, arrays)), Vec::new())
            }
            None => {
                let mut bound = Vec::with_capacity(chunk.items.len());
                for item in &chunk.items {
                    match self.bind(item, stmt.params()) {
                        Ok(params) => bound.push((item, params)),
                        Err(why) => outcome.bad_item(item, why),
                    }
                }
                (None, bound)
            }
        };
        let tx = client.transaction().await?;
        // The claim goes first, in the same pipeline as the items: a chunk applied before is
        // found by it (the items' work is then rolled back), and a copy of this chunk being
        // applied on another connection makes it wait for that one's end.
        let claimed = if careful {
            let claimed = tx.execute(&claim, &key_params).await?;
            if claimed == 1 {
                for (item, params) in &bound {
                    tx.batch_execute("SAVEPOINT hopper_item").await?;
                    match tx.execute(&stmt, &as_params(params)).await {
                        Ok(_) => tx.batch_execute("RELEASE SAVEPOINT hopper_item").await?,
                        Err(e) if verdict(&e) == Verdict::BadItem => {
                            tx.batch_execute("ROLLBACK TO SAVEPOINT hopper_item")
                                .await?;
                            outcome.bad_item(
                                item,
                                format!("the database refused it: {}", describe(&e)),
                            );
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            claimed
        } else if let Some((call, arrays)) = &batch {
            let arrays: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let (claimed, applied) =
                futures::join!(tx.execute(&claim, &key_params), tx.execute(call, &arrays));
            let claimed = claimed?;
            if claimed == 1 && refused([applied])? {
                return Ok(Applied::Refused);
            }
            claimed
        } else {
            // Polled together, the executions are pipelined on the one connection.
            let (claimed, results) = futures::join!(
                tx.execute(&claim, &key_params),
                join_all(
                    bound
                        .iter()
                        .map(|(_, params)| async { tx.execute(&stmt, &as_params(params)).await }),
                )
            );
            let claimed = claimed?;
            if claimed == 1 && refused(results)? {
                return Ok(Applied::Refused);
            }
            claimed
        };
        if claimed == 1 {
            if !outcome.bad_items.is_empty() {
                let bad: Vec<Value> = outcome
                    .bad_items
                    .iter()
                    .map(|b| serde_json::json!({"line": b.line, "reason": b.reason}))
                    .collect();
                tx.execute(
                    "UPDATE hopper.applied_chunks SET bad = $4::text::jsonb
                     WHERE job = $1 AND run = $2 AND seq = $3",
                    &[&key.0, &key.1, &key.2, &Value::Array(bad).to_string()],
                )
                .await?;
            }
            tx.commit().await?;
            return Ok(Applied::Done(outcome));
        }
        // Applied before, or by another consumer that committed first: ours goes, its outcome
        // stands.
        tx.rollback().await?;
        match recorded(&client, key).await? {
            Some(done) => Ok(Applied::Done(done)),
            None => Err(Failure::Pool(
                "the chunk's applied record vanished after a conflict".into(),
            )),
        }
    }
}

#[async_trait]
impl Processor for PostgresProcessor {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        match self.apply(chunk, false).await.map_err(Failure::decide)? {
            Applied::Done(outcome) => Ok(outcome),
            Applied::Refused => match self.apply(chunk, true).await.map_err(Failure::decide)? {
                Applied::Done(outcome) => Ok(outcome),
                Applied::Refused => Err(ProcessError::Transient(
                    "the database refused an item even under a savepoint".into(),
                )),
            },
        }
    }
}
