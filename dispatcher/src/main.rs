//! `hopper-dispatcher`: runs a job's dispatcher, or shows where a run stands.
//!
//! Exit codes: 0 completed; 1 completed with failures, failed or interrupted (or the run could
//! not go on: broker or execution context unreachable); 2 bad usage, bad job file or input;
//! 3 another dispatcher of the job is alive (nothing changed).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hopper_common::{say, say_error};
use hopper_dispatcher::{
    DispatchError, DispatcherMetrics, ExecutionContext, Job, Local, RunLine, RunOptions,
    RunSummary, StatusReport,
};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than the system allocator: every chunk allocates and frees thousands of
/// small strings and a few buffers of hundreds of KiB, and glibc's malloc spent a tenth of the
/// binaries' CPU on that (and on page faults for the large buffers it maps and unmaps again).
/// Without transparent huge pages (the `no_thp` feature), which added 20 MiB to the
/// dispatcher's peak memory for nothing measurable.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// What a scheduler runs: finish the latest run if it was interrupted (its dispatcher
        /// gone), otherwise start a new one. Exit 3, nothing changed, while a dispatcher of
        /// the job is alive.
        #[arg(long = "continue", conflicts_with = "resume")]
        continue_: bool,
        #[command(flatten)]
        local: RunArgs,
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
        local: RunArgs,
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
        /// Redraw every 2 s until the run ends (with --json: one object per line each time).
        #[arg(long)]
        watch: bool,
    },
    /// Remove ended runs from the execution context (--older-than), and/or the job's queues
    /// from the broker (--queues: refused while a run has not ended or the dead queue holds
    /// chunks, unless --force; never while a dispatcher of the job is alive).
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["older_than", "queues"])))]
    Clean {
        /// The job file.
        job: PathBuf,
        /// Remove the runs that ended longer ago than this (`30d`, `12h`, `0s` for all ended
        /// runs), with their chunks and failures.
        #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Delete the job's queues (chunks, replies, dead, delay queues), messages included.
        #[arg(long)]
        queues: bool,
        /// With --queues: delete them even while a run has not ended or chunks are dead.
        #[arg(long, requires = "queues")]
        force: bool,
    },
    /// Pause a run: its dispatcher publishes nothing new; chunks in hand finish.
    Pause(ControlArgs),
    /// Undo `pause`: the run's dispatcher publishes again.
    Resume(ControlArgs),
    /// Cancel a run: nothing new is published, the chunks still waiting are taken back, the
    /// chunks in hand finish; the run ends `cancelled` (final).
    Cancel(ControlArgs),
    /// Change a run's window, rate and/or ramp-up while it runs (kept if it is resumed later).
    Throttle {
        #[command(flatten)]
        target: ControlArgs,
        /// Chunks outstanding at the most (at least 1).
        #[arg(long)]
        window: Option<usize>,
        /// Items per second, 0 for unlimited.
        #[arg(long)]
        rate: Option<f64>,
        /// How long the rate takes to climb to --rate, from the rate reached now (`30s`).
        #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
        ramp_up: Option<std::time::Duration>,
    },
    /// List the job's runs, newest first: state, times, counts and dispatcher.
    Runs {
        /// The job file.
        job: PathBuf,
        /// Print a JSON array (one object per run) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Which run a live control acts on.
#[derive(clap::Args)]
struct ControlArgs {
    /// The job file.
    job: PathBuf,
    /// The run (the latest by default).
    #[arg(long)]
    run: Option<u64>,
}

/// What `run` and `retry` share: local mode, and metrics.
#[derive(clap::Args)]
struct RunArgs {
    /// Local mode: process the chunks in this process with N worker tasks running the job's own
    /// processor, over an in-process queue instead of RabbitMQ (no broker is contacted). The
    /// execution context, throttle, failure handling, `status`, `--resume` and `retry` work as
    /// over the broker, but the in-process queue does not outlive the process: a run interrupted
    /// in local mode is finished by `run --resume --local N`, which reads its unfinished chunks
    /// again.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    local: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR/metrics while the run goes (IP:PORT; over the
    /// job file's `[metrics] dispatcher`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hopper_common::process::run_main(async {
        match cli.command {
            Command::Run {
                job,
                resume,
                continue_,
                local,
            } => {
                let start = if continue_ {
                    Start::Continue
                } else {
                    Start::Run(resume)
                };
                run_job(job, start, local).await
            }
            Command::Retry { job, run, local } => run_job(job, Start::Retry(run), local).await,
            Command::Status {
                job,
                run,
                json,
                watch,
            } => status(job, run, json, watch).await,
            Command::Runs { job, json } => runs(job, json).await,
            Command::Pause(target) => control(target, Control::Pause).await,
            Command::Resume(target) => control(target, Control::Resume).await,
            Command::Cancel(target) => control(target, Control::Cancel).await,
            Command::Throttle {
                target,
                window,
                rate,
                ramp_up,
            } => {
                let change = hopper_dispatcher::ThrottleChange::new(window, rate, ramp_up);
                control(target, Control::Throttle(change)).await
            }
            Command::Clean {
                job,
                older_than,
                queues,
                force,
            } => clean(job, older_than, queues, force).await,
        }
    })
}

