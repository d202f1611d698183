//! Recording and publishing: chunks recorded then published, confirms applied, refused chunks
//! published again, open chunks taken over from the execution context (a resumed run, a
//! recovery after the connection was lost, the end of a run).
//!
//! A chunk is published again only when the broker does not hold it: a publish never confirmed,
//! or (local mode) a queue that died with an earlier process. Never on a timer: a chunk waiting
//! in a queue behind others is not lost, and a consumer that froze or vanished loses its
//! deliveries through the broker (heartbeats), which delivers them to another.

use std::sync::Arc;

use futures::stream::FuturesUnordered;
use hopper_common::transport::{Inbox, Recoveries};
use hopper_common::{codec, Chunk, ChunkHead, EncodedItems, Label, Route, TransportError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::outstanding::Outstanding;
use super::{Dispatch, MAX_REPUBLISH};
use crate::chunker::RawChunk;
use crate::context::{BadData, ChunkRecord, ChunkStatus, Keys, NewChunk, RecordBatch, Retried};
use crate::error::DispatchError;
use crate::progress::Snapshot;
use crate::source::reread;

impl Dispatch<'_> {
    /// Brings every open chunk row of the run (`pending` or `in_flight` in the execution
    /// context) into the outstanding set, and publishes again each one the broker does not hold:
    /// `pending` rows (recorded, never confirmed) and, when the queue did not outlive an earlier
    /// process (local mode), `in_flight` rows. Chunks already outstanding and unconfirmed are
    /// published again from their kept bytes; others are read again from their position. A
    /// consumer may then see a chunk twice, which processing absorbs (it is idempotent per
    /// chunk).
    ///
    /// The context's rows are the truth: a resumed run, a recovery after the connection was
    /// lost and the end of a run all go through here, so no recorded chunk is left unsent.
    pub(super) async fn take_over_open_chunks(&mut self) -> Result<(), DispatchError> {
        let open = self.store.open_chunks(self.run).await?;
        // Chunks confirmed into queues that died with an earlier process are sent again.
        let queued_elsewhere = self.transport.outlives_process();
        let mut taken = 0usize;
        for c in open {
            if let Some(o) = self.outstanding.get(&c.seq) {
                if !o.confirmed() {
                    self.publish(c.seq);
                }
                continue;
            }
            let message = match c.status {
                ChunkStatus::InFlight if queued_elsewhere => None,
                ChunkStatus::InFlight | ChunkStatus::Pending => Some(self.message_for(&c).await?),
                ChunkStatus::Done | ChunkStatus::Failed | ChunkStatus::Dead => continue,
            };
            let (seq, republish) = (c.seq, message.is_some());
            self.outstanding
                .insert(seq, Outstanding::publishing(c, message));
            taken += 1;
            if republish {
                self.publish(seq);
            }
        }
        if taken > 0 {
            info!(job = %self.job.name, run = self.run, chunks = taken,
                  "taking over recorded chunks that had no outcome yet");
        }
        Ok(())
    }

    /// A recorded chunk as a message again: its items read again from the source.
    async fn message_for(&self, c: &ChunkRecord) -> Result<(Arc<Vec<u8>>, Label), DispatchError> {
        let (spec, limits, record) = (self.job.source.clone(), self.job.chunking, c.clone());
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
            key: self.job.source.key().to_vec(),
            items,
        };
        Ok((Arc::new(codec::encode_chunk(&chunk)?), Label::chunk(&chunk)))
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        Snapshot {
            read: self.read,
            processed: self.processed,
            skipped: self.skipped,
            outstanding: self.outstanding.len(),
            offset: self.checkpoint.offset,
            paused: self.paused,
        }
    }

    /// Records chunks, the checkpoint and bad records in one transaction; `retry`: they were
    /// read again by `retry` (their items were counted as read the first time).
    pub(super) async fn record(
        &self,
        chunks: &[NewChunk],
        bad: &[BadData],
        retried: &[Retried],
        retry: bool,
    ) -> Result<(), DispatchError> {
        self.store
            .record(
                &self.fence,
                RecordBatch {
                    chunks,
                    checkpoint: &self.checkpoint,
                    bad_data: bad,
                    retry,
                    retried,
                },
            )
            .await?;
        Ok(())
    }

    /// Records chunks (one transaction per kind: read again by `retry`, or read on), then
    /// publishes them.
    pub(super) async fn dispatch(&mut self, mut raws: Vec<RawChunk>) -> Result<(), DispatchError> {
        while !raws.is_empty() {
            let retry = raws[0].retry.is_some();
            let same = raws
                .iter()
                .position(|r| r.retry.is_some() != retry)
                .unwrap_or(raws.len());
            let rest = raws.split_off(same);
            self.dispatch_kind(raws, retry).await?;
            raws = rest;
        }
        Ok(())
    }

    async fn dispatch_kind(
        &mut self,
        raws: Vec<RawChunk>,
        retry: bool,
    ) -> Result<(), DispatchError> {
        let (job, run) = (&self.job.name, self.run);
        let mut bad = Vec::new();
        let mut retried = Vec::new();
        let mut new = Vec::with_capacity(raws.len());
        let mut messages = Vec::with_capacity(raws.len());
        for raw in raws {
            let count = raw.item_count();
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
                if let Some(Keys::Range { last, .. }) = &raw.keys {
                    self.checkpoint.key = Some(last.clone());
                }
            }
            if count == 0 {
                continue;
            }
            let seq = self.checkpoint.next_seq;
            self.checkpoint.next_seq += 1;
            new.push(NewChunk {
                seq,
                position: raw.position,
                end_offset: raw.end.offset,
                items: count as u64,
                end_line: raw.end.lines,
                keys: raw.keys,
            });
            // Encoded before they are recorded, and all in the outstanding set before the first
            // is published: a publish that fails part-way leaves the rest outstanding and
            // unconfirmed, and recovery publishes them.
            let items = match raw.encoded {
                Some(items) => items,
                None => EncodedItems::encode(&raw.items)?,
            };
            let head = ChunkHead {
                job,
                run,
                seq,
                attempt: 1,
                position: raw.position,
                key: self.job.source.key(),
            };
            messages.push((
                Arc::new(codec::encode_chunk_head(head, &items)?),
                Label::chunk_head(&head),
            ));
        }
        self.skipped += bad.len() as u64;
        self.record(&new, &bad, &retried, retry).await?;
        self.metrics.items_skipped.inc_by(bad.len() as u64);
        if !retry {
            self.metrics.items_read.inc_by(bad.len() as u64);
        }
        for (record, message) in new.iter().zip(messages) {
            let recorded = ChunkRecord {
                seq: record.seq,
                position: record.position,
                end_offset: record.end_offset,
                items: record.items,
                status: ChunkStatus::Pending,
                attempts: 1,
                keys: record.keys.clone(),
            };
            self.outstanding
                .insert(record.seq, Outstanding::publishing(recorded, Some(message)));
            self.throttle.sent(record.items);
            if !retry {
                self.read += record.items;
                self.metrics.items_read.inc_by(record.items);
            }
        }
        for record in &new {
            self.publish(record.seq);
            debug!(job = %self.job.name, run, seq = record.seq, items = record.items, "chunk published");
        }
        Ok(())
    }

    /// After the connection was lost: connect again, receive replies again (unacked ones come
    /// again and are duplicates), and publish again every chunk the broker had not confirmed,
    /// from the execution context's rows (the old confirms are void; confirmed chunks are safe
    /// in their durable queue).
    pub(super) async fn recover(&mut self, prefetch: u16) -> Result<Inbox, DispatchError> {
        self.confirms = FuturesUnordered::new();
        self.transport.reconnect().await?;
        let replies = self.transport.receive(Route::Replies, prefetch).await?;
        self.take_over_open_chunks().await?;
        Ok(replies)
    }

    /// [`Dispatch::recover`], again and again with a growing pause while the connection keeps
    /// failing, up to [`Recoveries::MAX`] losses in a row; `None` when `shutdown` came first
    /// (the run stays resumable). A refusal that will recur is not retried.
    pub(super) async fn recover_bounded(
        &mut self,
        prefetch: u16,
        recoveries: &mut Recoveries,
        shutdown: &CancellationToken,
    ) -> Result<Option<Inbox>, DispatchError> {
        loop {
            let Some(pause) = recoveries.lost() else {
                return Err(DispatchError::Unrecoverable {
                    times: Recoveries::MAX,
                });
            };
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                attempt = async {
                    tokio::time::sleep(pause).await;
                    self.recover(prefetch).await
                } => attempt,
            };
            match attempt {
                Ok(inbox) => return Ok(Some(inbox)),
                Err(e) if e.is_connection_lost() => {
                    warn!(job = %self.job.name, run = self.run, error = %e,
                          "the connection failed again while recovering; trying again")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Publishes an outstanding chunk from its kept bytes; its confirm, or the failure to send
    /// it, comes out of `confirms`.
    ///
    /// The send itself is not awaited here: the client hands the frames to its I/O thread and
    /// resolves once they are written, and a loop that waited for each write in turn would read,
    /// encode and record nothing meanwhile (half the time of a dispatcher publishing 200 KiB
    /// chunks). The sends start when the loop next polls `confirms`, in the order they were
    /// pushed, [`SENDING`](super::SENDING) at a time.
    fn publish(&mut self, seq: u64) {
        let Some((payload, label)) = self.outstanding.get(&seq).and_then(|o| o.message.clone())
        else {
            return;
        };
        let (transport, sends) = (Arc::clone(&self.transport), Arc::clone(&self.sends));
        self.confirms.push(Box::pin(async move {
            let sent = {
                // The semaphore is never closed; without a permit the send would go ahead
                // unbounded rather than not at all.
                let _permit = sends.acquire().await.ok();
                transport.publish(Route::Chunks, &payload, &label).await
            };
            let confirmed = match sent {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            (seq, confirmed)
        }));
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
                Err(
                    e @ (TransportError::Connect(_)
                    | TransportError::Broker { .. }
                    | TransportError::Rejected { .. }),
                ) => return Err(e.into()),
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
                    self.publish(seq);
                }
            }
        }
        if !confirmed.is_empty() {
            self.store.mark_in_flight(&self.fence, &confirmed).await?;
        }
        Ok(())
    }
}
