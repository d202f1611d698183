//! The in-process transport of local mode: the job's routes as queues in memory, shared by the
//! dispatcher and the worker tasks of one process.
//!
//! It keeps the [`Transport`] contract within the process: a publish is confirmed once the
//! message is queued; a received message stays its receiver's until acked or given back, and
//! comes again when its receiver goes away unsettled; at most `prefetch` unacked messages per
//! receiver. A chunk sent to `Delay { next }` comes back on `Chunks` after the job's backoff
//! delay. What it does not keep: **nothing outlives the process.** A run interrupted in local
//! mode has its queued chunks read again from the source by `--resume`
//! ([`Transport::outlives_process`] is false).
//!
//! [`LocalBroker`] holds the queues; each side takes its own [`LocalTransport`] handle from it,
//! so that one side stopping (`stop_receiving`, `close`) leaves the other's inboxes alone.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::Notify;

use super::{Confirm, Inbox, Incoming, Label, Route, Settle, Transport, TransportError};
use crate::job::Job;

/// A message on a queue.
#[derive(Debug, Clone)]
struct Message {
    payload: Vec<u8>,
    label: Label,
    redelivered: bool,
}

/// The queues that exist in memory: `Delay` routes are timers, and the dead queue only counts
/// (what is parked there is recorded in the execution context; its bytes would only fill
/// memory, and nothing in the process reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Queue {
    Chunks,
    Replies,
}

#[derive(Debug)]
struct Receiver {
    queue: Queue,
    prefetch: usize,
    /// Delivered, not yet settled, by delivery tag.
    unacked: BTreeMap<u64, Message>,
    /// Hands out nothing more (stop_receiving, close).
    stopped: bool,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<Queue, VecDeque<Message>>,
    /// Messages parked on the dead queue.
    dead: usize,
    receivers: HashMap<u64, Receiver>,
    next_receiver: u64,
    next_tag: u64,
}

impl State {
    fn queue(&mut self, q: Queue) -> &mut VecDeque<Message> {
        self.queues.entry(q).or_default()
    }

    /// Puts a receiver's unsettled messages back at the head of their queue, in order.
    fn requeue_unacked(&mut self, receiver: u64) {
        let Some(r) = self.receivers.get_mut(&receiver) else {
            return;
        };
        let queue = r.queue;
        let back: Vec<Message> = std::mem::take(&mut r.unacked).into_values().collect();
        let q = self.queue(queue);
        for mut m in back.into_iter().rev() {
            m.redelivered = true;
            q.push_front(m);
        }
    }
}

#[derive(Debug)]
struct Shared {
    job: Job,
    state: Mutex<State>,
    /// Woken on every change a waiting receiver may care about.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still consistent per call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, queue: Queue, message: Message) {
        self.lock().queue(queue).push_back(message);
        self.changed.notify_waiters();
    }
}

/// The queues of one job in one process. Cheap to clone; every clone is the same broker.
#[derive(Debug, Clone)]
pub struct LocalBroker {
    shared: Arc<Shared>,
}

