//! One run of a job: read the source once, record then publish each chunk under the throttle,
//! apply the replies, and end when the source is exhausted and nothing is outstanding.
//!
//! Invariants:
//! - **Record, then publish.** A chunk and the checkpoint after it are committed to the state
//!   store before the chunk is published; the chunk becomes `in_flight` when the broker confirms.
//! - **Every confirm is kept.** Each publish's confirm future stays in `confirms` until it
//!   resolves; a nack or a returned (unroutable) chunk is published again from the bytes kept
//!   until then.
//! - **The window.** At most `window` chunks are outstanding (published, no final reply), and the
//!   source is not read further while the window is full (the reader runs at most a couple of
//!   chunks ahead, on its own thread, through a bounded channel).
//! - **Replies are applied once**, by the state store; a reply is acked only after it is
//!   committed. Replies of other runs are applied to their own run's record, never to this one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hopper_common::broker::process_identity;
use hopper_common::state::{
    now_ms, BadData, Checkpoint, ChunkRecord, ChunkStatus, NewChunk, Progress as Recorded, Retried,
    RunRecord,
};
use hopper_common::{
    codec, Chunk, CodecError, Incoming, Job, Label, Outcome, Route, RunId, RunState, RunStatus,
    StateError, StateStore, Transport, TransportError,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::chunker::{Chunker, Chunks, RawChunk};
use crate::local::{Local, Via};
use crate::progress::{Progress, Snapshot};
use crate::source::{self, Cursor, Read, Record, Source, SourceError};
use crate::status::HEARTBEAT_STALE;
use crate::throttle::Throttle;

/// How often the dispatcher tells the state store it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Times one chunk may be refused (nacked or returned) by the broker before the run stops.
const MAX_REPUBLISH: u32 = 5;

/// Replies (and confirms) already delivered are applied together, up to this many, in one
/// state-store transaction: one transaction per message would make the store the bottleneck.
const BATCH: usize = 256;

/// How a run is started.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Draw a progress bar (stderr is a terminal) rather than log progress lines.
    pub interactive: bool,
    /// How often progress lines are logged when not interactive.
    pub log_every: Duration,
    /// Local mode: worker tasks in this process, over an in-process transport, instead of
    /// RabbitMQ. The queue does not outlive the process.
    pub local: Option<Local>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            interactive: false,
            log_every: Duration::from_secs(10),
            local: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run's id.
    pub run: RunId,
    /// Its final state.
    pub state: RunState,
    /// Its counts and failures.
    pub status: RunStatus,
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The input cannot be opened (bad input: nothing was sent) or read part-way.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The transport cannot be reached, or failed mid-run.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The transport stopped delivering replies (the replies queue was deleted?).
    #[error("the transport stopped delivering replies")]
    RepliesEnded,
    /// The transport refused a chunk again and again.
    #[error("chunk {seq} of run {run} was refused {times} times; stopping ({last})")]
    Refused {
        /// The run.
        run: RunId,
        /// The chunk.
        seq: u64,
        /// How often.
        times: u32,
        /// The last refusal.
        last: String,
    },
    /// The execution context cannot be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A chunk could not be encoded (a bug).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Another dispatcher is running this job.
    #[error("run {run} of job {job} is being dispatched by {owner} (heartbeat {age_secs}s ago); stop it first")]
    AlreadyRunning {
        /// The job.
        job: String,
        /// Its running run.
        run: RunId,
        /// The dispatcher process (`host/pid`).
        owner: String,
        /// Seconds since that run's heartbeat.
        age_secs: u64,
    },
    /// `--resume` found no such run.
    #[error("job {job} has {}", match run { Some(r) => format!("no run {r}"), None => "no runs to resume".to_string() })]
    NoSuchRun {
        /// The job.
        job: String,
        /// The run asked for.
        run: Option<RunId>,
    },
    /// `--resume` of a run that has ended.
    #[error("run {run} has ended ({state}); there is nothing to resume")]
    NotResumable {
        /// The run.
        run: RunId,
        /// How it ended.
        state: RunState,
    },
    /// A chunk recorded before an interruption no longer matches the input.
    #[error("the input changed: chunk {seq} at line {line} had {expected} items, now {found}; resume with the input the run started with")]
    InputChanged {
        /// The chunk.
        seq: u64,
        /// Its first line.
        line: u64,
        /// Items recorded.
        expected: u64,
        /// Items read now.
        found: u64,
    },
    /// `retry` of a run that has not read all its input.
    #[error("run {run} is {state} and has not read all its input; `retry` only dispatches again what failed, it does not read on{}",
            if state.is_final() { "" } else { " (finish the run with `run --resume` first)" })]
    NotRetryable {
        /// The run.
        run: RunId,
        /// How it ended.
        state: RunState,
    },
    /// Local mode: the job's processor cannot be set up (an `exec` program not found...).
    #[error(transparent)]
    Processor(#[from] hopper_consumer::BuildError),
    /// Stopped by a signal before the run finished; the run stays `running`.
    #[error("interrupted: run {run} stopped before it finished ({read} items dispatched); `run --resume {run}` finishes it")]
    Interrupted {
        /// The run.
        run: RunId,
        /// Items dispatched before the stop.
        read: u64,
    },
}

