//! `retry`: dispatches again, as new chunks of the same run, only what a run failed on (failed
//! and dead chunks, bad data, bad items), read again from the positions the run recorded.
//!
//! The operator fixes the failed records in place, then runs `retry`. A fix may make a record
//! longer or shorter, which moves every byte after it: the reader keeps the shift (`delta`) seen
//! at the end of each record or chunk it read again, and seeks to the next one at its recorded
//! offset plus that shift. It never scans the input from its start.
//!
//! Invariants:
//! - **Nothing done is sent again.** Only the lines of what failed are read: a failed chunk's
//!   whole range, a done chunk's bad items by line, a bad record by its own span.
//! - **Checked before anything is sent.** The whole plan is read once before the run is taken
//!   up: every seek must land at the start of a line, and the shift after the last failed record
//!   must be the input's change in size. Otherwise something else moved and nothing is sent
//!   ([`SourceError::Moved`]).
//! - **A retry chunk takes over in the transaction that records it.** Its failures stop counting
//!   in the same transaction, so an interrupted retry leaves every failure either taken over by
//!   a recorded chunk or still standing for the next `retry`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read as _, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use hopper_common::job::{Chunking, SourceSpec};
use hopper_common::state::{FailureClass, Moved, Retried, Retryable};
use hopper_common::{Job, Position, RunId, RunState, StateStore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::chunker::{bad_data, oversized, Chunks, RawChunk, RetryOf};
use crate::local::Via;
use crate::run::{find_run, refuse_if_alive, run_on, DispatchError, RunOptions, RunSummary, Start};
use crate::source::{self, Cursor, Record, SourceError};

/// A stretch of the input to read again, in the coordinates of the run's first reading.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Where its first record started.
    start: Position,
    /// The byte offset past its end, and its last line.
    end_offset: u64,
    end_line: u64,
    /// `None`: every record in it (a failed chunk, a bad record). `Some`: only these lines (bad
    /// items and bad records inside a done chunk), each with the failures it takes over.
    only: Option<BTreeMap<u64, Vec<i64>>>,
    /// For a whole stretch: what it takes over, and how many of those are skipped items.
    retried: Vec<Retried>,
    skipped: u64,
    /// The row whose recorded span this is (a chunk, or a bad record's failure).
    row: Retried,
}

impl Target {
    fn holds(&self, line: u64) -> bool {
        (self.start.line..=self.end_line).contains(&line)
    }
}

/// What `retry` will read again, and what it cannot.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    targets: Vec<Target>,
    /// Failures that cannot be retried (recorded by an older version, without their span), for
    /// people.
    pub unretryable: Vec<String>,
}