impl LocalBroker {
    /// Empty queues for `job` (its retry backoff sets the delays of `Delay` routes).
    pub fn new(job: &Job) -> LocalBroker {
        LocalBroker {
            shared: Arc::new(Shared {
                job: job.clone(),
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// A handle for one side (the dispatcher, or the workers).
    pub fn transport(&self) -> LocalTransport {
        LocalTransport {
            shared: Arc::clone(&self.shared),
            mine: Mutex::new(Vec::new()),
        }
    }

    /// How many messages were parked on the dead queue (chunks and unreadable messages).
    pub fn dead(&self) -> usize {
        self.shared.lock().dead
    }
}

/// One side's handle on a [`LocalBroker`].
#[derive(Debug)]
pub struct LocalTransport {
    shared: Arc<Shared>,
    /// This handle's receivers, to stop and close them.
    mine: Mutex<Vec<u64>>,
}

struct Settler {
    shared: Arc<Shared>,
    receiver: u64,
    tag: u64,
}

#[async_trait]
impl Settle for Settler {
    async fn ack(&self, through: bool) -> Result<(), TransportError> {
        let mut state = self.shared.lock();
        if let Some(r) = state.receivers.get_mut(&self.receiver) {
            if through {
                let later = r.unacked.split_off(&(self.tag + 1));
                r.unacked = later;
            } else {
                r.unacked.remove(&self.tag);
            }
        }
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn give_back(&self) -> Result<(), TransportError> {
        let mut state = self.shared.lock();
        let back = state
            .receivers
            .get_mut(&self.receiver)
            .and_then(|r| Some((r.queue, r.unacked.remove(&self.tag)?)));
        if let Some((queue, mut m)) = back {
            m.redelivered = true;
            state.queue(queue).push_front(m);
        }
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }
}

/// A receiver's end: when the inbox is dropped, its unsettled messages go back to the queue.
struct InboxGuard {
    shared: Arc<Shared>,
    receiver: u64,
}

impl InboxGuard {
    /// The next message for this receiver, waiting for one and for room under its prefetch;
    /// `None` once it is stopped.
    async fn next(&self) -> Option<Incoming> {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so that a change between the look and the wait wakes it.
            notified.as_mut().enable();
            {
                let mut state = self.shared.lock();
                let State {
                    queues,
                    receivers,
                    next_tag,
                    ..
                } = &mut *state;
                let r = receivers.get_mut(&self.receiver)?;
                if r.stopped {
                    return None;
                }
                if r.unacked.len() < r.prefetch {
                    if let Some(m) = queues.entry(r.queue).or_default().pop_front() {
                        *next_tag += 1;
                        let tag = *next_tag;
                        r.unacked.insert(tag, m.clone());
                        let settle = Settler {
                            shared: Arc::clone(&self.shared),
                            receiver: self.receiver,
                            tag,
                        };
                        return Some(Incoming::new(
                            m.payload,
                            m.label,
                            m.redelivered,
                            Box::new(settle),
                        ));
                    }
                }
            }
            notified.await;
        }
    }
}

impl Drop for InboxGuard {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.requeue_unacked(self.receiver);
        state.receivers.remove(&self.receiver);
        drop(state);
        self.shared.changed.notify_waiters();
    }
}

#[async_trait]
impl Transport for LocalTransport {
    async fn publish(
        &self,
        route: Route,
        payload: &[u8],
        label: &Label,
    ) -> Result<Confirm, TransportError> {
        let message = Message {
            payload: payload.to_vec(),
            label: label.clone(),
            redelivered: false,
        };
        match route {
            Route::Chunks => self.shared.push(Queue::Chunks, message),
            Route::Replies => self.shared.push(Queue::Replies, message),
            Route::Dead => self.shared.lock().dead += 1,
            Route::Delay { next } => {
                // The chunk waits out its backoff on a timer, then comes back as attempt `next`.
                let delay = self.shared.job.retry.delay_before(next);
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    shared.push(Queue::Chunks, message);
                });
            }
        }
        Ok(futures::future::ready(Ok(())).boxed())
    }

    async fn receive(&self, route: Route, prefetch: u16) -> Result<Inbox, TransportError> {
        let queue = match route {
            Route::Chunks => Queue::Chunks,
            Route::Replies => Queue::Replies,
            Route::Dead => return Err(TransportError::Refused {
                queue: "dead (in-process)".into(),
                why:
                    "the in-process dead queue keeps no messages: the execution context lists them"
                        .into(),
            }),
            Route::Delay { next } => {
                return Err(TransportError::Refused {
                    queue: format!("delay before attempt {next}"),
                    why: "delay queues are not received from".into(),
                })
            }
        };
        let id = {
            let mut state = self.shared.lock();
            state.next_receiver += 1;
            let id = state.next_receiver;
            state.receivers.insert(
                id,
                Receiver {
                    queue,
                    prefetch: usize::from(prefetch.max(1)),
                    unacked: BTreeMap::new(),
                    stopped: false,
                },
            );
            id
        };
        self.mine.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        let guard = InboxGuard {
            shared: Arc::clone(&self.shared),
            receiver: id,
        };
        Ok(Box::pin(futures::stream::unfold(
            guard,
            |guard| async move {
                let message = guard.next().await?;
                Some((Ok(message), guard))
            },
        )))
    }

    async fn stop_receiving(&self) {
        let mine = self.mine.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut state = self.shared.lock();
        for id in mine {
            if let Some(r) = state.receivers.get_mut(&id) {
                r.stopped = true;
            }
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }

    async fn repair(&self) -> Result<(), TransportError> {
        Ok(())
    }

    async fn reconnect(&self) -> Result<(), TransportError> {
        Ok(())
    }

    async fn withdraw(&self, run: u64) -> Result<Vec<u64>, TransportError> {
        // Chunks waiting out a retry delay sit on timers here, not on a queue: they come back
        // when their delay ends, and are processed.
        let mut state = self.shared.lock();
        let queue = state.queue(Queue::Chunks);
        let mut taken = Vec::new();
        queue.retain(|m| match (m.label.run, m.label.seq) {
            (Some(r), Some(seq)) if r == run => {
                taken.push(seq);
                false
            }
            _ => true,
        });
        Ok(taken)
    }

    async fn close(&self, _why: &str) {
        self.stop_receiving().await;
        let mine = std::mem::take(&mut *self.mine.lock().unwrap_or_else(|p| p.into_inner()));
        let mut state = self.shared.lock();
        for id in mine {
            state.requeue_unacked(id);
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }

    fn outlives_process(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
