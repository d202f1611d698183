//! Edge cases Hopper promises to handle, one test each, in local mode (no broker), each checking
//! the exact counts and positions in `status --json` and the exit code. The numbers are those of
//! the edge-cases issue ("every record accounted for").

use std::time::Duration;

use hopper_tests::{write_jsonl, TestJob};

const LIMIT: Duration = Duration::from_secs(60);

/// A job over `input.jsonl` in chunks of 10, run by `command` (an exec processor).
fn exec_job(prefix: &str, command: &str, extra: &str) -> TestJob {
    TestJob::local(
        prefix,
        &format!(
            r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[processor]
kind = "exec"
command = ["sh", "-c", '{command}']
[retry]
max_attempts = 1
[failures]
skip_limit = 100
{extra}"#
        ),
    )
}

/// 3. The same item refused twice by a processor counts once.
#[tokio::test]
async fn an_item_refused_twice_counts_once() {
    let t = exec_job(
        "twice",
        r#"cat >/dev/null; echo "{\"index\": 0, \"reason\": \"no price\"}"; echo "{\"index\": 0, \"reason\": \"again\"}""#,
        "",
    );
    write_jsonl(&t.path("input.jsonl"), 30, 30);
    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["items"]["read"], 30);
    assert_eq!(s["items"]["processed"], 27);
    assert_eq!(s["items"]["skipped"], 3);
    let lines: Vec<u64> = s["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .map(|f| f["position"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(lines, vec![1, 11, 21]);
    assert_eq!(s["failures"][0]["reason"], "no price");
}

/// 6. A refusal line the exec processor does not understand fails the chunk, quoting the line,
///    instead of being ignored with the item counted as processed.
#[tokio::test]
async fn a_malformed_refusal_fails_its_chunk_quoting_the_line() {
    let t = exec_job(
        "malformed",
        r#"cat >/dev/null; if [ $HOPPER_SEQ = 2 ]; then echo "{\"index\": -1, \"reason\": \"x\"}"; fi"#,
        "",
    );
    write_jsonl(&t.path("input.jsonl"), 30, 30);
    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["items"]["processed"], 20);
    assert_eq!(s["items"]["failed"], 10);
    assert_eq!(s["chunks"]["dead"], 1);
    let reason = s["failures"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("malformed refusal line"), "{reason}");
    assert!(
        reason.contains(r#"{"index": -1, "reason": "x"}"#),
        "{reason}"
    );
}

/// 7. `lines` keeps each line byte for byte (but its line ending), and a byte order mark is
///    skipped.
#[tokio::test]
async fn lines_are_kept_byte_for_byte_and_a_byte_order_mark_is_skipped() {
    let t = TestJob::local(
        "bom",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.txt"
format = "lines"
[processor]
kind = "file"
dir = "out"
"#,
    );
    std::fs::write(t.path("input.txt"), b"\xEF\xBB\xBF\tindented \r\nplain\n").expect("input");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let written = std::fs::read_to_string(t.path("out/1/1.jsonl")).expect("output");
    assert_eq!(written, "\"\\tindented \"\n\"plain\"\n");
    assert_eq!(t.status().await["items"]["processed"], 2);
}

/// 12. Plain `status` escapes the control characters of a reason; 13. a 2 MB reason is stored
///     cut at 4 KiB, saying so.
#[tokio::test]
async fn reasons_are_escaped_in_the_table_and_cut_at_4_kib() {
    let t = exec_job(
        "reasons",
        r#"cat >/dev/null; if [ $HOPPER_SEQ = 1 ]; then printf "%s\n" "{\"index\": 0, \"reason\": \"\\u001b[2Jboom\\r\"}"; else printf "{\"index\": 0, \"reason\": \"%s\"}\n" "$(head -c 2000000 /dev/zero | tr "\\0" x)"; fi"#,
        "",
    );
    write_jsonl(&t.path("input.jsonl"), 20, 30);
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let table = t.dispatcher(&["status"], LIMIT).await;
    assert!(table.status.success(), "{}", table.stderr);
    assert!(!table.stdout.contains('\u{1b}') && !table.stdout.contains('\r'));
    assert!(
        table.stdout.contains(r"\u{1b}[2Jboom\r"),
        "{}",
        table.stdout
    );
    let s = t.status().await;
    let long = s["failures"][1]["reason"].as_str().unwrap_or_default();
    assert!(long.len() <= 4_096, "{} bytes", long.len());
    assert!(
        long.ends_with("(cut: 2000000 bytes in all)"),
        "{}",
        &long[4_000..]
    );
}

