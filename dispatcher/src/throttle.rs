//! The throttle: at most `window` chunks outstanding, and an optional item rate that ramps up
//! linearly from 0 over `ramp_up`.
//!
//! The rate is charged after the fact: a chunk may go once the items sent *before* it fit the
//! rate, so the first chunk never waits and the average over a run is the rate asked for.

use std::time::Duration;

use hopper_common::job::Throttle as ThrottleSpec;

/// The window and rate of a run, as the job file sets them.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    window: usize,
    rate: f64,
    ramp_up: Duration,
    sent_items: u64,
}

impl Throttle {
    /// The throttle of a job file.
    pub fn new(spec: ThrottleSpec) -> Throttle {
        Throttle {
            window: spec.window,
            rate: spec.rate,
            ramp_up: spec.ramp_up,
            sent_items: 0,
        }
    }

    /// True when one more chunk may be outstanding.
    pub fn has_room(&self, outstanding: usize) -> bool {
        outstanding < self.window
    }

    /// True when no item rate is set.
    pub fn is_unlimited(&self) -> bool {
        self.rate <= 0.0
    }

    /// How long after the start of the run the next chunk may go, given what was sent.
    pub fn next_allowed_at(&self) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let need = self.sent_items as f64;
        let ramp = self.ramp_up.as_secs_f64();
        // Items allowed by the end of the ramp: the area under the rising rate.
        let ramp_items = self.rate * ramp / 2.0;
        let secs = if ramp > 0.0 && need <= ramp_items {
            (2.0 * ramp * need / self.rate).sqrt()
        } else {
            ramp + (need - ramp_items) / self.rate
        };
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// Counts `items` as sent.
    pub fn sent(&mut self, items: u64) {
        self.sent_items += items;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(window: usize, rate: f64, ramp: u64) -> Throttle {
        Throttle::new(ThrottleSpec {
            window,
            rate,
            ramp_up: Duration::from_secs(ramp),
        })
    }

    #[test]
    fn window_bounds_outstanding_chunks() {
        let t = throttle(2, 0.0, 0);
        assert!(t.has_room(1));
        assert!(!t.has_room(2));
    }

    #[test]
    fn unlimited_rate_never_waits() {
        let mut t = throttle(1, 0.0, 0);
        t.sent(1_000_000);
        assert_eq!(t.next_allowed_at(), Duration::ZERO);
    }

    #[test]
    fn steady_rate_charges_after_the_fact() {
        let mut t = throttle(1, 100.0, 0);
        assert_eq!(t.next_allowed_at(), Duration::ZERO);
        t.sent(50);
        assert_eq!(t.next_allowed_at(), Duration::from_millis(500));
        t.sent(150);
        assert_eq!(t.next_allowed_at(), Duration::from_secs(2));
    }

    #[test]
    fn ramp_up_is_slower_at_first_then_catches_up() {
        let mut t = throttle(1, 100.0, 10);
        // By the end of a 10 s ramp to 100/s, 500 items were allowed.
        t.sent(500);
        assert!((t.next_allowed_at().as_secs_f64() - 10.0).abs() < 1e-9);
        t.sent(100);
        assert!((t.next_allowed_at().as_secs_f64() - 11.0).abs() < 1e-9);
        let mut early = throttle(1, 100.0, 10);
        early.sent(125);
        assert!((early.next_allowed_at().as_secs_f64() - 5.0).abs() < 1e-9);
    }
}