impl DispatchError {
    /// True when the broker went away (the connection dropped, or it stopped delivering
    /// replies): reconnecting may let the run go on.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            DispatchError::Transport(e) => e.is_connection_lost(),
            DispatchError::RepliesEnded => true,
            DispatchError::Source(_)
            | DispatchError::Refused { .. }
            | DispatchError::State(_)
            | DispatchError::Codec(_)
            | DispatchError::AlreadyRunning { .. }
            | DispatchError::NoSuchRun { .. }
            | DispatchError::NotResumable { .. }
            | DispatchError::InputChanged { .. }
            | DispatchError::NotRetryable { .. }
            | DispatchError::Processor(_)
            | DispatchError::Interrupted { .. } => false,
        }
    }

    /// True when the input was refused before anything was sent: the user's input is wrong
    /// (exit code 2), not the run.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DispatchError::Source(SourceError::Open { .. } | SourceError::Moved { .. })
                | DispatchError::NoSuchRun { .. }
                | DispatchError::NotRetryable { .. }
                | DispatchError::NotResumable { .. }
                | DispatchError::InputChanged { .. }
                | DispatchError::Processor(_)
        )
    }
}

/// A chunk published and not yet finally answered.
struct Outstanding {
    /// Where it is in the source, to read it again if it must be published again.
    record: ChunkRecord,
    /// Since when it has been waiting for its final reply (reset by a retry).
    since: Instant,
    /// Kept until the broker confirms, to publish again on a nack.
    message: Option<(Arc<Vec<u8>>, Label)>,
    refusals: u32,
}

type ConfirmFuture = BoxFuture<'static, (u64, Result<(), TransportError>)>;

/// The state of a run in progress.
struct Dispatch<'a> {
    job: &'a Job,
    run: RunId,
    store: Arc<dyn StateStore>,
    transport: Arc<dyn Transport>,
    outstanding: HashMap<u64, Outstanding>,
    confirms: FuturesUnordered<ConfirmFuture>,
    throttle: Throttle,
    checkpoint: Checkpoint,
    read: u64,
    processed: u64,
    skipped: u64,
    /// Reading again what failed (`retry`): the checkpoint and the read count stay as the first
    /// reading left them.
    retrying: bool,
}

enum End {
    Exhausted,
    SkipLimit,
    Interrupted,
}

/// Dispatches a new run of `job` to the end, over RabbitMQ or (with [`RunOptions::local`]) to
/// workers in this process.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::is_bad_input`] tells the ones where nothing was sent.
pub async fn run(
    job: &Job,
    store: Arc<dyn StateStore>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    // The input and the execution context are checked before anything else: a missing file or
    // a live dispatcher of the same job sends nothing.
    let source = source::open(&job.source)?;
    if let Some(prev) = store.run(&job.name, None).await? {
        if !prev.state.is_final() {
            refuse_if_alive(job, &prev)?;
            warn!(job = %job.name, run = prev.id,
                  "run {} was interrupted and stays unfinished; `run --resume {}` finishes it", prev.id, prev.id);
        }
    }
    let via = Via::open(job, &opts, &shutdown).await?;
    let result = run_on(
        job,
        Start::New(source),
        via.transport.clone(),
        store,
        opts,
        shutdown,
    )
    .await;
    via.close(job).await;
    result
}

