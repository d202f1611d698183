//! `hopper-bench`: Hopper against raw lapin over the same bytes, in one run, and the
//! dispatcher's peak memory for a small and a large input.
//!
//! ```text
//! cargo run --release -p hopper-bench -- [--records 1000000] [--width 200] [--rounds 5]
//!     [--window 32] [--prefetch 4] [--memory-small 100000] [--memory-large 2000000]
//!     [--only raw|hopper|local]
//! ```
//!
//! Both sides move the same input: `records` JSON lines of about `width` bytes, cut into
//! messages of 1000 lines, published persistent with publisher confirms and at most 32
//! outstanding onto a quorum queue, consumed by 2 consumers with a prefetch of 4 that ack each
//! message. Hopper adds what the raw side does not do: validating every JSON line, MessagePack
//! encoding, recording every chunk in SQLite, replying and applying replies. The machine is
//! noisy, so the figure that matters is the ratio of the two times, measured in one run.
//!
//! Each round also runs the same job in local mode (`run --local N`, N = consumers x prefetch,
//! the `noop` processor, no broker), and reports its items per second beside the broker's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

const CHUNK_ITEMS: usize = 1000;
const CONSUMERS: usize = 2;

/// The flow-control shape both sides share.
#[derive(Clone, Copy)]
struct Shape {
    window: usize,
    prefetch: u16,
}

struct Args {
    records: u64,
    width: usize,
    memory_small: u64,
    memory_large: u64,
    window: usize,
    prefetch: u16,
    rounds: usize,
    only: Option<String>,
    url: String,
}

fn args() -> Result<Args> {
    let mut a = Args {
        records: 1_000_000,
        width: 200,
        memory_small: 100_000,
        memory_large: 2_000_000,
        window: 32,
        prefetch: 4,
        rounds: 5,
        only: None,
        url: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--records" => a.records = value()?.parse()?,
            "--width" => a.width = value()?.parse()?,
            "--memory-small" => a.memory_small = value()?.parse()?,
            "--memory-large" => a.memory_large = value()?.parse()?,
            "--only" => a.only = Some(value()?),
            "--rounds" => a.rounds = value()?.parse()?,
            "--window" => a.window = value()?.parse()?,
            "--prefetch" => a.prefetch = value()?.parse()?,
            "--url" => a.url = value()?,
            other => bail!("unknown argument {other}; see the top of bench/src/main.rs"),
        }
    }
    Ok(a)
}

fn write_input(path: &Path, n: u64, width: usize) -> Result<u64> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut bytes = 0u64;
    for id in 1..=n {
        let head = format!(
            "{{\"id\":{id},\"sku\":\"SKU-{id:010}\",\"price\":{}.99,\"name\":\"",
            id % 1000
        );
        let pad = width.saturating_sub(head.len() + 3);
        let line = format!("{head}{}\"}}\n", "n".repeat(pad));
        bytes += line.len() as u64;
        w.write_all(line.as_bytes())?;
    }
    w.flush()?;
    Ok(bytes)
}

/// Raw lapin: the same lines, cut into the same messages, through a quorum queue.
async fn raw(url: &str, input: &Path, shape: Shape) -> Result<Duration> {
    let queue = format!("hopper-bench-raw-{}", std::process::id());
    let setup = lapin::Connection::connect(url, Default::default()).await?;
    let ch = setup.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await?;

    let text = std::fs::read(input)?;
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let messages = lines.len().div_ceil(CHUNK_ITEMS);

    let started = Instant::now();
    let mut consumers = Vec::new();
    let per = messages; // each consumer stops when the shared count reaches `messages`
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    for i in 0..CONSUMERS {
        let conn = lapin::Connection::connect(url, Default::default()).await?;
        let c = conn.create_channel().await?;
        c.basic_qos(shape.prefetch, BasicQosOptions::default())
            .await?;
        let mut stream = c
            .basic_consume(
                queue.as_str().into(),
                format!("bench-{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let count = count.clone();
        let done = done_tx.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = stream.next().await {
                // Like a consumer that looks at its payload: count the lines.
                let _lines = d.data.iter().filter(|b| **b == b'\n').count();
                if d.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == per {
                    let _ = done.send(()).await;
                }
            }
            drop(conn);
        }));
    }

    let pub_conn = lapin::Connection::connect(url, Default::default()).await?;
    let p = pub_conn.create_channel().await?;
    p.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut confirms = FuturesUnordered::new();
    let mut buf = Vec::with_capacity(CHUNK_ITEMS * 256);
    for chunk in lines.chunks(CHUNK_ITEMS) {
        while confirms.len() >= shape.window {
            let c: lapin::Result<lapin::Confirmation> =
                confirms.next().await.context("a confirm")?;
            if !c?.is_ack() {
                bail!("raw publish nacked");
            }
        }
        buf.clear();
        for l in chunk {
            buf.extend_from_slice(l);
            buf.push(b'\n');
        }
        let confirm = p
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &buf,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        confirms.push(confirm);
    }
    while let Some(c) = confirms.next().await {
        if !c?.is_ack() {
            bail!("raw publish nacked");
        }
    }
    tokio::time::timeout(Duration::from_secs(600), done_rx.recv())
        .await
        .context("raw consumers did not finish")?;
    let took = started.elapsed();
    for c in consumers {
        c.abort();
    }
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(took)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn build_binaries() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "hopper-dispatcher",
            "-p",
            "hopper-consumer",
            "--bins",
        ])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("building the release binaries failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("release"))
}

