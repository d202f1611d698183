//! The consumer's Prometheus metrics (`hopper-consumer --metrics ADDR`, or `[metrics]
//! consumer`): chunks by outcome, processing time, chunks in progress, reconnections. Counted
//! by this process as it goes; each consumer serves its own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The `outcome` label: `done`, `retrying`, `dead`, `failed`, or `unreadable` (a message
/// parked without being processed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) outcome: &'static str,
}

/// The consumer's metrics. Cheap to update (atomics); registered only when served.
pub struct ConsumerMetrics {
    pub(crate) chunks: Family<OutcomeLabel, Counter>,
    pub(crate) processing_seconds: Histogram,
    pub(crate) in_progress: Gauge,
    pub(crate) reconnects: Counter,
}

impl std::fmt::Debug for ConsumerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerMetrics").finish_non_exhaustive()
    }
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        ConsumerMetrics {
            chunks: Family::default(),
            // 1 ms to about 4 h.
            processing_seconds: Histogram::new(exponential_buckets(0.001, 3.0, 16)),
            in_progress: Gauge::default(),
            reconnects: Counter::default(),
        }
    }
}

impl ConsumerMetrics {
    /// Registers every metric in `registry` (see [`hopper_common::metrics::registry`]).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "consumer_chunks",
            "Chunks this consumer finished (replied and acked), by outcome",
            self.chunks.clone(),
        );
        registry.register_with_unit(
            "consumer_chunk_processing",
            "Time the processor took over a chunk (an attempt)",
            Unit::Seconds,
            self.processing_seconds.clone(),
        );
        registry.register(
            "consumer_chunks_in_progress",
            "Chunks being processed now",
            self.in_progress.clone(),
        );
        registry.register(
            "consumer_reconnects",
            "Times this consumer reconnected to the broker",
            self.reconnects.clone(),
        );
    }

    /// One more chunk finished with `outcome`.
    pub(crate) fn finished(&self, outcome: &'static str) {
        self.chunks.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}
