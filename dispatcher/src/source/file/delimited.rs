//! CSV records, with the line each starts on counted the way the reader splits records.
//!
//! The `csv` crate ends a record at `\n`, `\r\n` or a lone `\r`, but counts lines by `\n` only:
//! in a file with old Mac line endings (`\r`) every record would be on line 1, and `retry`
//! would find no record where the run said it was. So lines are counted here, by [`Counted`],
//! as the bytes pass to the reader: each `\n`, `\r\n` and lone `\r` ends one.
//!
//! A quote left open swallows the rest of the file into one field. It is bad data at the line
//! where the record starts (never a silent merge of the rows after it): the last record is
//! checked when it runs to the end of the file, a record of any size when it is longer than
//! `max_bytes` allows; a header row that does so is refused.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use hopper_common::{Item, Position};

use super::super::{Cursor, Read, Record};

/// A file read by the CSV reader, noting where each line break ends as the bytes pass.
#[derive(Debug)]
pub(super) struct Counted {
    file: File,
    /// Offset of the next byte the reader gets.
    offset: u64,
    /// Line breaks before the first one in `ends`.
    before: u64,
    /// Offsets just past each line break seen and not yet forgotten, in order.
    ends: VecDeque<u64>,
    /// The last byte passed was `\r`: a `\n` next belongs to it.
    after_cr: bool,
}

impl Counted {
    fn new(file: File) -> Counted {
        Counted {
            file,
            offset: 0,
            before: 0,
            ends: VecDeque::new(),
            after_cr: false,
        }
    }

    /// The line a record starting at `offset` is on (from 1). `offset` must not lie before
    /// what [`Counted::forget_before`] forgot.
    fn line_at(&self, offset: u64) -> u64 {
        self.before + self.ends.partition_point(|&end| end <= offset) as u64 + 1
    }

    /// Forgets the breaks before `offset`: records are read in order, so no earlier line is
    /// asked for again.
    fn forget_before(&mut self, offset: u64) {
        while self.ends.front().is_some_and(|&end| end <= offset) {
            self.ends.pop_front();
            self.before += 1;
        }
    }

    /// Counting starts again at `offset`, with `lines` lines before it.
    fn restart(&mut self, offset: u64, lines: u64) -> std::io::Result<()> {
        let mut prev = [0u8; 1];
        self.after_cr = offset > 0 && {
            self.file.read_exact_at(&mut prev, offset - 1)?;
            prev[0] == b'\r'
        };
        self.offset = offset;
        self.before = lines;
        self.ends.clear();
        Ok(())
    }
}

impl std::io::Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        for i in memchr::memchr2_iter(b'\n', b'\r', &buf[..n]) {
            let after_cr = if i == 0 {
                self.after_cr
            } else {
                buf[i - 1] == b'\r'
            };
            // A `\n` after a `\r` ends the line the `\r` already ended.
            if buf[i] == b'\r' || !after_cr {
                self.ends.push_back(self.offset + i as u64 + 1);
            }
        }
        if n > 0 {
            self.after_cr = buf[n - 1] == b'\r';
        }
        self.offset += n as u64;
        Ok(n)
    }
}

impl Seek for Counted {
    /// Only the reader's own seek (to a recorded position) lands here; [`Counted::restart`]
    /// then sets the line count.
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let at = self.file.seek(pos)?;
        self.offset = at;
        self.ends.clear();
        Ok(at)
    }
}

/// True when a record's text from `from` to `to` ends inside a quoted field: a quote opened at
/// the start of a field and never closed (the `csv` crate's rules: `""` inside quotes is a
/// quote; a quote elsewhere in a field is a plain character).
fn ends_in_quotes(file: &File, from: u64, to: u64) -> std::io::Result<bool> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        FieldStart,
        Unquoted,
        Quoted,
        QuoteInQuoted,
    }
    let mut state = State::FieldStart;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let want = usize::try_from(to - at)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            state = match (state, b) {
                (State::FieldStart, b'"') => State::Quoted,
                (State::FieldStart | State::Unquoted, b',' | b'\n' | b'\r') => State::FieldStart,
                (State::FieldStart | State::Unquoted, _) => State::Unquoted,
                (State::Quoted, b'"') => State::QuoteInQuoted,
                (State::Quoted, _) => State::Quoted,
                (State::QuoteInQuoted, b'"') => State::Quoted,
                (State::QuoteInQuoted, b',' | b'\n' | b'\r') => State::FieldStart,
                (State::QuoteInQuoted, _) => State::Unquoted,
            };
        }
        at += n as u64;
    }
    Ok(state == State::Quoted)
}

/// A CSV file read record by record: each becomes a JSON object of strings named by the header.
#[derive(Debug)]
pub(super) struct CsvRecords {
    reader: Box<csv::Reader<Counted>>,
    headers: Vec<String>,
    record: csv::StringRecord,
    /// Another handle on the file, to look at a record's text again (an open quote?).
    raw: File,
    len: u64,
    /// A record longer than this (bytes, line endings included) is bad data.
    max_record: u64,
}

