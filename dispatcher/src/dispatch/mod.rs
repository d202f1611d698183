//! The dispatch loop: one run of a job, from its first chunk to its last outcome. It reads the
//! chunks (a new run's source, a resumed run's rest, or what `retry` reads again), records then
//! publishes each under the throttle, applies the replies, and ends when the chunks are
//! exhausted and nothing is outstanding.
//!
//! Invariants:
//! - **Record, then publish.** A chunk and the checkpoint after it are committed to the
//!   execution context before the chunk is published; the chunk becomes `in_flight` when the
//!   broker confirms ([`publish`]).
//! - **Every confirm is kept** ([`outstanding`]) until it resolves; a nack or a returned
//!   (unroutable) chunk is published again from the bytes kept until then.
//! - **The window.** At most `window` chunks are outstanding (published, no final reply), and the
//!   source is not read further while the window is full (the reader runs at most a couple of
//!   chunks ahead, on its own thread, through a bounded channel).
//! - **Replies are applied once** ([`replies`]), by the execution context; a reply is acked only
//!   after it is committed. Replies of other runs are applied to their own run's record, never to
//!   this one.

mod cancel;
mod outstanding;
mod publish;
mod replies;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hopper_common::job::SourceSpec;
use hopper_common::transport::Recoveries;
use hopper_common::{Job, Route, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::chunker::{Chunker, Chunks, RawChunk};
use crate::context::{
    Checkpoint, ContextStore, ExecutionContext, Fence, RunId, RunRecord, RunState, RunStatus,
    StuckAfter,
};
use crate::error::DispatchError;
use crate::metrics::DispatcherMetrics;
use crate::options::RunOptions;
use crate::owner::{beat, owner_alive, stopped_beating, won};
use crate::progress::Progress;
use crate::source::{Fingerprint, Source, SourceError};
use crate::throttle::Throttle;
use outstanding::{ConfirmFuture, Outstanding};

/// Chunks handed to the client at once whose frames are not all written yet. The client copies
/// a chunk into its frames when it is handed over, so this bounds that memory (a few chunks,
/// whatever the window), and it keeps the client's I/O thread busy while the loop reads on.
const SENDING: usize = 4;

/// Times one chunk may be refused (nacked or returned) by the broker before the run stops.
const MAX_REPUBLISH: u32 = 5;

/// Replies (and confirms) already delivered are applied together, up to this many, in one
/// transaction of the execution context: one transaction per message would make the store the
/// bottleneck.
const BATCH: usize = 256;

/// How a run ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunSummary {
    /// The run's id, for `status --run` and `retry --run`.
    pub run: RunId,
    /// How it ended (or `running`, when a retry found nothing to do on a running run).
    pub state: RunState,
    /// Its counts and failures, as `status` shows them.
    pub status: RunStatus,
}

impl RunSummary {
    /// The exit code of the contract: 0 for `completed`, 1 for any other end.
    pub fn exit_code(&self) -> u8 {
        match self.state {
            RunState::Completed => 0,
            RunState::CompletedWithFailures
            | RunState::Failed
            | RunState::Cancelled
            | RunState::Running
            | RunState::Paused
            | RunState::Cancelling => 1,
        }
    }
}

/// The state of a run in progress.
struct Dispatch<'a> {
    job: &'a Job,
    run: RunId,
    /// The right to write the run; every write shows it.
    fence: Fence,
    store: Arc<dyn ContextStore>,
    transport: Arc<dyn Transport>,
    outstanding: HashMap<u64, Outstanding>,
    confirms: FuturesUnordered<ConfirmFuture>,
    /// Permits to hand a chunk to the client ([`SENDING`]).
    sends: Arc<tokio::sync::Semaphore>,
    throttle: Throttle,
    checkpoint: Checkpoint,
    read: u64,
    processed: u64,
    skipped: u64,
    /// Reading again what failed (`retry`), before reading on (if the run had stopped short of
    /// the end of its input): the skip limit is judged once what failed was read again, on what
    /// still fails.
    rereading: bool,
    /// Told to publish nothing new (`pause`), until told to go on (`resume`).
    paused: bool,
    /// Told to stop (`cancel`): nothing new is published, and the run ends `cancelled` once
    /// the chunks in hand have their outcomes.
    cancelling: bool,
    /// What the run counts for Prometheus.
    metrics: Arc<DispatcherMetrics>,
}

