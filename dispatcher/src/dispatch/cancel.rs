//! Cancelling a run (`cancel`): nothing new is published; the run's chunks still waiting on the
//! queues are taken back and recorded `dead` ("cancelled"), so that every record read stays
//! accounted for; the chunks in a consumer's hand finish and their replies are applied; then
//! the run ends `cancelled`.

use hopper_common::{Outcome, Reply};
use tracing::info;

use super::Dispatch;
use crate::context::{Applied, ChunkRecord, CANCELLED_BY};
use crate::error::DispatchError;

/// The reason recorded for a chunk taken back by `cancel`.
const CANCELLED: &str = "cancelled: taken back from the queue before a consumer took it";

impl Dispatch<'_> {
    /// Starts cancelling: takes back the chunks still waiting, and records them.
    pub(super) async fn cancel(&mut self) -> Result<(), DispatchError> {
        self.cancelling = true;
        let taken = self.transport.withdraw(self.run).await?;
        let records: Vec<ChunkRecord> = taken
            .iter()
            .filter_map(|seq| self.outstanding.get(seq).map(|o| o.record.clone()))
            .collect();
        self.record_cancelled(&records).await?;
        info!(job = %self.job.name, run = self.run, taken_back = records.len(),
              in_hand = self.outstanding.len(),
              "cancelling: nothing new is published; the chunks in hand finish");
        Ok(())
    }

    /// Once nothing is outstanding: the chunks the execution context still holds without an
    /// outcome (recorded, never published) are cancelled too.
    pub(super) async fn cancel_the_rest(&mut self) -> Result<(), DispatchError> {
        let open = self.store.open_chunks(self.run).await?;
        self.record_cancelled(&open).await
    }

    async fn record_cancelled(&mut self, chunks: &[ChunkRecord]) -> Result<(), DispatchError> {
        let replies: Vec<Reply> = chunks
            .iter()
            .map(|c| Reply {
                job: self.job.name.clone(),
                run: self.run,
                seq: c.seq,
                attempt: c.attempts.max(1),
                consumer: CANCELLED_BY.to_string(),
                outcome: Outcome::Dead {
                    error: CANCELLED.to_string(),
                },
            })
            .collect();
        let applied = self.store.apply_replies(&self.fence, &replies).await?;
        for ((reply, applied), chunk) in replies.iter().zip(applied).zip(chunks) {
            if applied == Applied::Recorded {
                self.metrics.items_failed.inc_by(chunk.items);
            }
            if applied != Applied::Stale {
                self.outstanding.remove(&reply.seq);
            }
        }
        Ok(())
    }
}