/// 14. An exec program that exists but is not executable is refused at start (exit 2).
#[tokio::test]
async fn a_program_that_is_not_executable_is_refused_at_start() {
    let t = TestJob::local(
        "noexec",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "exec"
command = ["./process.sh"]
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 10, 30);
    std::fs::write(t.path("process.sh"), "#!/bin/sh\ncat >/dev/null\n").expect("script");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("not executable"), "{}", out.stderr);
    assert!(out.stderr.contains("processor.command"), "{}", out.stderr);
}

/// 11. A dispatcher gone on this host is taken for dead at once, not 30 s later.
#[tokio::test]
async fn a_dispatcher_killed_on_this_host_is_not_alive_for_status() {
    let t = TestJob::local(
        "gone",
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
    t.kill_after_progress(&["run", "--local", "1"], 0, 100)
        .await;
    let s = t.status().await;
    assert_eq!(s["state"], "running");
    assert_eq!(s["dispatcher_alive"], false);
}

/// 9. A FIFO (any input that is not a regular file) is refused before it is opened (opening one
///    with no writer would block), with exit 2 and why.
#[tokio::test]
async fn an_input_that_is_not_a_regular_file_is_refused_without_blocking() {
    let t = TestJob::local(
        "fifo",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "noop"
"#,
    );
    let made = std::process::Command::new("mkfifo")
        .arg(t.path("input.jsonl"))
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let out = t
        .dispatcher(&["run", "--local", "1"], Duration::from_secs(20))
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("not a regular file"), "{}", out.stderr);
}

/// 16. `status` of a job never run says so and creates nothing.
#[tokio::test]
async fn status_of_a_job_never_run_creates_nothing() {
    let t = TestJob::local(
        "neverrun",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "noop"
"#,
    );
    let out = t.dispatcher(&["status"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("has no runs yet"), "{}", out.stderr);
    assert!(!t.path("state.db").exists());
}

/// 16. A `state.url` in a directory that does not exist is refused (exit 2, naming it), not
///     made: a typo in the path would otherwise hide the run's state somewhere new.
#[tokio::test]
async fn a_state_file_in_a_missing_directory_is_refused() {
    let t = TestJob::local(
        "nostatedir",
        r#"
[state]
url = "sqlite://missing/state.db"
[source]
kind = "file"
path = "input.jsonl"
[processor]
kind = "noop"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 10, 30);
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("missing") && out.stderr.contains("does not exist"),
        "{}",
        out.stderr
    );
    assert!(!t.path("missing").exists());
}

/// 4. A CSV header with a name used twice, or an empty one, is refused before anything is sent
///    (exit 2, naming the columns), instead of merging or dropping fields.
#[tokio::test]
async fn a_csv_header_that_would_lose_fields_is_refused() {
    for (header, says) in [
        ("id,id,name", "columns 1 and 2 are both named \"id\""),
        ("id,,name", "column 2 has no name"),
    ] {
        let t = TestJob::local(
            "csvheader",
            r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.csv"
[processor]
kind = "noop"
"#,
        );
        std::fs::write(t.path("input.csv"), format!("{header}\n1,2,3\n")).expect("input");
        let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
        assert_eq!(out.code(), 2, "{header}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{header}: {}", out.stderr);
        assert!(
            !out.stderr.contains("run 1"),
            "nothing was started: {}",
            out.stderr
        );
    }
}

