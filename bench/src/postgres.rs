//! The PostgreSQL side (`--only pg`): on one database, in one run,
//! - a table copied to another through Hopper (the `postgres` source, the broker, 2 consumer
//!   processes with the `postgres` processor) against one `INSERT INTO dst SELECT ... FROM src`
//!   (goal: at most 4x; Hopper commits per chunk, keeps an exactly-once record and crosses the
//!   broker twice, the statement does none of that);
//! - the same copy with the execution context in PostgreSQL too (`[state] url =
//!   "postgres://..."`), against the copy with it in SQLite: what a shared state store costs;
//! - the source alone (`noop` processor, local mode) against `COPY (query) TO STDOUT` of the
//!   same rows (goal: at most 2x).
//!
//! The tables and the state schema are the bench's own (`hopper_bench_<pid>_src`, `_dst`,
//! `hopper_bench_<pid>_state`), dropped at the end.
//!
//! Every timed step starts settled ([`settle`]): after a checkpoint, with the broker quiet. A
//! step that followed a copy otherwise paid for writing out the copy's dirty pages, or ran
//! beside the broker compacting its queue: the single statement took 0.38 s to 0.91 s in one
//! run, depending only on what ran before it, and the ratio moved with it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hopper_common::postgres::PgLink;

use crate::hopper::{over_broker, run_local};
use crate::{median, Shape, CHUNK_ITEMS, CONSUMERS};

/// The rows both sides move: 4 columns, about 80 bytes of data a row.
const COLUMNS: &str = "id, sku, price, name";

/// Connects as Hopper does (the URL's `sslmode`, TLS by default when the server offers it), so
/// that the references pay for the same link as Hopper's side.
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let link = PgLink::parse(url).map_err(anyhow::Error::msg)?;
    link.connect()
        .await
        .map_err(|e| anyhow::anyhow!(link.explain(&e)))
        .with_context(|| format!("connecting to PostgreSQL at {}", link.place()))
}

/// Waits until the machine is settled for a timed step: PostgreSQL has written out every dirty
/// page (`CHECKPOINT`; a superuser's or `pg_checkpoint` member's right: without it the step
/// runs unsettled, and the bench says so once) and the broker is quiet.
async fn settle(client: &tokio_postgres::Client, broker: Option<&str>, warned: &mut bool) {
    if let Err(e) = client.batch_execute("CHECKPOINT").await {
        if !*warned {
            eprintln!(
                "postgres: cannot CHECKPOINT before each step ({e}); the figures are noisier"
            );
            *warned = true;
        }
    }
    crate::cpu::broker_quiet(broker).await;
}

/// Where a bench job keeps its execution context.
enum State<'a> {
    Sqlite,
    /// In this schema of the bench's database.
    Postgres(&'a str),
}

#[allow(clippy::too_many_arguments)]
fn job(
    dir: &Path,
    name: &str,
    amqp: &str,
    pg: &str,
    src: &str,
    processor: &str,
    window: usize,
    state: State<'_>,
) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    let state = match state {
        State::Sqlite => format!("url = \"sqlite://{name}.db\""),
        State::Postgres(schema) => format!("url = \"{pg}\"\nschema = \"{schema}\""),
    };
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n[broker]\nurl = \"{amqp}\"\n[state]\n{state}\n\
             [source]\nkind = \"postgres\"\nurl = \"{pg}\"\nquery = \"SELECT {COLUMNS} FROM {src}\"\n\
             key = \"id\"\n[chunking]\nitems = {CHUNK_ITEMS}\n[throttle]\nwindow = {window}\n\
             {processor}"
        ),
    )?;
    Ok(path)
}

