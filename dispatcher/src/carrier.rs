//! What carries a run's chunks: RabbitMQ, or (local mode, `run --local N`) worker tasks in this
//! process over the in-process transport; and [`drive`], the one way every command opens it,
//! dispatches over it, closes it, and tells whom the job names that the run ended.
//!
//! In local mode the workers are the consumer library's own loop ([`hopper_consumer::run_on`])
//! with the job's own processor: the processor cannot tell the difference. The state store, the
//! throttle, failure classification, retries, `status`, `--resume` and `retry` are the same.
//! What differs: no broker is contacted, and the queues live in this process only, so a run
//! interrupted in local mode has its unfinished chunks read again from the source by `--resume`.

use std::sync::Arc;

use hopper_common::{AmqpTransport, Job, LocalBroker, Transport};
use hopper_consumer::{ConsumerError, ConsumerOptions, ConsumerSummary};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::context::ExecutionContext;
use crate::dispatch::{run_on, RunSummary, Start};
use crate::error::DispatchError;
use crate::notify::notify;
use crate::options::RunOptions;
use crate::status::StatusReport;

/// Opens what carries the run (the broker, or local workers), dispatches `start` over it to
/// the end, and closes it whatever the outcome.
///
/// # Errors
/// The carrier cannot be opened, or the run could not go on ([`DispatchError`]).
pub(crate) async fn drive(
    job: &Job,
    start: Start,
    context: &ExecutionContext,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let carrier = Carrier::open(job, &opts, &shutdown).await?;
    let result = run_on(
        job,
        start,
        carrier.transport.clone(),
        context,
        opts,
        shutdown,
    )
    .await;
    carrier.close(job).await;
    if let Ok(summary) = &result {
        match serde_json::to_string(&StatusReport::new(&summary.status)) {
            Ok(report) => notify(job, summary.run, &report).await,
            Err(e) => warn!(job = %job.name, run = summary.run, error = %e,
                            "cannot write the status object to notify"),
        }
    }
    result
}

/// The dispatcher's transport, and in local mode the workers behind it.
struct Carrier {
    /// What the dispatcher publishes to and receives from.
    transport: Arc<dyn Transport>,
    workers: Option<Workers>,
}

struct Workers {
    broker: LocalBroker,
    stop: CancellationToken,
    task: JoinHandle<Result<ConsumerSummary, ConsumerError>>,
}

impl Carrier {
    /// Connects to the job's broker, or, with `opts.local`, starts that many worker tasks over
    /// an in-process transport. Workers stop when `shutdown` is cancelled, after finishing the
    /// chunks in hand, or at [`Carrier::close`].
    ///
    /// # Errors
    /// The broker cannot be reached; the job's processor cannot be built (local mode).
    async fn open(
        job: &Job,
        opts: &RunOptions,
        shutdown: &CancellationToken,
    ) -> Result<Carrier, DispatchError> {
        let Some(local) = &opts.local else {
            let transport = AmqpTransport::open(job, "hopper-dispatcher").await?;
            return Ok(Carrier {
                transport: Arc::new(transport),
                workers: None,
            });
        };
        let processor = match &local.processor {
            Some(p) => Arc::clone(p),
            None => hopper_consumer::build(job).await?,
        };
        let workers = local.workers;
        let broker = LocalBroker::new(job);
        let stop = shutdown.child_token();
        let (job_for_workers, handle, token) = (job.clone(), broker.transport(), stop.clone());
        let consumer_opts = ConsumerOptions::default().with_concurrency(workers);
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
        Ok(Carrier {
            transport: Arc::new(broker.transport()),
            workers: Some(Workers { broker, stop, task }),
        })
    }

    /// Closes the transport; in local mode stops the workers (they finish what they hold) and
    /// waits for them.
    async fn close(self, job: &Job) {
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
