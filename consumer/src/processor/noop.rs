//! `noop`: counts items and does nothing else; for benchmarks and trials.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use hopper_common::Chunk;

use super::{ProcessError, Processed, Processor};

/// Counts the items it is given.
#[derive(Debug, Default)]
pub struct NoopProcessor {
    items: AtomicU64,
}

impl NoopProcessor {
    /// Items seen so far.
    pub fn items(&self) -> u64 {
        self.items.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Processor for NoopProcessor {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        self.items
            .fetch_add(chunk.items.len() as u64, Ordering::Relaxed);
        Ok(Processed::all_done())
    }
}
