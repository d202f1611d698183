//! Cuts a source's records into chunks of at most `items` items and `max_bytes` bytes of data.
//!
//! A chunk's position is the start of its first item; the cursor after it is exactly where the
//! next chunk begins, so a checkpoint taken after a chunk never skips nor repeats a record. Bad
//! records travel with the chunk they were met in, to be recorded with it; an item larger than
//! `max_bytes` on its own is bad data (it could never be sent). A keyed source's chunk also
//! knows its range of keys: after the previous chunk's last key, up to its own last.

use hopper_common::job::Chunking;
use hopper_common::{EncodedItems, Item, Position};

use crate::context::{BadData, Keys, Retried};
use crate::source::{Cursor, Read, Record, Source, SourceError};

/// Bad records one chunk carries at the most: past it the chunk is cut.
const MAX_BAD_PER_CHUNK: usize = 1000;

/// A chunk as cut from the source, before it has a seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawChunk {
    /// Where its first item starts (or, for a chunk of bad records only, where reading was).
    pub position: Position,
    /// Where the next chunk starts.
    pub end: Cursor,
    /// Its items, possibly none when only bad records were met; empty once encoded.
    pub items: Vec<Item>,
    /// Its items encoded ([`RawChunk::encode_items`]), in place of `items`.
    pub encoded: Option<EncodedItems>,
    /// Bad records met while cutting it.
    pub bad: Vec<BadData>,
    /// For a chunk read again by `retry`: what it takes over from.
    pub retry: Option<RetryOf>,
    /// For a keyed source (a query), the keys of its rows: how it is read again.
    pub keys: Option<Keys>,
}

impl RawChunk {
    /// Encodes the items and lets them go, on the thread that read them: the dispatch loop then
    /// only writes the chunk's head before them, and their memory is freed where it was taken
    /// (a free on another thread costs more). Left as they are if they cannot be encoded; the
    /// loop meets the error when it encodes them itself.
    pub(crate) fn encode_items(&mut self) {
        if self.encoded.is_none() {
            if let Ok(encoded) = EncodedItems::encode(&self.items) {
                self.encoded = Some(encoded);
                self.items = Vec::new();
            }
        }
    }

    /// How many items it has, encoded or not.
    pub(crate) fn item_count(&self) -> usize {
        self.encoded
            .as_ref()
            .map_or(self.items.len(), EncodedItems::len)
    }
}

/// What a chunk read again by `retry` takes over from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RetryOf {
    /// The failed chunks and skipped items it dispatches again.
    pub retried: Vec<Retried>,
    /// How many of those were skipped items (they stop counting against the skip limit).
    pub skipped: u64,
}

/// Something that hands out chunks one after another: the [`Chunker`] over a whole source, or
/// `retry`'s reader of failed records.
pub(crate) trait Chunks: Send {
    /// The next chunk, or `None` at the end.
    ///
    /// # Errors
    /// The source's read error.
    fn next_chunk(&mut self) -> Result<Option<RawChunk>, SourceError>;
}

impl Chunks for Chunker {
    fn next_chunk(&mut self) -> Result<Option<RawChunk>, SourceError> {
        Chunker::next_chunk(self)
    }
}

/// One [`Chunks`] after another: `retry` reading again what failed, then reading on.
pub(crate) struct Then {
    first: Option<Box<dyn Chunks>>,
    then: Box<dyn Chunks>,
}

impl Then {
    pub(crate) fn new(first: Box<dyn Chunks>, then: Box<dyn Chunks>) -> Then {
        Then {
            first: Some(first),
            then,
        }
    }
}

impl Chunks for Then {
    fn next_chunk(&mut self) -> Result<Option<RawChunk>, SourceError> {
        if let Some(first) = &mut self.first {
            match first.next_chunk()? {
                Some(chunk) => return Ok(Some(chunk)),
                None => self.first = None,
            }
        }
        self.then.next_chunk()
    }
}

/// A bad record met at `start` (with its key, for a keyed source), the source's cursor being
/// just past it.
pub(crate) fn bad_data(
    start: Position,
    key: Option<String>,
    after: Cursor,
    reason: String,
) -> BadData {
    BadData {
        position: start,
        end_offset: after.offset,
        end_line: after.lines.max(start.line),
        reason,
        key,
    }
}

/// Cuts chunks from a source.
pub(crate) struct Chunker {
    source: Box<dyn Source>,
    limits: Chunking,
    held: Option<Read>,
    /// For a keyed source: the key of the last record of the previous chunk (or where the
    /// source started), where the next chunk's range begins.
    prev_key: Option<String>,
}

impl Chunker {
    /// A chunker over `source`.
    pub fn new(source: Box<dyn Source>, limits: Chunking) -> Chunker {
        let prev_key = source.key();
        Chunker {
            source,
            limits,
            held: None,
            prev_key,
        }
    }

