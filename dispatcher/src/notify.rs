//! Telling someone that a run ended: the job file's `[notify]` command (the `status --json`
//! object on its standard input) and webhook (the same object as a JSON POST).
//!
//! A notification never changes the run's outcome: a failing one is logged and tried again
//! ([`ATTEMPTS`] in all, a short pause between), then given up with an error in the log.

use std::process::Stdio;
use std::time::Duration;

use hopper_common::job::redact_url;
use hopper_common::Job;
use tokio::io::AsyncWriteExt;
use tracing::{error, info, warn};

/// Tries per notification.
const ATTEMPTS: u32 = 3;
/// How long one try may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `report` (the `status --json` object) to the job's command and webhook, if it names
/// them.
pub(crate) async fn notify(job: &Job, run: u64, report: &str) {
    if let Some(command) = &job.notify.command {
        let what = format!("notify.command {:?}", command[0]);
        attempt(job, run, &what, || run_command(job, command, report)).await;
    }
    if let Some(url) = &job.notify.webhook {
        let what = format!("notify.webhook {}", redact_url(url));
        attempt(job, run, &what, || post(url, report)).await;
    }
}

async fn attempt<F, Fut>(job: &Job, run: u64, what: &str, mut once: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    for n in 1..=ATTEMPTS {
        let result = match tokio::time::timeout(TIMEOUT, once()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", TIMEOUT.as_secs())),
        };
        match result {
            Ok(()) => {
                info!(job = %job.name, run, "{what}: told");
                return;
            }
            Err(why) if n < ATTEMPTS => {
                warn!(job = %job.name, run, attempt = n, "{what} failed: {why}; trying again");
                tokio::time::sleep(Duration::from_secs(u64::from(n))).await;
            }
            Err(why) => {
                error!(job = %job.name, run, attempts = n, "{what} failed: {why}; giving up (the run's outcome stands)");
            }
        }
    }
}

async fn run_command(job: &Job, command: &[String], report: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .current_dir(&job.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is its own business.
        let _ = stdin.write_all(report.as_bytes()).await;
        let _ = stdin.write_all(b"\n").await;
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("it exited with {status}"))
    }
}

async fn post(url: &str, report: &str) -> Result<(), String> {
    let (url, body) = (url.to_string(), report.to_string());
    let sent = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .map(|response| response.status().as_u16())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    if (200..300).contains(&sent) {
        Ok(())
    } else {
        Err(format!("HTTP status {sent}"))
    }
}
