//! The dispatcher's Prometheus metrics (`run --metrics ADDR`, or `[metrics] dispatcher`).
//!
//! Two kinds, each where it is exact:
//! - **Events of this process**, counted as they happen: items read, processed, skipped and
//!   failed (as the replies this dispatcher applied say), broker reconnections, and the time
//!   from a chunk's first publish to its final outcome. Counters start at 0 with the process,
//!   as Prometheus expects; for a new run they equal `status`'s counts once its replies are in.
//! - **The run as the execution context holds it**, read at each scrape: chunks by state,
//!   the run's state and id. These are `status`'s own numbers, whichever process wrote them.
//!
//! Window and outstanding chunks are the loop's own, set each tick.

use std::sync::{Arc, Mutex};

use futures::FutureExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::context::{ContextStore, RunId, RunState, StuckAfter};

/// The `state` label of chunk and run gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    state: &'static str,
}

/// The run states a gauge is kept for, each 1 when the run is in it.
const RUN_STATES: [RunState; 7] = [
    RunState::Running,
    RunState::Paused,
    RunState::Cancelling,
    RunState::Cancelled,
    RunState::Completed,
    RunState::CompletedWithFailures,
    RunState::Failed,
];

/// The chunk states, as `status` counts them.
const CHUNK_STATES: [&str; 6] = ["pending", "in_flight", "done", "failed", "dead", "retried"];

/// The run the scrape reads from the execution context.
struct Watched {
    store: Arc<dyn ContextStore>,
    run: RunId,
    stuck: StuckAfter,
}

/// The dispatcher's metrics. Cheap to update (atomics); registered only when served.
pub struct DispatcherMetrics {
    pub(crate) items_read: Counter,
    pub(crate) items_processed: Counter,
    pub(crate) items_skipped: Counter,
    pub(crate) items_failed: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) window: Gauge,
    pub(crate) outstanding: Gauge,
    pub(crate) outcome_seconds: Histogram,
    chunks: Family<StateLabel, Gauge>,
    run_state: Family<StateLabel, Gauge>,
    run: Gauge,
    watched: Mutex<Option<Watched>>,
}

impl std::fmt::Debug for DispatcherMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherMetrics").finish_non_exhaustive()
    }
}

impl Default for DispatcherMetrics {
    fn default() -> Self {
        DispatcherMetrics {
            items_read: Counter::default(),
            items_processed: Counter::default(),
            items_skipped: Counter::default(),
            items_failed: Counter::default(),
            reconnects: Counter::default(),
            window: Gauge::default(),
            outstanding: Gauge::default(),
            // 10 ms to about 6 h.
            outcome_seconds: Histogram::new(exponential_buckets(0.01, 3.0, 16)),
            chunks: Family::default(),
            run_state: Family::default(),
            run: Gauge::default(),
            watched: Mutex::new(None),
        }
    }
}

impl DispatcherMetrics {
    /// Registers every metric in `registry` (see [`hopper_common::metrics::registry`]).
    pub fn register(&self, registry: &mut Registry) {
        let items = [
            (
                "items_read",
                "Records read from the source, bad ones included",
                &self.items_read,
            ),
            (
                "items_processed",
                "Items processed successfully",
                &self.items_processed,
            ),
            (
                "items_skipped",
                "Items skipped as bad data or bad items",
                &self.items_skipped,
            ),
            (
                "items_failed",
                "Items in chunks that failed or went dead",
                &self.items_failed,
            ),
            (
                "reconnects",
                "Times the dispatcher reconnected to the broker",
                &self.reconnects,
            ),
        ];
        for (name, help, counter) in items {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "window",
            "Chunks the throttle lets be outstanding",
            self.window.clone(),
        );
        registry.register(
            "chunks_outstanding",
            "Chunks published and not yet finally answered",
            self.outstanding.clone(),
        );
        registry.register_with_unit(
            "chunk_outcome",
            "Time from a chunk's first publish to its final outcome",
            Unit::Seconds,
            self.outcome_seconds.clone(),
        );
        registry.register(
            "chunks",
            "The run's chunks by state, as the execution context holds them",
            self.chunks.clone(),
        );
        registry.register(
            "run_state",
            "1 for the run's state, 0 for the others",
            self.run_state.clone(),
        );
        registry.register("run", "The run being dispatched", self.run.clone());
    }

    /// From now on a scrape reads `run`'s chunks and state from `store`.
    pub(crate) fn watch(&self, store: Arc<dyn ContextStore>, run: RunId, stuck: StuckAfter) {
        self.run.set(run as i64);
        if let Ok(mut w) = self.watched.lock() {
            *w = Some(Watched { store, run, stuck });
        }
    }

    /// Reads the watched run's chunks and state from the execution context (a scrape's
    /// refresh). A store that cannot be read leaves the last values.
    pub async fn refresh(&self) {
        let watched = match self.watched.lock() {
            Ok(w) => w.as_ref().map(|w| (Arc::clone(&w.store), w.run, w.stuck)),
            Err(_) => None,
        };
        let Some((store, run, stuck)) = watched else {
            return;
        };
        let Ok(s) = store.status(run, stuck).await else {
            return;
        };
        let c = s.chunks;
        for (state, n) in CHUNK_STATES.into_iter().zip([
            c.pending,
            c.in_flight,
            c.done,
            c.failed,
            c.dead,
            c.retried,
        ]) {
            self.chunks
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        for state in RUN_STATES {
            let on = i64::from(state == s.run.state);
            self.run_state
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(on);
        }
    }

    /// The refresh hook for [`hopper_common::metrics::serve`].
    pub fn refresher(self: &Arc<Self>) -> hopper_common::metrics::Refresh {
        let me = Arc::clone(self);
        Arc::new(move || {
            let me = Arc::clone(&me);
            async move { me.refresh().await }.boxed()
        })
    }
}