    /// The next chunk, or `None` when the source is exhausted.
    ///
    /// # Errors
    /// The source's read error.
    pub fn next_chunk(&mut self) -> Result<Option<RawChunk>, SourceError> {
        let mut items: Vec<Item> = Vec::with_capacity(self.limits.items.min(4096));
        let mut bad = Vec::new();
        let mut bytes = 0u64;
        let mut position = None;
        let mut last_key = None;
        let mut first_key = None;
        loop {
            let read = match self.held.take() {
                Some(r) => r,
                None => match self.source.next()? {
                    Some(r) => r,
                    None => break,
                },
            };
            let key = read.key;
            match read.record {
                Record::Bad { reason, .. } => {
                    last_key.clone_from(&key);
                    bad.push(bad_data(read.start, key, self.source.cursor(), reason));
                    // An input of bad records only is cut too, so that they are recorded and
                    // counted against the skip limit as they are read, not held by the million.
                    if bad.len() >= MAX_BAD_PER_CHUNK {
                        break;
                    }
                }
                Record::Item(item) => {
                    if let Some(reason) = self.limits.too_large(&item) {
                        last_key.clone_from(&key);
                        bad.push(bad_data(read.start, key, self.source.cursor(), reason));
                        continue;
                    }
                    let size = item.data.len() as u64;
                    if !items.is_empty() && bytes + size > self.limits.max_bytes {
                        self.held = Some(Read {
                            record: Record::Item(item),
                            start: read.start,
                            key,
                        });
                        break;
                    }
                    if position.is_none() {
                        first_key.clone_from(&key);
                    }
                    last_key = key;
                    position.get_or_insert(read.start);
                    bytes += size;
                    items.push(item);
                    if items.len() >= self.limits.items {
                        break;
                    }
                }
            }
        }
        let end = match &self.held {
            Some(r) => Cursor {
                offset: r.start.offset,
                lines: r.start.line.saturating_sub(1),
            },
            None => self.source.cursor(),
        };
        if items.is_empty() && bad.is_empty() {
            return Ok(None);
        }
        let keys = last_key.map(|last| Keys::Range {
            after: self.prev_key.replace(last.clone()),
            first: first_key.unwrap_or_else(|| last.clone()),
            last,
        });
        Ok(Some(RawChunk {
            position: position.unwrap_or(Position {
                line: end.lines,
                offset: end.offset,
            }),
            end,
            items,
            encoded: None,
            bad,
            retry: None,
            keys,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileSource;
    use hopper_common::FileFormat;
    use std::io::Write;

    fn chunker(text: &str, items: usize, max_bytes: u64) -> (tempfile::NamedTempFile, Chunker) {
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(text.as_bytes()).expect("write");
        let s = FileSource::open_at(
            f.path(),
            FileFormat::Jsonl,
            crate::source::Cursor::default(),
        )
        .expect("open");
        (f, Chunker::new(Box::new(s), Chunking { items, max_bytes }))
    }

    fn all(c: &mut Chunker) -> Vec<RawChunk> {
        std::iter::from_fn(|| c.next_chunk().expect("chunk")).collect()
    }

    #[test]
    fn cuts_by_count_and_chains_positions() {
        let (_f, mut c) = chunker("1\n2\n3\n4\n5\n", 2, 1000);
        let chunks = all(&mut c);
        let sizes: Vec<usize> = chunks.iter().map(|c| c.items.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        assert_eq!(chunks[1].position, Position { line: 3, offset: 4 });
        assert_eq!(
            chunks[0].end,
            Cursor {
                offset: 4,
                lines: 2
            }
        );
        assert_eq!(
            chunks[2].end,
            Cursor {
                offset: 10,
                lines: 5
            }
        );
    }

    #[test]
    fn cuts_by_bytes_and_holds_the_item_that_did_not_fit() {
        let (_f, mut c) = chunker("111\n222\n333\n", 10, 7);
        let chunks = all(&mut c);
        let sizes: Vec<usize> = chunks.iter().map(|c| c.items.len()).collect();
        assert_eq!(sizes, vec![2, 1]);
        assert_eq!(
            chunks[0].end,
            Cursor {
                offset: 8,
                lines: 2
            }
        );
        assert_eq!(chunks[1].position, Position { line: 3, offset: 8 });
    }

    #[test]
    fn oversized_items_and_bad_lines_are_bad_data() {
        let (_f, mut c) = chunker("1\n123456789\n{x\n2\n", 10, 5);
        let chunks = all(&mut c);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].items.len(), 2);
        let lines: Vec<u64> = chunks[0].bad.iter().map(|b| b.position.line).collect();
        assert_eq!(lines, vec![2, 3]);
        // Each bad record keeps where it starts and ends, for `retry` to seek to.
        let spans: Vec<(u64, u64, u64)> = chunks[0]
            .bad
            .iter()
            .map(|b| (b.position.offset, b.end_offset, b.end_line))
            .collect();
        assert_eq!(spans, vec![(2, 12, 2), (12, 15, 3)]);
    }

    /// An input of bad records only is cut into chunks of at most a thousand of them, so that
    /// they are counted against the skip limit as they are read.
    #[test]
    fn bad_records_alone_are_cut_too() {
        let text = "{x\n".repeat(2_500);
        let (_f, mut c) = chunker(&text, 10, 100);
        let chunks = all(&mut c);
        let bad: Vec<usize> = chunks.iter().map(|c| c.bad.len()).collect();
        assert_eq!(bad, vec![1000, 1000, 500]);
        assert!(chunks.iter().all(|c| c.items.is_empty()));
        assert_eq!(chunks[1].bad[0].position.line, 1001);
    }

    #[test]
    fn trailing_bad_lines_make_an_empty_chunk() {
        let (_f, mut c) = chunker("1\n{x\n", 1, 100);
        let chunks = all(&mut c);
        assert_eq!(chunks.len(), 2);
        assert!(chunks[1].items.is_empty());
        assert_eq!(chunks[1].bad.len(), 1);
    }
}
