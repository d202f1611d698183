//! Progress of a run, for the person watching: a progress bar on a terminal (items, rate, and
//! how far through the input file), log lines every few seconds otherwise.

use std::time::{Duration, Instant};

use crate::context::RunId;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The counts shown.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Items read and dispatched.
    pub read: u64,
    /// Items processed by consumers.
    pub processed: u64,
    /// Items skipped.
    pub skipped: u64,
    /// Chunks outstanding.
    pub outstanding: usize,
    /// Bytes of input read.
    pub offset: u64,
    /// Told to publish nothing new (`pause`).
    pub paused: bool,
}

/// Shows a run's progress.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    job: String,
    run: RunId,
    started: Instant,
    last_log: Instant,
    every: Duration,
}

impl Progress {
    /// A bar on stderr when `interactive`, else log lines every `every`.
    pub fn new(
        job: &str,
        run: RunId,
        total_bytes: Option<u64>,
        interactive: bool,
        every: Duration,
    ) -> Progress {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(total_bytes, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {percent:>3}% {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            job: job.to_string(),
            run,
            started: now,
            last_log: now,
            every,
        }
    }

    fn rate(&self, processed: u64) -> f64 {
        processed as f64 / self.started.elapsed().as_secs_f64().max(0.001)
    }

    /// Shows the latest counts.
    pub fn update(&mut self, s: &Snapshot) {
        let rate = self.rate(s.processed);
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.offset);
                bar.set_message(format!(
                    "{}read {} processed {} skipped {} | {:.0} items/s | {} chunks out",
                    if s.paused { "PAUSED | " } else { "" },
                    s.read,
                    s.processed,
                    s.skipped,
                    rate,
                    s.outstanding
                ));
            }
            None => {
                if self.last_log.elapsed() >= self.every {
                    self.last_log = Instant::now();
                    tracing::info!(
                        job = %self.job,
                        run = self.run,
                        read = s.read,
                        processed = s.processed,
                        skipped = s.skipped,
                        outstanding = s.outstanding,
                        items_per_s = rate.round() as u64,
                        paused = s.paused,
                        "progress"
                    );
                }
            }
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
