//! Reading a [`Plan`] from the fixed input: seek to each stretch at its recorded offset plus
//! the shift the fixes before it made, check that it still starts a line, and cut it into
//! chunks that take over its failures.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read as _, Seek, SeekFrom};
use std::path::PathBuf;

use hopper_common::job::{Chunking, FileFormat, SourceSpec};
use hopper_common::Position;

use super::plan::{Plan, Target};
use crate::chunker::{bad_data, Chunks, RawChunk, RetryOf};
use crate::context::{Moved, Retried};
use crate::source::{self, Cursor, Record, SourceError};

/// Reads a [`Plan`] from the input and hands out its chunks.
pub(crate) struct RetryReader {
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
pub(crate) struct Checked {
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
    pub(crate) fn new(spec: &SourceSpec, limits: Chunking, plan: &Plan) -> RetryReader {
        let path = match spec {
            SourceSpec::File { path, .. } => path.clone(),
            // A query's failures are read again by key ([`super::keyed`]), never by offset.
            SourceSpec::Postgres { .. } => PathBuf::new(),
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
    pub(crate) fn check(mut self, size_before: u64) -> Result<Checked, SourceError> {
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
            // CSV records also end at a lone `\r` (old Mac line endings).
            let csv = matches!(
                self.spec,
                SourceSpec::File {
                    format: FileFormat::Csv,
                    ..
                }
            );
            if byte[0] != b'\n' && !(csv && byte[0] == b'\r') {
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
        let mut source = source::open_span(&self.spec, at, span, self.limits.max_bytes)?;
        let mut group: Option<RawChunk> = None;
        // Bytes of item data in `group`.
        let mut bytes = 0u64;
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
                    // A fix may have made the stretch larger than a chunk may be: it goes out
                    // in pieces, each a contiguous range, within the job's chunking.
                    if let (Some(g), Record::Item(item)) = (&group, &read.record) {
                        let full = g.items.len() >= self.limits.items
                            || bytes + item.data.len() as u64 > self.limits.max_bytes;
                        if !g.items.is_empty() && full && self.limits.too_large(item).is_none() {
                            self.ready.extend(group.take());
                            bytes = 0;
                        }
                    }
                    let chunk = group.get_or_insert_with(|| RawChunk {
                        position: read.start,
                        end: after,
                        items: Vec::new(),
                        encoded: None,
                        bad: Vec::new(),
                        retry: Some(RetryOf::default()),
                        keys: None,
                    });
                    chunk.end = after;
                    match read.record {
                        Record::Item(item) => match self.limits.too_large(&item) {
                            Some(why) => chunk.bad.push(bad_data(read.start, None, after, why)),
                            None => {
                                if chunk.items.is_empty() {
                                    chunk.position = read.start;
                                }
                                bytes += item.data.len() as u64;
                                chunk.items.push(item);
                            }
                        },
                        Record::Bad { reason, .. } => {
                            chunk.bad.push(bad_data(read.start, None, after, reason))
                        }
                    }
                    if let Some(of) = chunk.retry.as_mut() {
                        of.skipped += ids.len() as u64;
                        of.retried.extend(ids.into_iter().map(Retried::Failure));
                    }
                }
                None => {
                    self.ready.extend(group.take());
                    bytes = 0;
                }
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
            // A whole stretch takes over its failures with its last chunk (one even when it
            // holds nothing now): an interrupted retry that recorded only its first pieces still
            // lists the failure, and the next `retry` reads the whole stretch again.
            let chunk = group.get_or_insert_with(|| RawChunk {
                position: Position {
                    line: at.lines + 1,
                    offset: at.offset,
                },
                end: at,
                items: Vec::new(),
                encoded: None,
                bad: Vec::new(),
                retry: Some(RetryOf::default()),
                keys: None,
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
