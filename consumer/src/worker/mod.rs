//! The consumer loop: take chunks, process them, reply, ack.
//!
//! Invariants:
//! - **Commit, reply, then ack.** A chunk is acked only after its processor returned and its
//!   reply (or its move to a retry or dead queue) was confirmed by the broker. A consumer that
//!   dies before the ack loses nothing: the broker delivers the chunk again.
//! - **Processing slots apart from delivery slots.** At most `concurrency` chunks are processed
//!   at once; the prefetch (twice that by default) also covers chunks whose processing is over
//!   and whose reply waits for the broker's confirm, so that wait does not idle the processor.
//!   A chunk waiting for a processing slot is not being processed: its clock has not started.
//! - **Poison never crash-loops.** A message that cannot be decoded (or is another job's, or
//!   another schema version, or larger than the job's chunks can be) is parked on the dead queue
//!   with the reason and acked, unread.
//! - **Shutdown finishes what is in hand.** On cancellation the consumer stops taking chunks,
//!   finishes, replies and acks the ones it is processing, then closes; chunks prefetched but
//!   not started are given back to the queue at once.
//! - **Only processing counts.** Each attempt is bounded by `chunk_timeout` from when its
//!   processing starts (`attempt`), never from when it was published.
//! - **A chunk delivered again is processed alone**, so that chunks which merely shared a dying
//!   consumer's prefetch do not reach the broker's delivery limit with the one that kills it:
//!   it starts once every other chunk in hand is acked, and none starts until it is. (A chunk
//!   that kills its consumer at its *first* delivery takes with it the chunks processed beside
//!   it, and, with a prefetch above the concurrency, those whose reply awaited its confirm:
//!   they come again, as after any crash.) Of several chunks delivered again in hand, the one
//!   delivered fewest times goes first, and between equals the order flips with each delivery
//!   ([`again`]), so that a chunk always handed out with a killer is acked before it within two
//!   deliveries.
//! - **Reconnecting is bounded** ([`Recoveries`]), and a refusal that will recur stops it.

mod again;
mod attempt;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hopper_common::transport::{Inbox, Recoveries};
use hopper_common::{
    codec, AmqpTransport, Chunk, CodecError, Incoming, Job, Label, NoteTiming, Outcome, Reply,
    Route, Transport, TransportError,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::metrics::ConsumerMetrics;
use crate::processor::{ProcessError, Processor};

/// How a consumer runs. Built from [`ConsumerOptions::default`] with the `with_*` methods, so
/// that new options can be added without breaking callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    pub(crate) concurrency: u16,
    /// `None`: twice the concurrency.
    pub(crate) prefetch: Option<u16>,
    pub(crate) metrics: Arc<ConsumerMetrics>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            concurrency: 4,
            prefetch: None,
            metrics: Arc::new(ConsumerMetrics::default()),
        }
    }
}

