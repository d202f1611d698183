//! The consumer loop: take chunks, process them, reply, ack.
//!
//! Invariants:
//! - **Commit, reply, then ack.** A chunk is acked only after its processor returned and its
//!   reply (or its move to a retry or dead queue) was confirmed by the broker. A consumer that
//!   dies before the ack loses nothing: the broker delivers the chunk again.
//! - **Prefetch = concurrency.** The broker never hands this consumer more chunks than it
//!   processes at once, so other consumers get the rest.
//! - **Poison never crash-loops.** A message that cannot be decoded (or is another job's, or
//!   another schema version) is parked on the dead queue with the reason and acked.
//! - **Shutdown finishes what is in hand.** On cancellation the consumer stops taking chunks,
//!   finishes, replies and acks the ones it holds, then closes; chunks prefetched but not
//!   started go back to the queue when the channel closes.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use hopper_common::broker::{self, process_identity, Link, LinkError};
use hopper_common::{codec, Chunk, Job, Outcome, Reply, Topology};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::processor::{ProcessError, Processor};

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Chunks processed at once (and the prefetch).
    pub concurrency: u16,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions { concurrency: 4 }
    }
}

/// What a consumer did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
pub enum ConsumerError {
    /// The broker cannot be reached or refused the set-up.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The broker failed mid-way.
    #[error("RabbitMQ: {what} ({queue}): {source}")]
    Broker {
        /// What was being done.
        what: &'static str,
        /// The queue involved.
        queue: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// The broker cancelled our consumer (the queue was deleted?).
    #[error("RabbitMQ cancelled the consumer of {queue}")]
    Cancelled {
        /// The chunk queue.
        queue: String,
    },
}

fn broker_err(what: &'static str, queue: &str) -> impl FnOnce(lapin::Error) -> ConsumerError {
    let queue = queue.to_string();
    move |source| ConsumerError::Broker {
        what,
        queue,
        source,
    }
}

/// What every chunk task shares.
struct Context {
    job: Job,
    topology: Topology,
    processor: Arc<dyn Processor>,
    channel: Channel,
    me: String,
    chunks: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
}

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("publish to {queue}: {source}")]
    Lapin { queue: String, source: lapin::Error },
    #[error("the broker did not take the message for {queue} ({why})")]
    Refused { queue: String, why: String },
}

/// Consumes `job`'s chunks with `processor` until `shutdown` is cancelled.
///
/// # Errors
/// A [`ConsumerError`] when the broker cannot be reached or fails.
pub async fn run(
    job: &Job,
    processor: Arc<dyn Processor>,
    opts: ConsumerOptions,
    shutdown: CancellationToken,
) -> Result<ConsumerSummary, ConsumerError> {
    let topology = Topology::for_job(job);
    let me = process_identity();
    let link = Link::open(job, &topology, "hopper-consumer").await?;
    let out = link.channel.clone();
    let input = link
        .consume
        .create_channel()
        .await
        .map_err(broker_err("open channel", &topology.chunks))?;
    input
        .basic_qos(opts.concurrency.max(1), BasicQosOptions::default())
        .await
        .map_err(broker_err("set prefetch", &topology.chunks))?;
    let tag = format!("hopper-consumer {me}");
    let mut deliveries = input
        .basic_consume(
            topology.chunks.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker_err("consume chunks", &topology.chunks))?;
    info!(job = %job.name, queue = %topology.chunks, concurrency = opts.concurrency,
          processor = job.processor.kind(), "consumer started");

    let ctx = Arc::new(Context {
        job: job.clone(),
        topology,
        processor,
        channel: out,
        me,
        chunks: AtomicU64::new(0),
        retried: AtomicU64::new(0),
        dead: AtomicU64::new(0),
    });
    let tracker = TaskTracker::new();
    let stopped = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    tracker.spawn(handle(Arc::clone(&ctx), delivery));
                }
                Some(Err(e)) => break Err(broker_err("receive chunks", &ctx.topology.chunks)(e)),
                None => break Err(ConsumerError::Cancelled { queue: ctx.topology.chunks.clone() }),
            },
        }
    };
    if stopped.is_ok() {
        info!(job = %job.name, in_hand = tracker.len(), "stopping: finishing the chunks in hand");
        // Best effort: if it fails, closing the channel below stops deliveries all the same.
        let _ = input
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    tracker.close();
    tracker.wait().await;
    // Closing returns prefetched chunks that were never started to the queue.
    let _ = input.close(200, "consumer stopping".into()).await;
    link.close("consumer stopping").await;
    let summary = ConsumerSummary {
        chunks: ctx.chunks.load(Ordering::Relaxed),
        retried: ctx.retried.load(Ordering::Relaxed),
        dead: ctx.dead.load(Ordering::Relaxed),
    };
    info!(job = %job.name, chunks = summary.chunks, retried = summary.retried, dead = summary.dead,
          "consumer stopped");
    stopped.map(|()| summary)
}

