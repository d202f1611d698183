//! This process: who it is, and how a Hopper binary starts.
//!
//! The identity (`host/pid`) names broker connections, tells the dispatcher which consumer
//! replied, and records which dispatcher owns a run (a run whose owner's process is gone on this
//! host can be taken over). Both binaries start the same way: logs to stderr filtered by
//! `HOPPER_LOG`, then one multi-threaded runtime.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

/// `host/pid`: who is talking, for connection names, replies and run ownership.
pub fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}/{}", std::process::id())
}

/// When process `pid` of this host started (clock ticks since boot, `/proc/PID/stat`), or `None`
/// when no such process runs. With the pid it names one process, even after its pid is reused.
pub fn started_at(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Set once by [`run_main`]: logs (and the binaries' own lines) are JSON lines.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// True when the binary writes its logs as JSON lines (`HOPPER_LOG_FORMAT=json`): then nothing
/// else (a progress bar) may write to stderr.
pub fn json_logs() -> bool {
    JSON_LOGS.get().copied().unwrap_or(false)
}

/// Tells the operator `text` on stderr, as a binary's own line (a run's result, a refusal):
/// a plain line, or with `HOPPER_LOG_FORMAT=json` a JSON log line like every other, so that
/// stderr stays one JSON object per line for a log shipper. `error` lines start `error: `.
pub fn tell(error: bool, text: std::fmt::Arguments<'_>) {
    match (json_logs(), error) {
        (true, true) => tracing::error!(target: "hopper", "{text}"),
        (true, false) => tracing::info!(target: "hopper", "{text}"),
        (false, true) => eprintln!("error: {text}"),
        (false, false) => eprintln!("{text}"),
    }
}

/// A binary's own line on stderr ([`tell`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::process::tell(false, format_args!($($arg)*)) };
}

/// A binary's own error line on stderr, `error: ...` ([`tell`]).
#[macro_export]
macro_rules! say_error {
    ($($arg:tt)*) => { $crate::process::tell(true, format_args!($($arg)*)) };
}

/// What is logged when `HOPPER_LOG` is not set. lapin logs every channel the broker closes as an
/// error, the expected 404 of a passive declare included (`status` and `clean` ask that way
/// whether each queue exists): an operator would read a clean job's seven missing queues as
/// seven failures. Hopper reports the closes that matter itself, with the broker's words and
/// the queue's name.
const DEFAULT_LOG: &str = "info,lapin::channel=off";

/// Runs a binary's `main`: installs the log subscriber (stderr, `HOPPER_LOG`, `DEFAULT_LOG` by
/// default; `HOPPER_LOG_FORMAT=json` for JSON lines), starts the runtime and drives `body` to its
/// exit code. Only binaries call this: a library never installs a subscriber.
pub fn run_main<F: Future<Output = ExitCode>>(body: F) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOPPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let format = std::env::var("HOPPER_LOG_FORMAT").unwrap_or_default();
    let json = format == "json";
    let _ = JSON_LOGS.set(json);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
        if !format.is_empty() && format != "text" {
            tracing::warn!("HOPPER_LOG_FORMAT={format:?} is neither json nor text; writing text");
        }
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => {
            let code = runtime.block_on(body);
            // Tasks still running (after a forced stop) are dropped, which kills their child
            // processes; a blocking task gets a moment to notice, not for ever.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            code
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}