/// Finishes an interrupted run of `job` (the latest one unless `run` names it), like [`run()`]:
/// publishes again what was recorded but never confirmed, waits for what is in flight, and reads
/// on from the run's checkpoint.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::is_bad_input`] tells the ones where nothing was sent.
pub async fn resume(
    job: &Job,
    store: Arc<dyn StateStore>,
    run: Option<RunId>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let record = find_run(job, store.as_ref(), run).await?;
    if record.state.is_final() {
        return Err(DispatchError::NotResumable {
            run: record.id,
            state: record.state,
        });
    }
    refuse_if_alive(job, &record)?;
    let source = if record.checkpoint.exhausted {
        None
    } else {
        let at = Cursor {
            offset: record.checkpoint.offset,
            lines: record.checkpoint.line,
        };
        Some(source::open_at(&job.source, at)?)
    };
    let via = Via::open(job, &opts, &shutdown).await?;
    let start = Start::Resume { record, source };
    let result = run_on(job, start, via.transport.clone(), store, opts, shutdown).await;
    via.close(job).await;
    result
}

/// The run `run` of `job` (its latest run when `None`), or [`DispatchError::NoSuchRun`].
pub(crate) async fn find_run(
    job: &Job,
    store: &dyn StateStore,
    run: Option<RunId>,
) -> Result<RunRecord, DispatchError> {
    store
        .run(&job.name, run)
        .await?
        .ok_or_else(|| DispatchError::NoSuchRun {
            job: job.name.clone(),
            run,
        })
}

/// Refuses to go on while the dispatcher that owns `run` is alive: its heartbeat is recent and,
/// when it ran on this host, its process still exists.
pub(crate) fn refuse_if_alive(job: &Job, run: &RunRecord) -> Result<(), DispatchError> {
    let age = now_ms().saturating_sub(run.heartbeat_at);
    if age >= HEARTBEAT_STALE.as_millis() as u64 {
        return Ok(());
    }
    if let Some((host, pid)) = run.owner.as_deref().and_then(|o| o.rsplit_once('/')) {
        let me = process_identity();
        let same_host = me.rsplit_once('/').map(|(h, _)| h) == Some(host);
        if same_host && !Path::new("/proc").join(pid).exists() {
            return Ok(());
        }
    }
    Err(DispatchError::AlreadyRunning {
        job: job.name.clone(),
        run: run.id,
        owner: run.owner.clone().unwrap_or_else(|| "unknown".into()),
        age_secs: age / 1000,
    })
}

/// Where a run starts.
pub enum Start {
    /// A new run, reading `source` from its beginning.
    New(Box<dyn Source>),
    /// An interrupted run; `source` is positioned at its checkpoint (`None` once it was read to
    /// the end).
    Resume {
        /// The run.
        record: RunRecord,
        /// The source at the run's checkpoint.
        source: Option<Box<dyn Source>>,
    },
    /// `retry` of an ended (or interrupted) run: `chunks` reads again what it failed on.
    Retry {
        /// The run.
        record: RunRecord,
        /// The failed records, read again.
        chunks: Box<dyn Chunks>,
    },
}

