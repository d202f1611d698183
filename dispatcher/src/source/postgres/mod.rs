//! The PostgreSQL source: the rows of the user's query, read once, in key order, one page at a
//! time.
//!
//! Each page is its own short statement: the user's query wrapped as a subquery, with
//! `(key) > (last key read)` (a row comparison for a composite key), ordered by the key and
//! limited. No OFFSET (each page costs the same however far the scan is), no transaction or
//! cursor held open between pages (a run may last days; an open transaction holds back VACUUM
//! for the whole database), one pass over the data whatever its size. With an index on the key,
//! every page is an index range scan.
//!
//! Positions: a row's line is its ordinal in the scan (1 for the first row of the run), and its
//! key is the JSON of its key columns (`42`, or `[7,"a"]` for a composite key). A chunk records
//! the key before its first row and the key of its last row, so that `--resume` reads on after
//! the checkpoint's key and a chunk is read again as exactly its range of keys; a failed row is
//! found again by its key.
//!
//! Invariants:
//! - Checked before anything is sent ([`inspect`]): the query prepares, every column has a
//!   mapping ([`values`]), the key columns exist, can be paged by, and hold no NULL.
//! - The source is blocking, as every [`Source`]: it runs on the reader's thread and waits for
//!   the database through the runtime's handle.
//! - Rows inserted behind the scan (below the last key read) during a run are not seen; rows
//!   inserted ahead of it are.

mod values;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hopper_common::job::redact_url;
use hopper_common::postgres::{describe, text_for, PgLink, Text};
use hopper_common::{Item, Position};
use serde_json::Value;
use tokio::runtime::Handle;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};
use tracing::warn;

use super::{Cursor, Read, Record, Source, SourceError};
use values::{Mapping, Raw};

/// Rows per page: large enough that a page's round trip is small beside its rows, small enough
/// that a page is a short statement and a little memory.
const PAGE: usize = 5000;

/// Times a page is fetched again after the connection failed, before the run stops (to be
/// resumed from its checkpoint).
const ATTEMPTS: u32 = 4;

/// What [`inspect`] learnt about the query: its columns and how each is written, and its key.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// Each column's name, written as a JSON object key with its colon (`"sku":`), and how
    /// its values are written.
    columns: Vec<(String, Mapping)>,
    /// The key columns, as indexes into `columns`, in the key's order.
    key: Vec<usize>,
    /// The key columns' types, for binding key values.
    key_types: Vec<Type>,
}

/// What part of the query a [`PostgresSource`] reads.
#[derive(Debug, Clone)]
pub(crate) enum Bounds {
    /// Every row after `after` (a key; `None`: from the first row).
    Scan {
        /// The key of the last row read.
        after: Option<String>,
    },
    /// The rows after `after` up to `last`, both keys: a chunk read again.
    Range {
        /// The key before the first row (`None`: from the first row of the query).
        after: Option<String>,
        /// The key of the last row, included.
        last: String,
    },
    /// Just these rows, by key, in this order, each with its line: failed rows read again by
    /// `retry`. A row no longer there is not read.
    Rows(VecDeque<(String, u64)>),
}

/// The rows of a query, read by key.
pub struct PostgresSource {
    handle: Handle,
    url: String,
    query: String,
    key: Vec<String>,
    bounds: Bounds,
    conn: Option<Conn>,
    /// The next page of a scan, asked for (and turned into items, on a task of its own) while
    /// the rows in hand are chunked and sent, so that the database's work, turning rows into
    /// JSON and the rest of the dispatcher's overlap instead of adding up.
    ahead: Option<Ahead>,
    page: VecDeque<Read>,
    /// The key of the last row handed out (or where reading started).
    last_key: Option<String>,
    /// Rows read so far; the next row's line is one more.
    rows: u64,
    done: bool,
}

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("url", &redact_url(&self.url))
            .field("query", &self.query)
            .field("bounds", &self.bounds)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// A page asked for ahead: the rows after `after` (a key's JSON), on their way.
struct Ahead {
    after: String,
    rows: tokio::task::JoinHandle<Result<Vec<Rendered>, SourceError>>,
}

/// A row as an item's JSON text, and its key's JSON.
struct Rendered {
    data: String,
    key: String,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        // Not wanted any more (the scan ended, or the connection is being replaced).
        self.rows.abort();
    }
}

