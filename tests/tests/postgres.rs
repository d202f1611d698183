//! The `postgres` processor against the real PostgreSQL (`HOPPER_TEST_PG_URL`, by default the
//! local `test` database): one transaction per chunk, exactly-once effect on a table with no
//! unique key, bad items by the database's own refusal, transient failures retried, mistakes
//! refused at start, types converted by the database. Each test has its own tables, dropped at
//! the end with the job's applied-chunk records.

use std::sync::Arc;
use std::time::Duration;

use hopper_common::{Chunk, Item, Position};
use hopper_consumer::{PostgresProcessor, Processor};
use hopper_tests::{
    count, kill_consumers_at_quarters, pg_url, require_broker, require_postgres, Tables, TestJob,
};

const LIMIT: Duration = Duration::from_secs(120);

/// The job file of a `postgres` processor at `url` applying `statement` to each item of
/// `input.jsonl`, the item fields `params` bound in order; `more` adds tables (`[state]`,
/// `[chunking]`...).
fn file_into_postgres(url: &str, statement: &str, params: &[&str], more: &str) -> String {
    let params: Vec<String> = params.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        r#"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "postgres"
url = "{url}"
statement = "{statement}"
params = [{}]
{more}"#,
        params.join(", ")
    )
}

/// A job that inserts each item of `input.jsonl` (`id`, `price`) into `table`, in local mode.
fn insert_job(prefix: &str, table_suffix: &str, url: &str, extra: &str) -> (TestJob, String) {
    let t = TestJob::local(
        prefix,
        &file_into_postgres(
            url,
            "INSERT INTO {TABLE} (id, price) VALUES ($1, $2)",
            &["id", "price"],
            &format!(
                "[state]\nurl = \"sqlite://state.db\"\n[chunking]\nitems = 10\n\
                 [failures]\nskip_limit = 10\n{extra}"
            ),
        ),
    );
    let table = Tables::name_in_job(&t, table_suffix);
    (t, table)
}

/// The job's `postgres` processor, connected as a consumer connects it.
async fn processor_of(t: &TestJob) -> PostgresProcessor {
    let job = t.job();
    let hopper_common::ProcessorSpec::Postgres {
        url,
        statement,
        params,
    } = &job.processor
    else {
        panic!("a postgres job")
    };
    PostgresProcessor::connect(url, statement, params.clone(), "job.toml")
        .await
        .expect("connect")
}

fn write_prices(t: &TestJob, n: u64, bad: Option<u64>) {
    let lines: String = (1..=n)
        .map(|i| {
            let price = if Some(i) == bad { -1 } else { i as i64 };
            format!("{{\"id\":{i},\"price\":\"{price}.25\"}}\n")
        })
        .collect();
    std::fs::write(t.path("input.jsonl"), lines).expect("input");
}

/// A chunk delivered again after it committed is recognised and not applied again: the table
/// has no unique key, and holds each row once. The second delivery returns the first's
/// outcome (its bad item included).
#[tokio::test]
async fn a_chunk_delivered_twice_changes_the_table_once() {
    let client = require_postgres().await;
    let (t, table) = insert_job("pgtwice", "dst", &pg_url(), "");
    let _tables = Tables::create(
        &client,
        &t,
        &[&table],
        &format!("CREATE TABLE {table} (id int, price numeric(10,2) CHECK (price >= 0))"),
    )
    .await;
    let p: Arc<dyn Processor> = Arc::new(processor_of(&t).await);
    let items = (1..=5u64)
        .map(|i| Item {
            line: i,
            data: format!(
                "{{\"id\":{i},\"price\":\"{}\"}}",
                if i == 3 { "-1" } else { "1.5" }
            ),
        })
        .collect();
    let chunk = Chunk {
        job: t.name.clone(),
        run: 1,
        seq: 1,
        attempt: 1,
        position: Position { line: 1, offset: 0 },
        key: Vec::new(),
        items,
    };
    let first = p.process(&chunk).await.expect("first delivery");
    let again = p.process(&chunk).await.expect("second delivery");
    assert_eq!(first, again);
    assert_eq!(first.bad_items.len(), 1);
    assert_eq!(first.bad_items[0].line, 3);
    assert!(
        first.bad_items[0].reason.contains("check constraint"),
        "{}",
        first.bad_items[0].reason
    );
    assert_eq!(count(&client, &table).await, (4, 4));
    // Two deliveries at once (a redelivery while the first still works): once, too.
    let other = Chunk { seq: 2, ..chunk };
    let (a, b) = tokio::join!(p.process(&other), p.process(&other));
    assert_eq!(a.expect("a"), b.expect("b"));
    assert_eq!(count(&client, &table).await, (8, 4));
}

