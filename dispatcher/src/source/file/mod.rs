//! The file source: JSON Lines, CSV and plain lines, read as a stream with exact positions.
//!
//! - `jsonl`: each non-blank line is one JSON value, validated but kept as text.
//! - `csv`: the header row names the fields; each record becomes a JSON object of strings.
//!   Quoted fields may hold commas, quotes and newlines; a record's line is the line it starts on.
//! - `lines`: each non-empty line is one item, a JSON string of the line byte for byte, but for
//!   its line ending (`\n` or `\r\n`).
//!
//! Blank lines (empty ones; for `jsonl`, whitespace only) are not records. A UTF-8 byte order
//! mark at the start of the file is skipped. A line that is not valid UTF-8 or not valid JSON, and a CSV
//! record with the wrong number of fields, is bad data: reported with its line, not fatal.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hopper_common::{FileFormat, Item, Position};
use serde::de::IgnoredAny;

use super::{Cursor, Read, Record, Source, SourceError};
use delimited::CsvRecords;

mod delimited;

/// A file read as a stream of records.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    format: FileFormat,
    len: u64,
    /// A line longer than this is bad data, skipped without being kept (see
    /// [`FileSource::with_max_record`]).
    max_line: usize,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Lines {
        reader: BufReader<File>,
        buf: Vec<u8>,
        cursor: Cursor,
    },
    Csv(CsvRecords),
}

/// How far a source reads ahead of the record it returns, when reading a whole input.
const READ_AHEAD: usize = 256 * 1024;

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `line` without its `\n` or `\r\n`.
fn without_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Room over the largest record for the blanks around it on its line.
const LINE_SLACK: u64 = 1024;

/// Reads one line into `buf`, keeping at most `max` bytes of it: the rest is consumed and
/// dropped. Returns the bytes consumed (the line's length, its newline included) and whether the
/// line was longer than `max`.
fn read_line_capped(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<(usize, bool)> {
    let (mut consumed, mut over) = (0usize, false);
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok((consumed, over));
        }
        let (take, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !over {
            if buf.len() + take > max {
                over = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&available[..take]);
            }
        }
        reader.consume(take);
        consumed += take;
        if done {
            return Ok((consumed, over));
        }
    }
}

impl FileSource {
    /// Opens `path` in `format` positioned at `at`, as a checkpoint or a chunk's position gives
    /// it: the next record read is the one starting there. A CSV file's header row is read first.
    ///
    /// # Errors
    /// [`SourceError::Open`] when the file cannot be opened or positioned.
    pub fn open_at(path: &Path, format: FileFormat, at: Cursor) -> Result<FileSource, SourceError> {
        FileSource::open_span(path, format, at, READ_AHEAD as u64)
    }

    /// Like [`FileSource::open_at`], to read about `span` bytes from there (a chunk or a record
    /// read again): the read-ahead is sized to it, so that reading a 200-byte record does not
    /// read 256 KiB.
    ///
    /// # Errors
    /// [`SourceError::Open`] when the file cannot be opened or positioned.
    pub fn open_span(
        path: &Path,
        format: FileFormat,
        at: Cursor,
        span: u64,
    ) -> Result<FileSource, SourceError> {
        let buffer = usize::try_from(span.clamp(8 * 1024, READ_AHEAD as u64)).unwrap_or(READ_AHEAD);
        let open_err = |source| SourceError::Open {
            path: path.display().to_string(),
            source,
        };
        // Looked at before it is opened: opening a FIFO with no writer blocks, and a stream
        // cannot be read again at a recorded offset, which resume and retry need.
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if meta.is_dir() {
            return Err(open_err(std::io::Error::other("it is a directory")));
        }
        if !meta.is_file() {
            return Err(open_err(std::io::Error::other(
                "it is not a regular file (a FIFO, a device or a socket): `run --resume` and \
                 `retry` read records again at their byte offsets, so the input must be a file",
            )));
        }
        let mut file = File::open(path).map_err(open_err)?;
        if at.offset > meta.len() {
            return Err(open_err(std::io::Error::other(format!(
                "it has {} bytes, the run's position is byte {}: was it replaced?",
                meta.len(),
                at.offset
            ))));
        }
        let inner = match format {
            FileFormat::Jsonl | FileFormat::Lines => {
                file.seek(SeekFrom::Start(at.offset)).map_err(open_err)?;
                Inner::Lines {
                    reader: BufReader::with_capacity(buffer, file),
                    buf: Vec::with_capacity(1024),
                    cursor: at,
                }
            }
            FileFormat::Csv => Inner::Csv(
                CsvRecords::open(file, meta.len(), buffer, at)
                    .map_err(|why| open_err(std::io::Error::other(why)))?,
            ),
        };
        Ok(FileSource {
            path: path.to_path_buf(),
            format,
            len: meta.len(),
            max_line: usize::MAX,
            inner,
        })
    }