fn job_file(dir: &Path, name: &str, url: &str, input: &Path, window: usize) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n[broker]\nurl = \"{url}\"\n[state]\nurl = \"sqlite://{name}.db\"\n\
             [source]\nkind = \"file\"\npath = \"{}\"\nformat = \"jsonl\"\n\
             [chunking]\nitems = {CHUNK_ITEMS}\n[throttle]\nwindow = {window}\n[processor]\nkind = \"noop\"\n",
            input.display()
        ),
    )?;
    Ok(path)
}

/// Peak resident memory (VmHWM) of a process, in KiB, read while it runs.
fn peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

struct HopperRun {
    took: Duration,
    peak_kib: u64,
}

/// Starts consumers, runs the dispatcher to its end, stops the consumers.
async fn hopper(
    bins: &Path,
    url: &str,
    dir: &Path,
    name: &str,
    input: &Path,
    shape: Shape,
) -> Result<HopperRun> {
    let job = job_file(dir, name, url, input, shape.window)?;
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        consumers.push(
            tokio::process::Command::new(bins.join("hopper-consumer"))
                .arg(&job)
                .args(["--concurrency", &shape.prefetch.to_string()])
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    // Wait until both consumers are attached, so their start-up is not timed.
    let conn = lapin::Connection::connect(url, Default::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                format!("hopper.{name}.chunks").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if matches!(&q, Ok(q) if q.consumer_count() as usize == CONSUMERS) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the consumers did not attach within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = Instant::now();
    let mut child = std::process::Command::new(bins.join("hopper-dispatcher"))
        .arg("run")
        .arg(&job)
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    if !status.success() {
        bail!("hopper-dispatcher failed: {status}");
    }
    for mut c in consumers {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
    }
    let ch = conn.create_channel().await?;
    for q in [
        "chunks", "replies", "dead", "retry.1s", "retry.2s", "retry.4s", "retry.8s",
    ] {
        let _ = ch
            .queue_delete(
                format!("hopper.{name}.{q}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    Ok(HopperRun {
        took,
        peak_kib: peak,
    })
}

/// Runs the same job in local mode: one process, `workers` worker tasks, no broker.
async fn local(
    bins: &Path,
    dir: &Path,
    name: &str,
    input: &Path,
    shape: Shape,
    workers: usize,
) -> Result<Duration> {
    // Local mode contacts no broker: the URL is never used.
    let job = job_file(dir, name, "amqp://127.0.0.1:1/%2f", input, shape.window)?;
    let started = Instant::now();
    let status = tokio::process::Command::new(bins.join("hopper-dispatcher"))
        .arg("run")
        .arg(&job)
        .args(["--local", &workers.to_string()])
        .stderr(Stdio::null())
        .status()
        .await?;
    let took = started.elapsed();
    if !status.success() {
        bail!("hopper-dispatcher --local failed: {status}");
    }
    Ok(took)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let bins = build_binaries()?;
    let dir = tempfile::tempdir()?;
    let pid = std::process::id();

    let input = dir.path().join("input.jsonl");
    let bytes = write_input(&input, a.records, a.width)?;
    println!(
        "input: {} records, {:.1} MiB ({} bytes per record), {CHUNK_ITEMS} per message, window {}, {CONSUMERS} consumers x prefetch {}",
        a.records,
        bytes as f64 / 1048576.0,
        bytes / a.records.max(1),
        a.window,
        a.prefetch
    );
    let shape = Shape {
        window: a.window,
        prefetch: a.prefetch,
    };

    // Alternate the two sides, several rounds, and compare medians: single runs on a shared
    // machine swing by half their length.
    let mut raws = Vec::new();
    let mut hoppers = Vec::new();
    let mut locals = Vec::new();
    let workers = CONSUMERS * usize::from(a.prefetch);
    for round in 1..=a.rounds.max(1) {
        // `--only raw|hopper` times one side alone, to look at it with other tools.
        match a.only.as_deref() {
            Some("raw") => {
                let r = raw(&a.url, &input, shape).await?;
                println!("raw lapin: {:.2} s", r.as_secs_f64());
                continue;
            }
            Some("hopper") => {
                let name = format!("bench-{pid}-r{round}");
                let h = hopper(&bins, &a.url, dir.path(), &name, &input, shape).await?;
                println!("hopper: {:.2} s", h.took.as_secs_f64());
                continue;
            }
            Some("local") => {
                let name = format!("bench-{pid}-l{round}");
                let l = local(&bins, dir.path(), &name, &input, shape, workers).await?;
                println!("local: {:.2} s", l.as_secs_f64());
                continue;
            }
            Some(other) => bail!("--only takes raw, hopper or local, not {other}"),
            None => {}
        }
        let r = raw(&a.url, &input, shape).await?;
        let h = hopper(
            &bins,
            &a.url,
            dir.path(),
            &format!("bench-{pid}-r{round}"),
            &input,
            shape,
        )
        .await?;
        let l = local(
            &bins,
            dir.path(),
            &format!("bench-{pid}-l{round}"),
            &input,
            shape,
            workers,
        )
        .await?;
        println!(
            "round {round}: raw lapin {:>6.2} s, hopper {:>6.2} s, ratio {:.2}x; local mode {:>6.2} s",
            r.as_secs_f64(),
            h.took.as_secs_f64(),
            h.took.as_secs_f64() / r.as_secs_f64(),
            l.as_secs_f64()
        );
        raws.push(r.as_secs_f64());
        hoppers.push(h.took.as_secs_f64());
        locals.push(l.as_secs_f64());
    }
    if a.only.is_some() {
        return Ok(());
    }
    let (raw_s, hopper_s, local_s) = (median(&mut raws), median(&mut hoppers), median(&mut locals));
    println!(
        "raw lapin : {raw_s:>7.2} s  {:>9.0} records/s  (median of {})",
        a.records as f64 / raw_s,
        raws.len()
    );
    println!(
        "hopper    : {hopper_s:>7.2} s  {:>9.0} records/s  (median of {})",
        a.records as f64 / hopper_s,
        hoppers.len()
    );
    println!(
        "local mode: {local_s:>7.2} s  {:>9.0} records/s  (median of {}; --local {workers}, noop, no broker)",
        a.records as f64 / local_s,
        locals.len()
    );
    println!(
        "ratio     : {:.2}x the raw broker time (goal: at most 1.5x); local mode {:.2}x",
        hopper_s / raw_s,
        local_s / raw_s
    );

    let mut peaks = Vec::new();
    for n in [a.memory_small, a.memory_large] {
        let path = dir.path().join(format!("memory-{n}.jsonl"));
        write_input(&path, n, a.width)?;
        let run = hopper(
            &bins,
            &a.url,
            dir.path(),
            &format!("bench-{pid}-mem-{n}"),
            &path,
            shape,
        )
        .await?;
        std::fs::remove_file(&path)?;
        println!(
            "dispatcher peak memory, {n:>9} records: {:>6.1} MiB ({:.2} s)",
            run.peak_kib as f64 / 1024.0,
            run.took.as_secs_f64()
        );
        peaks.push(run.peak_kib);
    }
    if let [small, large] = peaks[..] {
        println!(
            "memory growth {}x the records: {:+.0}% (goal: within 25%, under 64 MiB)",
            a.memory_large / a.memory_small.max(1),
            (large as f64 / small.max(1) as f64 - 1.0) * 100.0
        );
    }
    Ok(())
}