/// Over the broker, consumers SIGKILLed during the run: the target table (no unique key) holds
/// every source row exactly once.
#[tokio::test]
async fn consumers_killed_mid_run_leave_every_row_exactly_once() {
    let _conn = require_broker().await;
    let client = require_postgres().await;
    let n = 20_000u64;
    let t = TestJob::new(
        "pgkill",
        &file_into_postgres(
            &pg_url(),
            "INSERT INTO {TABLE} (id, price) VALUES ($1, $2)",
            &["id", "price"],
            "[state]\nurl = \"sqlite://state.db\"\n[chunking]\nitems = 50\n[throttle]\nrate = 8000\n",
        ),
    );
    let table = Tables::name_in_job(&t, "dst");
    let _tables = Tables::create(
        &client,
        &t,
        &[&table],
        &format!("CREATE TABLE {table} (id int, price numeric)"),
    )
    .await;
    write_prices(&t, n, None);
    let first = t.start_consumer(1, 4);
    let dispatcher = t.spawn_dispatcher(&["run"], "dispatcher.log");
    // Kill it twice in the middle of its work, each time starting another.
    let last = kill_consumers_at_quarters(&t, &client, &table, n as i64, first, LIMIT).await;
    t.await_success(dispatcher, "dispatcher.log", LIMIT).await;
    assert_eq!(count(&client, &table).await, (n as i64, n as i64));
    assert!(last.stop(LIMIT).await.success());
}

/// A row the target's CHECK refuses is a bad item listed with its line and the database's
/// message; fixed in the input, `retry` applies just that row.
#[tokio::test]
async fn a_row_refused_by_a_check_is_skipped_and_retry_applies_just_it() {
    let client = require_postgres().await;
    let (t, table) = insert_job("pgcheck", "dst", &pg_url(), "");
    let _tables = Tables::create(
        &client,
        &t,
        &[&table],
        &format!("CREATE TABLE {table} (id int, price numeric(10,2) CHECK (price >= 0))"),
    )
    .await;
    write_prices(&t, 100, Some(42));
    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["items"]["processed"], 99);
    let failures = hopper_tests::failures(&s, "reason");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, 42);
    assert!(
        failures[0].1.contains("check constraint") && failures[0].1.contains("23514"),
        "{}",
        failures[0].1
    );
    assert_eq!(count(&client, &table).await, (99, 99));

    write_prices(&t, 100, None);
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(count(&client, &table).await, (100, 100));
    let row = client
        .query_one(
            &format!("SELECT price::text FROM {table} WHERE id = 42"),
            &[],
        )
        .await
        .expect("row 42");
    assert_eq!(row.get::<_, String>(0), "42.25");
}