    /// A line (`jsonl`, `lines`) longer than `max` bytes, with a little room for the blanks
    /// around a record, is bad data: the reader skips to its end without holding it, so a
    /// hostile input (a 5 GB one-line JSON array) costs no memory.
    pub fn with_max_record(mut self, max: u64) -> FileSource {
        let max = max.saturating_add(LINE_SLACK);
        self.max_line = usize::try_from(max).unwrap_or(usize::MAX);
        self.inner = match self.inner {
            Inner::Csv(records) => Inner::Csv(records.with_max_record(max)),
            lines @ Inner::Lines { .. } => lines,
        };
        self
    }

    fn read_err(&self, offset: u64, message: String) -> SourceError {
        SourceError::Read {
            path: self.path.display().to_string(),
            offset,
            message,
        }
    }
}

/// Turns one line of a line-based format into a record.
fn line_record(format: FileFormat, line: u64, bytes: &[u8]) -> Record {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return Record::Bad {
                line,
                reason: format!("not valid UTF-8: {e}"),
            }
        }
    };
    match format {
        FileFormat::Jsonl => match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Record::Item(Item {
                line,
                data: text.to_string(),
            }),
            Err(e) => Record::Bad {
                line,
                reason: format!("not valid JSON: {e}"),
            },
        },
        // Serializing a &str cannot fail.
        _ => Record::Item(Item {
            line,
            data: serde_json::to_string(text).unwrap_or_default(),
        }),
    }
}

/// The record of the line `bytes` (its line ending included) that starts at `start`, or `None`
/// for a blank line.
fn line_read(format: FileFormat, start: Cursor, bytes: &[u8]) -> Option<Read> {
    let line = start.lines + 1;
    let mut bytes = bytes;
    if start.offset == 0 {
        // A UTF-8 byte order mark is no part of the first record.
        bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    }
    let bytes = match format {
        // JSON ignores the blanks around a value.
        FileFormat::Jsonl => bytes.trim_ascii(),
        // A line is kept byte for byte, but for its line ending.
        FileFormat::Lines | FileFormat::Csv => without_line_ending(bytes),
    };
    if bytes.is_empty() {
        return None;
    }
    Some(Read {
        record: line_record(format, line, bytes),
        start: Position {
            line,
            offset: start.offset,
        },
        key: None,
    })
}

impl Source for FileSource {
    fn next(&mut self) -> Result<Option<Read>, SourceError> {
        let format = self.format;
        match &mut self.inner {
            Inner::Lines {
                reader,
                buf,
                cursor,
            } => loop {
                let start = *cursor;
                // The common case: the whole line is in the read-ahead, and is looked at where it
                // lies instead of being copied out first.
                let available = match reader.fill_buf() {
                    Ok(available) => available,
                    Err(e) => {
                        let offset = cursor.offset;
                        return Err(self.read_err(offset, e.to_string()));
                    }
                };
                if let Some(n) = memchr::memchr(b'\n', available).map(|i| i + 1) {
                    if n <= self.max_line {
                        let read = line_read(format, start, &available[..n]);
                        reader.consume(n);
                        cursor.offset += n as u64;
                        cursor.lines += 1;
                        match read {
                            Some(read) => return Ok(Some(read)),
                            None => continue,
                        }
                    }
                }
                buf.clear();
                let (n, over) = match read_line_capped(reader, buf, self.max_line) {
                    Ok(read) => read,
                    Err(e) => {
                        let offset = cursor.offset;
                        return Err(self.read_err(offset, e.to_string()));
                    }
                };
                if n == 0 {
                    return Ok(None);
                }
                cursor.offset += n as u64;
                cursor.lines += 1;
                if over {
                    let line = cursor.lines;
                    return Ok(Some(Read {
                        record: Record::Bad {
                            line,
                            reason: format!(
                                "a line of {n} bytes, longer than chunking.max_bytes allows: \
                                 skipped unread"
                            ),
                        },
                        start: Position {
                            line,
                            offset: start.offset,
                        },
                        key: None,
                    }));
                }
                if let Some(read) = line_read(format, start, buf) {
                    return Ok(Some(read));
                }
            },
            Inner::Csv(records) => records.next().map_err(|message| {
                let offset = records.offset();
                SourceError::Read {
                    path: self.path.display().to_string(),
                    offset,
                    message,
                }
            }),
        }
    }

    fn cursor(&self) -> Cursor {
        match &self.inner {
            Inner::Lines { cursor, .. } => *cursor,
            Inner::Csv(records) => records.cursor(),
        }
    }

    fn size_bytes(&self) -> Option<u64> {
        Some(self.len)
    }

    fn describe(&self) -> String {
        format!("file {} ({})", self.path.display(), self.format)
    }
}

#[cfg(test)]
mod tests;
