//! One attempt at a chunk: the processor, bounded by the job's `chunk_timeout` and cancelled
//! there, with notes to the dispatcher while it runs long. Time waiting in a queue never counts:
//! the clock starts when processing does.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use hopper_common::{codec, Chunk, Label, Outcome, Reply, Route};
use tracing::debug;

use super::{publish, Context};
use crate::processor::{ProcessError, Processed};

/// Runs the processor on `chunk`, bounded by the job's `chunk_timeout`, sending a note to the
/// dispatcher while it runs long ([`NoteTiming`]). Time spent waiting in a queue never counts:
/// the clock starts here. A panic, and a processor cancelled at the limit (its future dropped;
/// an `exec` child's process group killed), are transient failures of this attempt.
pub(super) async fn process(ctx: &Context, chunk: &Chunk) -> Result<Processed, ProcessError> {
    let limit = ctx.job.retry.chunk_timeout;
    let work = tokio::time::timeout(
        limit,
        AssertUnwindSafe(ctx.processor.process(chunk)).catch_unwind(),
    );
    tokio::pin!(work);
    let started = tokio::time::Instant::now();
    let mut next_note = started + ctx.notes.first;
    loop {
        tokio::select! {
            done = &mut work => return match done {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_string());
                    Err(ProcessError::Transient(format!("the processor panicked: {what}")))
                }
                Err(_) => Err(ProcessError::Transient(format!(
                    "processing passed retry.chunk_timeout ({}); the processor was cancelled",
                    humantime::format_duration(limit)
                ))),
            },
            _ = tokio::time::sleep_until(next_note) => {
                note(ctx, chunk, started.elapsed()).await;
                next_note += ctx.notes.every;
            }
        }
    }
}

/// Tells the dispatcher that `chunk` has been processed for `elapsed` so far. Best effort: a
/// note that does not get through only makes `status` less precise.
async fn note(ctx: &Context, chunk: &Chunk, elapsed: std::time::Duration) {
    let reply = Reply {
        job: chunk.job.clone(),
        run: chunk.run,
        seq: chunk.seq,
        attempt: chunk.attempt,
        consumer: ctx.me.clone(),
        outcome: Outcome::Processing {
            elapsed_ms: elapsed.as_millis() as u64,
        },
    };
    let sent = match codec::encode_reply(&reply) {
        Ok(payload) => publish(ctx, Route::Replies, &payload, &Label::reply(&reply))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = sent {
        debug!(job = %ctx.job.name, run = chunk.run, seq = chunk.seq, error = %e,
               "cannot send a progress note");
    }
}
