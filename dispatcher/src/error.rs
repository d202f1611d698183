//! Why a run could not go on, and what the operator does next: each variant's message says it,
//! and [`DispatchError::exit_code`] decides the exit code with one exhaustive match, so that a
//! new variant cannot silently exit 1.

use hopper_common::{CodecError, TransportError};

use crate::context::{ContextError, RunId, RunState};
use crate::source::SourceError;

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A consumer replied in another message schema (another release): the dispatcher cannot
    /// read it, and stops rather than drop it. Its replies stay on the queue.
    #[error("a reply ({}) has message schema version {found}, this dispatcher reads version {expected}; run consumers and dispatcher of the same release", message_id.as_deref().unwrap_or("no message id"))]
    ReplySchema {
        /// The schema version of the reply.
        found: u16,
        /// The version this build reads.
        expected: u16,
        /// The reply's message id, to find it in the management UI.
        message_id: Option<String>,
    },
    /// The connection to the broker was lost again and again, each time soon after it was
    /// recovered; the run stops and can be resumed.
    #[error("lost the broker connection {times} times in a row, each soon after recovering it; stopping (the run can be resumed)")]
    Unrecoverable {
        /// Losses in a row.
        times: u32,
    },
    /// The transport refused a chunk again and again.
    #[error("chunk {seq} of run {run} was refused {times} times; stopping ({last})")]
    Refused {
        /// The run the chunk belongs to.
        run: RunId,
        /// The chunk that was refused.
        seq: u64,
        /// How often it was refused.
        times: u32,
        /// The broker's last reason.
        last: String,
    },
    /// The execution context cannot be read or written.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A chunk could not be encoded (a bug).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A task the run depends on (reading the source on its own thread) stopped abnormally.
    #[error("the dispatcher's {what} task stopped: {message}")]
    Task {
        /// What the task was doing.
        what: &'static str,
        /// How it stopped (a panic's message).
        message: String,
    },
    /// Another dispatcher of this job is alive: nothing was changed (exit 3).
    #[error("already running: run {run} of job {job} is being dispatched by {owner}, started {}, heartbeat {age_secs}s ago; nothing was changed", crate::status::rfc3339(*started_at))]
    AlreadyRunning {
        /// The job.
        job: String,
        /// The run that dispatcher owns.
        run: RunId,
        /// The dispatcher process (`host/pid`).
        owner: String,
        /// When the run started (ms since the Unix epoch).
        started_at: u64,
        /// Seconds since that run's heartbeat.
        age_secs: u64,
    },
    /// `pause`, `resume`, `throttle`, `cancel` or `retry` of a run that has ended (or is being
    /// cancelled).
    #[error("run {run} has ended ({state}); there is nothing to {what}")]
    Ended {
        /// The run.
        run: RunId,
        /// How it ended.
        state: RunState,
        /// The command refused.
        what: &'static str,
    },
    /// `throttle` with a setting that makes no sense.
    #[error("throttle: {why}")]
    BadThrottle {
        /// What is wrong.
        why: String,
    },
    /// `clean --queues` found them still needed (nothing was deleted).
    #[error("the queues are kept: {why}")]
    CleanRefused {
        /// What still needs them, and what to do.
        why: String,
    },
    /// `--resume` or `retry` found no such run.
    #[error("job {job} has {}", match run { Some(r) => format!("no run {r}"), None => "no runs to resume".to_string() })]
    NoSuchRun {
        /// The job.
        job: String,
        /// The run asked for; `None` when the job has no runs at all.
        run: Option<RunId>,
    },
    /// `--resume` of a run that has ended.
    #[error("run {run} has ended ({state}); there is nothing to resume")]
    NotResumable {
        /// The run asked for.
        run: RunId,
        /// How it ended.
        state: RunState,
    },
    /// `retry` of a run that has not read all its input: one still going, or one stopped at the
    /// skip limit by an earlier build that kept no fingerprint of its input.
    #[error("run {run} is {state} and has not read all its input; {}",
            if state.is_final() {
                "it was started by an earlier build, which kept no fingerprint of its input, so `retry` cannot check the fixes before reading on: start a new run"
            } else {
                "finish it with `run --resume` first"
            })]
    NotRetryable {
        /// The run asked for.
        run: RunId,
        /// Where it stands.
        state: RunState,
    },
    /// Local mode: the job's processor cannot be set up (an `exec` program not found...).
    #[error(transparent)]
    Processor(#[from] hopper_consumer::BuildError),
    /// Stopped by a signal before the run finished; the run stays `running`.
    #[error("interrupted: run {run} stopped before it finished ({read} items dispatched); `run --resume {run}` finishes it")]
    Interrupted {
        /// The run, left `running`.
        run: RunId,
        /// Items dispatched before the stop.
        read: u64,
    },
}

impl DispatchError {
    /// True when the broker went away (the connection dropped, or it stopped delivering
    /// replies): reconnecting may let the run go on.
    pub(crate) fn is_connection_lost(&self) -> bool {
        match self {
            DispatchError::Transport(e) => e.is_connection_lost(),
            DispatchError::RepliesEnded => true,
            DispatchError::Source(_)
            | DispatchError::Refused { .. }
            | DispatchError::Unrecoverable { .. }
            | DispatchError::ReplySchema { .. }
            | DispatchError::Context(_)
            | DispatchError::Codec(_)
            | DispatchError::Task { .. }
            | DispatchError::AlreadyRunning { .. }
            | DispatchError::NoSuchRun { .. }
            | DispatchError::NotResumable { .. }
            | DispatchError::NotRetryable { .. }
            | DispatchError::Processor(_)
            | DispatchError::Interrupted { .. }
            | DispatchError::CleanRefused { .. }
            | DispatchError::Ended { .. }
            | DispatchError::BadThrottle { .. } => false,
        }
    }

    /// The exit code of the contract: 2 when the input or the request was refused before
    /// anything was sent (bad input, a run that cannot be resumed or retried, a processor that
    /// cannot be set up); 3 when another dispatcher of the job is alive (nothing changed: a
    /// scheduler's overlapping start); 1 when the run could not go on (broker, execution
    /// context, a refused chunk, an interruption).
    pub fn exit_code(&self) -> u8 {
        match self {
            DispatchError::Source(
                SourceError::Open { .. }
                | SourceError::Moved { .. }
                | SourceError::Changed { .. }
                | SourceError::Edited { .. }
                | SourceError::Query { .. }
                | SourceError::QueryChanged { .. },
            )
            | DispatchError::NoSuchRun { .. }
            | DispatchError::NotRetryable { .. }
            | DispatchError::NotResumable { .. }
            | DispatchError::CleanRefused { .. }
            | DispatchError::Ended { .. }
            | DispatchError::BadThrottle { .. } => 2,
            DispatchError::Processor(e) => e.exit_code(),
            DispatchError::Source(
                SourceError::Read { .. }
                | SourceError::Unreachable { .. }
                | SourceError::Fetch { .. },
            )
            | DispatchError::Transport(_)
            | DispatchError::RepliesEnded
            | DispatchError::Refused { .. }
            | DispatchError::Unrecoverable { .. }
            | DispatchError::ReplySchema { .. }
            | DispatchError::Codec(_)
            | DispatchError::Task { .. }
            | DispatchError::Interrupted { .. } => 1,
            DispatchError::Context(e) => e.exit_code(),
            DispatchError::AlreadyRunning { .. } => 3,
        }
    }
}