/// Runs the PostgreSQL comparisons for `rows` rows, `rounds` times each, and prints them.
pub(crate) async fn postgres(
    bins: &Path,
    amqp: &str,
    pg: &str,
    dir: &Path,
    rows: u64,
    rounds: usize,
    shape: Shape,
) -> Result<()> {
    let client = connect(pg).await?;
    let pid = std::process::id();
    let (src, dst) = (
        format!("hopper_bench_{pid}_src"),
        format!("hopper_bench_{pid}_dst"),
    );
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {src}, {dst};
             CREATE TABLE {src} (id bigint PRIMARY KEY, sku text NOT NULL,
                                 price numeric(10,2) NOT NULL, name text NOT NULL);
             INSERT INTO {src} SELECT i, 'SKU-' || lpad(i::text, 10, '0'), (i % 1000) + 0.99,
                                      repeat('n', 40) FROM generate_series(1, {rows}) i;
             CREATE TABLE {dst} (id bigint, sku text, price numeric(10,2), name text);"
        ))
        .await
        .context("creating the bench tables")?;
    // A statement of its own: VACUUM cannot run in the implicit transaction of a batch.
    client
        .batch_execute(&format!("VACUUM ANALYZE {src}"))
        .await
        .context("vacuuming the source table")?;
    let result = compare(
        bins, amqp, pg, dir, rows, rounds, shape, &client, &src, &dst,
    )
    .await;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {src}, {dst};
             DROP SCHEMA IF EXISTS hopper_bench_{pid}_state CASCADE;
             DELETE FROM hopper.applied_chunks WHERE job LIKE 'bench-{pid}-pg%';"
        ))
        .await
        .context("dropping the bench tables")?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn compare(
    bins: &Path,
    amqp: &str,
    pg: &str,
    dir: &Path,
    rows: u64,
    rounds: usize,
    shape: Shape,
    client: &tokio_postgres::Client,
    src: &str,
    dst: &str,
) -> Result<()> {
    let pid = std::process::id();
    println!(
        "postgres: {rows} rows ({COLUMNS}), {CHUNK_ITEMS} per chunk, {CONSUMERS} consumers x {}",
        shape.prefetch
    );
    let (mut statement, mut copied, mut copy_out, mut read) = (vec![], vec![], vec![], vec![]);
    let mut shared = vec![];
    let schema = format!("hopper_bench_{pid}_state");
    let broker = crate::cpu::broker_pid();
    let mut warned = false;
    for round in 1..=rounds.max(1) {
        client.batch_execute(&format!("TRUNCATE {dst}")).await?;
        settle(client, broker.as_deref(), &mut warned).await;
        let started = Instant::now();
        client
            .batch_execute(&format!("INSERT INTO {dst} SELECT {COLUMNS} FROM {src}"))
            .await?;
        let s = started.elapsed();
        client.batch_execute(&format!("TRUNCATE {dst}")).await?;

        let name = format!("bench-{pid}-pg{round}");
        let processor = format!(
            "[processor]\nkind = \"postgres\"\nurl = \"{pg}\"\n\
             statement = \"INSERT INTO {dst} ({COLUMNS}) VALUES ($1, $2, $3, $4)\"\n\
             params = [\"id\", \"sku\", \"price\", \"name\"]\n"
        );
        let file = job(
            dir,
            &name,
            amqp,
            pg,
            src,
            &processor,
            shape.window,
            State::Sqlite,
        )?;
        settle(client, broker.as_deref(), &mut warned).await;
        let h = over_broker(bins, amqp, &file, &name, shape).await?.took;
        check_copy(client, dst, rows).await?;
        client.batch_execute(&format!("TRUNCATE {dst}")).await?;

        let name = format!("bench-{pid}-pgstate{round}");
        let file = job(
            dir,
            &name,
            amqp,
            pg,
            src,
            &processor,
            shape.window,
            State::Postgres(&schema),
        )?;
        settle(client, broker.as_deref(), &mut warned).await;
        let p = over_broker(bins, amqp, &file, &name, shape).await?.took;
        check_copy(client, dst, rows).await?;

        settle(client, broker.as_deref(), &mut warned).await;
        let started = Instant::now();
        let stream = client
            .copy_out(&format!("COPY (SELECT {COLUMNS} FROM {src}) TO STDOUT"))
            .await?;
        let mut bytes = 0usize;
        futures::pin_mut!(stream);
        while let Some(part) = stream.next().await {
            bytes += part?.len();
        }
        let c = started.elapsed();

        let name = format!("bench-{pid}-pgsrc{round}");
        let file = job(
            dir,
            &name,
            "amqp://127.0.0.1:1/%2f",
            pg,
            src,
            "[processor]\nkind = \"noop\"\n",
            shape.window,
            State::Sqlite,
        )?;
        let workers = CONSUMERS * usize::from(shape.prefetch);
        settle(client, broker.as_deref(), &mut warned).await;
        let r = run_local(bins, &file, workers).await?;
        println!(
            "round {round}: INSERT SELECT {:>6.2} s, hopper copy {:>6.2} s ({:.2}x), with the \
             state in postgres {:>6.2} s ({:.2}x); \
             COPY TO STDOUT {:>6.2} s ({:.0} MiB), hopper source {:>6.2} s ({:.2}x)",
            s.as_secs_f64(),
            h.as_secs_f64(),
            ratio(h, s),
            p.as_secs_f64(),
            ratio(p, s),
            c.as_secs_f64(),
            bytes as f64 / 1048576.0,
            r.as_secs_f64(),
            ratio(r, c)
        );
        statement.push(s.as_secs_f64());
        copied.push(h.as_secs_f64());
        shared.push(p.as_secs_f64());
        copy_out.push(c.as_secs_f64());
        read.push(r.as_secs_f64());
    }
    let (s, h) = (median(&mut statement), median(&mut copied));
    let (c, r) = (median(&mut copy_out), median(&mut read));
    let p = median(&mut shared);
    println!(
        "copy  : hopper {h:.2} s ({:.0} rows/s) vs INSERT SELECT {s:.2} s: {:.2}x (goal: at most 4x)",
        rows as f64 / h,
        h / s
    );
    println!(
        "state : the copy with its state in postgres {p:.2} s vs in sqlite {h:.2} s: {:.2}x",
        p / h
    );
    println!(
        "source: hopper {r:.2} s ({:.0} rows/s) vs COPY TO STDOUT {c:.2} s: {:.2}x (goal: at most 2x)",
        rows as f64 / r,
        r / c
    );
    Ok(())
}

/// Fails unless `dst` holds exactly `rows` rows.
async fn check_copy(client: &tokio_postgres::Client, dst: &str, rows: u64) -> Result<()> {
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {dst}"), &[])
        .await?
        .get(0);
    if n != rows as i64 {
        bail!("the copy through Hopper holds {n} rows, not {rows}");
    }
    Ok(())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}
