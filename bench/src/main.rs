//! `hopper-bench`: Hopper against raw lapin over the same bytes, in one run, and the
//! dispatcher's peak memory for a small and a large input.
//!
//! ```text
//! cargo run --release -p hopper-bench -- [--records 1000000] [--width 200] [--rounds 5]
//!     [--window 32] [--prefetch 4] [--memory-small 100000] [--memory-large 2000000]
//!     [--only raw|hopper|local|pg] [--bin-dir DIR] [--pg-url URL] [--pg-rows 1000000]
//! ```
//!
//! Both sides move the same input: `records` JSON lines of about `width` bytes, cut into
//! messages of 1000 lines, published persistent with publisher confirms and at most 32
//! outstanding onto a quorum queue, consumed by 2 consumers with a prefetch of 4 that ack each
//! message. Hopper adds what the raw side does not do: validating every JSON line, MessagePack
//! encoding, recording every chunk in SQLite, replying and applying replies. The machine is
//! noisy, so the figure that matters is the ratio of the two times, measured in one run. Each
//! round prints the CPU seconds of the broker and of each side's processes ([`cpu`]), and each
//! timed run starts on a quiet broker with a fresh quorum-queue WAL.
//!
//! `--bin-dir DIR` times the `hopper-dispatcher` and `hopper-consumer` found in DIR instead of
//! building this tree's: to compare two builds on the same machine in one session, run the bench
//! with and without it, in turn.
//!
//! Each round also runs the same job in local mode (`run --local N`, N = consumers x prefetch,
//! the `noop` processor, no broker), and reports its items per second beside the broker's.
//!
//! `--only pg` runs the PostgreSQL comparisons instead ([`postgres`]): a table copied through
//! Hopper against `INSERT ... SELECT`, and the source alone against `COPY ... TO STDOUT`.

mod cpu;
mod hopper;
mod postgres;
mod raw;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use hopper::{build_binaries, hopper, local};
use raw::raw;

/// Lines per message, on both sides.
const CHUNK_ITEMS: usize = 1000;
/// Consumer processes (Hopper) or consumers (raw lapin).
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
    bin_dir: Option<PathBuf>,
    pg_url: String,
    pg_rows: u64,
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
        bin_dir: None,
        pg_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string()),
        pg_rows: 1_000_000,
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
            "--bin-dir" => a.bin_dir = Some(PathBuf::from(value()?)),
            "--pg-url" => a.pg_url = value()?,
            "--pg-rows" => a.pg_rows = value()?.parse()?,
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
    // On disk before anything is timed: the kernel writing 200 MiB of dirty pages back in the
    // middle of a round slows whichever side runs then.
    w.into_inner()?.sync_all()?;
    Ok(bytes)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let bins = match &a.bin_dir {
        Some(dir) => dir.clone(),
        None => build_binaries()?,
    };
    let dir = tempfile::tempdir()?;
    let pid = std::process::id();
    let shape = Shape {
        window: a.window,
        prefetch: a.prefetch,
    };
    if a.only.as_deref() == Some("pg") {
        let rounds = a.rounds.max(1);
        return postgres::postgres(
            &bins,
            &a.url,
            &a.pg_url,
            dir.path(),
            a.pg_rows,
            rounds,
            shape,
        )
        .await;
    }

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

    // Alternate the two sides, several rounds, and compare medians: single runs on a shared
    // machine swing by half their length.
    let mut raws = Vec::new();
    let mut hoppers = Vec::new();
    let mut locals = Vec::new();
    // CPU seconds per round: raw (broker, clients), hopper (broker, dispatcher, consumers).
    let mut cpus: [Vec<f64>; 5] = Default::default();
    let workers = CONSUMERS * usize::from(a.prefetch);
    for round in 1..=a.rounds.max(1) {
        // `--only raw|hopper` times one side alone, to look at it with other tools.
        match a.only.as_deref() {
            Some("raw") => {
                let r = raw(&a.url, &input, shape).await?;
                println!("raw lapin: {:.2} s", r.took.as_secs_f64());
                continue;
            }
            Some("hopper") => {
                let name = format!("bench-{pid}-r{round}");
                let h = hopper(&bins, &a.url, dir.path(), &name, &input, shape).await?;
                println!(
                    "hopper: {:.2} s; CPU-s broker {:.2} dispatcher {:.2} consumers {:.2}",
                    h.took.as_secs_f64(),
                    h.broker_cpu,
                    h.dispatcher_cpu,
                    h.consumers_cpu
                );
                continue;
            }
            Some("local") => {
                let name = format!("bench-{pid}-l{round}");
                let l = local(&bins, dir.path(), &name, &input, shape, workers).await?;
                println!("local: {:.2} s", l.as_secs_f64());
                continue;
            }
            Some(other) => bail!("--only takes raw, hopper, local or pg, not {other}"),
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
            "round {round}: raw lapin {:>6.2} s, hopper {:>6.2} s, ratio {:.2}x; local mode {:>6.2} s; \
             CPU-s raw: broker {:.2} clients {:.2}, hopper: broker {:.2} dispatcher {:.2} consumers {:.2}",
            r.took.as_secs_f64(),
            h.took.as_secs_f64(),
            h.took.as_secs_f64() / r.took.as_secs_f64(),
            l.as_secs_f64(),
            r.cpu.broker,
            r.cpu.own,
            h.broker_cpu,
            h.dispatcher_cpu,
            h.consumers_cpu,
        );
        for (v, x) in cpus.iter_mut().zip([
            r.cpu.broker,
            r.cpu.own,
            h.broker_cpu,
            h.dispatcher_cpu,
            h.consumers_cpu,
        ]) {
            v.push(x);
        }
        raws.push(r.took.as_secs_f64());
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

    let [rb, rc, hb, hd, hc] = &mut cpus;
    println!(
        "CPU-s     : raw lapin: broker {:.2}, clients {:.2}; hopper: broker {:.2}, dispatcher {:.2}, consumers {:.2} (medians)",
        median(rb),
        median(rc),
        median(hb),
        median(hd),
        median(hc)
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