impl ConsumerOptions {
    /// Chunks processed at once. At least 1; 4 by default.
    pub fn with_concurrency(mut self, concurrency: u16) -> ConsumerOptions {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Chunks the broker hands this consumer before it acks any: the ones being processed and
    /// the ones whose reply is on its way (a chunk is acked only once the broker confirmed its
    /// reply). Twice the concurrency by default ([`ConsumerOptions::prefetch`]), so processing
    /// goes on while replies are confirmed; the concurrency itself (never less) keeps every
    /// chunk this consumer holds in processing, for chunks so slow that another consumer should
    /// rather take the next one.
    pub fn with_prefetch(mut self, prefetch: u16) -> ConsumerOptions {
        self.prefetch = Some(prefetch);
        self
    }

    /// The prefetch in effect for chunks that may each be processed for up to `chunk_timeout`:
    /// the one set, or twice the concurrency; never less than the concurrency. A chunk beyond
    /// the concurrency may wait a whole `chunk_timeout` for a slot before its own, unacked all
    /// along, and RabbitMQ closes the channel of a delivery unacked past its `consumer_timeout`
    /// (30 minutes unless the broker is configured otherwise): so where two `chunk_timeout`s
    /// could pass it, the default is the concurrency alone.
    pub fn prefetch(&self, chunk_timeout: Duration) -> u16 {
        let default = if doubled_fits(chunk_timeout) {
            self.concurrency.saturating_mul(2)
        } else {
            self.concurrency
        };
        self.prefetch
            .unwrap_or(default)
            .max(self.concurrency)
            .max(1)
    }

    /// The metrics the consumer updates: register them in a registry of one's own, or serve
    /// them with [`hopper_common::metrics::serve`] (what `hopper-consumer --metrics` does).
    pub fn with_metrics(mut self, metrics: Arc<ConsumerMetrics>) -> ConsumerOptions {
        self.metrics = metrics;
        self
    }
}

/// RabbitMQ's default `consumer_timeout`, less a margin for the reply and the ack.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(29 * 60);

/// Whether a chunk could wait a whole `chunk_timeout` for a slot, then be processed for another,
/// within the broker's default `consumer_timeout`.
fn doubled_fits(chunk_timeout: Duration) -> bool {
    chunk_timeout.saturating_mul(2) <= CONSUMER_TIMEOUT
}

/// What a consumer did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerSummary {
    /// Chunks finished (done, failed or parked) and acked.
    pub chunks: u64,
    /// Chunks sent to a retry queue.
    pub retried: u64,
    /// Messages parked on the dead queue.
    pub dead: u64,
}

/// Why a consumer stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The transport cannot be reached, or failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The connection to the broker was lost again and again, each time soon after it was
    /// recovered.
    #[error("lost the broker connection {times} times in a row, each soon after recovering it; stopping")]
    Unrecoverable {
        /// Losses in a row.
        times: u32,
    },
}

/// What every chunk task shares.
struct Context {
    job: Job,
    processor: Arc<dyn Processor>,
    transport: Arc<dyn Transport>,
    me: String,
    /// When to send notes about long chunks.
    notes: NoteTiming,
    /// One per chunk being processed: the concurrency.
    slots: tokio::sync::Semaphore,
    /// Taken shared to process a chunk, alone for a chunk delivered before (see `handle`).
    turns: tokio::sync::RwLock<()>,
    /// Which of the chunks delivered before goes first.
    again: Arc<again::Line>,
    /// Cancelled once no more chunks are taken: a chunk still waiting for a slot goes back.
    closing: CancellationToken,
    chunks: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    metrics: Arc<ConsumerMetrics>,
}

/// Consumes `job`'s chunks from RabbitMQ with `processor` until `shutdown` is cancelled.
///
/// # Errors
/// A [`ConsumerError`] when the broker cannot be reached or fails.
pub async fn run(
    job: &Job,
    processor: Arc<dyn Processor>,
    opts: ConsumerOptions,
    shutdown: CancellationToken,
) -> Result<ConsumerSummary, ConsumerError> {
    let transport = Arc::new(AmqpTransport::open(job, "hopper-consumer").await?);
    let result = run_on(job, processor, transport.clone(), opts, shutdown).await;
    // Closing gives back the chunks that were received but never started.
    transport.close("consumer stopping").await;
    result
}

