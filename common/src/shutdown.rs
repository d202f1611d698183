//! Shutdown on a signal: both binaries stop the same way. The first SIGINT or SIGTERM asks to
//! stop cleanly (finish what is in hand); a second one stops at once ([`stop_on_signals`]).

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// The next SIGINT or SIGTERM.
async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // Without a SIGTERM handler, SIGINT still works.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM, then returns on the second.
pub async fn cancel_on_signal(token: CancellationToken) {
    signal().await;
    tracing::info!("stop requested: finishing what is in hand (a second signal stops at once)");
    token.cancel();
    signal().await;
}

/// Runs `body`, which stops cleanly once `stop` is cancelled: `stop` is cancelled on the first
/// SIGINT or SIGTERM. On a second signal `body` is abandoned and `forced` returned: once the
/// runtime is dropped, whatever `body` had in hand is dropped with it (an `exec` command's
/// process group is killed; unacked chunks go back to the broker). For an operator whose clean
/// stop waits on a command that hangs.
pub async fn stop_on_signals<F>(body: F, stop: CancellationToken, forced: ExitCode) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    tokio::select! {
        code = body => code,
        () = cancel_on_signal(stop) => {
            tracing::warn!("second signal: stopping at once; what was in hand is dropped");
            forced
        }
    }
}
