//! Bounded recovery: how long to pause before recovering a lost connection, and when to give up.
//! Both sides use it, so a broker that keeps dropping the connection (or a message it refuses in
//! a way that closes the channel) cannot make either loop reconnect-republish for ever.

use std::time::{Duration, Instant};

/// Losses of the connection in a row, each soon after the last recovery.
#[derive(Debug, Default)]
pub struct Recoveries {
    in_a_row: u32,
    last: Option<Instant>,
}

impl Recoveries {
    /// Losses in a row (each within [`Recoveries::STEADY`] of the last recovery) after which a
    /// side gives up.
    pub const MAX: u32 = 5;

    /// A connection that held this long after a recovery resets the count.
    pub const STEADY: Duration = Duration::from_secs(60);

    /// Counts a loss (or a failed recovery), and returns the pause before the next recovery:
    /// none after a first loss, then 1 s, 2 s, 4 s...; `None` once [`Recoveries::MAX`] losses
    /// in a row have passed.
    pub fn lost(&mut self) -> Option<Duration> {
        if self.last.is_some_and(|at| at.elapsed() > Self::STEADY) {
            self.in_a_row = 0;
        }
        self.in_a_row += 1;
        self.last = Some(Instant::now());
        match self.in_a_row {
            n if n > Self::MAX => None,
            1 => Some(Duration::ZERO),
            n => Some(Duration::from_secs(1 << (n - 2))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_then_it_gives_up() {
        let mut r = Recoveries::default();
        let pauses: Vec<Option<u64>> = (0..6).map(|_| r.lost().map(|d| d.as_secs())).collect();
        assert_eq!(
            pauses,
            vec![Some(0), Some(1), Some(2), Some(4), Some(8), None]
        );
    }
}
