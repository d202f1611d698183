//! `hopper-consumer`: processes a job's chunks until stopped.
//!
//! SIGTERM or SIGINT: stop taking chunks, finish and ack the ones in hand, exit 0.
//! Exit codes: 0 stopped cleanly; 1 the broker failed; 2 bad usage or bad job file.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hopper_common::Job;
use tokio_util::sync::CancellationToken;

/// Processes chunks of a Hopper job from RabbitMQ until stopped.
#[derive(Parser)]
#[command(name = "hopper-consumer", version, about)]
struct Cli {
    /// The job file (the same one the dispatcher runs).
    job: PathBuf,
    /// Chunks processed at once; also the prefetch.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1000))]
    concurrency: u16,
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
    let job = match Job::load(&cli.job) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let processor = match hopper_consumer::build(&job) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(hopper_common::shutdown::cancel_on_signal(shutdown.clone()));
        let opts = hopper_consumer::ConsumerOptions {
            concurrency: cli.concurrency,
        };
        match hopper_consumer::run(&job, processor, opts, shutdown).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}
