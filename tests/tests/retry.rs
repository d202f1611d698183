//! `retry`: after the operator fixed the input, only what failed is dispatched again, from the
//! positions the run recorded, and the run ends `completed` with every record once.

use std::time::Duration;

use hopper_tests::{
    assert_every_id_once, failures, output_ids, require_broker, write_jsonl, TestJob,
};

const LIMIT: Duration = Duration::from_secs(120);

/// Lines that cannot be read the first time, and are fixed (made longer) before the retry.
const MALFORMED: [u64; 3] = [7, 1500, 2999];
/// Items the processor refuses the first time, fixed (made shorter) before the retry.
const REFUSED: [u64; 2] = [250, 1777];
/// The chunk holding this id fails on every attempt while `outage` exists.
const OUTAGE_ID: u64 = 2222;
const N: u64 = 3000;

/// The input, with the malformed lines and the refused items fixed or not.
fn input(malformed_fixed: bool, refused_fixed: bool) -> String {
    (1..=N)
        .map(|id| {
            if MALFORMED.contains(&id) && !malformed_fixed {
                format!("{{\"id\":{id},oops\n")
            } else if MALFORMED.contains(&id) {
                format!("{{\"id\":{id},\"name\":\"fixed by the operator\",\"price\":2}}\n")
            } else if REFUSED.contains(&id) && !refused_fixed {
                format!("{{\"id\":{id},\"name\":\"item {id}\",\"price\":null}}\n")
            } else {
                format!("{{\"id\":{id},\"name\":\"item {id}\",\"price\":1}}\n")
            }
        })
        .collect()
}

#[tokio::test]
async fn fixed_records_are_read_again_from_their_positions_and_the_run_completes() {
    let conn = require_broker().await;
    let t = TestJob::new(
        "retry",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 100
[processor]
kind = "exec"
command = ["python3", "process.py"]
[retry]
max_attempts = 2
backoff = "100ms..100ms"
[failures]
skip_limit = 10
"#,
    );
    // Refuses items without a price; fails the whole chunk holding OUTAGE_ID while `outage`
    // exists; writes the rest to out/RUN/SEQ.jsonl, replacing the file of an earlier attempt.
    std::fs::write(
        t.path("process.py"),
        format!(
            r#"import json, os, sys
items = [json.loads(l) for l in sys.stdin]
if os.path.exists("outage") and any(i["id"] == {OUTAGE_ID} for i in items):
    sys.exit("the payment API is down")
good = []
for n, item in enumerate(items):
    if item.get("price") is None:
        print(json.dumps({{"index": n, "reason": "no price"}}))
    else:
        good.append(item)
d = os.path.join("out", os.environ["HOPPER_RUN"])
os.makedirs(d, exist_ok=True)
tmp = os.path.join(d, os.environ["HOPPER_SEQ"] + ".tmp")
with open(tmp, "w") as f:
    f.writelines(json.dumps(i) + "\n" for i in good)
os.replace(tmp, tmp[:-4] + ".jsonl")
"#
        ),
    )
    .expect("script");
    std::fs::write(t.path("outage"), "").expect("outage");
    std::fs::write(t.path("input.jsonl"), input(false, false)).expect("input");
    let consumer = t.start_consumer(1, 2);

    let out = t.dispatcher(&["run"], LIMIT).await;
    assert_eq!(out.code(), 1, "completed with failures: {}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["items"]["read"], N);
    assert_eq!(status["items"]["skipped"], 5);
    assert_eq!(status["items"]["failed"], 100);
    assert_eq!(status["chunks"]["dead"], 1);
    let mut listed = failures(&status, "class");
    listed.sort();
    let dead_line = listed
        .iter()
        .find(|f| f.1 == "chunk")
        .map(|f| f.0)
        .expect("the dead chunk is listed");
    assert!(
        (dead_line..dead_line + 101).contains(&OUTAGE_ID),
        "{listed:?}"
    );
    for line in MALFORMED {
        assert!(listed.contains(&(line, "bad_data".into())), "{listed:?}");
    }
    for line in REFUSED {
        assert!(listed.contains(&(line, "bad_item".into())), "{listed:?}");
    }
    let done_first = output_ids(&t.path("out"));
    assert_eq!(done_first.len() as u64, N - 5 - 100);

    // An input edited elsewhere than the failed records is refused, and nothing is sent.
    std::fs::remove_file(t.path("outage")).expect("outage over");
    let elsewhere = input(true, true).replacen("\"item 1\"", "\"item one\"", 1);
    std::fs::write(t.path("input.jsonl"), elsewhere).expect("input");
    let out = t.dispatcher(&["retry", "--run", "1"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("changed outside the failed records"),
        "{}",
        out.stderr
    );
    assert_eq!(t.status().await["state"], "completed_with_failures");
    assert_eq!(output_ids(&t.path("out")), done_first);

    // The malformed lines fixed in place (longer now), the refused items not yet: what is fixed
    // goes through, the rest is listed again, where it lies in the input now.
    std::fs::write(t.path("input.jsonl"), input(true, false)).expect("input");
    let out = t.dispatcher(&["retry", "--run", "1"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["state"], "completed_with_failures");
    assert_eq!(status["items"]["skipped"], 2);
    assert_eq!(status["chunks"]["dead"], 0);
    let still: Vec<(u64, String)> = failures(&status, "class");
    assert_eq!(
        still,
        REFUSED
            .iter()
            .map(|l| (*l, "bad_item".to_string()))
            .collect::<Vec<_>>()
    );

    // Then the refused items fixed too (shorter now): a second retry finishes the run.
    std::fs::write(t.path("input.jsonl"), input(true, true)).expect("input");
    let out = t.dispatcher(&["retry", "--run", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let status = t.status().await;
    assert_eq!(status["run"], 1);
    assert_eq!(status["state"], "completed");
    assert_eq!(status["items"]["read"], N);
    assert_eq!(status["items"]["processed"], N);
    assert_eq!(status["items"]["skipped"], 0);
    assert_eq!(status["items"]["failed"], 0);
    assert_eq!(status["chunks"]["dead"], 0);
    assert_eq!(status["chunks"]["retried"], 1);
    assert_eq!(status["failures"].as_array().map(Vec::len), Some(0));
    assert_every_id_once(&t.path("out"), N);

    // A completed run has nothing left to retry.
    let out = t.dispatcher(&["retry", "--run", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stderr.contains("nothing to retry"), "{}", out.stderr);
    assert_every_id_once(&t.path("out"), N);

    assert!(consumer.stop(Duration::from_secs(30)).await.success());
    assert_eq!(
        t.queue_depth(&conn, &format!("hopper.{}.chunks", t.name))
            .await,
        0
    );
}

#[tokio::test]
async fn retry_refuses_unknown_runs_and_runs_still_reading_their_input() {
    let t = TestJob::local(
        "retry-refused",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
rate = 200
[processor]
kind = "noop"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 2_000, 30);
    let out = t.dispatcher(&["retry", "--run", "7"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("no run 7"), "{}", out.stderr);

    // Interrupted part-way: `--resume` finishes it, not `retry`. (A run stopped at the skip
    // limit is another matter: `retry` finishes it, see edge_cases.)
    t.kill_after_progress(&["run", "--local", "1"], 0, 100)
        .await;
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("finish it with `run --resume` first"),
        "{}",
        out.stderr
    );

    let out = t.dispatcher(&["retry"], LIMIT).await;
    assert_eq!(out.code(), 2, "--run is required: {}", out.stderr);
}
