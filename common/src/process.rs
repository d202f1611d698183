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

/// Runs a binary's `main`: installs the log subscriber (stderr, `HOPPER_LOG`, `info` by
/// default), starts the runtime and drives `body` to its exit code. Only binaries call this: a
/// library never installs a subscriber.
pub fn run_main<F: Future<Output = ExitCode>>(body: F) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
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