impl CsvRecords {
    /// Reads the header row of `file` (`len` bytes), refusing one that would lose fields, then
    /// goes to `at`. The error says what is wrong, for [`super::SourceError::Open`].
    pub(super) fn open(
        file: File,
        len: u64,
        buffer: usize,
        at: Cursor,
    ) -> Result<CsvRecords, String> {
        let raw = file.try_clone().map_err(|e| e.to_string())?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .buffer_capacity(buffer)
            .from_reader(Counted::new(file));
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| format!("CSV header row: {e}"))?
            .iter()
            .map(str::to_string)
            .collect();
        let header_end = reader.position().byte();
        if header_end >= len && ends_in_quotes(&raw, 0, len).map_err(|e| e.to_string())? {
            return Err(
                "CSV header row: a quoted name is never closed, so the header runs \
                        to the end of the file; close the quote"
                    .into(),
            );
        }
        // Each field becomes a key of the item: a name used twice, or none, would merge or
        // drop fields.
        if let Some(why) = header_problem(&headers) {
            return Err(format!("CSV header row: {why}"));
        }
        if at.offset > 0 {
            let mut pos = csv::Position::new();
            pos.set_byte(at.offset).set_line(at.lines + 1);
            reader.seek(pos).map_err(|e| e.to_string())?;
            reader
                .get_mut()
                .restart(at.offset, at.lines)
                .map_err(|e| e.to_string())?;
        }
        Ok(CsvRecords {
            reader: Box::new(reader),
            headers,
            record: csv::StringRecord::new(),
            raw,
            len,
            max_record: u64::MAX,
        })
    }

    /// A record longer than `max` bytes is bad data.
    pub(super) fn with_max_record(mut self, max: u64) -> CsvRecords {
        self.max_record = max;
        self
    }

    /// Where a record starting at byte `offset` starts, with its line.
    fn start(&mut self, offset: u64) -> Position {
        let counted = self.reader.get_mut();
        counted.forget_before(offset);
        Position {
            line: counted.line_at(offset),
            offset,
        }
    }

    fn bad(start: Position, reason: String) -> Read {
        Read {
            record: Record::Bad {
                line: start.line,
                reason,
            },
            start,
            key: None,
        }
    }

    /// The next record; an error that stops reading is the parser's message.
    pub(super) fn next(&mut self) -> Result<Option<Read>, String> {
        loop {
            let result = self.reader.read_record(&mut self.record);
            let pos = self.record.position().cloned();
            match result {
                Ok(false) => return Ok(None),
                Ok(true) => {
                    let Some(pos) = pos else { continue };
                    let start = self.start(pos.byte());
                    let end = self.reader.position().byte();
                    if end >= self.len
                        && ends_in_quotes(&self.raw, start.offset, end)
                            .map_err(|e| e.to_string())?
                    {
                        let last = self.reader.get_ref().line_at(end.saturating_sub(1));
                        return Ok(Some(CsvRecords::bad(
                            start,
                            format!(
                                "a quoted field opened in this record is never closed: lines \
                                 {} to {last} (the end of the file) were read as one field",
                                start.line
                            ),
                        )));
                    }
                    if end - start.offset > self.max_record {
                        let last = self.reader.get_ref().line_at(end.saturating_sub(1));
                        return Ok(Some(CsvRecords::bad(
                            start,
                            format!(
                                "a record of {} bytes (lines {} to {last}), longer than \
                                 chunking.max_bytes allows; is a quote left open?",
                                end - start.offset,
                                start.line
                            ),
                        )));
                    }
                    if self.record.iter().all(str::is_empty) {
                        continue;
                    }
                    let object: serde_json::Map<String, serde_json::Value> = self
                        .headers
                        .iter()
                        .zip(self.record.iter())
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_string())))
                        .collect();
                    return Ok(Some(Read {
                        record: Record::Item(Item {
                            line: start.line,
                            data: serde_json::Value::Object(object).to_string(),
                        }),
                        start,
                        key: None,
                    }));
                }
                Err(e) => {
                    let at = e.position().cloned();
                    match e.into_kind() {
                        csv::ErrorKind::UnequalLengths {
                            pos,
                            expected_len,
                            len,
                        } => {
                            let offset = pos.or(at).map_or(0, |p| p.byte());
                            let start = self.start(offset);
                            return Ok(Some(CsvRecords::bad(
                                start,
                                format!(
                                    "CSV record has {len} fields, the header has {expected_len}"
                                ),
                            )));
                        }
                        csv::ErrorKind::Utf8 { pos, err } => {
                            let offset = pos.or(at).map_or(0, |p| p.byte());
                            let start = self.start(offset);
                            return Ok(Some(CsvRecords::bad(
                                start,
                                format!("not valid UTF-8: {err}"),
                            )));
                        }
                        other => return Err(format!("{other:?}")),
                    }
                }
            }
        }
    }

    /// Where the next record starts.
    pub(super) fn cursor(&self) -> Cursor {
        let offset = self.reader.position().byte();
        Cursor {
            offset,
            lines: self.reader.get_ref().line_at(offset) - 1,
        }
    }

    /// Where reading stands, for an error.
    pub(super) fn offset(&self) -> u64 {
        self.reader.position().byte()
    }
}

/// What is wrong with a CSV header row, if anything: an empty name, or a name used twice
/// (columns counted from 1).
fn header_problem(headers: &[String]) -> Option<String> {
    if let Some(i) = headers.iter().position(|h| h.trim().is_empty()) {
        return Some(format!(
            "column {} has no name; every column needs one (it names the field)",
            i + 1
        ));
    }
    for (i, h) in headers.iter().enumerate() {
        if let Some(j) = headers[..i].iter().position(|earlier| earlier == h) {
            return Some(format!(
                "columns {} and {} are both named {h:?}; one would hide the other",
                j + 1,
                i + 1
            ));
        }
    }
    None
}