/// The rows the statement needs locked past the processor's `lock_timeout` (SQLSTATE 55P03):
/// transient, retried after the backoff, then done once the lock is gone. (A row lock, not a
/// table lock, so that the statement can still be prepared at start.)
#[tokio::test]
async fn a_lock_held_past_lock_timeout_is_retried_then_done() {
    let client = require_postgres().await;
    let url = format!("{}?options=-c%20lock_timeout%3D200ms", pg_url());
    let (t, table) = insert_job(
        "pglock",
        "dst",
        &url,
        "[retry]\nmax_attempts = 10\nbackoff = \"500ms..500ms\"",
    );
    let gate = Tables::name(&t, "gate");
    let text = std::fs::read_to_string(t.file()).expect("job").replace(
        &format!("INSERT INTO {table} (id, price) VALUES ($1, $2)"),
        &format!("INSERT INTO {table} (id, price) SELECT $1, $2 FROM {gate} FOR UPDATE"),
    );
    std::fs::write(t.file(), text).expect("job");
    let _tables = Tables::create(
        &client,
        &t,
        &[&table, &gate],
        &format!(
            "CREATE TABLE {table} (id int, price numeric); CREATE TABLE {gate} (open bool);
             INSERT INTO {gate} VALUES (true);"
        ),
    )
    .await;
    write_prices(&t, 30, None);
    let (mut locker, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .expect("a second connection");
    tokio::spawn(conn);
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute(&format!("SELECT * FROM {gate} FOR UPDATE"))
        .await
        .expect("lock");
    let run = t.spawn_dispatcher(&["run", "--local", "1"], "run.log");
    // The lock is let go once an attempt has failed on it, not after a guessed pause: on a
    // loaded machine the first attempt can come later than any pause.
    t.await_log("run.log", "55P03").await;
    lock.rollback().await.expect("unlock");
    t.await_success(run, "run.log", LIMIT).await;
    assert_eq!(count(&client, &table).await, (30, 30));
}

/// What cannot work is refused at start, naming the field: a statement the database cannot
/// prepare, parameters that do not match it (exit 2); a database that cannot be reached (exit
/// 1, with host and port, never the password).
#[tokio::test]
async fn mistakes_are_refused_at_start_naming_the_field() {
    let client = require_postgres().await;
    let (t, table) = insert_job("pgbad", "dst", &pg_url(), "");
    let _tables = Tables::create(
        &client,
        &t,
        &[&table],
        &format!("CREATE TABLE {table} (id int, price numeric)"),
    )
    .await;
    write_prices(&t, 10, None);
    let job = std::fs::read_to_string(t.file()).expect("job");
    let cases = [
        (
            job.replace("INSERT INTO", "INSERT INTOO"),
            2,
            "processor.statement",
            "syntax error",
        ),
        (
            job.replace("params = [\"id\", \"price\"]", "params = [\"id\"]"),
            2,
            "processor.params",
            "takes 2 parameter",
        ),
        (
            job.replace(&pg_url(), "postgres://postgres:s3cret@127.0.0.1:1/test"),
            1,
            "processor.url",
            "127.0.0.1:1",
        ),
    ];
    for (text, code, field, says) in cases {
        std::fs::write(t.file(), &text).expect("job");
        for out in [
            t.dispatcher(&["run", "--local", "1"], LIMIT).await,
            hopper_tests::run(
                {
                    let mut cmd =
                        tokio::process::Command::new(hopper_tests::bin("hopper-consumer"));
                    cmd.arg(t.file());
                    cmd
                },
                LIMIT,
            )
            .await,
        ] {
            assert_eq!(out.code(), code, "{}", out.stderr);
            assert!(
                out.stderr.contains(field) && out.stderr.contains(says),
                "{}",
                out.stderr
            );
            assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
        }
    }
    assert_eq!(count(&client, &table).await, (0, 0));
}

/// Every common type goes through as the database reads its text form; NULL stays NULL.
#[tokio::test]
async fn types_are_converted_by_the_database() {
    let client = require_postgres().await;
    let t = TestJob::local(
        "pgtypes",
        &file_into_postgres(
            &pg_url(),
            "INSERT INTO {TABLE} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            &[
                "i2", "i4", "i8", "num", "f8", "txt", "b", "d", "ts", "u", "jb", "j", "bin", "ia",
                "ta",
            ],
            "[state]\nurl = \"sqlite://state.db\"\n",
        ),
    );
    let table = Tables::name_in_job(&t, "types");
    let _tables = Tables::create(
        &client,
        &t,
        &[&table],
        &format!(
            "CREATE TABLE {table} (i2 int2, i4 int4, i8 int8, num numeric, f8 float8, txt text,
             b bool, d date, ts timestamptz, u uuid, jb jsonb, j json, bin bytea, ia int4[],
             ta text[])"
        ),
    )
    .await;
    let full = r#"{"i2":-7,"i4":2147483647,"i8":9007199254740993,"num":"12345678901234567890.000000000001","f8":1.5,"txt":"tab\there \"quoted\" é","b":true,"d":"2026-11-26","ts":"2026-11-26T10:00:00.123456Z","u":"0f8fad5b-d9cb-469f-a165-70867728950e","jb":{"a":[1,null,"x"]},"j":"just a string","bin":"AAEC/w==","ia":[1,null,3],"ta":["a","b \"c\"",null]}"#;
    let nulls = r#"{"i2":null,"i4":null,"i8":null,"num":null,"f8":null,"txt":null,"b":null,"d":null,"ts":null,"u":null,"jb":null,"j":null,"bin":null,"ia":null,"ta":null}"#;
    std::fs::write(t.path("input.jsonl"), format!("{full}\n{nulls}\n")).expect("input");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let rows = client
        .query(
            &format!(
                "SELECT i2::text, i4::text, i8::text, num::text, f8::text, txt, b::text, \
                 d::text, ts::text, u::text, jb::text, j::text, bin::text, ia::text, ta::text \
                 FROM {table} ORDER BY i2 NULLS LAST"
            ),
            &[],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), 2);
    let got: Vec<Option<String>> = (0..15).map(|i| rows[0].get(i)).collect();
    let want = [
        "-7",
        "2147483647",
        "9007199254740993",
        "12345678901234567890.000000000001",
        "1.5",
        "tab\there \"quoted\" é",
        "true",
        "2026-11-26",
        "",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        r#"{"a": [1, null, "x"]}"#,
        r#""just a string""#,
        r"\x000102ff",
        "{1,NULL,3}",
        r#"{a,"b \"c\"",NULL}"#,
    ];
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if i == 8 {
            // The session's time zone decides how a timestamptz prints: compare the instant.
            continue;
        }
        assert_eq!(g.as_deref(), Some(w), "column {i}");
    }
    let instant = client
        .query_one(
            &format!(
                "SELECT ts = '2026-11-26T10:00:00.123456Z'::timestamptz FROM {table} WHERE i2 = -7"
            ),
            &[],
        )
        .await
        .expect("ts");
    assert!(instant.get::<_, bool>(0));
    let nulls: Vec<Option<String>> = (0..15).map(|i| rows[1].get(i)).collect();
    assert!(nulls.iter().all(Option::is_none), "{nulls:?}");
}

