//! Applying replies: a batch decoded, applied in one transaction of the execution context, then
//! acked at once; the run's own counts and log lines follow what was recorded.

use std::time::Instant;

use hopper_common::{codec, CodecError, Incoming, Label, Outcome, Reply, Route};
use tracing::{debug, error, warn};

use super::Dispatch;
use crate::context::Applied;
use crate::error::DispatchError;

impl Dispatch<'_> {
    /// Applies replies in one transaction, then acks them all at once (they are the only
    /// messages of the replies inbox, taken in order, so acking through the last covers them).
    pub(super) async fn on_replies(
        &mut self,
        incoming: Vec<Incoming>,
    ) -> Result<(), DispatchError> {
        let mut replies = Vec::with_capacity(incoming.len());
        for message in &incoming {
            if message.label.dead_lettered.is_some() {
                match self.dead_lettered(message).await? {
                    Some(reply) => replies.push(reply),
                    None => {
                        self.park_unreadable(message, "dead-lettered, unlabelled")
                            .await?
                    }
                }
                continue;
            }
            match codec::decode_reply(&message.payload) {
                Ok(reply) => replies.push(reply),
                // A consumer of another release: its replies stay on the queue (nothing of this
                // batch is acked) for a dispatcher that reads them.
                Err(CodecError::SchemaVersion {
                    found, expected, ..
                }) => {
                    return Err(DispatchError::ReplySchema {
                        found,
                        expected,
                        message_id: message.label.message_id.clone(),
                    })
                }
                Err(e @ (CodecError::Decode { .. } | CodecError::Encode { .. })) => {
                    self.park_unreadable(message, &e.to_string()).await?
                }
            }
        }
        let applied = self.store.apply_replies(&self.fence, &replies).await?;
        for (reply, applied) in replies.iter().zip(applied) {
            if reply.run != self.run {
                debug!(job = %self.job.name, run = reply.run, seq = reply.seq, ?applied,
                       "reply of another run");
                continue;
            }
            match applied {
                Applied::Recorded => self.log_outcome(reply),
                Applied::Stale => debug!(job = %self.job.name, run = reply.run, seq = reply.seq,
                                         attempt = reply.attempt,
                                         "an older attempt's outcome; a newer attempt is under way"),
                Applied::Duplicate | Applied::Unknown => {}
            }
            // A stale outcome leaves the chunk waiting for its newer attempt.
            if reply.outcome.is_final() && applied != Applied::Stale {
                self.outstanding.remove(&reply.seq);
            }
        }
        if let Some(last) = incoming.last() {
            last.ack_through().await?;
        }
        Ok(())
    }

    /// A chunk the broker dead-lettered onto the replies queue: it passed the chunk queue's
    /// delivery limit, so every consumer that took it died or lost its connection before
    /// answering. It is parked on the dead queue (where a person can look at it) and becomes a
    /// `Dead` outcome for its chunk, so that its run can end; `retry` sends it again. `None`
    /// when its label does not say which chunk it is.
    async fn dead_lettered(&self, message: &Incoming) -> Result<Option<Reply>, DispatchError> {
        let label = &message.label;
        let (Some(run), Some(seq), Some(attempt)) = (label.run, label.seq, label.attempt) else {
            return Ok(None);
        };
        let deliveries = label
            .deliveries
            .map_or_else(|| "too many".to_string(), |n| n.to_string());
        let error = format!(
            "the broker dead-lettered it ({}) after {deliveries} deliveries: each consumer that \
             took it died or lost its connection before answering (a chunk that crashes its \
             consumer, or one processed past the broker's consumer_timeout)",
            label.dead_lettered.as_deref().unwrap_or("no reason given")
        );
        error!(job = %self.job.name, run, seq, attempt, %deliveries,
               "chunk dead-lettered by the broker; parking it on the dead queue");
        let parked = label.clone().parked(&error);
        self.transport
            .publish(Route::Dead, &message.payload, &parked)
            .await?
            .await?;
        Ok(Some(Reply {
            job: label.job.clone().unwrap_or_else(|| self.job.name.clone()),
            run,
            seq,
            attempt,
            consumer: "rabbitmq".to_string(),
            outcome: Outcome::Dead { error },
        }))
    }

    /// A message on the replies queue that is no reply at all: parked on the dead queue, where
    /// a person can look at it, rather than dropped.
    async fn park_unreadable(&self, message: &Incoming, why: &str) -> Result<(), DispatchError> {
        warn!(job = %self.job.name, message_id = ?message.label.message_id, error = %why,
              "parking an unreadable reply on the dead queue");
        let label: Label = message.label.clone().parked(why);
        self.transport
            .publish(Route::Dead, &message.payload, &label)
            .await?
            .await?;
        Ok(())
    }

    /// The items of chunk `seq`, which failed for good, count as failed.
    pub(super) fn count_failed(&self, seq: u64) {
        if let Some(o) = self.outstanding.get(&seq) {
            self.metrics.items_failed.inc_by(o.record.items);
        }
    }

    fn log_outcome(&mut self, reply: &Reply) {
        let (job, run, seq, attempt) = (&self.job.name, reply.run, reply.seq, reply.attempt);
        if reply.outcome.is_final() {
            if let Some(o) = self.outstanding.get(&seq) {
                self.metrics
                    .outcome_seconds
                    .observe(o.published.elapsed().as_secs_f64());
            }
        }
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
                self.metrics.items_processed.inc_by(*processed);
                self.metrics.items_skipped.inc_by(bad_items.len() as u64);
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
            Outcome::Processing { elapsed_ms } => {
                debug!(job = %job, run, seq, attempt, consumer = %reply.consumer, elapsed_ms,
                       "chunk in progress")
            }
            Outcome::Dead { error } => {
                self.count_failed(seq);
                error!(job = %job, run, seq, attempt, error = %error,
                       "chunk failed on its last attempt; parked on the dead queue")
            }
            Outcome::Failed { error } => {
                self.count_failed(seq);
                error!(job = %job, run, seq, attempt, error = %error, "chunk failed permanently")
            }
        }
    }
}