impl Dispatch<'_> {
    /// Takes up what an operator set for the run since the last look (`pause`, `resume`,
    /// `throttle`): they write the execution context, the dispatcher reads it here, within a
    /// tick.
    async fn follow_controls(&mut self, now: Duration) -> Result<(), DispatchError> {
        let Some(record) = self.store.run(&self.job.name, Some(self.run)).await? else {
            return Ok(());
        };
        if record.state == RunState::Cancelling && !self.cancelling {
            return self.cancel().await;
        }
        let paused = record.state == RunState::Paused;
        if paused != self.paused {
            self.paused = paused;
            if paused {
                info!(job = %self.job.name, run = self.run, outstanding = self.outstanding.len(),
                      "paused: nothing new is published; the chunks in hand finish");
            } else {
                // The time paused allows no burst.
                let spec = self.throttle.spec();
                self.throttle.retune(spec, now);
                info!(job = %self.job.name, run = self.run, "resumed: publishing again");
            }
        }
        let wanted = record.throttle.unwrap_or(self.job.throttle);
        if wanted != self.throttle.spec() {
            self.throttle.retune(wanted, now);
            info!(job = %self.job.name, run = self.run, window = wanted.window, rate = wanted.rate,
                  ramp_up_s = wanted.ramp_up.as_secs_f64(), "throttle changed");
        }
        Ok(())
    }
}

enum End {
    Exhausted,
    SkipLimit,
    Cancelled,
    Interrupted,
}

/// Where a run starts.
pub(crate) enum Start {
    /// A new run, reading `source` from its beginning.
    New {
        /// The source, at its beginning.
        source: Box<dyn Source>,
        /// The input's fingerprint, kept with the run for `--resume` to compare.
        input: Fingerprint,
    },
    /// An interrupted run; `source` is positioned at its checkpoint (`None` once it was read to
    /// the end).
    Resume {
        /// The interrupted run, with its checkpoint.
        record: RunRecord,
        /// The source at the run's checkpoint.
        source: Option<Box<dyn Source>>,
    },
    /// `retry` of an ended (or interrupted) run: `chunks` reads again what it failed on.
    Retry {
        /// The run whose failures are dispatched again.
        record: RunRecord,
        /// The failed records, read again (then, for a run stopped at the skip limit, the rest
        /// of its input).
        chunks: Box<dyn Chunks>,
        /// The input's size, when the retry reads on to its end.
        size: Option<u64>,
    },
}

impl Start {
    /// A new run of the input `spec` names: the source at its beginning, and the input's
    /// fingerprint.
    ///
    /// # Errors
    /// [`SourceError::Open`] when the input cannot be opened.
    pub(crate) fn new(spec: &SourceSpec, max_record: u64) -> Result<Start, SourceError> {
        // Opened first: it refuses what is not a regular file before anything reads it.
        let source = crate::source::open(spec, max_record)?;
        let input = Fingerprint::of(spec)?;
        Ok(Start::New { source, input })
    }
}