/// A connection, with the query's shape and its page statements prepared on it.
struct Conn {
    /// Shared with the task that reads the next page ahead.
    client: Arc<Client>,
    shape: Arc<Shape>,
    /// From the first row; after a key; up to a key; after and up to; one row by key.
    first: Statement,
    after: Statement,
    upto: Statement,
    between: Statement,
    one: Statement,
}

/// `"name"`: an identifier quoted for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL of a page: the user's query as a subquery, `filter` on its key, in key order.
fn page_sql(query: &str, key: &[String], filter: &str, limit: usize) -> String {
    let cols: Vec<String> = key
        .iter()
        .map(|k| format!("hopper_rows.{}", ident(k)))
        .collect();
    let order = cols.join(", ");
    let mut sql = format!("SELECT * FROM ({query}\n) AS hopper_rows");
    if !filter.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(filter);
    }
    sql.push_str(&format!(" ORDER BY {order} LIMIT {limit}"));
    sql
}

/// `(k1, k2) OP ($n, $n+1)`: the key compared with parameters from `$first`.
fn compare(key: &[String], op: &str, first: usize) -> String {
    let cols: Vec<String> = key
        .iter()
        .map(|k| format!("hopper_rows.{}", ident(k)))
        .collect();
    let params: Vec<String> = (0..key.len()).map(|i| format!("${}", first + i)).collect();
    format!("({}) {op} ({})", cols.join(", "), params.join(", "))
}

fn query_error(field: &'static str, message: String) -> SourceError {
    SourceError::Query { field, message }
}

/// Connects to `url` as its `sslmode` asks; the connection is driven on a task of its own.
async fn connect(url: &str) -> Result<Client, SourceError> {
    let link = PgLink::parse(url).map_err(|e| query_error("source.url", e))?;
    link.connect().await.map_err(|e| SourceError::Unreachable {
        place: link.place(),
        message: link.explain(&e),
    })
}

/// Learns the query's shape on `client`: its columns (each must have a mapping, and no two the
/// same name) and its key (each key column must be one of them, and one that can be paged by).
async fn shape(client: &Client, query: &str, key: &[String]) -> Result<Shape, SourceError> {
    let prepared = client.prepare(query).await.map_err(|e| {
        query_error(
            "source.query",
            format!("the database cannot prepare it: {}", describe(&e)),
        )
    })?;
    let mut columns = Vec::with_capacity(prepared.columns().len());
    for (i, c) in prepared.columns().iter().enumerate() {
        if prepared.columns()[..i].iter().any(|d| d.name() == c.name()) {
            return Err(query_error(
                "source.query",
                format!(
                    "two columns are named {:?}: an item is an object keyed by column name, so \
                     give them distinct names (AS ...)",
                    c.name()
                ),
            ));
        }
        let Some(mapping) = Mapping::of(c.type_()) else {
            return Err(query_error(
                "source.query",
                format!(
                    "column {:?} has type {}, which Hopper cannot write as JSON; cast it in the \
                     query (for example {}::text)",
                    c.name(),
                    c.type_(),
                    c.name()
                ),
            ));
        };
        let name = serde_json::to_string(c.name()).unwrap_or_default();
        columns.push((format!("{name}:"), mapping));
    }
    let mut key_idx = Vec::with_capacity(key.len());
    let mut key_types = Vec::with_capacity(key.len());
    for k in key {
        let Some(i) = prepared.columns().iter().position(|c| c.name() == k) else {
            let names: Vec<&str> = prepared.columns().iter().map(|c| c.name()).collect();
            return Err(query_error(
                "source.key",
                format!(
                    "column {k:?} is not in the result of source.query (its columns: {})",
                    names.join(", ")
                ),
            ));
        };
        let ty = prepared.columns()[i].type_().clone();
        if !columns[i].1.can_page() {
            return Err(query_error(
                "source.key",
                format!(
                    "column {k:?} has type {ty}, which cannot order a scan; use an integer, \
                     numeric, text, uuid, date or timestamp column (unique and not null)"
                ),
            ));
        }
        key_idx.push(i);
        key_types.push(ty);
    }
    Ok(Shape {
        columns,
        key: key_idx,
        key_types,
    })
}

