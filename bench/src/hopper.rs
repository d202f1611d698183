//! The Hopper side: the real binaries, a dispatcher and consumer processes over the broker, or
//! the dispatcher alone in local mode; and the dispatcher's peak memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use crate::cpu::Cpu;
use crate::{Shape, CHUNK_ITEMS, CONSUMERS};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

pub(crate) fn build_binaries() -> Result<PathBuf> {
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

pub(crate) fn job_file(
    dir: &Path,
    name: &str,
    url: &str,
    input: &Path,
    window: usize,
) -> Result<PathBuf> {
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

pub(crate) struct HopperRun {
    pub(crate) took: Duration,
    pub(crate) peak_kib: u64,
    /// The broker's CPU seconds from the dispatcher's start to its end.
    pub(crate) broker_cpu: f64,
    /// The dispatcher's CPU seconds.
    pub(crate) dispatcher_cpu: f64,
    /// The consumer processes' CPU seconds, all of them together.
    pub(crate) consumers_cpu: f64,
}

/// Starts consumers, runs the dispatcher to its end, stops the consumers.
pub(crate) async fn hopper(
    bins: &Path,
    url: &str,
    dir: &Path,
    name: &str,
    input: &Path,
    shape: Shape,
) -> Result<HopperRun> {
    let job = job_file(dir, name, url, input, shape.window)?;
    over_broker(bins, url, &job, name, shape).await
}

/// Starts consumers of the job file `job` (named `name`), runs its dispatcher to the end,
/// stops the consumers and deletes the job's queues.
pub(crate) async fn over_broker(
    bins: &Path,
    url: &str,
    job: &Path,
    name: &str,
    shape: Shape,
) -> Result<HopperRun> {
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        consumers.push(
            tokio::process::Command::new(bins.join("hopper-consumer"))
                .arg(job)
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

    let broker = crate::cpu::broker_pid();
    crate::cpu::broker_quiet(broker.as_deref()).await;
    let started = Instant::now();
    let cpu_start = Cpu::now(broker.as_deref());
    let mut child = std::process::Command::new(bins.join("hopper-dispatcher"))
        .arg("run")
        .arg(job)
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
    let cpu_run = Cpu::now(broker.as_deref()).since(cpu_start);
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
    let consumers_cpu = Cpu::now(None).children - cpu_start.children - cpu_run.children;
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
    let _ = ch
        .exchange_delete(
            format!("hopper.{name}.exchange").as_str().into(),
            Default::default(),
        )
        .await;
    Ok(HopperRun {
        took,
        peak_kib: peak,
        broker_cpu: cpu_run.broker,
        dispatcher_cpu: cpu_run.children,
        consumers_cpu,
    })
}

/// Runs the same job in local mode: one process, `workers` worker tasks, no broker.
pub(crate) async fn local(
    bins: &Path,
    dir: &Path,
    name: &str,
    input: &Path,
    shape: Shape,
    workers: usize,
) -> Result<Duration> {
    // Local mode contacts no broker: the URL is never used.
    let job = job_file(dir, name, "amqp://127.0.0.1:1/%2f", input, shape.window)?;
    run_local(bins, &job, workers).await
}

/// Runs the job file `job` in local mode with `workers` worker tasks, to its end.
pub(crate) async fn run_local(bins: &Path, job: &Path, workers: usize) -> Result<Duration> {
    let started = Instant::now();
    let status = tokio::process::Command::new(bins.join("hopper-dispatcher"))
        .arg("run")
        .arg(job)
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
