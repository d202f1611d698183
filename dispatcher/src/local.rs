//! Where a run's chunks go: RabbitMQ, or (local mode, `run --local N`) worker tasks in this
//! process over the in-process transport.
//!
//! In local mode the workers are the consumer library's own loop ([`hopper_consumer::run_on`])
//! with the job's own processor: the processor cannot tell the difference. The state store, the
//! throttle, failure classification, retries, `status`, `--resume` and `retry` are the same.
//! What differs: no broker is contacted, and the queues live in this process only, so a run
//! interrupted in local mode has its unfinished chunks read again from the source by `--resume`.

use std::sync::Arc;

use hopper_common::{AmqpTransport, Job, LocalBroker, Transport};
use hopper_consumer::{ConsumerError, ConsumerOptions, ConsumerSummary, Processor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::run::{DispatchError, RunOptions};

/// Local mode's settings: how many worker tasks, and which processor they run.
#[derive(Clone)]
pub struct Local {
    /// Worker tasks (chunks processed at once).
    pub workers: u16,
    /// The processor; `None` builds the one the job file names (`exec`, `file`, `noop`). A
    /// `custom` job needs one given here.
    pub processor: Option<Arc<dyn Processor>>,
}

impl Local {
    /// `workers` worker tasks running the job file's processor.
    pub fn new(workers: u16) -> Local {
        Local {
            workers,
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

/// The dispatcher's transport, and in local mode the workers behind it.
pub(crate) struct Via {
    /// What the dispatcher publishes to and receives from.
    pub(crate) transport: Arc<dyn Transport>,
    workers: Option<Workers>,
}

struct Workers {
    broker: LocalBroker,
    stop: CancellationToken,
    task: JoinHandle<Result<ConsumerSummary, ConsumerError>>,
}

impl Via {
    /// Connects to the job's broker, or, with `opts.local`, starts that many worker tasks over
    /// an in-process transport. Workers stop when `shutdown` is cancelled, after finishing the
    /// chunks in hand, or at [`Via::close`].
    ///
    /// # Errors
    /// The broker cannot be reached; the job's processor cannot be built (local mode).
    pub(crate) async fn open(
        job: &Job,
        opts: &RunOptions,
        shutdown: &CancellationToken,
    ) -> Result<Via, DispatchError> {
        let Some(local) = &opts.local else {
            let transport = AmqpTransport::open(job, "hopper-dispatcher").await?;
            return Ok(Via {
                transport: Arc::new(transport),
                workers: None,
            });
        };
        let processor = match &local.processor {
            Some(p) => Arc::clone(p),
            None => hopper_consumer::build(job)?,
        };
        let workers = local.workers.max(1);
        let broker = LocalBroker::new(job);
        let stop = shutdown.child_token();
        let (job_for_workers, handle, token) = (job.clone(), broker.transport(), stop.clone());
        let consumer_opts = ConsumerOptions {
            concurrency: workers,
        };
        let task = tokio::spawn(async move {
            hopper_consumer::run_on(
                &job_for_workers,
                processor,
                Arc::new(handle),
                consumer_opts,
                token,
            )
            .await
        });
        info!(job = %job.name, workers, "local mode: workers in this process, no broker");
        Ok(Via {
            transport: Arc::new(broker.transport()),
            workers: Some(Workers { broker, stop, task }),
        })
    }

    /// Closes the transport; in local mode stops the workers (they finish what they hold) and
    /// waits for them.
    pub(crate) async fn close(self, job: &Job) {
        self.transport.close("run over").await;
        let Some(w) = self.workers else {
            return;
        };
        w.stop.cancel();
        match w.task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(job = %job.name, error = %e, "local workers stopped on an error"),
            Err(e) => warn!(job = %job.name, error = %e, "local workers failed"),
        }
        let dead = w.broker.dead();
        if dead > 0 {
            warn!(job = %job.name, dead,
                  "messages parked on the in-process dead queue are gone with the process; \
                   `status` lists their chunks and `retry` dispatches them again");
        }
    }
}