/// The batched path sends a chunk's values as arrays, binary where a value's binary form is
/// exactly what the database makes of its text: every value lands as the database's own cast
/// of its text would make it, whether its column went binary, fell back to a text literal for
/// a value without a binary form, or the chunk was done item by item after a refusal.
#[tokio::test]
async fn batched_arrays_give_the_database_what_each_value_one_by_one_would() {
    use serde_json::{json, Value};

    let client = require_postgres().await;
    let columns = [
        ("i2", "int2"),
        ("i4", "int4"),
        ("i8", "int8"),
        ("num", "numeric"),
        ("n2", "numeric(10,2)"),
        ("t", "text"),
        ("vc", "varchar(12)"),
        ("c", "char(3)"),
    ];
    let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let params: Vec<&str> = std::iter::once("ord")
        .chain(names.iter().copied())
        .collect();
    let t = TestJob::local(
        "pgarrays",
        &file_into_postgres(
            &pg_url(),
            &format!(
                "INSERT INTO {{TABLE}} (ord, {}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                names.join(", ")
            ),
            &params,
            "",
        ),
    );
    let table = Tables::name_in_job(&t, "arrays");
    let ddl: Vec<String> = columns.iter().map(|(n, ty)| format!("{n} {ty}")).collect();
    let _tables = Tables::create(
        &client,
        &t,
        &[&table],
        &format!("CREATE TABLE {table} (ord int4, {})", ddl.join(", ")),
    )
    .await;
    let p = processor_of(&t).await;
    let row = |ord: i64, values: [Value; 8]| {
        let mut item = serde_json::Map::new();
        item.insert("ord".into(), json!(ord));
        for (name, v) in names.iter().zip(values) {
            item.insert(name.to_string(), v);
        }
        Value::Object(item)
    };
    let n = Value::Null;
    // A row of plain values with `changes` in place of some: each row below differs from it in
    // what it tries.
    let plain = |ord: i64, changes: &[(&str, Value)]| {
        let mut item = row(
            ord,
            [
                json!(1),
                json!(1),
                json!(1),
                json!("1"),
                json!("1"),
                json!("t"),
                json!("v"),
                json!("c"),
            ],
        );
        for (name, value) in changes {
            item[*name] = value.clone();
        }
        item
    };
    let chunks: Vec<Vec<Value>> = vec![
        // Every value with a binary form; a bad item (a missing field) among them.
        vec![
            row(
                1,
                [
                    json!(-7),
                    json!(7),
                    json!(9007199254740993i64),
                    json!("12345678901234567890.000000000001"),
                    json!("1.99"),
                    json!("a \"q\" \\ {x}, y"),
                    json!("short"),
                    json!("ab"),
                ],
            ),
            row(
                2,
                [
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                ],
            ),
            row(
                3,
                [
                    json!(-32768),
                    json!(-2147483648i64),
                    json!(i64::MIN),
                    json!("-0.000"),
                    json!("00012.3450"),
                    json!(""),
                    json!("é ü ✓"),
                    json!("abc"),
                ],
            ),
            json!({"ord": 4, "i2": 1}),
            row(
                5,
                [
                    json!(32767),
                    json!(0),
                    json!(i64::MAX),
                    json!("0"),
                    json!("-0.5"),
                    json!("NULL"),
                    json!("{}"),
                    json!(""),
                ],
            ),
            row(
                6,
                [
                    json!(0),
                    json!(1),
                    json!(2),
                    json!(1.5),
                    json!(7),
                    json!(12),
                    json!(true),
                    json!(3),
                ],
            ),
        ],
        // Values without a binary form: their columns go as literals.
        vec![
            row(
                7,
                [
                    json!("5"),
                    json!(" 6 "),
                    json!("42"),
                    json!("1e3"),
                    json!(" 5 "),
                    json!(false),
                    json!(1.25),
                    json!("x"),
                ],
            ),
            plain(
                8,
                &[
                    ("i4", json!(2)),
                    ("i8", json!(3)),
                    ("num", json!("NaN")),
                    ("n2", json!("+2.5")),
                ],
            ),
            plain(
                9,
                &[
                    ("i4", json!(2)),
                    ("i8", json!(3)),
                    ("num", json!(".5")),
                    ("n2", json!("5.")),
                ],
            ),
        ],
        // Refused by the database: the chunk is done item by item.
        vec![
            plain(10, &[("i2", json!(40000))]),
            plain(11, &[("t", json!("nul\u{0}byte"))]),
            plain(12, &[("i8", json!(u64::MAX))]),
            plain(13, &[("vc", json!("far too long for it"))]),
            plain(14, &[("n2", json!("123456789.5"))]),
            row(
                15,
                [
                    json!(3),
                    json!(3),
                    json!(3),
                    json!("3.14159"),
                    json!("3.14159"),
                    json!("t"),
                    json!("v"),
                    json!("c"),
                ],
            ),
        ],
    ];
    let mut bad = Vec::new();
    for (seq, items) in chunks.iter().enumerate() {
        let chunk = Chunk {
            job: t.name.clone(),
            run: 1,
            seq: seq as u64 + 1,
            attempt: 1,
            position: Position { line: 1, offset: 0 },
            key: Vec::new(),
            items: items
                .iter()
                .map(|v| Item {
                    line: v["ord"].as_u64().expect("ord"),
                    data: v.to_string(),
                })
                .collect(),
        };
        let done = p.process(&chunk).await.expect("processed");
        bad.extend(done.bad_items.iter().map(|b| b.line));
    }
    assert_eq!(bad, [4, 10, 11, 12, 13, 14]);
    // Each value as the database's cast of its text makes it, the row's own or NULL.
    let mut checked = 0;
    for item in chunks.iter().flatten() {
        let ord = item["ord"].as_i64().expect("ord");
        if bad.contains(&(ord as u64)) {
            continue;
        }
        for (name, ty) in columns {
            let text: Option<String> = match &item[name] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            let want: Option<String> = client
                .query_one(&format!("SELECT CAST($1::text AS {ty})::text"), &[&text])
                .await
                .expect("cast")
                .get(0);
            let got: Option<String> = client
                .query_one(
                    &format!("SELECT {name}::text FROM {table} WHERE ord = $1"),
                    &[&(ord as i32)],
                )
                .await
                .unwrap_or_else(|e| panic!("row {ord}: {e}"))
                .get(0);
            assert_eq!(got, want, "row {ord}, column {name} ({ty}), text {text:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 9 * columns.len());
    assert_eq!(count_rows(&client, &table).await, 9);
}

async fn count_rows(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}
