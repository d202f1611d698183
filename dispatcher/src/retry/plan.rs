//! Planning a `retry`: from the failures a run still lists, the stretches of the input to read
//! again, in line order, each with the failures it takes over.

use std::collections::BTreeMap;

use hopper_common::Position;

use crate::context::{FailureClass, Retried, Retryable};

/// A stretch of the input to read again, in the coordinates of the run's first reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// Where its first record started.
    pub(super) start: Position,
    /// The byte offset past its end, and its last line.
    pub(super) end_offset: u64,
    pub(super) end_line: u64,
    /// `None`: every record in it (a failed chunk, a bad record). `Some`: only these lines (bad
    /// items and bad records inside a done chunk), each with the failures it takes over.
    pub(super) only: Option<BTreeMap<u64, Vec<i64>>>,
    /// For a whole stretch: what it takes over, and how many of those are skipped items.
    pub(super) retried: Vec<Retried>,
    pub(super) skipped: u64,
    /// The row whose recorded span this is (a chunk, or a bad record's failure).
    pub(super) row: Retried,
}

impl Target {
    fn holds(&self, line: u64) -> bool {
        (self.start.line..=self.end_line).contains(&line)
    }
}

/// What `retry` will read again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    pub(super) targets: Vec<Target>,
}

impl Plan {
    /// Plans the reading of what `failed` lists, in line order.
    pub(crate) fn new(failed: &Retryable) -> Plan {
        let mut plan = Plan::default();
        for c in &failed.chunks {
            plan.targets.push(Target {
                start: c.position,
                end_offset: c.end_offset,
                end_line: c.end_line,
                only: None,
                retried: vec![Retried::Chunk(c.seq)],
                skipped: 0,
                row: Retried::Chunk(c.seq),
            });
        }
        for host in &failed.hosts {
            let items: BTreeMap<u64, Vec<i64>> = failed
                .failures
                .iter()
                .filter(|f| f.class == FailureClass::BadItem && f.seq == Some(host.seq))
                .fold(BTreeMap::new(), |mut m, f| {
                    m.entry(f.line).or_default().push(f.id);
                    m
                });
            plan.targets.push(Target {
                start: host.position,
                end_offset: host.end_offset,
                end_line: host.end_line,
                only: Some(items),
                retried: Vec::new(),
                skipped: 0,
                row: Retried::Chunk(host.seq),
            });
        }
        for f in &failed.failures {
            if f.class != FailureClass::BadData {
                continue;
            }
            // A bad record inside a stretch read again is read with it.
            if let Some(t) = plan.targets.iter_mut().find(|t| t.holds(f.line)) {
                match &mut t.only {
                    None => {
                        t.retried.push(Retried::Failure(f.id));
                        t.skipped += 1;
                    }
                    Some(lines) => {
                        lines.entry(f.line).or_default().push(f.id);
                        // A record that ran over several lines (a quote left open) may be
                        // several records once fixed: every line of it is read again.
                        if let Some((_, _, end_line)) = f.span {
                            for line in f.line + 1..=end_line.min(t.end_line) {
                                lines.entry(line).or_default();
                            }
                        }
                    }
                }
                continue;
            }
            // The store never hands out a bad record without its span (it refuses such a row).
            let Some((start, end_offset, end_line)) = f.span else {
                continue;
            };
            plan.targets.push(Target {
                start,
                end_offset,
                end_line,
                only: None,
                retried: vec![Retried::Failure(f.id)],
                skipped: 1,
                row: Retried::Failure(f.id),
            });
        }
        plan.targets.sort_by_key(|t| t.start.line);
        plan
    }

    /// True when there is nothing to read again.
    pub(crate) fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// How many failures the plan takes over: failed chunks and skipped items.
    pub(crate) fn failures(&self) -> usize {
        self.targets
            .iter()
            .map(|t| {
                t.retried.len()
                    + t.only
                        .as_ref()
                        .map_or(0, |m| m.values().map(Vec::len).sum())
            })
            .sum()
    }
}