/// One delivery, from decoding to ack.
async fn handle(ctx: Arc<Context>, delivery: Delivery) {
    let job = &ctx.job.name;
    let chunk = match codec::decode_chunk(&delivery.data) {
        Ok(c) if c.job == *job => c,
        Ok(c) => {
            let why = format!("a chunk of job {:?} on the queue of job {job:?}", c.job);
            return park_poison(&ctx, delivery, why).await;
        }
        Err(e) => return park_poison(&ctx, delivery, e.to_string()).await,
    };
    let (run, seq, attempt) = (chunk.run, chunk.seq, chunk.attempt);
    debug!(job = %job, run, seq, attempt, items = chunk.items.len(),
           redelivered = delivery.redelivered, "chunk received");

    let started = std::time::Instant::now();
    // A panicking processor must not lose the delivery (and with it a prefetch slot): the panic
    // is a transient failure of this chunk.
    let result = AssertUnwindSafe(ctx.processor.process(&chunk))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            Err(ProcessError::Transient(format!(
                "the processor panicked: {what}"
            )))
        });
    let processed_in = started.elapsed();
    let outcome = match result {
        Ok(p) => Outcome::Done {
            processed: (chunk.items.len() - p.bad_items.len().min(chunk.items.len())) as u64,
            bad_items: p.bad_items,
        },
        Err(ProcessError::Transient(error)) if attempt < ctx.job.retry.max_attempts => {
            let next = attempt + 1;
            match send_to_retry(&ctx, &chunk, next).await {
                Ok(()) => {
                    ctx.retried.fetch_add(1, Ordering::Relaxed);
                    warn!(job = %job, run, seq, attempt, error = %error, "chunk failed; retrying later");
                    Outcome::Retrying {
                        error,
                        next_attempt: next,
                    }
                }
                Err(e) => return give_back(delivery, &e.to_string(), job, run, seq).await,
            }
        }
        Err(ProcessError::Transient(error)) => {
            match park(&ctx, &delivery.data, &delivery.properties, &error).await {
                Ok(()) => Outcome::Dead { error },
                Err(e) => return give_back(delivery, &e.to_string(), job, run, seq).await,
            }
        }
        Err(ProcessError::Permanent(error)) => {
            match park(&ctx, &delivery.data, &delivery.properties, &error).await {
                Ok(()) => Outcome::Failed { error },
                Err(e) => return give_back(delivery, &e.to_string(), job, run, seq).await,
            }
        }
    };
    let final_outcome = outcome.is_final();
    let reply = Reply {
        job: job.clone(),
        run,
        seq,
        attempt,
        consumer: ctx.me.clone(),
        outcome,
    };
    let payload = match codec::encode_reply(&reply) {
        Ok(p) => p,
        Err(e) => return give_back(delivery, &e.to_string(), job, run, seq).await,
    };
    let props = broker::reply_properties(&reply);
    if let Err(e) = publish(&ctx.channel, &ctx.topology.replies, &payload, props).await {
        return give_back(delivery, &e.to_string(), job, run, seq).await;
    }
    let replied_in = started.elapsed() - processed_in;
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(_) => {
            if final_outcome {
                ctx.chunks.fetch_add(1, Ordering::Relaxed);
            }
            debug!(job = %job, run, seq, attempt,
                   process_ms = processed_in.as_secs_f64() * 1000.0,
                   reply_ms = replied_in.as_secs_f64() * 1000.0, "chunk finished");
        }
        // The channel is gone: the broker delivers the chunk again, and its reply is a duplicate.
        Err(e) => warn!(job = %job, run, seq, error = %e, "ack failed; the chunk will come again"),
    }
}

/// Something failed after processing: leave the chunk to the broker to deliver again.
async fn give_back(delivery: Delivery, why: &str, job: &str, run: u64, seq: u64) {
    error!(job = %job, run, seq, error = %why, "cannot finish the chunk; handing it back to the queue");
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}

async fn send_to_retry(ctx: &Context, chunk: &Chunk, next: u32) -> Result<(), PublishError> {
    let Some(queue) = ctx.topology.retry_queue(&ctx.job, next) else {
        return Err(PublishError::Refused {
            queue: format!("hopper.{}.retry.*", ctx.job.name),
            why: format!("no delay queue for attempt {next}"),
        });
    };
    let mut again = chunk.clone();
    again.attempt = next;
    let payload = codec::encode_chunk(&again).map_err(|e| PublishError::Refused {
        queue: queue.to_string(),
        why: e.to_string(),
    })?;
    publish(
        &ctx.channel,
        queue,
        &payload,
        broker::chunk_properties(&again),
    )
    .await
}

async fn park(
    ctx: &Context,
    data: &[u8],
    props: &BasicProperties,
    reason: &str,
) -> Result<(), PublishError> {
    publish(
        &ctx.channel,
        &ctx.topology.dead,
        data,
        broker::dead_properties(props, reason),
    )
    .await?;
    ctx.dead.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn park_poison(ctx: &Context, delivery: Delivery, why: String) {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_else(|| "-".into());
    warn!(job = %ctx.job.name, message_id = %id, reason = %why,
          "parking an unreadable message on the dead queue");
    match park(ctx, &delivery.data, &delivery.properties, &why).await {
        Ok(()) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(e) => {
            // The quorum queue's delivery limit dead-letters it if this keeps happening.
            error!(job = %ctx.job.name, message_id = %id, error = %e, "cannot park the message");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
}

/// Publishes a persistent message and waits for the broker's confirm.
async fn publish(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let lapin_err = |source| PublishError::Lapin {
        queue: queue.to_string(),
        source,
    };
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            props,
        )
        .await
        .map_err(lapin_err)?
        .await
        .map_err(lapin_err)?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Refused {
            queue: queue.to_string(),
            why: format!("unroutable: {}", returned.reply_text),
        }),
        Confirmation::Nack(_) => Err(PublishError::Refused {
            queue: queue.to_string(),
            why: "nacked".into(),
        }),
    }
}
