//! How a run is started: the options of [`crate::run`], [`crate::resume`] and [`crate::retry`].

use std::sync::Arc;
use std::time::Duration;

use hopper_consumer::Processor;

use crate::metrics::DispatcherMetrics;

/// How a run is started. Built from [`RunOptions::default`] with the `with_*` methods, so that
/// new options can be added without breaking callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOptions {
    pub(crate) interactive: bool,
    pub(crate) log_every: Duration,
    pub(crate) local: Option<Local>,
    pub(crate) metrics: Arc<DispatcherMetrics>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            interactive: false,
            log_every: Duration::from_secs(10),
            local: None,
            metrics: Arc::new(DispatcherMetrics::default()),
        }
    }
}

impl RunOptions {
    /// Draws a progress bar (for a terminal) rather than logging a progress line every
    /// [`RunOptions::with_log_every`].
    pub fn with_progress_bar(mut self, interactive: bool) -> RunOptions {
        self.interactive = interactive;
        self
    }

    /// How often progress lines are logged when there is no progress bar (10 s by default).
    pub fn with_log_every(mut self, every: Duration) -> RunOptions {
        self.log_every = every;
        self
    }

    /// Local mode: worker tasks in this process, over an in-process transport, instead of
    /// RabbitMQ. The queue does not outlive the process.
    pub fn with_local(mut self, local: Local) -> RunOptions {
        self.local = Some(local);
        self
    }

    /// The metrics the run updates: register them in a registry of one's own, or serve them
    /// with [`hopper_common::metrics::serve`] (what `run --metrics ADDR` does).
    pub fn with_metrics(mut self, metrics: Arc<DispatcherMetrics>) -> RunOptions {
        self.metrics = metrics;
        self
    }
}

/// Local mode's settings: how many worker tasks, and which processor they run.
#[derive(Clone)]
pub struct Local {
    /// Chunks processed at once; at least 1.
    pub(crate) workers: u16,
    /// `None` builds the one the job file names (`exec`, `file`, `noop`); a `custom` job needs
    /// one given here.
    pub(crate) processor: Option<Arc<dyn Processor>>,
}

impl Local {
    /// `workers` worker tasks running the job file's processor.
    pub fn new(workers: u16) -> Local {
        Local {
            workers: workers.max(1),
            processor: None,
        }
    }

    /// The workers run `processor` instead: a processor of one's own, written in Rust.
    pub fn with_processor(mut self, processor: Arc<dyn Processor>) -> Local {
        self.processor = Some(processor);
        self
    }
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("workers", &self.workers)
            .field("custom_processor", &self.processor.is_some())
            .finish()
    }
}