/// Dispatches a run of `job` over `transport`, to the end. The transport is the only way out of
/// this process, so a test can run the whole loop in-process.
///
/// # Errors
/// A [`DispatchError`].
pub(crate) async fn run_on(
    job: &Job,
    start: Start,
    transport: Arc<dyn Transport>,
    context: &ExecutionContext,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let store = Arc::clone(context.store());
    let prefetch = u16::try_from((job.throttle.window * 2).clamp(64, 10_000)).unwrap_or(10_000);
    let mut replies = transport.receive(Route::Replies, prefetch).await?;
    // This dispatcher's right to write the run: every write checks it, so one that lost the run
    // to another stops at its next write.
    let token = Fence::token();
    let fence = |run| Fence {
        run,
        token: token.clone(),
    };
    let is_retry = matches!(start, Start::Retry { .. });
    let (record, chunks, total_bytes) = match start {
        Start::New { source, input } => {
            let claimed = store
                .create_run(
                    &job.name,
                    &source.describe(),
                    &input.to_string(),
                    &token,
                    owner_alive,
                )
                .await?;
            let record = won(job, claimed)?;
            info!(job = %job.name, run = record.id, source = %record.source,
                  window = job.throttle.window,
                  broker = %hopper_common::job::redact_url(&job.broker_url), "run started");
            let size = source.size_bytes();
            let chunks: Box<dyn Chunks> = Box::new(Chunker::new(source, job.chunking));
            (record, Some(chunks), size)
        }
        Start::Resume { record, source } => {
            won(job, store.claim_run(&fence(record.id), owner_alive).await?)?;
            info!(job = %job.name, run = record.id, next_seq = record.checkpoint.next_seq,
                  offset = record.checkpoint.offset, "run resumed");
            let size = source.as_ref().and_then(|s| s.size_bytes());
            let chunks = source.map(|s| Box::new(Chunker::new(s, job.chunking)) as Box<dyn Chunks>);
            (record, chunks, size)
        }
        Start::Retry {
            record,
            chunks,
            size,
        } => {
            won(job, store.reopen_run(&fence(record.id), owner_alive).await?)?;
            info!(job = %job.name, run = record.id, "run taken up again to retry what failed");
            (record, Some(chunks), size)
        }
    };
    let run = record.id;
    let fence = fence(run);
    // The heartbeat comes from its own timer, so that a long stall of the loop (a publish held
    // by a broker alarm) does not make a live owner look dead.
    let beating = CancellationToken::new();
    let mut heartbeat = tokio::spawn(beat(Arc::clone(&store), fence.clone(), beating.clone()));
    // However the run ends, its heartbeat stops with it.
    let _stop_beating = beating.clone().drop_guard();

    let mut d = Dispatch {
        job,
        run,
        fence,
        store: Arc::clone(&store),
        transport: Arc::clone(&transport),
        outstanding: HashMap::new(),
        confirms: FuturesUnordered::new(),
        sends: Arc::new(tokio::sync::Semaphore::new(SENDING)),
        throttle: Throttle::new(record.throttle.unwrap_or(job.throttle)),
        checkpoint: Checkpoint {
            next_seq: record.checkpoint.next_seq.max(1),
            ..record.checkpoint
        },
        read: 0,
        processed: 0,
        skipped: 0,
        rereading: is_retry,
        paused: record.state == RunState::Paused,
        cancelling: false,
        metrics: Arc::clone(&opts.metrics),
    };
    d.metrics
        .watch(Arc::clone(&store), run, StuckAfter::for_job(job));
    if d.paused {
        warn!(job = %job.name, run, "the run is paused: nothing new is published until `resume`");
    }
    if record.checkpoint.next_seq > 1 {
        // A resumed run goes on counting from where it was: skips before the interruption count
        // against the skip limit too.
        let so_far = store.status(run, StuckAfter::for_job(job)).await?;
        d.read = so_far.items.read;
        d.processed = so_far.items.processed;
        d.skipped = so_far.items.skipped;
    }
    d.take_over_open_chunks().await?;
    if record.state == RunState::Cancelling {
        // Cancelled while no dispatcher ran it: the cancellation is finished now.
        d.cancel().await?;
    }

    // The reader runs ahead by at most the channel's capacity.
    let (tx, mut rx) = mpsc::channel::<Result<RawChunk, SourceError>>(4);
    let mut exhausted = chunks.is_none();
    let reader = chunks.map(|mut chunker| {
        tokio::task::spawn_blocking(move || loop {
            let next = chunker.next_chunk();
            let last = !matches!(next, Ok(Some(_)));
            let sent = match next {
                Ok(Some(mut c)) => {
                    c.encode_items();
                    tx.blocking_send(Ok(c))
                }
                Ok(None) => return,
                Err(e) => tx.blocking_send(Err(e)),
            };
            if sent.is_err() || last {
                return;
            }
        })
    });

    let mut progress = Progress::new(
        &job.name,
        run,
        total_bytes,
        opts.interactive,
        opts.log_every,
    );
    let started = tokio::time::Instant::now();
    let rate_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(rate_timer);
    let mut held: Option<RawChunk> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recoveries = Recoveries::default();

    // Past the skip limit nothing more is read or sent, but the chunks already sent are waited
    // for: every record read is accounted for (processed, or listed), and `retry` finishes the
    // run once the input is fixed.
    let mut over_limit = false;
    let end = loop {
        if !over_limit && !d.rereading && d.skipped > job.failures.skip_limit {
            over_limit = true;
            held = None;
            error!(job = %job.name, run, skipped = d.skipped, skip_limit = job.failures.skip_limit,
                   outstanding = d.outstanding.len(),
                   "skip limit passed: nothing more is sent; waiting for the chunks in flight");
        }
        if d.cancelling {
            held = None;
        }
        let reading = !exhausted && !over_limit && !d.cancelling;
        let room = !d.paused && !d.cancelling && d.throttle.has_room(d.outstanding.len());
        let step: Result<Option<End>, DispatchError> = async {
        if d.cancelling && d.outstanding.is_empty() {
            d.cancel_the_rest().await?;
            return Ok(d.outstanding.is_empty().then_some(End::Cancelled));
        }
        if !reading && held.is_none() && d.outstanding.is_empty() {
            // The context's rows have the last word: a chunk recorded but never sent (or sent
            // and never answered) holds the run open until it has an outcome.
            d.take_over_open_chunks().await?;
            let end = if over_limit { End::SkipLimit } else { End::Exhausted };
            return Ok(d.outstanding.is_empty().then_some(end));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(Some(End::Interrupted)),
            delivery = replies.next() => match delivery {
                Some(Ok(first)) => {
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match replies.next().now_or_never() {
                            Some(Some(Ok(more))) => batch.push(more),
                            Some(Some(Err(e))) => return Err(e.into()),
                            Some(None) | None => break,
                        }
                    }
                    d.on_replies(batch).await?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(DispatchError::RepliesEnded),
            },
            Some(first) = d.confirms.next(), if !d.confirms.is_empty() => {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match d.confirms.next().now_or_never() {
                        Some(Some(more)) => batch.push(more),
                        Some(None) | None => break,
                    }
                }
                d.on_confirms(batch).await?;
            }
            _ = &mut rate_timer, if held.is_some() && room => {
                if let Some(chunk) = held.take() {
                    d.dispatch(vec![chunk]).await?;
                }
            }
            next = rx.recv(), if held.is_none() && reading && room => match next {
                None => {
                    exhausted = true;
                    d.rereading = false;
                    d.checkpoint.exhausted = true;
                    if let Some(size) = total_bytes {
                        // Past trailing blank lines too: `retry` compares the input's size with
                        // this offset.
                        d.checkpoint.offset = d.checkpoint.offset.max(size);
                    }
                    d.record(&[], &[], &[], false).await?;
                    info!(job = %job.name, run, items = d.read, chunks = d.checkpoint.next_seq - 1,
                          "source exhausted; waiting for the last replies");
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(chunk)) => {
                    if chunk.retry.is_none() && d.rereading {
                        // What failed has been read again: from here on `retry` reads on, and
                        // the skip limit counts what still fails.
                        d.rereading = false;
                        if d.skipped > job.failures.skip_limit {
                            return Ok(None);
                        }
                    }
                    let at = started + d.throttle.next_allowed_at();
                    if at <= tokio::time::Instant::now() {
                        // Without a rate, take every chunk already read that fits the window, to
                        // record them in one transaction.
                        let mut batch = vec![chunk];
                        while d.throttle.is_unlimited()
                            && d.throttle.has_room(d.outstanding.len() + batch.len())
                        {
                            match rx.try_recv() {
                                Ok(Ok(more)) => batch.push(more),
                                Ok(Err(e)) => return Err(e.into()),
                                // An exhausted reader is seen by the next recv().
                                Err(_) => break,
                            }
                        }
                        d.dispatch(batch).await?;
                    } else {
                        rate_timer.as_mut().reset(at);
                        held = Some(chunk);
                    }
                }
            },
            _ = beating.cancelled() => return Err(stopped_beating(&mut heartbeat).await),
            _ = tick.tick() => {
                d.follow_controls(started.elapsed()).await?;
                progress.update(&d.snapshot());
                d.metrics.window.set(d.throttle.spec().window as i64);
                d.metrics.outstanding.set(d.outstanding.len() as i64);
            }
        }
        Ok(None)
        }
        .await;
        match step {
            Ok(Some(end)) => break end,
            Ok(None) => {}
            Err(e) if e.is_connection_lost() => {
                warn!(job = %job.name, run, error = %e, "lost the broker; reconnecting");
                match d
                    .recover_bounded(prefetch, &mut recoveries, &shutdown)
                    .await?
                {
                    Some(again) => replies = again,
                    None => break End::Interrupted,
                }
                d.metrics.reconnects.inc();
                info!(job = %job.name, run, "reconnected to the broker");
            }
            Err(e) => return Err(e),
        }
    };
    // Dropping the receiver stops the reader at its next chunk; wait for it, so no thread
    // outlives the run.
    drop(rx);
    if let Some(reader) = reader {
        reader.await.map_err(|e| DispatchError::Task {
            what: "source reader",
            message: e.to_string(),
        })?;
    }
    progress.update(&d.snapshot());
    progress.finish();

    let state = match end {
        End::Interrupted => {
            warn!(job = %job.name, run, "interrupted; the run stays `running`");
            return Err(DispatchError::Interrupted { run, read: d.read });
        }
        End::Cancelled => {
            warn!(job = %job.name, run, "cancelled");
            RunState::Cancelled
        }
        End::SkipLimit => {
            error!(job = %job.name, run, skipped = d.skipped, skip_limit = job.failures.skip_limit,
                   "skip limit passed: the run fails; fix the input and `retry` it to finish");
            RunState::Failed
        }
        End::Exhausted => {
            let s = store.status(run, StuckAfter::for_job(job)).await?;
            if s.items.skipped > 0 || s.chunks.failed > 0 || s.chunks.dead > 0 {
                RunState::CompletedWithFailures
            } else {
                RunState::Completed
            }
        }
    };
    beating.cancel();
    // The heartbeat's own failure (the run taken over) stops the run before it is ended here.
    if let Ok(Err(e)) = heartbeat.await {
        return Err(e.into());
    }
    store.finish_run(&d.fence, state).await?;
    let status = store.status(run, StuckAfter::for_job(job)).await?;
    info!(job = %job.name, run, state = %state, processed = status.items.processed,
          skipped = status.items.skipped, failed = status.items.failed,
          seconds = started.elapsed().as_secs_f64(), "run finished");
    Ok(RunSummary { run, state, status })
}
