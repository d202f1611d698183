//! The throttle: at most `window` chunks outstanding, and an optional item rate that ramps up
//! linearly from 0 over `ramp_up`.
//!
//! The rate is charged after the fact: a chunk may go once the items sent *before* it fit the
//! rate, so the first chunk never waits and the average over a run is the rate asked for.

use std::time::Duration;

use hopper_common::job::Throttle as ThrottleSpec;

/// The window and rate of a run: the job file's, or those `throttle` set while it runs.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    spec: ThrottleSpec,
    /// The rate the ramp climbs from: 0 at the start, the rate reached when retuned.
    from_rate: f64,
    /// When the current setting took effect, from the start of the run.
    origin: Duration,
    /// Items sent before `origin`.
    base_items: u64,
    sent_items: u64,
}

impl Throttle {
    /// The throttle of a job file.
    pub fn new(spec: ThrottleSpec) -> Throttle {
        Throttle {
            spec,
            from_rate: 0.0,
            origin: Duration::ZERO,
            base_items: 0,
            sent_items: 0,
        }
    }

    /// The setting in force.
    pub fn spec(&self) -> ThrottleSpec {
        self.spec
    }

    /// True when one more chunk may be outstanding.
    pub fn has_room(&self, outstanding: usize) -> bool {
        outstanding < self.spec.window
    }

    /// True when no item rate is set.
    pub fn is_unlimited(&self) -> bool {
        self.spec.rate <= 0.0
    }

    /// The rate allowed `at` (from the start of the run): on the ramp, or the rate itself.
    fn rate_at(&self, at: Duration) -> f64 {
        let t = at.saturating_sub(self.origin).as_secs_f64();
        let ramp = self.spec.ramp_up.as_secs_f64();
        if ramp > 0.0 && t < ramp {
            self.from_rate + (self.spec.rate - self.from_rate) * t / ramp
        } else {
            self.spec.rate
        }
    }

    /// Takes a new setting `now` (from the start of the run): the next chunk follows it, and a
    /// ramp-up climbs again from the rate allowed now, not from zero. Also what a pause ends
    /// with (the same setting): the time paused allows no burst.
    pub fn retune(&mut self, spec: ThrottleSpec, now: Duration) {
        let current = if self.is_unlimited() {
            // Nothing to climb from: the new rate applies at once.
            spec.rate
        } else {
            self.rate_at(now)
        };
        self.from_rate = current.min(spec.rate.max(0.0));
        self.spec = spec;
        self.origin = now;
        self.base_items = self.sent_items;
    }

    /// How long after the start of the run the next chunk may go, given what was sent.
    pub fn next_allowed_at(&self) -> Duration {
        let rate = self.spec.rate;
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        let need = (self.sent_items - self.base_items) as f64;
        let ramp = self.spec.ramp_up.as_secs_f64();
        let from = self.from_rate;
        // Items allowed by the end of the ramp: the area under the rising rate.
        let ramp_items = (from + rate) * ramp / 2.0;
        let secs = if ramp > 0.0 && need <= ramp_items {
            // Solve from*t + (rate - from) * t^2 / (2 ramp) = need.
            let a = (rate - from) / (2.0 * ramp);
            if a.abs() < 1e-12 {
                need / from.max(1e-12)
            } else {
                (-from + (from * from + 4.0 * a * need).max(0.0).sqrt()) / (2.0 * a)
            }
        } else {
            ramp + (need - ramp_items) / rate
        };
        self.origin + Duration::from_secs_f64(secs.max(0.0))
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

    #[test]
    fn a_new_setting_applies_from_now_and_ramps_from_the_current_rate() {
        // 100/s steady; at 10 s (1,000 sent) the rate goes to 200/s with a 10 s ramp.
        let mut t = throttle(4, 100.0, 0);
        t.sent(1_000);
        let now = Duration::from_secs(10);
        t.retune(
            ThrottleSpec {
                window: 8,
                rate: 200.0,
                ramp_up: Duration::from_secs(10),
            },
            now,
        );
        assert!(t.has_room(7) && !t.has_room(8));
        assert_eq!(t.next_allowed_at(), now);
        // Over the ramp from 100/s to 200/s, 1,500 items: by 20 s.
        t.sent(1_500);
        assert!((t.next_allowed_at().as_secs_f64() - 20.0).abs() < 1e-6);
        // Then 200/s.
        t.sent(200);
        assert!((t.next_allowed_at().as_secs_f64() - 21.0).abs() < 1e-6);
    }

    #[test]
    fn time_spent_paused_allows_no_burst() {
        let mut t = throttle(4, 100.0, 0);
        t.sent(100);
        // Paused from 1 s to 60 s, then the same setting again.
        let spec = t.spec();
        t.retune(spec, Duration::from_secs(60));
        t.sent(100);
        assert!((t.next_allowed_at().as_secs_f64() - 61.0).abs() < 1e-6);
    }
}