/// The job file, validated, and its execution context; the exit code to leave with when either
/// fails.
async fn open(path: &Path) -> Result<(Job, ExecutionContext), ExitCode> {
    let job = Job::load(path).map_err(|e| {
        say_error!("{e}");
        ExitCode::from(2)
    })?;
    let context = ExecutionContext::open(&job).await.map_err(|e| {
        say_error!("{e}");
        ExitCode::from(e.exit_code())
    })?;
    Ok((job, context))
}

/// The job file, validated, and its execution context if the job was ever run (`None`, and
/// nothing created, otherwise): what the commands that only read or control need. The exit
/// code to leave with when either fails.
async fn open_read_only(path: &Path) -> Result<(Job, Option<ExecutionContext>), ExitCode> {
    let job = Job::load(path).map_err(|e| {
        say_error!("{e}");
        ExitCode::from(2)
    })?;
    let context = ExecutionContext::open_existing(&job).await.map_err(|e| {
        say_error!("{e}");
        ExitCode::from(e.exit_code())
    })?;
    Ok((job, context))
}

/// What `run_job` does: a run (new, or resumed), a run for a scheduler, or a retry.
enum Start {
    Run(Option<Option<u64>>),
    Continue,
    Retry(u64),
}

async fn run_job(path: PathBuf, start: Start, args: RunArgs) -> ExitCode {
    let (job, context) = match open(&path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let shutdown = CancellationToken::new();
    let mut opts = RunOptions::default()
        .with_progress_bar(std::io::stderr().is_terminal() && !hopper_common::process::json_logs());
    if let Some(workers) = args.local {
        opts = opts.with_local(Local::new(workers));
    }
    // Served until the run ends (the token drops with this function).
    let serving = CancellationToken::new();
    let _stop_serving = serving.clone().drop_guard();
    if let Some(addr) = args.metrics.or(job.metrics.dispatcher) {
        let metrics = Arc::new(DispatcherMetrics::default());
        let mut registry = hopper_common::metrics::registry(&job.name);
        metrics.register(&mut registry);
        let refresh = metrics.refresher();
        if let Err(e) =
            hopper_common::metrics::serve(addr, Arc::new(registry), Some(refresh), serving).await
        {
            say_error!("{e}; choose another address (--metrics, or [metrics] dispatcher)");
            return ExitCode::from(2);
        }
        opts = opts.with_metrics(metrics);
    }
    let stop = shutdown.clone();
    let dispatch = async {
        let result = match start {
            Start::Run(Some(run_id)) => {
                hopper_dispatcher::resume(&job, &context, run_id, opts, stop).await
            }
            Start::Run(None) => hopper_dispatcher::run(&job, &context, opts, stop).await,
            Start::Continue => hopper_dispatcher::run_or_continue(&job, &context, opts, stop).await,
            Start::Retry(run_id) => {
                hopper_dispatcher::retry(&job, &context, run_id, opts, stop).await
            }
        };
        report(&job, result)
    };
    // A second signal leaves the run as SIGKILL would: `running`, for `run --resume`.
    hopper_common::shutdown::stop_on_signals(dispatch, shutdown, ExitCode::from(1)).await
}

/// Prints how the run ended, and gives its exit code.
fn report(job: &Job, result: Result<RunSummary, DispatchError>) -> ExitCode {
    match result {
        Ok(summary) => {
            let s = &summary.status;
            say!(
                "run {} of {}: {} ({} processed, {} skipped, {} failed of {} read)",
                summary.run,
                job.name,
                summary.state,
                s.items.processed,
                s.items.skipped,
                s.items.failed,
                s.items.read
            );
            ExitCode::from(summary.exit_code())
        }
        Err(e) => {
            say_error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn status(path: PathBuf, run: Option<u64>, json: bool, watch: bool) -> ExitCode {
    let (job, context) = match open_read_only(&path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    // `status` only reads: a job never run has no execution context, and gets none.
    let Some(context) = context else {
        return match run {
            Some(id) => {
                say_error!("job {} has no run {id}", job.name);
                ExitCode::from(2)
            }
            None => {
                say_error!("job {} has no runs yet", job.name);
                ExitCode::from(1)
            }
        };
    };
    loop {
        let status = match hopper_dispatcher::status(&job, &context, run).await {
            Ok(s) => s,
            Err(DispatchError::NoSuchRun { run: None, .. }) => {
                say_error!("job {} has no runs yet", job.name);
                return ExitCode::from(1);
            }
            Err(e) => {
                say_error!("{e}");
                return ExitCode::from(e.exit_code());
            }
        };
        let broker = hopper_dispatcher::broker_view(&job).await;
        let report = StatusReport::new(&status).with_broker(broker);
        if json {
            let text = if watch {
                serde_json::to_string(&report)
            } else {
                serde_json::to_string_pretty(&report)
            };
            match text {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    say_error!("cannot print status as JSON: {e}");
                    return ExitCode::from(1);
                }
            }
        } else {
            if watch {
                // Home and clear, then the table: a redraw in place.
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", report.table());
        }
        if !watch || status.run.state.is_final() {
            return ExitCode::SUCCESS;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        }
    }
}

async fn runs(path: PathBuf, json: bool) -> ExitCode {
    let (job, context) = match open_read_only(&path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let lines = match &context {
        None => Vec::new(),
        Some(context) => match hopper_dispatcher::runs(&job, context).await {
            Ok(lines) => lines,
            Err(e) => {
                say_error!("{e}");
                return ExitCode::from(e.exit_code());
            }
        },
    };
    if json {
        match serde_json::to_string_pretty(&lines) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                say_error!("cannot print the runs as JSON: {e}");
                return ExitCode::from(1);
            }
        }
    } else if lines.is_empty() {
        say!("job {} has no runs yet", job.name);
    } else {
        print!("{}", RunLine::table(&lines));
    }
    ExitCode::SUCCESS
}

async fn clean(
    path: PathBuf,
    older_than: Option<std::time::Duration>,
    queues: bool,
    force: bool,
) -> ExitCode {
    // A job never run has no execution context: nothing to remove there, and none is made.
    let (job, context) = match open_read_only(&path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    if let Some(age) = older_than {
        let removed = match &context {
            Some(c) => hopper_dispatcher::clean_runs(&job, c, age).await,
            None => Ok(0),
        };
        match removed {
            Ok(n) => say!(
                "removed {n} run(s) of {} that ended more than {} ago",
                job.name,
                humantime::format_duration(age)
            ),
            Err(e) => {
                say_error!("{e}");
                return ExitCode::from(e.exit_code());
            }
        }
    }
    if queues {
        match hopper_dispatcher::clean_queues(&job, context.as_ref(), force).await {
            Ok(deleted) if deleted.is_empty() => say!("job {} has no queues", job.name),
            Ok(deleted) => say!("deleted {}", deleted.join(", ")),
            Err(e) => {
                say_error!("{e}");
                return ExitCode::from(e.exit_code());
            }
        }
    }
    ExitCode::SUCCESS
}

/// A live control.
enum Control {
    Pause,
    Resume,
    Cancel,
    Throttle(hopper_dispatcher::ThrottleChange),
}

async fn control(target: ControlArgs, what: Control) -> ExitCode {
    let (job, context) = match open_read_only(&target.job).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let Some(context) = context else {
        say_error!("job {} has no runs", job.name);
        return ExitCode::from(2);
    };
    let done = match what {
        Control::Pause => hopper_dispatcher::pause(&job, &context, target.run).await,
        Control::Resume => hopper_dispatcher::unpause(&job, &context, target.run).await,
        Control::Cancel => hopper_dispatcher::cancel(&job, &context, target.run).await,
        Control::Throttle(change) => {
            hopper_dispatcher::throttle(&job, &context, target.run, change).await
        }
    };
    match done {
        Ok(c) => {
            let t = c.throttle;
            say!(
                "run {} of {}: {} (window {}, rate {}, ramp-up {})",
                c.run,
                job.name,
                c.state,
                t.window,
                if t.rate > 0.0 {
                    format!("{}/s", t.rate)
                } else {
                    "unlimited".into()
                },
                humantime::format_duration(t.ramp_up)
            );
            if !c.dispatcher_alive {
                say!(
                    "its dispatcher is gone: this is kept with the run; `run --resume {}` finishes it",
                    c.run
                );
            }
            ExitCode::SUCCESS
        }
        Err(DispatchError::NoSuchRun { run: None, .. }) => {
            say_error!("job {} has no runs", job.name);
            ExitCode::from(2)
        }
        Err(e) => {
            say_error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
