//! Chunks delivered again: which of those in hand starts first.
//!
//! A chunk delivered again may be the one that killed a consumer, so it is processed alone
//! (see `handle`). A consumer may still hold several at once (a fresh consumer is sent a whole
//! prefetch of chunks that a dead one gave back), and the one it starts decides which others
//! die with it: a chunk that kills its consumer takes every chunk in hand along, and the
//! broker counts each of those deaths towards each chunk's delivery limit. An innocent chunk
//! that is always handed out with a killer, and always after it, would be dead-lettered with it.
//! So, among the chunks delivered again that a consumer holds:
//! - **The one delivered fewest times starts first.** A killer dies at every delivery, an
//!   innocent chunk only when it shares a killer's hand.
//! - **Between chunks delivered as often, the order flips with the count**: on an even count
//!   the earliest arrival starts first, on an odd count the latest. Two chunks that keep dying
//!   together arrive in the same order each time, with the same count; with the flip, each of
//!   them starts first within two deliveries, and the innocent one is acked before the killer
//!   runs.
//! - **What the broker sends at once is gathered first** ([`GATHER`]): the order only helps if
//!   every chunk of the hand is seen before one starts.
//!
//! Invariant: a ticket is in the line from the chunk's arrival until its task ends (acked,
//! given back or parked), so a chunk waiting its turn always sees every other one in hand.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long a chunk delivered again waits for the rest of its hand before the line is read.
/// The broker sends a fresh consumer's prefetch back to back; this only has to cover the
/// frames in flight, and a chunk delivered again is rare enough for the pause not to count.
pub(super) const GATHER: Duration = Duration::from_millis(100);

/// The chunks delivered again that this consumer holds.
#[derive(Default)]
pub(super) struct Line {
    places: Mutex<Vec<Place>>,
    changed: tokio::sync::Notify,
}

/// One chunk's place in the [`Line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    /// Order of arrival at this consumer.
    arrival: u64,
    /// How often the broker delivered it (this delivery included).
    deliveries: u64,
}

impl Place {
    /// Lowest starts first (see the module docs).
    fn rank(self) -> (u64, i128) {
        let arrival = i128::from(self.arrival);
        let flip = if self.deliveries % 2 == 1 { -1 } else { 1 };
        (self.deliveries, flip * arrival)
    }
}

/// A chunk's place in the [`Line`], held until its task ends.
pub(super) struct Ticket {
    line: Arc<Line>,
    place: Place,
}

impl Line {
    /// Puts a chunk that arrived `arrival`-th, delivered `deliveries` times, in the line; called
    /// in the order of arrival, before its task starts.
    pub(super) fn enter(self: &Arc<Self>, arrival: u64, deliveries: u64) -> Ticket {
        let place = Place {
            arrival,
            deliveries,
        };
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(place);
        Ticket {
            line: Arc::clone(self),
            place,
        }
    }

    fn first(&self) -> Option<Place> {
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .min_by_key(|p| p.rank())
    }
}

impl Ticket {
    /// Waits until no chunk in the line should start before this one.
    pub(super) async fn first(&self) {
        loop {
            let changed = self.line.changed.notified();
            tokio::pin!(changed);
            // Registered before the line is read, so a change in between is not missed.
            changed.as_mut().enable();
            if self.line.first() == Some(self.place) {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut places = self
            .line
            .places
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = places.iter().position(|p| *p == self.place) {
            places.swap_remove(i);
        }
        drop(places);
        self.line.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first of `places` (arrival, deliveries) to start.
    fn first_of(places: &[(u64, u64)]) -> u64 {
        let line = Arc::new(Line::default());
        let _tickets: Vec<Ticket> = places.iter().map(|&(a, d)| line.enter(a, d)).collect();
        line.first().map(|p| p.arrival).unwrap_or(0)
    }

    #[test]
    fn the_chunk_delivered_fewest_times_starts_first() {
        assert_eq!(first_of(&[(1, 5), (2, 2), (3, 3)]), 2);
    }

    #[test]
    fn between_equals_the_order_flips_with_each_delivery() {
        assert_eq!(first_of(&[(1, 1), (2, 1)]), 2);
        assert_eq!(first_of(&[(1, 2), (2, 2)]), 1);
        assert_eq!(first_of(&[(1, 3), (2, 3), (3, 3)]), 3);
    }

    /// Two chunks that keep arriving together, in the same order and with the same count: the
    /// innocent one starts first within two deliveries, wherever it stands.
    #[test]
    fn an_innocent_chunk_starts_before_its_killer_within_two_deliveries() {
        for innocent_arrives in [1, 2] {
            let escapes =
                (1..=2).any(|count| first_of(&[(1, count), (2, count)]) == innocent_arrives);
            assert!(escapes, "arriving {innocent_arrives}");
        }
    }

    #[tokio::test]
    async fn a_chunk_waits_for_the_one_before_it_to_end() {
        let line = Arc::new(Line::default());
        let killer = line.enter(1, 3);
        let innocent = line.enter(2, 1);
        let waiting = tokio::spawn(async move {
            killer.first().await;
        });
        innocent.first().await;
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "the killer started while the innocent chunk was in hand"
        );
        drop(innocent);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the killer starts once the innocent chunk ends")
            .expect("the task");
    }
}
