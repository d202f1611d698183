//! `hopper-consumer`: processes a job's chunks until stopped.
//!
//! SIGTERM or SIGINT: stop taking chunks, finish and ack the ones in hand, exit 0. A second
//! signal: stop at once (processors cancelled, `exec` commands killed with their process group,
//! unacked chunks back to the queue), exit 1.
//! Exit codes: 0 stopped cleanly; 1 the broker failed, or stopped at once; 2 bad usage or bad
//! job file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hopper_common::say_error;
use hopper_consumer::{ConsumerMetrics, ConsumerOptions, Job};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than the system allocator: every chunk allocates and frees thousands of
/// small strings and a few buffers of hundreds of KiB, and glibc's malloc spent a tenth of the
/// binaries' CPU on that (and on page faults for the large buffers it maps and unmaps again).
/// Without transparent huge pages (the `no_thp` feature), which added 20 MiB to the
/// dispatcher's peak memory for nothing measurable.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Processes chunks of a Hopper job from RabbitMQ until stopped.
#[derive(Parser)]
#[command(name = "hopper-consumer", version, about)]
struct Cli {
    /// The job file (the same one the dispatcher runs).
    job: PathBuf,
    /// Chunks processed at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1000))]
    concurrency: u16,
    /// Chunks held at once: those being processed and those whose reply awaits the broker's
    /// confirm (default: twice --concurrency; at least --concurrency).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=2000))]
    prefetch: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT; port 0 takes any free port,
    /// logged at start; over the job file's `[metrics] consumer`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hopper_common::process::run_main(async {
        let job = match Job::load(&cli.job) {
            Ok(j) => j,
            Err(e) => {
                say_error!("{e}");
                return ExitCode::from(2);
            }
        };
        let processor = match hopper_consumer::build(&job).await {
            Ok(p) => p,
            Err(e) => {
                say_error!("{e}");
                return ExitCode::from(e.exit_code());
            }
        };
        let shutdown = CancellationToken::new();
        let mut opts = ConsumerOptions::default().with_concurrency(cli.concurrency);
        if let Some(prefetch) = cli.prefetch {
            if prefetch < cli.concurrency {
                say_error!(
                    "--prefetch {prefetch} is less than --concurrency {}: every chunk being \
                     processed needs a place in the prefetch",
                    cli.concurrency
                );
                return ExitCode::from(2);
            }
            opts = opts.with_prefetch(prefetch);
        }
        if let Some(addr) = cli.metrics.or(job.metrics.consumer) {
            let metrics = Arc::new(ConsumerMetrics::default());
            let mut registry = hopper_common::metrics::registry(&job.name);
            metrics.register(&mut registry);
            let serving = hopper_common::metrics::serve(
                addr,
                Arc::new(registry),
                None,
                shutdown.child_token(),
            );
            if let Err(e) = serving.await {
                say_error!("{e}; choose another address (--metrics, or [metrics] consumer)");
                return ExitCode::from(2);
            }
            opts = opts.with_metrics(metrics);
        }
        let consume = async {
            match hopper_consumer::run(&job, processor, opts, shutdown.clone()).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    say_error!("{e}");
                    ExitCode::from(1)
                }
            }
        };
        hopper_common::shutdown::stop_on_signals(consume, shutdown.clone(), ExitCode::from(1)).await
    })
}
