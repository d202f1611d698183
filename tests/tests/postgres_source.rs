//! The `postgres` source against the real PostgreSQL (`HOPPER_TEST_PG_URL`, by default the local
//! `test` database): a query read once by key into a table with no unique key, exactly once
//! through killed consumers and a killed dispatcher; a row refused by the target listed by its
//! key and retried alone; mistakes refused before anything is sent; every mapped type through
//! the source and the processor and back. Each test has its own tables, dropped at the end.

use std::time::Duration;

use hopper_tests::{
    count, kill_consumers_at_quarters, misfits, pg_url, require_broker, require_postgres, Tables,
    TestJob,
};

const LIMIT: Duration = Duration::from_secs(180);

/// A job reading `query` (by `key`) and running `statement` for each row, with `{SRC}` and
/// `{DST}` in them standing for the test's two tables, which it returns.
fn copy_job(
    prefix: &str,
    local: bool,
    query: &str,
    key: &str,
    statement: &str,
    params: &str,
    extra: &str,
) -> (TestJob, String, String) {
    let url = pg_url();
    let body = format!(
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "postgres"
url = "{url}"
query = "{query}"
key = {key}
[chunking]
items = 500
[processor]
kind = "postgres"
url = "{url}"
statement = "{statement}"
params = {params}
[failures]
skip_limit = 10
{extra}"#
    );
    let t = if local {
        TestJob::local(prefix, &body)
    } else {
        TestJob::new(prefix, &body)
    };
    let (src, dst) = (Tables::name(&t, "src"), Tables::name(&t, "dst"));
    let text = std::fs::read_to_string(t.file())
        .expect("job")
        .replace("{SRC}", &src)
        .replace("{DST}", &dst);
    std::fs::write(t.file(), text).expect("job");
    (t, src, dst)
}

/// 200,000 rows over the broker into a table with no unique key, consumers SIGKILLed twice
/// during the run: every row exactly once.
#[tokio::test]
async fn rows_reach_a_table_without_a_unique_key_exactly_once_through_killed_consumers() {
    let _conn = require_broker().await;
    let client = require_postgres().await;
    let n = 200_000i64;
    let (t, src, dst) = copy_job(
        "pgsrc-kill",
        false,
        "SELECT id, price FROM {SRC}",
        "\"id\"",
        "INSERT INTO {DST} (id, price) VALUES ($1, $2)",
        "[\"id\", \"price\"]",
        "",
    );
    let _tables = Tables::create(
        &client,
        &t,
        &[&src, &dst],
        &format!(
            "CREATE TABLE {src} (id bigint PRIMARY KEY, price numeric(12,2));
             INSERT INTO {src} SELECT i, i * 1.25 FROM generate_series(1, {n}) i;
             CREATE TABLE {dst} (id bigint, price numeric(12,2));"
        ),
    )
    .await;
    let first = t.start_consumer(1, 4);
    let dispatcher = t.spawn_dispatcher(&["run"], "dispatcher.log");
    let last = kill_consumers_at_quarters(&t, &client, &dst, n, first, LIMIT).await;
    t.await_success(dispatcher, "dispatcher.log", LIMIT).await;
    assert_eq!(count(&client, &dst).await, (n, n));
    assert_eq!(misfits(&client, &src, &dst).await, 0);
    let s = t.status().await;
    assert_eq!(s["items"]["read"], n);
    assert_eq!(s["items"]["processed"], n);
    assert!(last.stop(LIMIT).await.success());
}

