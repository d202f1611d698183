//! Processors: what a consumer does with a chunk.
//!
//! A [`Processor`] takes a whole [`Chunk`] and either finishes it (some items possibly refused
//! as bad, with reasons) or fails it with a [`ProcessError`] that says what happens next:
//! retry the chunk later, or park it for good. Processing must be idempotent per chunk
//! (`job`, `run`, `seq`): a chunk can be delivered twice (a consumer died after committing and
//! before acking), and the second delivery must not apply its items twice.
//!
//! Built-in kinds: [`ExecProcessor`] (`exec`), [`FileProcessor`] (`file`), [`NoopProcessor`]
//! (`noop`), [`PostgresProcessor`] (`postgres`). A custom processor is any type implementing [`Processor`], run with
//! [`crate::run`]; see `consumer/examples/custom_processor.rs`.

mod exec;
mod file;
mod noop;
mod postgres;

use std::sync::Arc;

use async_trait::async_trait;
use hopper_common::{BadItem, Chunk, Item, Job};

use hopper_common::ProcessorSpec;

pub use exec::ExecProcessor;
pub use file::FileProcessor;
pub use noop::NoopProcessor;
pub use postgres::PostgresProcessor;

/// What a processor made of a chunk it finished: every item not listed in `bad_items` is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processed {
    /// Items refused, with reasons. They are skipped and reported; the rest of the run goes on.
    pub bad_items: Vec<BadItem>,
}

impl Processed {
    /// Every item done.
    pub fn all_done() -> Processed {
        Processed::default()
    }

    /// Marks `item` as bad: skipped, and reported with its line and `reason`. An item marked
    /// twice counts once, with its first reason; a reason is cut at 4 KiB when the outcome is
    /// reported.
    pub fn bad_item(&mut self, item: &Item, reason: impl Into<String>) {
        self.bad_items.push(BadItem {
            line: item.line,
            reason: reason.into(),
            key: None,
        });
    }

    /// The bad items that belong to `chunk`, each once, their reasons cut, with their keys
    /// for a chunk of a keyed source (the one place all three are done, since a processor may
    /// fill `bad_items` by hand): every item of the chunk is then either processed or bad,
    /// never both, never twice.
    pub(crate) fn settle(mut self, chunk: &hopper_common::Chunk) -> Vec<BadItem> {
        if self.bad_items.is_empty() {
            return self.bad_items;
        }
        let mut open: std::collections::HashSet<u64> = chunk.items.iter().map(|i| i.line).collect();
        self.bad_items.retain(|b| open.remove(&b.line));
        for b in &mut self.bad_items {
            b.reason = cut(&b.reason);
            if !chunk.key.is_empty() {
                b.key = chunk
                    .items
                    .binary_search_by_key(&b.line, |i| i.line)
                    .ok()
                    .and_then(|at| key_of(&chunk.items[at], &chunk.key));
            }
        }
        self.bad_items
    }
}

/// The key of `item`: the JSON of its `fields` (one value, or an array of them).
fn key_of(item: &Item, fields: &[String]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(&item.data).ok()?;
    let parts: Vec<&serde_json::Value> =
        fields.iter().map(|f| value.get(f)).collect::<Option<_>>()?;
    match parts.as_slice() {
        [one] => Some(one.to_string()),
        many => serde_json::to_string(many).ok(),
    }
}

/// The longest reason or log line kept whole: longer ones are cut, and say so, so that one
/// careless processor cannot fill the execution context or the logs.
const MAX_TEXT: usize = 4096;

/// `text`, cut to at most [`MAX_TEXT`] bytes (on a character boundary) with a mark saying how
/// long it was. Cutting again changes nothing.
pub(crate) fn cut(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mark = format!("… (cut: {} bytes in all)", text.len());
    let mut end = MAX_TEXT - mark.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{mark}", &text[..end])
}

/// A chunk that could not be finished. The variant is the decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// Might work later (a timeout, a deadlock, a service down): the chunk is retried after the
    /// job's backoff, up to `max_attempts`, then parked on the dead queue.
    #[error("transient: {0}")]
    Transient(String),
    /// Cannot work however often it is tried: the chunk is parked on the dead queue now.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// Processes chunks. Implement it to run your own code on every chunk of a job.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// Processes one chunk and commits its effect, idempotently per (`run`, `seq`).
    ///
    /// # Errors
    /// A [`ProcessError`] saying whether to retry the chunk.
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError>;
}

/// A job file's processor cannot be built on this host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `kind = "custom"` needs Rust code: run it through the library.
    #[error("job file {file}: processor kind \"custom\" runs only through the hopper-consumer library (see consumer/examples/custom_processor.rs)")]
    Custom {
        /// The job file that asks for it.
        file: String,
    },
    /// The `postgres` processor cannot do its work: a bad URL, statement or parameter list
    /// (bad job file), or the database cannot be reached.
    #[error("job file {file}: field `{field}`: {message}")]
    Database {
        /// The job file.
        file: String,
        /// The field at fault: `processor.url`, `processor.statement` or `processor.params`.
        field: &'static str,
        /// True when the database could not be reached (not the job file's fault).
        unreachable: bool,
        /// What the database or the URL parser said (never the password).
        message: String,
    },
    /// The `exec` command's program cannot be found.
    #[error("job file {file}: field `processor.command`: {message}")]
    Command {
        /// The job file that names it.
        file: String,
        /// Why the program cannot be run.
        message: String,
    },
}

impl BuildError {
    /// The exit code of the contract: 1 when the database cannot be reached, 2 for what the
    /// job file asks that cannot be done.
    pub fn exit_code(&self) -> u8 {
        match self {
            BuildError::Database {
                unreachable: true, ..
            } => 1,
            BuildError::Database { .. }
            | BuildError::Custom { .. }
            | BuildError::Command { .. } => 2,
        }
    }
}

/// Builds the processor a job file names, for the `hopper-consumer` binary. A `postgres`
/// processor connects and prepares its statement here, so that a consumer that cannot do its
/// work says so at start.
///
/// # Errors
/// [`BuildError`] for a custom processor, a command that cannot be found, a database that
/// cannot be reached or a statement it cannot prepare.
pub async fn build(job: &Job) -> Result<Arc<dyn Processor>, BuildError> {
    let file = job.file.display().to_string();
    match &job.processor {
        ProcessorSpec::Exec { command, env } => {
            let p = ExecProcessor::new(command.clone(), job.dir.clone())
                .map_err(|message| BuildError::Command { file, message })?
                .with_env(env.clone());
            Ok(Arc::new(p))
        }
        ProcessorSpec::File { dir } => Ok(Arc::new(FileProcessor::new(dir.clone()))),
        ProcessorSpec::Noop => Ok(Arc::new(NoopProcessor::default())),
        ProcessorSpec::Postgres {
            url,
            statement,
            params,
        } => Ok(Arc::new(
            PostgresProcessor::connect(url, statement, params.clone(), &file).await?,
        )),
        ProcessorSpec::Custom { .. } => Err(BuildError::Custom { file }),
    }
}