/// 10. Two `run`s started together: checking that no dispatcher of the job is alive and taking
///     the run are one transaction, so exactly one runs and the other exits 3 ("already
///     running", naming the run and its dispatcher) having changed nothing. Five rounds, since
///     a race shows itself only sometimes.
#[tokio::test]
async fn of_two_runs_started_together_exactly_one_runs() {
    let t = exec_job("together", "cat >/dev/null; sleep 0.3", "");
    write_jsonl(&t.path("input.jsonl"), 30, 30);
    for round in 1..=5u64 {
        let (a, b) = tokio::join!(
            t.dispatcher(&["run", "--local", "1"], LIMIT),
            t.dispatcher(&["run", "--local", "1"], LIMIT)
        );
        let mut codes = [a.code(), b.code()];
        codes.sort_unstable();
        assert_eq!(
            codes,
            [0, 3],
            "round {round}: {}\n---\n{}",
            a.stderr,
            b.stderr
        );
        let loser = if a.code() == 3 { &a } else { &b };
        assert!(
            loser
                .stderr
                .contains(&format!("already running: run {round} ")),
            "round {round}: {}",
            loser.stderr
        );
        // One run per round, every record processed once in it.
        let s = t.status().await;
        assert_eq!(s["run"], round);
        assert_eq!(s["state"], "completed");
        assert_eq!(s["items"]["processed"], 30);
    }
}

