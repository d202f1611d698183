//! What only the PostgreSQL store does: its schema created on first use (once, however many
//! open it together), nothing created by a reader, a newer version refused, an unreachable
//! database named without its password. What every store does is in the conformance suite
//! (`context::conformance`), which runs against this store too.

use super::*;
use crate::context::conformance::{drop_schema, pg_url, two_chunks, LENIENT};
use tokio_postgres::NoTls;

/// A schema name of this test's own, dropped when the guard goes.
struct Schema(String);

impl Schema {
    fn new(what: &str) -> Schema {
        let name = format!("ctx_{what}_{}", std::process::id());
        drop_schema(&name);
        Schema(name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        drop_schema(&self.0);
    }
}

#[tokio::test]
async fn a_reader_creates_nothing_and_the_first_open_creates_the_schema_once() {
    let schema = Schema::new("first");
    assert!(PostgresStore::open_existing(&pg_url(), &schema.0)
        .await
        .expect("open")
        .is_none());
    let (client, conn) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema.0],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(n, 0, "a reader created the schema");
    // Four dispatchers open the new store together: each finds it ready.
    let url = pg_url();
    let opens = (0..4).map(|_| PostgresStore::open(&url, &schema.0));
    let stores = futures::future::join_all(opens).await;
    let stores: Vec<PostgresStore> = stores.into_iter().map(|s| s.expect("open")).collect();
    let run = two_chunks(&stores[0]).await;
    let reader = PostgresStore::open_existing(&pg_url(), &schema.0)
        .await
        .expect("open")
        .expect("exists now");
    assert_eq!(
        reader
            .status(run, LENIENT)
            .await
            .expect("status")
            .items
            .read,
        21
    );
    let version: i64 = client
        .query_one(
            &format!("SELECT version FROM {}.context_version", schema.0),
            &[],
        )
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, schema::VERSION);
}

#[tokio::test]
async fn a_store_of_a_newer_version_is_refused_with_what_to_do() {
    let schema = Schema::new("newer");
    PostgresStore::open(&pg_url(), &schema.0)
        .await
        .expect("create");
    let (client, conn) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "UPDATE {}.context_version SET version = version + 1",
            schema.0
        ))
        .await
        .expect("a newer version");
    let err = PostgresStore::open(&pg_url(), &schema.0)
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, ContextError::Corrupt { .. }), "{text}");
    assert!(
        text.contains(&schema.0) && text.contains("use a newer hopper-dispatcher"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_named_without_its_password() {
    // Nothing listens on port 1.
    let err = PostgresStore::open("postgres://hopper:s3cret@127.0.0.1:1/ops", "hopper")
        .await
        .expect_err("unreachable");
    let text = err.to_string();
    assert_eq!(err.exit_code(), 1);
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("s3cret"),
        "{text}"
    );
    let err = PostgresStore::open(
        "postgres://hopper:s3cret@127.0.0.1:5432/ops?sslmode=sideways",
        "hopper",
    )
    .await
    .expect_err("bad URL");
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

/// The database closes the store's connections between two writes (a restart, or an operator's
/// `pg_terminate_backend`): the next write gets a new connection and succeeds; the run goes on.
#[tokio::test]
async fn connections_the_database_closed_are_replaced_before_the_next_write() {
    let schema = Schema::new("closed");
    // A name of this test's own: other tests' stores run beside it and must not lose theirs.
    let name = format!("hopper-closed-test-{}", std::process::id());
    let url = pg_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = PostgresStore::open(&format!("{url}{sep}application_name={name}"), &schema.0)
        .await
        .expect("open");
    let run = two_chunks(&store).await;
    let (client, conn) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(killed >= 1, "no connection of the store was found");
    // The pool tries each connection before handing it out again.
    let fence = crate::context::Fence {
        run,
        token: "h/1#0#0".into(),
    };
    store
        .mark_in_flight(&fence, &[1])
        .await
        .expect("a write after the connections were closed");
    let s = store.status(run, LENIENT).await.expect("status");
    assert_eq!(s.chunks.in_flight, 1);
}