/// Dispatches a run of `job` over `transport`, to the end.
///
/// # Errors
/// A [`DispatchError`].
pub async fn run_on(
    job: &Job,
    start: Start,
    transport: Arc<dyn Transport>,
    store: Arc<dyn StateStore>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let prefetch = u16::try_from((job.throttle.window * 2).clamp(64, 10_000)).unwrap_or(10_000);
    let mut replies = transport.receive(Route::Replies, prefetch).await?;
    let me = process_identity();
    let retrying = matches!(start, Start::Retry { .. });
    let (record, chunks, total_bytes) = match start {
        Start::New(source) => {
            let record = store.create_run(&job.name, &source.describe(), &me).await?;
            info!(job = %job.name, run = record.id, source = %record.source,
                  window = job.throttle.window,
                  broker = %hopper_common::job::redact_url(&job.broker_url), "run started");
            let size = source.size_bytes();
            let chunks: Box<dyn Chunks> = Box::new(Chunker::new(source, job.chunking));
            (record, Some(chunks), size)
        }
        Start::Resume { record, source } => {
            store.claim_run(record.id, &me).await?;
            info!(job = %job.name, run = record.id, next_seq = record.checkpoint.next_seq,
                  offset = record.checkpoint.offset, "run resumed");
            let size = source.as_ref().and_then(|s| s.size_bytes());
            let chunks = source.map(|s| Box::new(Chunker::new(s, job.chunking)) as Box<dyn Chunks>);
            (record, chunks, size)
        }
        Start::Retry { record, chunks } => {
            store.reopen_run(record.id, &me).await?;
            info!(job = %job.name, run = record.id, "run taken up again to retry what failed");
            (record, Some(chunks), None)
        }
    };
    let run = record.id;

    let mut d = Dispatch {
        job,
        run,
        store: Arc::clone(&store),
        transport: Arc::clone(&transport),
        outstanding: HashMap::new(),
        confirms: FuturesUnordered::new(),
        throttle: Throttle::new(job.throttle),
        checkpoint: Checkpoint {
            next_seq: record.checkpoint.next_seq.max(1),
            ..record.checkpoint
        },
        read: 0,
        processed: 0,
        skipped: 0,
        retrying,
    };
    if record.checkpoint.next_seq > 1 {
        // A resumed run goes on counting from where it was: skips before the interruption count
        // against the skip limit too.
        let so_far = store.status(run, job.retry.chunk_timeout).await?;
        d.read = so_far.items.read;
        d.processed = so_far.items.processed;
        d.skipped = so_far.items.skipped;
    }
    d.take_over_open_chunks().await?;

    // The reader runs ahead by at most the channel's capacity.
    let (tx, mut rx) = mpsc::channel::<Result<RawChunk, SourceError>>(4);
    let mut exhausted = chunks.is_none();
    let reader = chunks.map(|mut chunker| {
        tokio::task::spawn_blocking(move || loop {
            let next = chunker.next_chunk();
            let last = !matches!(next, Ok(Some(_)));
            let sent = match next {
                Ok(Some(c)) => tx.blocking_send(Ok(c)),
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
    let mut last_heartbeat = Instant::now();

    let end = loop {
        if d.skipped > job.failures.skip_limit {
            break End::SkipLimit;
        }
        if exhausted && held.is_none() && d.outstanding.is_empty() {
            break End::Exhausted;
        }
        let room = d.throttle.has_room(d.outstanding.len());
        let step: Result<Option<End>, DispatchError> = async {
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
            next = rx.recv(), if held.is_none() && !exhausted && room => match next {
                None => {
                    exhausted = true;
                    d.checkpoint.exhausted = true;
                    if let Some(size) = total_bytes {
                        // Past trailing blank lines too: `retry` compares the input's size with
                        // this offset.
                        d.checkpoint.offset = d.checkpoint.offset.max(size);
                    }
                    d.record(&[], &[], &[]).await?;
                    info!(job = %job.name, run, items = d.read, chunks = d.checkpoint.next_seq - 1,
                          "source exhausted; waiting for the last replies");
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(chunk)) => {
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
            _ = tick.tick() => {
                progress.update(&d.snapshot());
                d.republish_stuck().await?;
                if last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
                    last_heartbeat = Instant::now();
                    d.store.heartbeat(run).await?;
                }
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
                replies = d.recover(prefetch).await?;
                info!(job = %job.name, run, "reconnected to the broker");
            }
            Err(e) => return Err(e),
        }
    };
    // Dropping the receiver stops the reader at its next chunk; wait for it, so no thread
    // outlives the run.
    drop(rx);
    if let Some(reader) = reader {
        let _ = reader.await;
    }
    progress.update(&d.snapshot());
    progress.finish();

    let state = match end {
        End::Interrupted => {
            warn!(job = %job.name, run, "interrupted; the run stays `running`");
            return Err(DispatchError::Interrupted { run, read: d.read });
        }
        End::SkipLimit => {
            error!(job = %job.name, run, skipped = d.skipped, skip_limit = job.failures.skip_limit,
                   "skip limit passed: the run fails");
            RunState::Failed
        }
        End::Exhausted => {
            let s = store.status(run, job.retry.chunk_timeout).await?;
            if s.items.skipped > 0 || s.chunks.failed > 0 || s.chunks.dead > 0 {
                RunState::CompletedWithFailures
            } else {
                RunState::Completed
            }
        }
    };
    store.finish_run(run, state).await?;
    let status = store.status(run, job.retry.chunk_timeout).await?;
    info!(job = %job.name, run, state = %state, processed = status.items.processed,
          skipped = status.items.skipped, failed = status.items.failed,
          seconds = started.elapsed().as_secs_f64(), "run finished");
    Ok(RunSummary { run, state, status })
}

impl Dispatch<'_> {
    /// On resume: chunks in flight count against the window until their replies come; chunks
    /// recorded but never confirmed are read again from their position and published again
    /// (a consumer may then see one twice, which processing absorbs: it is idempotent per chunk).
    async fn take_over_open_chunks(&mut self) -> Result<(), DispatchError> {
        let open = self.store.open_chunks(self.run).await?;
        // Chunks confirmed into queues that died with the interrupted process are sent again.
        let queued_elsewhere = self.transport.outlives_process();
        for c in open {
            let message = match c.status {
                ChunkStatus::InFlight if queued_elsewhere => None,
                ChunkStatus::InFlight | ChunkStatus::Pending => Some(self.message_for(&c).await?),
                ChunkStatus::Done | ChunkStatus::Failed | ChunkStatus::Dead => continue,
            };
            let republish = message.is_some();
            self.outstanding.insert(
                c.seq,
                Outstanding {
                    record: c,
                    since: Instant::now(),
                    message,
                    refusals: 0,
                },
            );
            if republish {
                self.publish(c.seq).await?;
            }
        }
        if !self.outstanding.is_empty() {
            info!(job = %self.job.name, run = self.run, chunks = self.outstanding.len(),
                  "waiting for the chunks of the interrupted dispatcher");
        }
        Ok(())
    }

    /// A recorded chunk as a message again: its items read again from the source.
    async fn message_for(&self, c: &ChunkRecord) -> Result<(Arc<Vec<u8>>, Label), DispatchError> {
        let (spec, limits, record) = (self.job.source.clone(), self.job.chunking, *c);
        let items = tokio::task::spawn_blocking(move || reread(&spec, limits, &record))
            .await
            .map_err(|e| SourceError::Read {
                path: String::new(),
                offset: c.position.offset,
                message: e.to_string(),
            })??;
        let chunk = Chunk {
            job: self.job.name.clone(),
            run: self.run,
            seq: c.seq,
            attempt: c.attempts.max(1),
            position: c.position,
            items,
        };
        Ok((Arc::new(codec::encode_chunk(&chunk)?), Label::chunk(&chunk)))
    }

    /// Chunks confirmed but without a final reply for longer than the job's `chunk_timeout` (a
    /// consumer froze or vanished while holding them) are read again and published again, as
    /// the same attempt: whichever copy finishes first is applied, the other is a duplicate.
    async fn republish_stuck(&mut self) -> Result<(), DispatchError> {
        let timeout = self.job.retry.chunk_timeout;
        let stuck: Vec<(ChunkRecord, u64)> = self
            .outstanding
            .values()
            .filter(|o| o.message.is_none() && o.since.elapsed() > timeout)
            .map(|o| (o.record, o.since.elapsed().as_secs()))
            .collect();
        for (c, secs) in stuck {
            warn!(job = %self.job.name, run = self.run, seq = c.seq, attempt = c.attempts, secs,
                  "chunk stuck: in flight past chunk_timeout; publishing it again");
            let message = self.message_for(&c).await?;
            if let Some(o) = self.outstanding.get_mut(&c.seq) {
                o.message = Some(message);
                o.since = Instant::now();
            }
            self.publish(c.seq).await?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            read: self.read,
            processed: self.processed,
            skipped: self.skipped,
            outstanding: self.outstanding.len(),
            offset: self.checkpoint.offset,
        }
    }

    async fn record(
        &self,
        chunks: &[NewChunk],
        bad: &[BadData],
        retried: &[Retried],
    ) -> Result<(), DispatchError> {
        self.store
            .record(
                self.run,
                Recorded {
                    chunks,
                    checkpoint: &self.checkpoint,
                    bad_data: bad,
                    retry: self.retrying,
                    retried,
                },
            )
            .await?;
        Ok(())
    }

    /// Records chunks (one transaction), then publishes them.
    async fn dispatch(&mut self, raws: Vec<RawChunk>) -> Result<(), DispatchError> {
        let (job, run) = (&self.job.name, self.run);
        let mut bad = Vec::new();
        let mut retried = Vec::new();
        let mut new = Vec::with_capacity(raws.len());
        let mut chunks = Vec::with_capacity(raws.len());
        for raw in raws {
            for b in &raw.bad {
                warn!(job = %job, run, line = b.position.line, reason = %b.reason,
                      "skipping a record that cannot be read");
            }
            bad.extend(raw.bad);
            if let Some(of) = raw.retry {
                // The skipped items it takes over stop counting; what is still bad counts again.
                self.skipped = self.skipped.saturating_sub(of.skipped);
                retried.extend(of.retried);
            } else {
                self.checkpoint.offset = raw.end.offset;
                self.checkpoint.line = raw.end.lines;
            }
            if raw.items.is_empty() {
                continue;
            }
            let seq = self.checkpoint.next_seq;
            self.checkpoint.next_seq += 1;
            new.push(NewChunk {
                seq,
                position: raw.position,
                end_offset: raw.end.offset,
                items: raw.items.len() as u64,
                end_line: raw.end.lines,
            });
            chunks.push(Chunk {
                job: job.clone(),
                run,
                seq,
                attempt: 1,
                position: raw.position,
                items: raw.items,
            });
        }
        self.skipped += bad.len() as u64;
        self.record(&new, &bad, &retried).await?;

        for (chunk, record) in chunks.into_iter().zip(&new) {
            let (seq, items) = (chunk.seq, chunk.items.len() as u64);
            let payload = Arc::new(codec::encode_chunk(&chunk)?);
            let label = Label::chunk(&chunk);
            self.outstanding.insert(
                seq,
                Outstanding {
                    record: ChunkRecord {
                        seq,
                        position: record.position,
                        end_offset: record.end_offset,
                        items,
                        status: ChunkStatus::Pending,
                        attempts: 1,
                    },
                    since: Instant::now(),
                    message: Some((payload, label)),
                    refusals: 0,
                },
            );
            self.publish(seq).await?;
            self.throttle.sent(items);
            if !self.retrying {
                self.read += items;
            }
            debug!(job = %self.job.name, run, seq, items, "chunk published");
        }
        Ok(())
    }

    /// After the connection was lost: connect again, publish again every chunk the broker had
    /// not confirmed (the old confirms are void; confirmed chunks are safe in their durable
    /// queue), and receive replies again (unacked ones come again and are duplicates).
    async fn recover(
        &mut self,
        prefetch: u16,
    ) -> Result<hopper_common::transport::Inbox, DispatchError> {
        self.confirms = FuturesUnordered::new();
        self.transport.reconnect().await?;
        let replies = self.transport.receive(Route::Replies, prefetch).await?;
        let unconfirmed: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.message.is_some())
            .map(|(seq, _)| *seq)
            .collect();
        for seq in unconfirmed {
            self.publish(seq).await?;
        }
        Ok(replies)
    }

    /// Publishes an outstanding chunk from its kept bytes and keeps the confirm.
    async fn publish(&mut self, seq: u64) -> Result<(), DispatchError> {
        let Some((payload, label)) = self.outstanding.get(&seq).and_then(|o| o.message.clone())
        else {
            return Ok(());
        };
        let confirm = self
            .transport
            .publish(Route::Chunks, &payload, &label)
            .await?;
        self.confirms
            .push(Box::pin(async move { (seq, confirm.await) }));
        Ok(())
    }

    async fn on_confirms(
        &mut self,
        confirms: Vec<(u64, Result<(), TransportError>)>,
    ) -> Result<(), DispatchError> {
        let mut confirmed = Vec::with_capacity(confirms.len());
        for (seq, confirmation) in confirms {
            let refused = match confirmation {
                Ok(()) => None,
                Err(e @ TransportError::Refused { .. }) => Some(e.to_string()),
                Err(
                    e @ (TransportError::Connect(_)
                    | TransportError::Broker { .. }
                    | TransportError::Cancelled { .. }),
                ) => return Err(e.into()),
            };
            let Some(o) = self.outstanding.get_mut(&seq) else {
                // Its final reply came before its confirm: nothing left to do.
                continue;
            };
            match refused {
                None => {
                    o.message = None;
                    confirmed.push(seq);
                }
                Some(why) => {
                    o.refusals += 1;
                    if o.refusals > MAX_REPUBLISH {
                        return Err(DispatchError::Refused {
                            run: self.run,
                            seq,
                            times: o.refusals,
                            last: why,
                        });
                    }
                    warn!(job = %self.job.name, run = self.run, seq, why = %why,
                          "chunk not accepted; declaring the queues again and publishing it again");
                    self.transport.repair().await?;
                    self.publish(seq).await?;
                }
            }
        }
        if !confirmed.is_empty() {
            self.store.mark_in_flight(self.run, &confirmed).await?;
        }
        Ok(())
    }

    /// Applies replies in one transaction, then acks them all at once (they are the only
    /// messages of the replies inbox, taken in order, so acking through the last covers them).
    async fn on_replies(&mut self, incoming: Vec<Incoming>) -> Result<(), DispatchError> {
        let mut replies = Vec::with_capacity(incoming.len());
        for message in &incoming {
            match codec::decode_reply(&message.payload) {
                Ok(reply) => replies.push(reply),
                Err(e) => warn!(job = %self.job.name,
                                message_id = ?message.label.message_id,
                                error = %e, "dropping a reply that cannot be read"),
            }
        }
        let applied = self.store.apply_replies(&replies).await?;
        for (reply, applied) in replies.iter().zip(applied) {
            if reply.run != self.run {
                debug!(job = %self.job.name, run = reply.run, seq = reply.seq, ?applied,
                       "reply of another run");
                continue;
            }
            if applied == hopper_common::state::Applied::Recorded {
                self.log_outcome(reply);
            }
            if reply.outcome.is_final() {
                self.outstanding.remove(&reply.seq);
            }
        }
        if let Some(last) = incoming.last() {
            last.ack_through().await?;
        }
        Ok(())
    }

    fn log_outcome(&mut self, reply: &hopper_common::Reply) {
        let (job, run, seq, attempt) = (&self.job.name, reply.run, reply.seq, reply.attempt);
        match &reply.outcome {
            Outcome::Done {
                processed,
                bad_items,
            } => {
                if let Some(o) = self.outstanding.get(&seq) {
                    debug!(job = %job, run, seq, ms = o.since.elapsed().as_millis() as u64, "chunk done");
                }
                self.processed += processed;
                self.skipped += bad_items.len() as u64;
                for b in bad_items {
                    warn!(job = %job, run, seq, line = b.line, reason = %b.reason, "item skipped by the processor");
                }
            }
            Outcome::Retrying {
                error,
                next_attempt,
            } => {
                warn!(job = %job, run, seq, attempt, next_attempt, consumer = %reply.consumer,
                      error = %error, "chunk failed; it will be retried");
                if let Some(o) = self.outstanding.get_mut(&seq) {
                    o.since = Instant::now();
                    o.record.attempts = *next_attempt;
                }
            }
            Outcome::Dead { error } => {
                error!(job = %job, run, seq, attempt, error = %error,
                       "chunk failed on its last attempt; parked on the dead queue")
            }
            Outcome::Failed { error } => {
                error!(job = %job, run, seq, attempt, error = %error, "chunk failed permanently")
            }
        }
    }
}

/// The items of a recorded chunk, read again from its position: the records between its start
/// and its end offset, less what was bad data when it was first read.
fn reread(
    spec: &hopper_common::SourceSpec,
    limits: hopper_common::job::Chunking,
    chunk: &ChunkRecord,
) -> Result<Vec<hopper_common::Item>, DispatchError> {
    let at = Cursor {
        offset: chunk.position.offset,
        lines: chunk.position.line.saturating_sub(1),
    };
    let span = chunk.end_offset.saturating_sub(chunk.position.offset);
    let mut source = source::open_span(spec, at, span)?;
    let mut items = Vec::with_capacity(chunk.items as usize);
    while let Some(Read { record, start }) = source.next()? {
        if start.offset >= chunk.end_offset {
            break;
        }
        match record {
            Record::Item(item) if item.data.len() as u64 <= limits.max_bytes => items.push(item),
            Record::Item(_) | Record::Bad { .. } => {}
        }
    }
    if items.len() as u64 != chunk.items {
        return Err(DispatchError::InputChanged {
            seq: chunk.seq,
            line: chunk.position.line,
            expected: chunk.items,
            found: items.len() as u64,
        });
    }
    Ok(items)
}