impl Plan {
    /// Plans the reading of what `failed` lists, in line order.
    pub fn new(failed: &Retryable) -> Plan {
        let mut plan = Plan::default();
        for c in &failed.chunks {
            let Some(end_line) = c.end_line else {
                plan.unretryable.push(format!(
                    "chunk {} at line {} (recorded without its end line by an older version)",
                    c.seq, c.position.line
                ));
                continue;
            };
            plan.targets.push(Target {
                start: c.position,
                end_offset: c.end_offset,
                end_line,
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
            let Some(end_line) = host.end_line else {
                plan.unretryable.extend(items.keys().map(|line| {
                    format!("bad item at line {line} (its chunk {} was recorded without its end line by an older version)", host.seq)
                }));
                continue;
            };
            plan.targets.push(Target {
                start: host.position,
                end_offset: host.end_offset,
                end_line,
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
                    Some(lines) => lines.entry(f.line).or_default().push(f.id),
                }
                continue;
            }
            let Some((start, end_offset, end_line)) = f.span else {
                plan.unretryable.push(format!(
                    "bad data at line {} (recorded without its byte offset by an older version)",
                    f.line
                ));
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
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// How many failures the plan takes over: failed chunks and skipped items.
    pub fn failures(&self) -> usize {
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

/// Reads a [`Plan`] from the input and hands out its chunks.
pub struct RetryReader {
    spec: SourceSpec,
    limits: Chunking,
    path: PathBuf,
    targets: VecDeque<Target>,
    /// How far the input moved, at the last point where it could be told: new offset minus
    /// recorded offset.
    delta: i64,
    ready: VecDeque<RawChunk>,
    /// Where each target read so far lies now: its row, start and end offsets.
    moves: Vec<Moved>,
}

/// What [`RetryReader::check`] found: what the plan holds now, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Items it holds now.
    pub items: u64,
    /// Records still bad.
    pub bad: u64,
    /// The input's size now.
    pub size: u64,
    /// Where each failed stretch lies in the input now.
    pub moves: Vec<Moved>,
}

impl RetryReader {
    /// A reader of `plan` from the input `spec` names; an item larger than `limits.max_bytes` is
    /// bad data, as in a first reading.
    pub fn new(spec: &SourceSpec, limits: Chunking, plan: &Plan) -> RetryReader {
        let path = match spec {
            SourceSpec::File { path, .. } => path.clone(),
        };
        RetryReader {
            spec: spec.clone(),
            limits,
            path,
            targets: plan.targets.iter().cloned().collect(),
            delta: 0,
            ready: VecDeque::new(),
            moves: Vec::new(),
        }
    }

    /// Reads the whole plan without keeping anything, and checks that the input moved only by
    /// the length changes of the failed records: the shift after the last one must be the
    /// input's change in size from `size_before`. Returns the items and bad records it saw.
    ///
    /// # Errors
    /// [`SourceError::Moved`] when the input changed elsewhere; read errors.
    pub fn check(mut self, size_before: u64) -> Result<Checked, SourceError> {
        let (mut items, mut bad) = (0u64, 0u64);
        while let Some(c) = self.next_chunk()? {
            items += c.items.len() as u64;
            bad += c.bad.len() as u64;
        }
        let size_now = std::fs::metadata(&self.path)
            .map_err(|e| self.moved(format!("cannot read its size: {e}")))?
            .len();
        if size_now as i64 - size_before as i64 != self.delta {
            return Err(self.moved(format!(
                "it has {size_now} bytes, {size_before} when the run read it, but the fixed \
                 records account for {} bytes of the difference",
                self.delta
            )));
        }
        Ok(Checked {
            items,
            bad,
            size: size_now,
            moves: self.moves,
        })
    }

    fn moved(&self, detail: String) -> SourceError {
        SourceError::Moved {
            path: self.path.display().to_string(),
            detail,
        }
    }

    /// Where `target` starts now; it must be the start of a line.
    fn seek_point(&self, target: &Target) -> Result<Cursor, SourceError> {
        let offset = u64::try_from(target.start.offset as i64 + self.delta).map_err(|_| {
            self.moved(format!(
                "line {} would start before the input",
                target.start.line
            ))
        })?;
        if offset > 0 {
            let mut byte = [0u8; 1];
            File::open(&self.path)
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(offset - 1))?;
                    f.read_exact(&mut byte)
                })
                .map_err(|e| {
                    self.moved(format!(
                        "cannot read line {} at byte {offset}: {e}",
                        target.start.line
                    ))
                })?;
            if byte[0] != b'\n' {
                return Err(self.moved(format!(
                    "line {} no longer starts at byte {offset}",
                    target.start.line
                )));
            }
        }
        Ok(Cursor {
            offset,
            lines: target.start.line.saturating_sub(1),
        })
    }

    /// Reads one target again, into chunks in `ready`: one chunk for a whole stretch; one per
    /// run of adjacent wanted lines otherwise, so that each chunk is a contiguous range of the
    /// input that can be read again by its position (resume, stuck chunks).
    fn read_target(&mut self, t: Target) -> Result<(), SourceError> {
        let at = self.seek_point(&t)?;
        // The span as recorded, with room for a fix that made it longer.
        let span = t.end_offset.saturating_sub(t.start.offset) + 4096;
        let mut source = source::open_span(&self.spec, at, span)?;
        let mut group: Option<RawChunk> = None;
        loop {
            let before = source.cursor();
            let Some(read) = source.next()? else {
                let end = source.cursor();
                if end.lines == t.end_line {
                    self.delta = end.offset as i64 - t.end_offset as i64;
                }
                break;
            };
            let line = read.start.line;
            if line > t.end_line {
                // Past the stretch: where it ends now tells how far the input moved.
                if line == t.end_line + 1 {
                    self.delta = read.start.offset as i64 - t.end_offset as i64;
                } else if before.lines == t.end_line {
                    self.delta = before.offset as i64 - t.end_offset as i64;
                }
                break;
            }
            let after = source.cursor();
            let ids = match &t.only {
                None => Some(Vec::new()),
                Some(lines) => lines.get(&line).cloned(),
            };
            match ids {
                Some(ids) => {
                    let chunk = group.get_or_insert_with(|| RawChunk {
                        position: read.start,
                        end: after,
                        items: Vec::new(),
                        bad: Vec::new(),
                        retry: Some(RetryOf::default()),
                    });
                    chunk.end = after;
                    match read.record {
                        Record::Item(item) if item.data.len() as u64 > self.limits.max_bytes => {
                            let why = oversized(item.data.len() as u64, &self.limits);
                            chunk.bad.push(bad_data(read.start, after, why))
                        }
                        Record::Item(item) => {
                            if chunk.items.is_empty() {
                                chunk.position = read.start;
                            }
                            chunk.items.push(item);
                        }
                        Record::Bad { reason, .. } => {
                            chunk.bad.push(bad_data(read.start, after, reason))
                        }
                    }
                    if let Some(of) = chunk.retry.as_mut() {
                        of.skipped += ids.len() as u64;
                        of.retried.extend(ids.into_iter().map(Retried::Failure));
                    }
                }
                None => self.ready.extend(group.take()),
            }
            if after.lines >= t.end_line {
                if after.lines == t.end_line {
                    self.delta = after.offset as i64 - t.end_offset as i64;
                }
                break;
            }
        }
        self.moves.push(Moved {
            row: t.row,
            offset: at.offset,
            end_offset: (t.end_offset as i64 + self.delta).max(0) as u64,
        });
        if t.only.is_none() {
            // A whole stretch is one chunk, even when it holds nothing now: it still takes over.
            let chunk = group.get_or_insert_with(|| RawChunk {
                position: Position {
                    line: at.lines + 1,
                    offset: at.offset,
                },
                end: at,
                items: Vec::new(),
                bad: Vec::new(),
                retry: Some(RetryOf::default()),
            });
            if let Some(of) = chunk.retry.as_mut() {
                of.retried.extend(t.retried.iter().copied());
                of.skipped += t.skipped;
            }
        }
        self.ready.extend(group);
        Ok(())
    }
}

impl Chunks for RetryReader {
    fn next_chunk(&mut self) -> Result<Option<RawChunk>, SourceError> {
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                return Ok(Some(chunk));
            }
            let Some(target) = self.targets.pop_front() else {
                return Ok(None);
            };
            self.read_target(target)?;
        }
    }
}

/// Dispatches again what run `run` of `job` failed on (over RabbitMQ, or to workers in this
/// process with [`RunOptions::local`]) and ends the run again:
/// `completed` when everything now succeeds.
///
/// A run that is still going (its dispatcher alive) is refused; one whose dispatcher died is
/// taken over first, as `--resume` would. A run that stopped before reading all its input
/// (`failed` at the skip limit, `cancelled`) is refused: `retry` does not read on.
///
/// # Errors
/// A [`DispatchError`]; [`DispatchError::is_bad_input`] tells the ones where nothing was sent.
pub async fn retry(
    job: &Job,
    store: Arc<dyn StateStore>,
    run: RunId,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunSummary, DispatchError> {
    let record = find_run(job, store.as_ref(), Some(run)).await?;
    match record.state {
        RunState::Running | RunState::Paused => refuse_if_alive(job, &record)?,
        RunState::Completed | RunState::CompletedWithFailures => {}
        RunState::Failed | RunState::Cancelled => {}
    }
    if !record.checkpoint.exhausted {
        return Err(DispatchError::NotRetryable {
            run,
            state: record.state,
        });
    }
    let failed = store.retryable(run).await?;
    let plan = Plan::new(&failed);
    for what in &plan.unretryable {
        warn!(job = %job.name, run, "cannot retry {what}");
    }
    let open = store.open_chunks(run).await?;
    if plan.is_empty() && open.is_empty() {
        info!(job = %job.name, run, state = %record.state, "nothing to retry");
        let status = store.status(run, job.retry.chunk_timeout).await?;
        return Ok(RunSummary {
            run,
            state: record.state,
            status,
        });
    }
    let (spec, limits) = (job.source.clone(), job.chunking);
    let (size_before, checked) = (record.checkpoint.offset, plan.clone());
    let found = tokio::task::spawn_blocking(move || {
        RetryReader::new(&spec, limits, &checked).check(size_before)
    })
    .await
    .map_err(|e| SourceError::Read {
        path: String::new(),
        offset: 0,
        message: format!("the retry check stopped: {e}"),
    })??;
    info!(job = %job.name, run, failures = plan.failures(), items = found.items,
          still_bad = found.bad, "retrying what failed");
    // From here on the run's positions are those of the input as it is now, so that failures
    // found by this retry and those it has yet to reach share one frame, even if it is
    // interrupted.
    store.rebase(run, &found.moves, found.size).await?;
    let plan = Plan::new(&store.retryable(run).await?);
    let record = find_run(job, store.as_ref(), Some(run)).await?;
    let via = Via::open(job, &opts, &shutdown).await?;
    let start = Start::Retry {
        record,
        chunks: Box::new(RetryReader::new(&job.source, job.chunking, &plan)),
    };
    let result = run_on(job, start, via.transport.clone(), store, opts, shutdown).await;
    via.close(job).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopper_common::state::{FailedChunk, OpenFailure};
    use hopper_common::FileFormat;

    fn spec(path: &std::path::Path) -> SourceSpec {
        SourceSpec::File {
            path: path.to_path_buf(),
            format: FileFormat::Jsonl,
        }
    }

    const LIMITS: Chunking = Chunking {
        items: 1000,
        max_bytes: 1 << 20,
    };

    fn lines(chunks: &[RawChunk]) -> Vec<Vec<u64>> {
        chunks
            .iter()
            .map(|c| c.items.iter().map(|i| i.line).collect())
            .collect()
    }

    /// The run read `{"id":1}` .. `{"id":9}` with line 3 bad, chunk 2 (lines 4-6) dead and line
    /// 8 a bad item of chunk 3 (lines 7-9); the operator then fixed line 3 and line 8, making
    /// both longer.
    #[test]
    fn reads_only_what_failed_and_follows_the_fixes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.jsonl");
        let before: Vec<String> = (1..=9)
            .map(|i| match i {
                3 => "{bad".to_string(),
                8 => "{\"id\":8}".to_string(),
                _ => format!("{{\"id\":{i}}}"),
            })
            .collect();
        let offsets: Vec<u64> = before
            .iter()
            .scan(0u64, |at, l| {
                let start = *at;
                *at += l.len() as u64 + 1;
                Some(start)
            })
            .collect();
        let size_before = offsets[8] + before[8].len() as u64 + 1;
        let after: String = (1..=9)
            .map(|i| match i {
                3 => "{\"id\":3,\"fixed\":true}\n".to_string(),
                8 => "{\"id\":8,\"price\":12.5}\n".to_string(),
                _ => format!("{{\"id\":{i}}}\n"),
            })
            .collect();
        std::fs::write(&path, after).expect("write");
        let at = |line: usize| Position {
            line: line as u64,
            offset: offsets[line - 1],
        };
        let failed = Retryable {
            chunks: vec![FailedChunk {
                seq: 2,
                position: at(4),
                end_offset: offsets[6],
                end_line: Some(6),
            }],
            failures: vec![
                OpenFailure {
                    id: 10,
                    seq: None,
                    line: 3,
                    class: FailureClass::BadData,
                    span: Some((at(3), offsets[3], 3)),
                },
                OpenFailure {
                    id: 11,
                    seq: Some(3),
                    line: 8,
                    class: FailureClass::BadItem,
                    span: None,
                },
            ],
            hosts: vec![FailedChunk {
                seq: 3,
                position: at(7),
                end_offset: size_before,
                end_line: Some(9),
            }],
        };
        let plan = Plan::new(&failed);
        assert_eq!(plan.failures(), 3);
        let checked = RetryReader::new(&spec(&path), LIMITS, &plan)
            .check(size_before)
            .expect("check");
        assert_eq!((checked.items, checked.bad), (5, 0));
        // Where each stretch lies in the fixed input, for the store to record before sending.
        let fixed = std::fs::read_to_string(&path).expect("read");
        let at_now = |text: &str| fixed.find(text).expect("in the fixed input") as u64;
        assert_eq!(checked.size, fixed.len() as u64);
        let moves: Vec<(Retried, u64, u64)> = checked
            .moves
            .iter()
            .map(|m| (m.row, m.offset, m.end_offset))
            .collect();
        assert_eq!(
            moves,
            vec![
                (
                    Retried::Failure(10),
                    at_now("{\"id\":3,"),
                    at_now("{\"id\":4}")
                ),
                (
                    Retried::Chunk(2),
                    at_now("{\"id\":4}"),
                    at_now("{\"id\":7}")
                ),
                (Retried::Chunk(3), at_now("{\"id\":7}"), fixed.len() as u64),
            ]
        );

        let mut reader = RetryReader::new(&spec(&path), LIMITS, &plan);
        let chunks: Vec<RawChunk> =
            std::iter::from_fn(|| reader.next_chunk().expect("chunk")).collect();
        assert_eq!(lines(&chunks), vec![vec![3], vec![4, 5, 6], vec![8]]);
        assert_eq!(chunks[2].items[0].data, "{\"id\":8,\"price\":12.5}");
        let retried: Vec<Vec<Retried>> = chunks
            .iter()
            .map(|c| c.retry.clone().unwrap_or_default().retried)
            .collect();
        assert_eq!(
            retried,
            vec![
                vec![Retried::Failure(10)],
                vec![Retried::Chunk(2)],
                vec![Retried::Failure(11)]
            ]
        );
        // Each chunk is a contiguous range of the fixed input: it can be read again by position.
        let c = &chunks[2];
        let text = &fixed[c.position.offset as usize..c.end.offset as usize];
        assert_eq!(text, "{\"id\":8,\"price\":12.5}\n");
    }

    #[test]
    fn an_edit_elsewhere_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.jsonl");
        // Line 1 was `{"id":1}` and line 2 `{bad` (offset 9); line 1 was edited too.
        std::fs::write(&path, "{\"id\":1, \"x\":1}\n{\"id\":2}\n").expect("write");
        let failed = Retryable {
            failures: vec![OpenFailure {
                id: 1,
                seq: None,
                line: 2,
                class: FailureClass::BadData,
                span: Some((Position { line: 2, offset: 9 }, 14, 2)),
            }],
            ..Retryable::default()
        };
        let err = RetryReader::new(&spec(&path), LIMITS, &Plan::new(&failed))
            .check(14)
            .expect_err("moved");
        assert!(matches!(err, SourceError::Moved { .. }), "{err}");
    }
}
