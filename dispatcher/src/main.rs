//! `hopper-dispatcher`: runs a job's dispatcher, or shows where a run stands.
//!
//! Exit codes: 0 completed; 1 completed with failures, failed, cancelled or interrupted (or the
//! run could not go on: broker or state store unreachable); 2 bad usage, bad job file or input.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hopper_common::{open_state, Job, RunState, StateStore};
use hopper_dispatcher::{run, RunOptions, StatusReport};
use tokio_util::sync::CancellationToken;

/// Dispatches very large batch jobs over RabbitMQ, in chunks, under a throttling window.
#[derive(Parser)]
#[command(name = "hopper-dispatcher", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dispatch a new run of the job; progress on stderr. Start consumers with `hopper-consumer`.
    Run {
        /// The job file.
        job: PathBuf,
        /// Finish an interrupted run instead (the latest, or RUN): publish again what was
        /// recorded but not confirmed, wait for what is in flight, read on from its checkpoint.
        #[arg(long, value_name = "RUN")]
        resume: Option<Option<u64>>,
        #[command(flatten)]
        local: Local,
    },
    /// Dispatch again only what a run failed on (failed and dead chunks, bad data, bad items),
    /// after the input was fixed in place: each failed record is read again from the byte
    /// offset the run recorded, and the run ends again (`completed` when all of it succeeds).
    Retry {
        /// The job file.
        job: PathBuf,
        /// The run whose failures to dispatch again.
        #[arg(long)]
        run: u64,
        #[command(flatten)]
        local: Local,
    },
    /// Show where a run stands (the latest run unless --run).
    Status {
        /// The job file.
        job: PathBuf,
        /// The run to show.
        #[arg(long)]
        run: Option<u64>,
        /// Print the JSON object of the contract instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Local mode, for `run` and `retry`.
#[derive(clap::Args)]
struct Local {
    /// Local mode: process the chunks in this process with N worker tasks running the job's own
    /// processor, over an in-process queue instead of RabbitMQ (no broker is contacted). The
    /// state store, throttle, failure handling, `status`, `--resume` and `retry` work as over the
    /// broker, but the in-process queue does not outlive the process: a run interrupted in local
    /// mode is finished by `run --resume --local N`, which reads its unfinished chunks again.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    local: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { job, resume, local } => {
                run_job(job, Start::Run(resume), local.local).await
            }
            Command::Retry { job, run, local } => {
                run_job(job, Start::Retry(run), local.local).await
            }
            Command::Status { job, run, json } => status(job, run, json).await,
        }
    })
}

/// The job file, validated, and its state store; the exit code to leave with when either fails.
fn open(path: &Path) -> Result<(Job, Arc<dyn StateStore>), ExitCode> {
    let job = Job::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    let store = open_state(&job).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })?;
    Ok((job, store))
}

/// What `run_job` does: a run (new, or resumed), or a retry.
enum Start {
    Run(Option<Option<u64>>),
    Retry(u64),
}

async fn run_job(path: PathBuf, start: Start, local: Option<u16>) -> ExitCode {
    let (job, store) = match open(&path) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(hopper_common::shutdown::cancel_on_signal(shutdown.clone()));
    let opts = RunOptions {
        interactive: std::io::stderr().is_terminal(),
        local: local.map(hopper_dispatcher::Local::new),
        ..RunOptions::default()
    };
    let result = match start {
        Start::Run(Some(run_id)) => {
            hopper_dispatcher::resume(&job, store, run_id, opts, shutdown).await
        }
        Start::Run(None) => run(&job, store, opts, shutdown).await,
        Start::Retry(run_id) => hopper_dispatcher::retry(&job, store, run_id, opts, shutdown).await,
    };
    match result {
        Ok(summary) => {
            let s = &summary.status;
            eprintln!(
                "run {} of {}: {} ({} processed, {} skipped, {} failed of {} read)",
                summary.run,
                job.name,
                summary.state,
                s.items.processed,
                s.items.skipped,
                s.items.failed,
                s.items.read
            );
            match summary.state {
                RunState::Completed => ExitCode::SUCCESS,
                RunState::CompletedWithFailures
                | RunState::Failed
                | RunState::Cancelled
                | RunState::Running
                | RunState::Paused => ExitCode::from(1),
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_bad_input() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn status(path: PathBuf, run: Option<u64>, json: bool) -> ExitCode {
    let (job, store) = match open(&path) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let record = match store.run(&job.name, run).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            match run {
                Some(id) => eprintln!("error: job {} has no run {id}", job.name),
                None => eprintln!("error: job {} has no runs yet", job.name),
            }
            return ExitCode::from(if run.is_some() { 2 } else { 1 });
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let status = match store.status(record.id, job.retry.chunk_timeout).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let report = StatusReport::new(&status);
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: cannot print status as JSON: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", report.table());
    }
    ExitCode::SUCCESS
}