/// Consumes `job`'s chunks from `transport` with `processor` until `shutdown` is cancelled.
///
/// # Errors
/// A [`ConsumerError`] when the transport fails.
pub async fn run_on(
    job: &Job,
    processor: Arc<dyn Processor>,
    transport: Arc<dyn Transport>,
    opts: ConsumerOptions,
    shutdown: CancellationToken,
) -> Result<ConsumerSummary, ConsumerError> {
    let prefetch = opts.prefetch(job.retry.chunk_timeout);
    if prefetch > opts.concurrency && !doubled_fits(job.retry.chunk_timeout) {
        warn!(job = %job.name, prefetch, concurrency = opts.concurrency,
              chunk_timeout = %humantime::format_duration(job.retry.chunk_timeout),
              "a chunk waiting for a slot, then processed, may stay unacked past the broker's \
               consumer_timeout (30 min by default), which closes the channel; \
               set --prefetch to --concurrency for chunks this long");
    }
    let mut inbox = transport.receive(Route::Chunks, prefetch).await?;
    info!(job = %job.name, concurrency = opts.concurrency, prefetch,
          processor = job.processor.kind(), "consumer started");

    let ctx = Arc::new(Context {
        job: job.clone(),
        processor,
        transport: Arc::clone(&transport),
        me: hopper_common::process::identity(),
        notes: NoteTiming::for_job(job),
        slots: tokio::sync::Semaphore::new(usize::from(opts.concurrency.max(1))),
        turns: tokio::sync::RwLock::new(()),
        again: Arc::default(),
        closing: CancellationToken::new(),
        chunks: AtomicU64::new(0),
        retried: AtomicU64::new(0),
        dead: AtomicU64::new(0),
        metrics: Arc::clone(&opts.metrics),
    });
    let tracker = TaskTracker::new();
    let mut recoveries = Recoveries::default();
    let mut arrivals = 0u64;
    let stopped = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            next = inbox.next() => {
                // The connection is gone (or the broker stopped delivering): chunks in hand can
                // no longer be acked and come again.
                let why = match next {
                    Some(Ok(message)) => {
                        // In the line as it arrives, before any task can look at the line.
                        arrivals += 1;
                        let ticket = message.redelivered.then(|| {
                            ctx.again.enter(arrivals, message.label.deliveries.unwrap_or(1))
                        });
                        tracker.spawn(handle(Arc::clone(&ctx), message, ticket));
                        continue;
                    }
                    Some(Err(e)) if e.is_connection_lost() => e.to_string(),
                    Some(Err(e)) => break Err(ConsumerError::from(e)),
                    None => "the broker stopped delivering chunks".to_string(),
                };
                warn!(job = %job.name, error = %why, "lost the broker; reconnecting");
                match reconnect(&transport, prefetch, &mut recoveries, &shutdown).await {
                    Ok(Some(again)) => {
                        inbox = again;
                        ctx.metrics.reconnects.inc();
                    }
                    // Stopped while reconnecting: nothing is in hand that could still be acked.
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
                info!(job = %job.name, "reconnected to the broker");
            }
        }
    };
    if stopped.is_ok() {
        info!(job = %job.name, in_hand = tracker.len(), "stopping: finishing the chunks in hand");
        transport.stop_receiving().await;
    }
    // Once nothing more comes, what waits for a slot goes back for another consumer.
    ctx.closing.cancel();
    tracker.close();
    tracker.wait().await;
    let summary = ConsumerSummary {
        chunks: ctx.chunks.load(Ordering::Relaxed),
        retried: ctx.retried.load(Ordering::Relaxed),
        dead: ctx.dead.load(Ordering::Relaxed),
    };
    info!(job = %job.name, chunks = summary.chunks, retried = summary.retried, dead = summary.dead,
          "consumer stopped");
    stopped.map(|()| summary)
}

