//! Recording and publishing: chunks recorded then published, confirms applied, refused chunks
//! published again, a resumed run's open chunks taken over, stuck chunks published again, and
//! recovery after the connection was lost.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::FuturesUnordered;
use hopper_common::transport::Inbox;
use hopper_common::{codec, Chunk, Label, Route, TransportError};
use tracing::{debug, info, warn};

use super::outstanding::Outstanding;
use super::{Dispatch, MAX_REPUBLISH};
use crate::chunker::RawChunk;
use crate::context::{BadData, ChunkRecord, ChunkStatus, NewChunk, RecordBatch, Retried};
use crate::error::DispatchError;
use crate::progress::Snapshot;
use crate::source::reread;

impl Dispatch<'_> {
    /// On resume: chunks in flight count against the window until their replies come; chunks
    /// recorded but never confirmed are read again from their position and published again
    /// (a consumer may then see one twice, which processing absorbs: it is idempotent per chunk).
    pub(super) async fn take_over_open_chunks(&mut self) -> Result<(), DispatchError> {
        let open = self.store.open_chunks(self.run).await?;
        // Chunks confirmed into queues that died with the interrupted process are sent again.
        let queued_elsewhere = self.transport.outlives_process();
        for c in open {
            let message = match c.status {
                ChunkStatus::InFlight if queued_elsewhere => None,
                ChunkStatus::InFlight | ChunkStatus::Pending => Some(self.message_for(&c).await?),
                ChunkStatus::Done | ChunkStatus::Failed | ChunkStatus::Dead => continue,
            };
            let republish = message.is_some();
            self.outstanding
                .insert(c.seq, Outstanding::publishing(c, message));
            if republish {
                self.publish(c.seq).await?;
            }
        }
        if !self.outstanding.is_empty() {
            info!(job = %self.job.name, run = self.run, chunks = self.outstanding.len(),
                  "waiting for the chunks of the interrupted dispatcher");
        }
        Ok(())
    }

    /// A recorded chunk as a message again: its items read again from the source.
    async fn message_for(&self, c: &ChunkRecord) -> Result<(Arc<Vec<u8>>, Label), DispatchError> {
        let (spec, limits, record) = (self.job.source.clone(), self.job.chunking, *c);
        let items = tokio::task::spawn_blocking(move || reread(&spec, limits, &record))
            .await
            .map_err(|e| DispatchError::Task {
                what: "source re-reader",
                message: e.to_string(),
            })??;
        let chunk = Chunk {
            job: self.job.name.clone(),
            run: self.run,
            seq: c.seq,
            attempt: c.attempts.max(1),
            position: c.position,
            items,
        };
        Ok((Arc::new(codec::encode_chunk(&chunk)?), Label::chunk(&chunk)))
    }

    /// Chunks confirmed but without a final reply for longer than the job's `chunk_timeout` (a
    /// consumer froze or vanished while holding them) are read again and published again, as
    /// the same attempt: whichever copy finishes first is applied, the other is a duplicate.
    pub(super) async fn republish_stuck(&mut self) -> Result<(), DispatchError> {
        let timeout = self.job.retry.chunk_timeout;
        let stuck: Vec<(ChunkRecord, u64)> = self
            .outstanding
            .values()
            .filter(|o| o.confirmed() && o.since.elapsed() > timeout)
            .map(|o| (o.record, o.since.elapsed().as_secs()))
            .collect();
        for (c, secs) in stuck {
            warn!(job = %self.job.name, run = self.run, seq = c.seq, attempt = c.attempts, secs,
                  "chunk stuck: in flight past chunk_timeout; publishing it again");
            let message = self.message_for(&c).await?;
            if let Some(o) = self.outstanding.get_mut(&c.seq) {
                o.message = Some(message);
                o.since = Instant::now();
            }
            self.publish(c.seq).await?;
        }
        Ok(())
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        Snapshot {
            read: self.read,
            processed: self.processed,
            skipped: self.skipped,
            outstanding: self.outstanding.len(),
            offset: self.checkpoint.offset,
        }
    }

    pub(super) async fn record(
        &self,
        chunks: &[NewChunk],
        bad: &[BadData],
        retried: &[Retried],
    ) -> Result<(), DispatchError> {
        self.store
            .record(
                self.run,
                RecordBatch {
                    chunks,
                    checkpoint: &self.checkpoint,
                    bad_data: bad,
                    retry: self.is_retry,
                    retried,
                },
            )
            .await?;
        Ok(())
    }

    /// Records chunks (one transaction), then publishes them.
    pub(super) async fn dispatch(&mut self, raws: Vec<RawChunk>) -> Result<(), DispatchError> {
        let (job, run) = (&self.job.name, self.run);
        let mut bad = Vec::new();
        let mut retried = Vec::new();
        let mut new = Vec::with_capacity(raws.len());
        let mut chunks = Vec::with_capacity(raws.len());
        for raw in raws {
            for b in &raw.bad {
                warn!(job = %job, run, line = b.position.line, reason = %b.reason,
                      "skipping a record that cannot be read");
            }
            bad.extend(raw.bad);
            if let Some(of) = raw.retry {
                // The skipped items it takes over stop counting; what is still bad counts again.
                self.skipped = self.skipped.saturating_sub(of.skipped);
                retried.extend(of.retried);
            } else {
                self.checkpoint.offset = raw.end.offset;
                self.checkpoint.line = raw.end.lines;
            }
            if raw.items.is_empty() {
                continue;
            }
            let seq = self.checkpoint.next_seq;
            self.checkpoint.next_seq += 1;
            new.push(NewChunk {
                seq,
                position: raw.position,
                end_offset: raw.end.offset,
                items: raw.items.len() as u64,
                end_line: raw.end.lines,
            });
            chunks.push(Chunk {
                job: job.clone(),
                run,
                seq,
                attempt: 1,
                position: raw.position,
                items: raw.items,
            });
        }
        self.skipped += bad.len() as u64;
        self.record(&new, &bad, &retried).await?;

        for (chunk, record) in chunks.into_iter().zip(&new) {
            let (seq, items) = (chunk.seq, chunk.items.len() as u64);
            let payload = Arc::new(codec::encode_chunk(&chunk)?);
            let label = Label::chunk(&chunk);
            let recorded = ChunkRecord {
                seq,
                position: record.position,
                end_offset: record.end_offset,
                items,
                status: ChunkStatus::Pending,
                attempts: 1,
            };
            self.outstanding.insert(
                seq,
                Outstanding::publishing(recorded, Some((payload, label))),
            );
            self.publish(seq).await?;
            self.throttle.sent(items);
            if !self.is_retry {
                self.read += items;
            }
            debug!(job = %self.job.name, run, seq, items, "chunk published");
        }
        Ok(())
    }

    /// After the connection was lost: connect again, publish again every chunk the broker had
    /// not confirmed (the old confirms are void; confirmed chunks are safe in their durable
    /// queue), and receive replies again (unacked ones come again and are duplicates).
    pub(super) async fn recover(&mut self, prefetch: u16) -> Result<Inbox, DispatchError> {
        self.confirms = FuturesUnordered::new();
        self.transport.reconnect().await?;
        let replies = self.transport.receive(Route::Replies, prefetch).await?;
        let unconfirmed: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| !o.confirmed())
            .map(|(seq, _)| *seq)
            .collect();
        for seq in unconfirmed {
            self.publish(seq).await?;
        }
        Ok(replies)
    }

    /// Publishes an outstanding chunk from its kept bytes and keeps the confirm.
    async fn publish(&mut self, seq: u64) -> Result<(), DispatchError> {
        let Some((payload, label)) = self.outstanding.get(&seq).and_then(|o| o.message.clone())
        else {
            return Ok(());
        };
        let confirm = self
            .transport
            .publish(Route::Chunks, &payload, &label)
            .await?;
        self.confirms
            .push(Box::pin(async move { (seq, confirm.await) }));
        Ok(())
    }

    pub(super) async fn on_confirms(
        &mut self,
        confirms: Vec<(u64, Result<(), TransportError>)>,
    ) -> Result<(), DispatchError> {
        let mut confirmed = Vec::with_capacity(confirms.len());
        for (seq, confirmation) in confirms {
            let refused = match confirmation {
                Ok(()) => None,
                Err(e @ TransportError::Refused { .. }) => Some(e.to_string()),
                Err(e @ (TransportError::Connect(_) | TransportError::Broker { .. })) => {
                    return Err(e.into())
                }
            };
            let Some(o) = self.outstanding.get_mut(&seq) else {
                // Its final reply came before its confirm: nothing left to do.
                continue;
            };
            match refused {
                None => {
                    o.message = None;
                    confirmed.push(seq);
                }
                Some(why) => {
                    o.refusals += 1;
                    if o.refusals > MAX_REPUBLISH {
                        return Err(DispatchError::Refused {
                            run: self.run,
                            seq,
                            times: o.refusals,
                            last: why,
                        });
                    }
                    warn!(job = %self.job.name, run = self.run, seq, why = %why,
                          "chunk not accepted; declaring the queues again and publishing it again");
                    self.transport.repair().await?;
                    self.publish(seq).await?;
                }
            }
        }
        if !confirmed.is_empty() {
            self.store.mark_in_flight(self.run, &confirmed).await?;
        }
        Ok(())
    }
}