/// Checks the source before anything is sent: the database answers, the query prepares, its
/// columns can be written as JSON, and the key columns exist, can be paged by and hold no NULL
/// (a row with a NULL key could never be read by key, so it would be lost).
///
/// # Errors
/// [`SourceError::Unreachable`] (exit 1), [`SourceError::Query`] naming `source.query` or
/// `source.key` with the database's own message (exit 2).
pub(crate) async fn inspect(url: &str, query: &str, key: &[String]) -> Result<(), SourceError> {
    let client = connect(url).await?;
    shape(&client, query, key).await?;
    // The page statement itself: ordering by the key must work.
    client
        .prepare(&page_sql(query, key, &compare(key, ">", 1), PAGE))
        .await
        .map_err(|e| {
            query_error(
                "source.key",
                format!("the database cannot page by it: {}", describe(&e)),
            )
        })?;
    let nulls: Vec<String> = key
        .iter()
        .map(|k| format!("hopper_rows.{} IS NULL", ident(k)))
        .collect();
    let sql = format!(
        "SELECT 1 FROM ({query}\n) AS hopper_rows WHERE {} LIMIT 1",
        nulls.join(" OR ")
    );
    let found = client
        .query_opt(&sql, &[])
        .await
        .map_err(|e| query_error("source.key", describe(&e)))?;
    if found.is_some() {
        return Err(query_error(
            "source.key",
            format!(
                "some rows of source.query have a NULL in {}: the key must be unique and not \
                 null (filter them out in the query, or choose another key)",
                key.join(", ")
            ),
        ));
    }
    Ok(())
}

impl PostgresSource {
    /// A source of the rows of `query` within `bounds`, the first of them numbered `rows + 1`.
    /// Nothing is done until the first row is asked for; [`inspect`] checks the query first.
    ///
    /// # Errors
    /// [`SourceError::Query`] when there is no runtime to wait on the database with (a bug).
    pub(crate) fn open(
        url: &str,
        query: &str,
        key: &[String],
        bounds: Bounds,
        rows: u64,
    ) -> Result<PostgresSource, SourceError> {
        let handle = Handle::try_current().map_err(|e| {
            query_error(
                "source.url",
                format!("the PostgreSQL source needs a Tokio runtime: {e}"),
            )
        })?;
        let last_key = match &bounds {
            Bounds::Scan { after } | Bounds::Range { after, .. } => after.clone(),
            Bounds::Rows(_) => None,
        };
        Ok(PostgresSource {
            handle,
            url: url.to_string(),
            query: query.to_string(),
            key: key.to_vec(),
            bounds,
            conn: None,
            ahead: None,
            page: VecDeque::new(),
            last_key,
            rows,
            done: false,
        })
    }

    /// Connects and prepares the page statements.
    async fn open_conn(&self) -> Result<Conn, SourceError> {
        let client = connect(&self.url).await?;
        let shape = shape(&client, &self.query, &self.key).await?;
        let n = self.key.len();
        let (q, k) = (&self.query, &self.key);
        let prepare = |sql: String| {
            let client = &client;
            async move {
                client.prepare(&sql).await.map_err(|e| {
                    query_error(
                        "source.key",
                        format!("the database cannot page by it: {}", describe(&e)),
                    )
                })
            }
        };
        let first = prepare(page_sql(q, k, "", PAGE)).await?;
        let after = prepare(page_sql(q, k, &compare(k, ">", 1), PAGE)).await?;
        let upto = prepare(page_sql(q, k, &compare(k, "<=", 1), PAGE)).await?;
        let between = prepare(page_sql(
            q,
            k,
            &format!("{} AND {}", compare(k, ">", 1), compare(k, "<=", n + 1)),
            PAGE,
        ))
        .await?;
        let one = prepare(page_sql(q, k, &compare(k, "=", 1), 1)).await?;
        Ok(Conn {
            client: Arc::new(client),
            shape: Arc::new(shape),
            first,
            after,
            upto,
            between,
            one,
        })
    }