/// Connects again and receives chunks again.
/// Connects again and receives chunks again, with a growing pause while the connection keeps
/// failing, up to [`Recoveries::MAX`] losses in a row; `None` when `shutdown` came first. A
/// refusal that will recur (access refused...) is not retried.
async fn reconnect(
    transport: &Arc<dyn Transport>,
    prefetch: u16,
    recoveries: &mut Recoveries,
    shutdown: &CancellationToken,
) -> Result<Option<Inbox>, ConsumerError> {
    loop {
        let Some(pause) = recoveries.lost() else {
            return Err(ConsumerError::Unrecoverable {
                times: Recoveries::MAX,
            });
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = async {
                tokio::time::sleep(pause).await;
                transport.reconnect().await?;
                transport.receive(Route::Chunks, prefetch.max(1)).await
            } => attempt,
        };
        match attempt {
            Ok(inbox) => return Ok(Some(inbox)),
            Err(e) if e.is_connection_lost() => {
                warn!(error = %e, "the connection failed again while reconnecting; trying again")
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One message, from decoding to ack; `again` is its place in the line of chunks delivered
/// before, if it is one.
async fn handle(ctx: Arc<Context>, message: Incoming, again: Option<again::Ticket>) {
    let job = &ctx.job.name;
    let limit = usize::try_from(codec::chunk_size_bound(&ctx.job.chunking)).unwrap_or(usize::MAX);
    if message.payload.len() > limit {
        let why = format!(
            "oversized: {} bytes, more than a chunk of this job can be ({limit} bytes)",
            message.payload.len()
        );
        return park_poison(&ctx, message, why).await;
    }
    let chunk = match codec::decode_chunk(&message.payload) {
        Ok(c) if c.job == *job => c,
        Ok(c) => {
            let why = format!("a chunk of job {:?} on the queue of job {job:?}", c.job);
            return park_poison(&ctx, message, why).await;
        }
        Err(e) => return park_poison(&ctx, message, e.to_string()).await,
    };
    let (run, seq, attempt) = (chunk.run, chunk.seq, chunk.attempt);
    debug!(job = %job, run, seq, attempt, items = chunk.items.len(),
           redelivered = message.redelivered, "chunk received");

    // A chunk delivered before may be the one that killed a consumer: it is processed alone, so
    // that chunks which merely shared that consumer's hands do not die with it again and again
    // until the broker's delivery limit parks them; of several, the line says which goes first.
    let turn = async {
        if let Some(ticket) = &again {
            tokio::time::sleep(again::GATHER).await;
            ticket.first().await;
        }
        let slot = ctx.slots.acquire().await;
        let turn = if again.is_some() {
            (None, Some(ctx.turns.write().await))
        } else {
            (Some(ctx.turns.read().await), None)
        };
        (slot, turn)
    };
    let (slot, turn) = tokio::select! {
        biased;
        _ = ctx.closing.cancelled() => {
            debug!(job = %job, run, seq, attempt, "stopping: the chunk goes back unstarted");
            let _ = message.give_back().await;
            return;
        }
        taken = turn => taken,
    };
    let started = std::time::Instant::now();
    ctx.metrics.in_progress.inc();
    let result = attempt::process(&ctx, &chunk).await;
    ctx.metrics.in_progress.dec();
    // The slot is free for the next chunk while this one's reply is confirmed. The turn is
    // kept to the ack: a chunk delivered again waits until every other chunk in hand is
    // acked, not only processed, so that if it kills the consumer no finished chunk goes with
    // it to be run again.
    drop(slot);
    let _turn = turn;
    let processed_in = started.elapsed();
    ctx.metrics
        .processing_seconds
        .observe(processed_in.as_secs_f64());
    let label = Label::chunk(&chunk);
    let outcome = match result {
        Ok(p) => {
            let bad_items = p.settle(&chunk);
            Outcome::Done {
                processed: (chunk.items.len() - bad_items.len()) as u64,
                bad_items,
            }
        }
        Err(ProcessError::Transient(error)) if attempt < ctx.job.retry.max_attempts => {
            let next = attempt + 1;
            match send_to_delay(&ctx, &chunk, next).await {
                Ok(()) => {
                    ctx.retried.fetch_add(1, Ordering::Relaxed);
                    warn!(job = %job, run, seq, attempt, error = %error, "chunk failed; retrying later");
                    Outcome::Retrying {
                        error,
                        next_attempt: next,
                    }
                }
                Err(e) => return give_back(message, &e, &label).await,
            }
        }
        Err(ProcessError::Transient(error)) => {
            match park(&ctx, &message.payload, label.clone().parked(&error)).await {
                Ok(()) => Outcome::Dead { error },
                Err(e) => return give_back(message, &e, &label).await,
            }
        }
        Err(ProcessError::Permanent(error)) => {
            match park(&ctx, &message.payload, label.clone().parked(&error)).await {
                Ok(()) => Outcome::Failed { error },
                Err(e) => return give_back(message, &e, &label).await,
            }
        }
    };
    let final_outcome = outcome.is_final();
    let outcome_name = match &outcome {
        Outcome::Done { .. } => "done",
        Outcome::Retrying { .. } => "retrying",
        Outcome::Dead { .. } => "dead",
        Outcome::Failed { .. } => "failed",
        Outcome::Processing { .. } => "processing",
    };
    let reply = Reply {
        job: job.clone(),
        run,
        seq,
        attempt,
        consumer: ctx.me.clone(),
        outcome,
    };
    let sent = match codec::encode_reply(&reply) {
        Ok(payload) => publish(&ctx, Route::Replies, &payload, &Label::reply(&reply)).await,
        // A bug, not bad input: the chunk goes back, so its prefetch slot is not lost; the
        // queue's delivery limit dead-letters it if this keeps happening.
        Err(e) => return give_back(message, &e, &label).await,
    };
    if let Err(e) = sent {
        return give_back(message, &e, &label).await;
    }
    let replied_in = started.elapsed() - processed_in;
    match message.ack().await {
        Ok(()) => {
            if final_outcome {
                ctx.chunks.fetch_add(1, Ordering::Relaxed);
            }
            ctx.metrics.finished(outcome_name);
            debug!(job = %job, run, seq, attempt,
                   process_ms = processed_in.as_secs_f64() * 1000.0,
                   reply_ms = replied_in.as_secs_f64() * 1000.0, "chunk finished");
        }
        // The transport is gone: the chunk comes again, and its reply is then a duplicate.
        Err(e) => warn!(job = %job, run, seq, error = %e, "ack failed; the chunk will come again"),
    }
}

/// Why a chunk could not be handed on after processing.
#[derive(Debug, thiserror::Error)]
enum HandOff {
    /// The transport did not take it.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Its next attempt could not be encoded (a bug, not bad input).
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Something failed after processing: hand the chunk back to be delivered again.
async fn give_back(message: Incoming, why: &(dyn std::fmt::Display + Sync), label: &Label) {
    error!(message_id = ?label.message_id, error = %why,
           "cannot finish the chunk; handing it back to the queue");
    // If this fails too, the transport gives it back when the consumer goes.
    let _ = message.give_back().await;
}

/// Publishes and waits until the transport holds the message.
async fn publish(
    ctx: &Context,
    route: Route,
    payload: &[u8],
    label: &Label,
) -> Result<(), TransportError> {
    ctx.transport.publish(route, payload, label).await?.await
}

/// Sends the chunk to wait out its backoff before attempt `next`.
async fn send_to_delay(ctx: &Context, chunk: &Chunk, next: u32) -> Result<(), HandOff> {
    let mut again = chunk.clone();
    again.attempt = next;
    let payload = codec::encode_chunk(&again)?;
    publish(ctx, Route::Delay { next }, &payload, &Label::chunk(&again)).await?;
    Ok(())
}

async fn park(ctx: &Context, payload: &[u8], label: Label) -> Result<(), TransportError> {
    publish(ctx, Route::Dead, payload, &label).await?;
    ctx.dead.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn park_poison(ctx: &Context, message: Incoming, why: String) {
    let id = message
        .label
        .message_id
        .clone()
        .unwrap_or_else(|| "-".into());
    warn!(job = %ctx.job.name, message_id = %id, reason = %why,
          "parking an unreadable message on the dead queue");
    let label = message.label.clone().parked(&why);
    match park(ctx, &message.payload, label).await {
        Ok(()) => {
            if message.ack().await.is_ok() {
                ctx.metrics.finished("unreadable");
            }
        }
        Err(e) => {
            // The quorum queue's delivery limit dead-letters it if this keeps happening.
            error!(job = %ctx.job.name, message_id = %id, error = %e, "cannot park the message");
            let _ = message.give_back().await;
        }
    }
}

#[cfg(test)]
mod tests;
