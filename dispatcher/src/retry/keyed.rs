//! Reading again, by key, what a run of a query failed on: a failed chunk's whole range of
//! keys (or its rows, for a chunk `retry` made), and each skipped row by its own key. Nothing
//! moves in a database as it does in a fixed file, so there is nothing to check first: a row
//! fixed in place has the same key, and a row deleted since is simply not read (its failure is
//! taken over all the same: there is nothing left to retry).

use std::collections::{BTreeMap, VecDeque};

use hopper_common::job::{Chunking, SourceSpec};

use crate::chunker::{Chunker, Chunks, RawChunk, RetryOf};
use crate::context::{FailureClass, Keys, Retried, Retryable};
use crate::source::{self, Bounds, SourceError};

/// One thing to read again: a source's bounds and what the chunks cut from it take over.
struct Target {
    bounds: Bounds,
    /// The line before its first row.
    from_line: u64,
    /// A whole chunk (by seq), taken over by its last piece; or rows, each taking over its own
    /// failures (by line).
    over: Over,
}

enum Over {
    Chunk(u64),
    Rows(BTreeMap<u64, Vec<i64>>),
}

/// Hands out the chunks of a keyed `retry`.
pub(crate) struct KeyedReader {
    spec: SourceSpec,
    limits: Chunking,
    targets: VecDeque<Target>,
    ready: VecDeque<RawChunk>,
}

impl KeyedReader {
    /// A reader of what `failed` lists, from the query `spec` names.
    pub(crate) fn new(spec: &SourceSpec, limits: Chunking, failed: &Retryable) -> KeyedReader {
        let mut targets = VecDeque::new();
        for c in &failed.chunks {
            let bounds = match &c.keys {
                Some(Keys::Range { after, last, .. }) => Bounds::Range {
                    after: after.clone(),
                    last: last.clone(),
                },
                Some(Keys::Rows(rows)) => Bounds::Rows(rows.iter().cloned().collect()),
                // A chunk recorded without keys cannot be found in a query.
                None => continue,
            };
            targets.push_back(Target {
                bounds,
                from_line: c.position.line.saturating_sub(1),
                over: Over::Chunk(c.seq),
            });
        }
        // Skipped rows (bad data and bad items), by key, in line order, each failure once.
        let mut rows: BTreeMap<u64, (String, Vec<i64>)> = BTreeMap::new();
        for f in &failed.failures {
            let Some(key) = &f.key else { continue };
            match f.class {
                FailureClass::BadData | FailureClass::BadItem => {}
                FailureClass::Chunk => continue,
            }
            rows.entry(f.line)
                .or_insert_with(|| (key.clone(), Vec::new()))
                .1
                .push(f.id);
        }
        if !rows.is_empty() {
            let keys = rows
                .iter()
                .map(|(line, (k, _))| (k.clone(), *line))
                .collect();
            let over = rows
                .into_iter()
                .map(|(line, (_, ids))| (line, ids))
                .collect();
            targets.push_back(Target {
                bounds: Bounds::Rows(keys),
                from_line: 0,
                over: Over::Rows(over),
            });
        }
        KeyedReader {
            spec: spec.clone(),
            limits,
            targets,
            ready: VecDeque::new(),
        }
    }

    /// How many failures it takes over.
    pub(crate) fn failures(&self) -> usize {
        self.targets
            .iter()
            .map(|t| match &t.over {
                Over::Chunk(_) => 1,
                Over::Rows(rows) => rows.values().map(Vec::len).sum(),
            })
            .sum()
    }

    fn read_target(&mut self, t: Target) -> Result<(), SourceError> {
        // For rows read by key: each row's key, by its line.
        let wanted: BTreeMap<u64, String> = match &t.bounds {
            Bounds::Rows(rows) => rows.iter().map(|(k, line)| (*line, k.clone())).collect(),
            Bounds::Scan { .. } | Bounds::Range { .. } => BTreeMap::new(),
        };
        let by_rows = !wanted.is_empty();
        let source = source::open_keyed(&self.spec, t.bounds, t.from_line)?;
        let mut chunker = Chunker::new(source, self.limits);
        let mut pieces = Vec::new();
        while let Some(mut chunk) = chunker.next_chunk()? {
            if by_rows {
                // Rows apart from each other: the chunk is read again by its rows' keys.
                let mut rows: Vec<(String, u64)> = lines(&chunk)
                    .filter_map(|l| wanted.get(&l).map(|k| (k.clone(), l)))
                    .collect();
                rows.sort_by_key(|&(_, line)| line);
                chunk.keys = Some(Keys::Rows(rows));
            }
            chunk.retry = Some(RetryOf::default());
            pieces.push(chunk);
        }
        match t.over {
            Over::Chunk(seq) => {
                // The last piece takes the chunk over (one even when the range holds nothing
                // now): an interrupted retry that recorded only its first pieces still lists the
                // chunk, and the next `retry` reads it again whole.
                if pieces.is_empty() {
                    pieces.push(empty());
                }
                if let Some(of) = pieces.last_mut().and_then(|p| p.retry.as_mut()) {
                    of.retried.push(Retried::Chunk(seq));
                }
            }
            Over::Rows(mut rows) => {
                for piece in &mut pieces {
                    let ids: Vec<i64> = lines(piece)
                        .filter_map(|l| rows.remove(&l))
                        .flatten()
                        .collect();
                    if let Some(of) = piece.retry.as_mut() {
                        of.skipped += ids.len() as u64;
                        of.retried.extend(ids.into_iter().map(Retried::Failure));
                    }
                }
                // Rows gone since: nothing is left of them to retry, so their failures are
                // taken over too.
                let gone: Vec<i64> = rows.into_values().flatten().collect();
                if !gone.is_empty() {
                    let mut chunk = empty();
                    if let Some(of) = chunk.retry.as_mut() {
                        of.skipped += gone.len() as u64;
                        of.retried.extend(gone.into_iter().map(Retried::Failure));
                    }
                    pieces.push(chunk);
                }
            }
        }
        self.ready.extend(pieces);
        Ok(())
    }
}

/// The lines of a chunk's records: its items' and its bad records'.
fn lines(chunk: &RawChunk) -> impl Iterator<Item = u64> + '_ {
    chunk
        .items
        .iter()
        .map(|i| i.line)
        .chain(chunk.bad.iter().map(|b| b.position.line))
}

/// A chunk of nothing, there to take failures over.
fn empty() -> RawChunk {
    RawChunk {
        position: hopper_common::Position::default(),
        end: source::Cursor::default(),
        items: Vec::new(),
        encoded: None,
        bad: Vec::new(),
        retry: Some(RetryOf::default()),
        keys: None,
    }
}

impl Chunks for KeyedReader {
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