    /// Fetches the next page into `self.page`, connecting first if needed, and trying again
    /// after a lost connection.
    fn fetch(&mut self) -> Result<(), SourceError> {
        let handle = self.handle.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = handle.block_on(self.fetch_once());
            match result {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS && e.is_transient() => {
                    warn!(source = %self.describe(), attempt, error = %e,
                          "reading the source failed; connecting again");
                    self.ahead = None;
                    self.conn = None;
                    std::thread::sleep(Duration::from_millis(500 << attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn fetch_once(&mut self) -> Result<(), SourceError> {
        if self.conn.is_none() {
            self.conn = Some(self.open_conn().await?);
        }
        let Some(conn) = self.conn.as_ref() else {
            return Ok(());
        };
        let shape = &*conn.shape;
        let (statement, params) = match &self.bounds {
            Bounds::Rows(keys) => match keys.front() {
                None => {
                    self.done = true;
                    return Ok(());
                }
                Some((key, line)) => {
                    // Numbered as in the first scan.
                    self.rows = line.saturating_sub(1);
                    (&conn.one, bind(shape, key)?)
                }
            },
            Bounds::Scan { after: None } => (&conn.first, Vec::new()),
            Bounds::Scan { after: Some(a) } => (&conn.after, bind(shape, a)?),
            Bounds::Range { after: None, last } => (&conn.upto, bind(shape, last)?),
            Bounds::Range {
                after: Some(a),
                last,
            } => {
                let mut p = bind(shape, a)?;
                p.extend(bind(shape, last)?);
                (&conn.between, p)
            }
        };
        let ahead = self.ahead.take();
        let rows = match (ahead, &self.bounds) {
            (
                Some(mut ahead),
                Bounds::Scan { after: Some(a) } | Bounds::Range { after: Some(a), .. },
            ) if ahead.after == *a => {
                (&mut ahead.rows).await.map_err(|e| SourceError::Fetch {
                    after: String::new(),
                    message: format!("the page read ahead was lost: {e}"),
                })??
            }
            _ => {
                let (client, shape) = (Arc::clone(&conn.client), Arc::clone(&conn.shape));
                page(client, statement.clone(), params, shape).await?
            }
        };
        match &mut self.bounds {
            Bounds::Rows(keys) => {
                keys.pop_front();
            }
            Bounds::Scan { .. } | Bounds::Range { .. } => self.done = rows.len() < PAGE,
        }
        if !self.done {
            if let Some(last) = rows.last() {
                self.ahead = read_ahead(conn, &self.bounds, last.key.clone())?;
            }
        }
        for Rendered { data, key } in rows {
            self.rows += 1;
            let line = self.rows;
            self.page.push_back(Read {
                record: Record::Item(Item { line, data }),
                start: Position {
                    line,
                    offset: line - 1,
                },
                key: Some(key),
            });
        }
        let key_of_last = self.page.back().and_then(|r| r.key.clone());
        if let (Some(k), Bounds::Scan { after } | Bounds::Range { after, .. }) =
            (key_of_last, &mut self.bounds)
        {
            // Where the next page starts; `self.last_key` moves as rows are handed out.
            *after = Some(k);
        }
        Ok(())
    }
}

/// Starts reading the page after `key` (the last row of the page in hand) on its own task, for a
/// scan or a range; `None` for rows read one by one.
fn read_ahead(conn: &Conn, bounds: &Bounds, key: String) -> Result<Option<Ahead>, SourceError> {
    let (statement, params) = match bounds {
        Bounds::Scan { .. } => (conn.after.clone(), bind(&conn.shape, &key)?),
        Bounds::Range { last, .. } => {
            let mut p = bind(&conn.shape, &key)?;
            p.extend(bind(&conn.shape, last)?);
            (conn.between.clone(), p)
        }
        Bounds::Rows(_) => return Ok(None),
    };
    let (client, shape) = (Arc::clone(&conn.client), Arc::clone(&conn.shape));
    let rows = tokio::spawn(page(client, statement, params, shape));
    Ok(Some(Ahead { after: key, rows }))
}

/// The text parameters that bind `key` (its JSON) to the key columns.
fn bind(shape: &Shape, key: &str) -> Result<Vec<Text>, SourceError> {
    let bad = |why: String| query_error("source.key", format!("key {key}: {why}"));
    let value: Value = serde_json::from_str(key).map_err(|e| bad(e.to_string()))?;
    let parts = match (value, shape.key.len()) {
        (Value::Array(parts), n) if n > 1 => parts,
        (v, 1) => vec![v],
        (v, n) => return Err(bad(format!("{v} is not a list of {n} values"))),
    };
    if parts.len() != shape.key.len() {
        return Err(bad(format!(
            "has {} values, not {}",
            parts.len(),
            shape.key.len()
        )));
    }
    parts
        .iter()
        .zip(&shape.key_types)
        .map(|(v, ty)| text_for(v, ty).map(Text).map_err(bad))
        .collect()
}

/// One page: `statement` with `params`, each row turned into its item's JSON as it arrives
/// (no page of `Row`s is held), the rows in the order the database sends them.
async fn page(
    client: Arc<Client>,
    statement: Statement,
    params: Vec<Text>,
    shape: Arc<Shape>,
) -> Result<Vec<Rendered>, SourceError> {
    let fetch = |message: String| SourceError::Fetch {
        after: String::new(),
        message,
    };
    let refs = params.iter().map(|p| p as &(dyn ToSql + Sync));
    let stream = client
        .query_raw(&statement, refs)
        .await
        .map_err(|e| fetch(describe(&e)))?;
    futures::pin_mut!(stream);
    let mut rows = Vec::with_capacity(PAGE.min(1024));
    // A guess at the next row's length (the last one's), so that its text is allocated once.
    let mut size = 64;
    while let Some(row) = stream.next().await {
        let row = row.map_err(|e| fetch(describe(&e)))?;
        let (data, key) = render(&shape, &row, size).map_err(fetch)?;
        size = data.len();
        rows.push(Rendered { data, key });
    }
    Ok(rows)
}

/// A row as an item's JSON text, and its key's JSON; `size` is a guess at the text's length
/// (the previous row's), so that the text is allocated once.
fn render(
    shape: &Shape,
    row: &tokio_postgres::Row,
    size: usize,
) -> Result<(String, String), String> {
    let mut data = String::with_capacity(size + 16);
    // Where each key column's JSON lies in `data`, in the key's order.
    let mut spans = [(0usize, 0usize); 4];
    let mut more_spans = Vec::new();
    data.push('{');
    for (i, (name, mapping)) in shape.columns.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        data.push_str(name);
        let column = || name.trim_end_matches(':');
        let raw: Raw<'_> = row
            .try_get(i)
            .map_err(|e| format!("column {}: {e}", column()))?;
        let start = data.len();
        mapping
            .write(raw.0, &mut data)
            .map_err(|e| format!("column {}: {e}", column()))?;
        if let Some(k) = shape.key.iter().position(|&c| c == i) {
            if &data[start..] == "null" {
                return Err(format!(
                    "its key column {} is NULL: the key must be not null",
                    column()
                ));
            }
            match spans.get_mut(k) {
                Some(span) => *span = (start, data.len()),
                None => more_spans.push((k, start, data.len())),
            }
        }
    }
    data.push('}');
    let part = |k: usize| -> &str {
        let (start, end) = spans.get(k).copied().unwrap_or_else(|| {
            more_spans
                .iter()
                .find(|(at, _, _)| *at == k)
                .map_or((0, 0), |&(_, s, e)| (s, e))
        });
        &data[start..end]
    };
    let key = match shape.key.len() {
        1 => part(0).to_string(),
        n => {
            let parts: Vec<&str> = (0..n).map(part).collect();
            format!("[{}]", parts.join(","))
        }
    };
    Ok((data, key))
}

impl Source for PostgresSource {
    fn next(&mut self) -> Result<Option<Read>, SourceError> {
        loop {
            if let Some(read) = self.page.pop_front() {
                self.last_key.clone_from(&read.key);
                return Ok(Some(read));
            }
            if self.done {
                return Ok(None);
            }
            self.fetch().map_err(|e| match e {
                SourceError::Fetch { message, .. } => SourceError::Fetch {
                    after: self.last_key.clone().unwrap_or_else(|| "the start".into()),
                    message,
                },
                other => other,
            })?;
        }
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            offset: self.rows - self.page.len() as u64,
            lines: self.rows - self.page.len() as u64,
        }
    }

    fn size_bytes(&self) -> Option<u64> {
        None
    }

    fn describe(&self) -> String {
        let url = PgLink::place_of(&self.url).unwrap_or_else(|| redact_url(&self.url));
        format!("postgres {url} (key {})", self.key.join(", "))
    }

    fn key(&self) -> Option<String> {
        self.last_key.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_wrap_the_query_and_compare_rows() {
        let key = vec!["tenant".to_string(), "id".to_string()];
        assert_eq!(
            page_sql("SELECT * FROM t", &key, &compare(&key, ">", 1), 10),
            "SELECT * FROM (SELECT * FROM t\n) AS hopper_rows WHERE (hopper_rows.\"tenant\", \
             hopper_rows.\"id\") > ($1, $2) ORDER BY hopper_rows.\"tenant\", hopper_rows.\"id\" \
             LIMIT 10"
        );
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