/// 15. In local mode the dispatcher runs the commands itself: a first SIGTERM waits for the chunk
///     in hand, a second stops at once and kills the command's whole process group. The run
///     stays `running`, for `run --resume`, which then finishes it with every record once.
#[tokio::test]
async fn a_second_sigterm_stops_a_local_run_at_once_and_kills_the_command_group() {
    let t = exec_job(
        "secondsig",
        "cat >/dev/null; if [ ! -e grandchild.pid ]; then sleep 300 & echo $! > grandchild.tmp; mv grandchild.tmp grandchild.pid; wait; fi",
        "",
    );
    write_jsonl(&t.path("input.jsonl"), 30, 30);
    let mut child = t.spawn_dispatcher(&["run", "--local", "1"], "dispatcher.log");
    let pid_file = t.path("grandchild.pid");
    hopper_tests::await_file(&pid_file, "no chunk started", LIMIT).await;
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    let term = |pid: u32| {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
    };
    let pid = child.id().expect("the dispatcher runs");
    term(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        child.try_wait().expect("poll").is_none(),
        "the first SIGTERM waits for the chunk in hand"
    );
    term(pid);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the second SIGTERM stops the dispatcher at once")
        .expect("wait");
    assert_eq!(status.code(), Some(1));
    hopper_tests::await_process_end(
        grandchild,
        "the command's grandchild",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(t.status().await["state"], "running");

    let out = t
        .dispatcher(&["run", "--resume", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_eq!(s["items"]["processed"], 30);
    assert_eq!(s["items"]["read"], 30);
}

/// A CSV job over `input.csv`, each chunk's items written to `out/SEQ.jsonl` (the `file`
/// processor), so that what was processed can be read back.
fn csv_job(prefix: &str) -> TestJob {
    TestJob::local(
        prefix,
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.csv"
format = "csv"
[chunking]
items = 2
[processor]
kind = "file"
dir = "out"
[failures]
skip_limit = 10
"#,
    )
}

/// The `id` of every item the `file` processor wrote, in order.
fn csv_ids(t: &TestJob) -> Vec<String> {
    let mut ids: Vec<String> = hopper_tests::output_items(&t.path("out"))
        .iter()
        .map(|v| v["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
    ids
}

/// 5. A quote left open swallows the rest of the file: that is bad data at the line where its
///    record starts, not rows silently merged. Fixed in place, `retry` reads every row it had
///    swallowed; in the header, the run is refused.
#[tokio::test]
async fn a_csv_quote_left_open_is_bad_data_at_its_line_and_retry_reads_what_it_swallowed() {
    let t = csv_job("openquote");
    let input = "id,name\n1,a\n2,b\n3,\"c\n4,d\n5,e\n6,f\n";
    std::fs::write(t.path("input.csv"), input).expect("input");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["items"]["read"], 3);
    assert_eq!(s["items"]["processed"], 2);
    assert_eq!(s["items"]["skipped"], 1);
    let failures = hopper_tests::failures(&s, "reason");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, 4);
    assert!(
        failures[0].1.contains("never closed: lines 4 to 7"),
        "{}",
        failures[0].1
    );

    std::fs::write(t.path("input.csv"), input.replace("\"c", "\"c\"")).expect("fix");
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_eq!(s["failures"], serde_json::json!([]));
    // The record it had taken for one was four: they count as four, read and processed.
    assert_eq!(s["items"]["read"], 6);
    assert_eq!(s["items"]["processed"], 6);
    assert_eq!(csv_ids(&t), ["1", "2", "3", "4", "5", "6"]);

    let h = csv_job("openheader");
    std::fs::write(h.path("input.csv"), "id,\"name\n1,a\n").expect("input");
    let out = h.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("never closed"), "{}", out.stderr);
}

/// 8. CSV with old Mac line endings (`\r` only): lines are counted as the reader splits
///    records, so a bad row is reported on its own line, and fixed in place it is retried.
#[tokio::test]
async fn csv_with_cr_line_endings_reports_the_right_line_and_retries_the_fix() {
    let t = csv_job("crcsv");
    let input = "id,name\r1,a\r2\r3,c\r4,d\r";
    std::fs::write(t.path("input.csv"), input).expect("input");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["items"]["read"], 4);
    assert_eq!(s["items"]["processed"], 3);
    let failures = hopper_tests::failures(&s, "class");
    assert_eq!(failures, [(3, "bad_data".to_string())]);

    std::fs::write(t.path("input.csv"), input.replace("\r2\r", "\r2,b\r")).expect("fix");
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_eq!(csv_ids(&t), ["1", "2", "3", "4"]);
}

/// `status --json` accounts for every record read: processed, skipped or failed, and no chunk
/// left without an outcome.
fn assert_accounted(s: &serde_json::Value) {
    let items = &s["items"];
    let n = |k: &str| items[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        n("read"),
        n("processed") + n("skipped") + n("failed"),
        "every record read is accounted for: {items}"
    );
    assert_eq!(s["chunks"]["pending"], 0, "{}", s["chunks"]);
    assert_eq!(s["chunks"]["in_flight"], 0, "{}", s["chunks"]);
}

/// 1. The skip limit reached through processor refusals: the run stops sending, but waits for
///    the outcome of every chunk it sent, so that each record read is processed or listed; once
///    the processor is fixed, `retry` finishes the run.
#[tokio::test]
async fn the_skip_limit_reached_by_refusals_accounts_for_every_chunk_and_retry_finishes() {
    let t = exec_job(
        "skiprefuse",
        r#"cat >/dev/null; if [ ! -e fixed ] && [ $HOPPER_SEQ = 1 ]; then echo "{\"index\": 0, \"reason\": \"no price\"}"; fi"#,
        "",
    );
    std::fs::write(
        t.file(),
        std::fs::read_to_string(t.file())
            .expect("job")
            .replace("skip_limit = 100", "skip_limit = 0"),
    )
    .expect("job");
    write_jsonl(&t.path("input.jsonl"), 30, 30);
    let out = t.dispatcher(&["run", "--local", "2"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "failed");
    assert_accounted(&s);
    assert_eq!(s["items"]["skipped"], 1);
    assert_eq!(
        hopper_tests::failures(&s, "reason"),
        [(1, "no price".to_string())]
    );

    std::fs::write(t.path("fixed"), "").expect("fix the processor");
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "2"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_accounted(&s);
    assert_eq!(s["items"]["read"], 30);
    assert_eq!(s["items"]["processed"], 30);
}

/// 1. A run that stopped at the skip limit before reading all its input (a bad line, one chunk
///    in flight at a time): `retry`, once the line is fixed in place (longer), reads it again,
///    then reads on from where the run stopped, every record once.
#[tokio::test]
async fn retry_of_a_run_stopped_at_the_skip_limit_reads_on_after_the_fix() {
    let t = TestJob::local(
        "skipreadon",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
window = 1
[processor]
kind = "file"
dir = "out"
[failures]
skip_limit = 0
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 500, 40);
    let good = std::fs::read_to_string(t.path("input.jsonl")).expect("input");
    let line5 = good.lines().nth(4).expect("line 5").to_string();
    std::fs::write(t.path("input.jsonl"), good.replacen(&line5, "{oops", 1)).expect("break");
    let out = t.dispatcher(&["run", "--local", "1"], LIMIT).await;
    assert_eq!(out.code(), 1, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "failed");
    assert_accounted(&s);
    let read = s["items"]["read"].as_u64().unwrap_or(0);
    assert!(read < 500, "it stopped short of the end: read {read}");
    assert_eq!(
        hopper_tests::failures(&s, "class"),
        [(5, "bad_data".to_string())]
    );

    std::fs::write(t.path("input.jsonl"), &good).expect("fix line 5 in place");
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_accounted(&s);
    assert_eq!(s["items"]["read"], 500);
    assert_eq!(s["items"]["processed"], 500);
    hopper_tests::assert_every_id_once(&t.path("out"), 500);
}

/// 2. `run --resume` after the input was edited before the checkpoint: a fix that changes the
///    size, or a line inserted and another of the same length deleted, is refused with exit 2,
///    saying what changed. With the input put back, the run resumes and ends with every record
///    once, and `retry` is not left refused.
#[tokio::test]
async fn resume_refuses_an_input_edited_before_its_checkpoint() {
    let t = TestJob::local(
        "editedinput",
        r#"
[state]
url = "sqlite://state.db"
[source]
kind = "file"
path = "input.jsonl"
[chunking]
items = 10
[throttle]
rate = 2000
[processor]
kind = "file"
dir = "out"
"#,
    );
    write_jsonl(&t.path("input.jsonl"), 5_000, 40);
    let original = std::fs::read_to_string(t.path("input.jsonl")).expect("input");
    t.kill_after_progress(&["run", "--local", "1"], 0, 500)
        .await;

    let line5 = original.lines().nth(4).expect("line 5").to_string();
    let longer = original.replacen(&line5, &format!("{line5}        "), 1);
    let mut lines: Vec<&str> = original.lines().collect();
    let same_len = lines[1].replace("\"id\":2,", "\"id\":0,");
    lines.insert(2, &same_len);
    // The line of id 9, as long as id 2's.
    lines.remove(9);
    let shuffled = lines.join("\n") + "\n";
    assert_eq!(shuffled.len(), original.len());
    for (edited, says) in [(longer, "bytes, "), (shuffled, "content differs")] {
        std::fs::write(t.path("input.jsonl"), &edited).expect("edit");
        let out = t
            .dispatcher(&["run", "--resume", "--local", "1"], LIMIT)
            .await;
        assert_eq!(out.code(), 2, "{}", out.stderr);
        assert!(
            out.stderr
                .contains("changed since run 1 started reading it")
                && out.stderr.contains(says),
            "{}",
            out.stderr
        );
    }

    std::fs::write(t.path("input.jsonl"), &original).expect("put it back");
    let out = t
        .dispatcher(&["run", "--resume", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let s = t.status().await;
    assert_eq!(s["state"], "completed");
    assert_accounted(&s);
    assert_eq!(s["items"]["read"], 5_000);
    hopper_tests::assert_every_id_once(&t.path("out"), 5_000);
    let out = t
        .dispatcher(&["retry", "--run", "1", "--local", "1"], LIMIT)
        .await;
    assert_eq!(out.code(), 0, "{}", out.stderr);
}