/// A composite key; the dispatcher SIGKILLed mid-run; `--resume` refused while the query is
/// changed, then, with it put back, reads on after its checkpoint's key and sends again what
/// was recorded but unconfirmed (local mode: the queues died with the process). `status` from
/// another process is exact.
#[tokio::test]
async fn a_killed_dispatcher_resumes_after_its_checkpoint_key() {
    let client = require_postgres().await;
    let n = 60_000i64;
    let (t, src, dst) = copy_job(
        "pgsrc-resume",
        true,
        "SELECT tenant, id, price FROM {SRC}",
        "[\"tenant\", \"id\"]",
        "INSERT INTO {DST} (tenant, id, price) VALUES ($1, $2, $3)",
        "[\"tenant\", \"id\", \"price\"]",
        "[throttle]\nrate = 15000",
    );
    let _tables = Tables::create(
        &client,
        &t,
        &[&src, &dst],
        &format!(
            "CREATE TABLE {src} (tenant text, id bigint, price numeric(12,2),
                                 PRIMARY KEY (tenant, id));
             INSERT INTO {src} SELECT 't' || (i % 7), i, i * 1.25
               FROM generate_series(1, {n}) i;
             CREATE TABLE {dst} (tenant text, id bigint, price numeric(12,2));"
        ),
    )
    .await;
    let read = t
        .kill_after_progress(&["run", "--local", "2"], 0, 20_000)
        .await;
    assert!(read < n as u64, "killed after the end");
    let s = t.status().await;
    assert_eq!(s["state"], "running");
    // The query changed: the checkpoint's key means nothing for it.
    let job = std::fs::read_to_string(t.file()).expect("job");
    std::fs::write(t.file(), job.replace("FROM ", "FROM ONLY ")).expect("job");
    let out = t
        .dispatcher(&["run", "--resume", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("source.query"), "{}", out.stderr);
    std::fs::write(t.file(), job).expect("job");
    let out = t
        .dispatcher(&["run", "--resume", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(count(&client, &dst).await, (n, n));
    assert_eq!(misfits(&client, &src, &dst).await, 0);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_eq!(s["items"]["read"], n);
    assert_eq!(s["items"]["processed"], n);
}

/// A row the target's CHECK refuses is listed with its key as its position and the database's
/// message; once the row is fixed in the source, `retry` applies just that row.
#[tokio::test]
async fn a_refused_row_is_listed_by_its_key_and_retry_applies_just_it() {
    let client = require_postgres().await;
    let (t, src, dst) = copy_job(
        "pgsrc-check",
        true,
        "SELECT sku, price FROM {SRC}",
        "\"sku\"",
        "INSERT INTO {DST} (id, price) VALUES ($1, $2)",
        "[\"sku\", \"price\"]",
        "",
    );
    let _tables = Tables::create(
        &client,
        &t,
        &[&src, &dst],
        &format!(
            "CREATE TABLE {src} (sku text PRIMARY KEY, price numeric(10,2));
             INSERT INTO {src} SELECT 'sku-' || lpad(i::text, 5, '0'), i
               FROM generate_series(1, 3000) i;
             UPDATE {src} SET price = -1 WHERE sku = 'sku-01234';
             CREATE TABLE {dst} (id text, price numeric(10,2) CHECK (price >= 0));"
        ),
    )
    .await;
    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed_with_failures");
    assert_eq!(s["items"]["processed"], 2999);
    let failures = s["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{s}");
    assert_eq!(failures[0]["position"], "sku-01234");
    assert_eq!(failures[0]["class"], "bad_item");
    let reason = failures[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("23514"), "{reason}");
    assert_eq!(count(&client, &dst).await.0, 2999);

    client
        .batch_execute(&format!(
            "UPDATE {src} SET price = 1234 WHERE sku = 'sku-01234'"
        ))
        .await
        .expect("fix the row");
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(count(&client, &dst).await, (3000, 3000));
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_eq!(s["items"]["read"], 3000);
    assert_eq!(s["items"]["processed"], 3000);
}

/// What cannot work is refused before anything is sent, naming the field: a query that does
/// not prepare, a key not in its result, a type without a mapping, a NULL key (exit 2); a
/// database that does not answer, by host and port, never the password (exit 1).
#[tokio::test]
async fn mistakes_in_the_source_are_refused_naming_the_field() {
    let client = require_postgres().await;
    let (t, src, _dst) = copy_job(
        "pgsrc-bad",
        true,
        "SELECT id, spot FROM {SRC}",
        "\"id\"",
        "SELECT $1::text",
        "[\"id\"]",
        "",
    );
    let _tables = Tables::create(
        &client,
        &t,
        &[&src],
        &format!(
            "CREATE TABLE {src} (id bigint, spot point, name text);
             INSERT INTO {src} VALUES (1, '(1,2)', 'a'), (NULL, NULL, 'b');"
        ),
    )
    .await;
    let job = std::fs::read_to_string(t.file()).expect("job");
    let cases: [(&str, &str, i32, &[&str]); 5] = [
        (
            "SELECT id, spot FROM",
            "SELEC id FROM",
            2,
            &["source.query", "syntax error"],
        ),
        (
            "SELECT id, spot FROM",
            "SELECT name FROM",
            2,
            &["source.key", "\"id\""],
        ),
        (
            "SELECT id, spot FROM",
            "SELECT id, spot FROM",
            2,
            &["source.query", "\"spot\"", "point"],
        ),
        (
            "SELECT id, spot FROM",
            "SELECT id, name FROM",
            2,
            &["source.key", "NULL"],
        ),
        (
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://hopper:s3cret@127.0.0.1:1/test",
            1,
            &["127.0.0.1:1"],
        ),
    ];
    for (from, to, code, says) in cases {
        let mut text = job.clone();
        if from.starts_with("postgres://") {
            // Only the source's URL.
            text = text.replacen(&pg_url(), to, 1);
        } else {
            text = text.replace(from, to);
        }
        std::fs::write(t.file(), &text).expect("job");
        let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
        assert_eq!(out.code(), code, "{to}: {}", out.stderr);
        for word in says {
            assert!(
                out.stderr.contains(word),
                "{to}: no {word:?} in {}",
                out.stderr
            );
        }
        assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
    }
    // Nothing was started.
    let out = t.dispatcher(&["runs", "--json"], LIMIT).await;
    assert!(!out.stdout.contains("\"id\""), "{}", out.stdout);
}

/// Every mapped type, special values and NULLs, through the source and back into a table of
/// the same types by the processor: the copy is equal to the source, value for value.
#[tokio::test]
async fn every_type_round_trips_through_the_source_and_the_processor() {
    let client = require_postgres().await;
    let scalars = [
        "id", "i2", "i4", "n", "f4", "f8", "t", "v", "c", "b", "d", "tm", "ts", "tz", "u", "j",
        "jb", "by",
    ];
    let arrays = ["ia", "ta", "na", "m"];
    // With array parameters the items are pipelined one statement each; with scalars alone
    // they go batched, as arrays of each parameter: both ways keep every value.
    let every: Vec<&str> = scalars.iter().chain(&arrays).copied().collect();
    let out = round_trip(&client, "pgsrc-types", &every).await;
    assert!(out.contains("items are pipelined"), "{out}");
    let out = round_trip(&client, "pgsrc-types-batched", &scalars).await;
    assert!(!out.contains("items are pipelined"), "{out}");
}

/// Copies the four test rows' columns `names` through the source and the processor into a
/// table of the same columns, and checks that every value came back as it was; returns the
/// run's log.
async fn round_trip(client: &tokio_postgres::Client, prefix: &str, names: &[&str]) -> String {
    let columns = "id int8, i2 int2, i4 int4, n numeric, f4 float4, f8 float8, t text,
                   v varchar(20), c char(3), b bool, d date, tm time, ts timestamp,
                   tz timestamptz, u uuid, j json, jb jsonb, by bytea, ia int4[],
                   ta text[], na numeric[], m int4[][]";
    let params: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
    let (t, src, dst) = copy_job(
        prefix,
        true,
        "SELECT * FROM {SRC}",
        "\"id\"",
        &format!(
            "INSERT INTO {{DST}} ({}) VALUES ({})",
            names.join(", "),
            params.join(", ")
        ),
        &serde_json::to_string(&names).expect("names"),
        "",
    );
    let _tables = Tables::create(
        client,
        &t,
        &[&src, &dst],
        &format!(
            "CREATE TABLE {src} ({columns});
             CREATE TABLE {dst} ({columns});
             INSERT INTO {src} VALUES
             (1, -32768, 2147483647, 12345678901234567890.000000000123, 3.4028235e38,
              0.1, 'quote \" back \\ tab \t é 😀', 'varchar', 'ab', true, '1999-12-31',
              '23:59:59.999999', '2024-02-29 12:34:56.789012', '2024-02-29 12:34:56.5+05:30',
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"a\": [1, 2.50, null]}}',
              '{{\"b\": {{\"c\": true}}}}', '\\x00ff10', '{{1,NULL,3}}', '{{\"a b\",\"c,d\",NULL}}',
              '{{1.50,-0.001}}', '{{{{1,2}},{{3,4}}}}'),
             (2, 0, 0, 'NaN', 'NaN', '-Infinity', '', '', '', false, '0001-01-01', '00:00',
              '1970-01-01', 'infinity', '00000000-0000-0000-0000-000000000000', '0', '[]',
              '', '{{}}', '{{}}', '{{}}', '{{}}'),
             (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (4, 1, 1, '-0.5', -1.5, 1e-300, 'x', 'y', 'z', true, '2000-01-01',
              '12:00', '-infinity', '1900-01-01 00:00:00+00', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
              '1', '\"s\"', '\\x', '{{-1}}', '{{\"\"}}', '{{0}}', '{{{{5}}}}');"
        ),
    )
    .await;
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    // json has no equality (and keeps its text as written): compared as jsonb; everything
    // else as itself.
    let side = |alias: &str| -> String {
        names
            .iter()
            .filter(|n| **n != "id")
            .map(|n| match *n {
                "j" => format!("{alias}.j::jsonb"),
                other => format!("{alias}.{other}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let differ: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {src} s FULL JOIN {dst} d USING (id)
                 WHERE ({}) IS DISTINCT FROM ({})",
                side("s"),
                side("d")
            ),
            &[],
        )
        .await
        .expect("compare")
        .get(0);
    assert_eq!(differ, 0, "rows differ after the round trip");
    assert_eq!(count(client, &dst).await, (4, 4));
    out.stderr
}
