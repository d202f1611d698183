//! The file source: JSON Lines, CSV and lines, with their positions and bad records.

use super::*;
use std::io::Write;

fn source(format: FileFormat, text: &[u8]) -> (tempfile::NamedTempFile, FileSource) {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text).expect("write");
    let s = FileSource::open_at(f.path(), format, Cursor::default()).expect("open");
    (f, s)
}

fn all(s: &mut FileSource) -> Vec<Read> {
    std::iter::from_fn(|| s.next().expect("read")).collect()
}

#[test]
fn jsonl_keeps_lines_offsets_and_reports_bad_lines() {
    let (_f, mut s) = source(FileFormat::Jsonl, b"{\"id\":1}\n\n{oops\n{\"id\":3}\r\n");
    let reads = all(&mut s);
    assert_eq!(reads.len(), 3);
    assert_eq!(
        reads[0],
        Read {
            record: Record::Item(Item {
                line: 1,
                data: "{\"id\":1}".into()
            }),
            start: Position { line: 1, offset: 0 },
            key: None,
        }
    );
    assert!(matches!(&reads[1].record, Record::Bad { line: 3, reason } if reason.contains("JSON")));
    assert_eq!(
        reads[1].start,
        Position {
            line: 3,
            offset: 10
        }
    );
    assert_eq!(
        reads[2].start,
        Position {
            line: 4,
            offset: 16
        }
    );
    assert_eq!(
        s.cursor(),
        Cursor {
            offset: 26,
            lines: 4
        }
    );
}

#[test]
fn lines_become_json_strings() {
    let (_f, mut s) = source(FileFormat::Lines, b"a \"quoted\" line\nlast");
    let reads = all(&mut s);
    assert_eq!(
        reads[0].record,
        Record::Item(Item {
            line: 1,
            data: r#""a \"quoted\" line""#.into()
        })
    );
    assert_eq!(
        reads[1].start,
        Position {
            line: 2,
            offset: 16
        }
    );
}

#[test]
fn invalid_utf8_is_bad_data() {
    let (_f, mut s) = source(FileFormat::Lines, b"ok\n\xff\xfe\n");
    let reads = all(&mut s);
    assert!(matches!(&reads[1].record, Record::Bad { line: 2, .. }));
}

#[test]
fn csv_uses_headers_quotes_and_reports_short_rows() {
    let text = b"id,name\n1,\"a, \"\"b\"\"\"\n2,\"multi\nline\"\n3\n4,d\n";
    let (_f, mut s) = source(FileFormat::Csv, text);
    let reads = all(&mut s);
    assert_eq!(reads.len(), 4);
    assert_eq!(
        reads[0].record,
        Record::Item(Item {
            line: 2,
            data: r#"{"id":"1","name":"a, \"b\""}"#.into()
        })
    );
    assert_eq!(reads[0].start.offset, 8);
    assert_eq!(reads[1].start.line, 3);
    assert!(
        matches!(&reads[2].record, Record::Bad { line: 5, reason } if reason.contains("1 fields"))
    );
    assert_eq!(reads[3].start.line, 6);
}

#[test]
fn opened_at_a_cursor_it_reads_on_from_there() {
    for (format, text) in [
        (
            FileFormat::Jsonl,
            &b"{\"id\":1}\n{\"id\":2}\n{\"id\":3}\n"[..],
        ),
        (FileFormat::Csv, &b"id,name\n1,a\n2,\"b\nb\"\n3,c\n"[..]),
    ] {
        let (f, mut s) = source(format, text);
        let first = s.next().expect("read").expect("a record");
        let at = s.cursor();
        let rest: Vec<Read> = all(&mut s);
        let mut again = FileSource::open_at(f.path(), format, at).expect("open at");
        assert_eq!(all(&mut again), rest, "{format}");
        assert_ne!(rest[0], first);
    }
}

#[test]
fn a_position_past_the_end_is_refused() {
    let (f, _) = source(FileFormat::Jsonl, b"{}\n");
    let at = Cursor {
        offset: 99,
        lines: 9,
    };
    assert!(FileSource::open_at(f.path(), FileFormat::Jsonl, at).is_err());
}

#[test]
fn a_missing_file_cannot_be_opened() {
    let err = FileSource::open_at(
        Path::new("/nonexistent/x.jsonl"),
        FileFormat::Jsonl,
        Cursor::default(),
    )
    .expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/x.jsonl"));
}

/// Regression (the protocol issue, finding 6): a line of any length was read whole. A line
/// longer than the job's largest record is bad data, skipped to its end without being kept, and
/// the lines after it keep their numbers and offsets.
#[test]
fn a_line_longer_than_a_record_may_be_is_skipped_unread() {
    let long = format!("[{}]", "1,".repeat(50_000) + "1");
    let text = format!("{{\"id\":1}}\n{long}\n{{\"id\":3}}\n");
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
    let mut s = FileSource::open_at(f.path(), FileFormat::Jsonl, Cursor::default())
        .expect("open")
        .with_max_record(1_000);
    let reads = all(&mut s);
    assert_eq!(reads.len(), 3);
    match &reads[1].record {
        Record::Bad { line, reason } => {
            assert_eq!(*line, 2);
            assert!(
                reason.contains("longer than chunking.max_bytes"),
                "{reason}"
            );
        }
        other => panic!("expected bad data, got {other:?}"),
    }
    assert_eq!(reads[2].start.line, 3);
    assert_eq!(reads[2].start.offset, 9 + long.len() as u64 + 1);
    assert_eq!(s.cursor().offset, text.len() as u64);
}

/// Regression (the edge-cases issue, 7): `lines` trimmed its lines and kept a byte order mark in
/// the first item; `jsonl` refused a first line behind a byte order mark.
#[test]
fn a_byte_order_mark_is_skipped_and_lines_are_kept_byte_for_byte() {
    let (_f, mut s) = source(FileFormat::Lines, b"\xEF\xBB\xBF\tindented \r\n\nlast\n");
    let data: Vec<String> = all(&mut s)
        .into_iter()
        .map(|r| match r.record {
            Record::Item(i) => i.data,
            Record::Bad { reason, .. } => panic!("bad: {reason}"),
        })
        .collect();
    assert_eq!(
        data,
        vec![r#""\tindented ""#.to_string(), r#""last""#.into()]
    );
    let (_f, mut s) = source(FileFormat::Jsonl, b"\xEF\xBB\xBF{\"id\":1}\n");
    let reads = all(&mut s);
    assert_eq!(
        reads[0].record,
        Record::Item(Item {
            line: 1,
            data: "{\"id\":1}".into()
        })
    );
}

fn lines_of(reads: &[Read]) -> Vec<u64> {
    reads.iter().map(|r| r.start.line).collect()
}

#[test]
fn csv_lines_are_counted_as_the_reader_splits_records() {
    // The same rows with `\r`, `\r\n` and `\n` endings, a quoted field spanning two lines, and a
    // short row (bad data) on line 5.
    for ending in ["\r", "\r\n", "\n"] {
        let text = ["id,name", "1,a", "2,\"b", "b\"", "3", "4,d", ""].join(ending);
        let (f, mut s) = source(FileFormat::Csv, text.as_bytes());
        let reads = all(&mut s);
        assert_eq!(lines_of(&reads), vec![2, 3, 5, 6], "{ending:?}");
        assert!(
            matches!(&reads[2].record, Record::Bad { line: 5, .. }),
            "{ending:?}"
        );
        // Opened again where a record starts, the count goes on from there.
        let at = Cursor {
            offset: reads[2].start.offset,
            lines: 4,
        };
        let mut again = FileSource::open_at(f.path(), FileFormat::Csv, at).expect("open at");
        assert_eq!(lines_of(&all(&mut again)), vec![5, 6], "{ending:?}");
        assert_eq!(s.cursor().lines, 6, "{ending:?}");
    }
}

#[test]
fn csv_opened_between_a_cr_and_its_lf_does_not_count_the_line_twice() {
    let text = b"id,name\r\n1,a\r\n2,b\r\n";
    let f = {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text).expect("write");
        f
    };
    // Byte 13 is the `\n` of line 2's `\r\n`.
    let at = Cursor {
        offset: 13,
        lines: 2,
    };
    let mut s = FileSource::open_at(f.path(), FileFormat::Csv, at).expect("open at");
    assert_eq!(lines_of(&all(&mut s)), vec![3]);
}

#[test]
fn csv_quote_left_open_is_bad_data_where_its_record_starts() {
    let text = b"id,name\n1,a\n2,\"b\n3,c\n4,d\n";
    let (_f, mut s) = source(FileFormat::Csv, text);
    let reads = all(&mut s);
    assert_eq!(lines_of(&reads), vec![2, 3]);
    match &reads[1].record {
        Record::Bad { line: 3, reason } => {
            assert!(
                reason.contains("never closed") && reason.contains("lines 3 to 5"),
                "{reason}"
            )
        }
        other => panic!("expected bad data at line 3, got {other:?}"),
    }
    // A quote closed later in the file is no problem.
    let (_f, mut s) = source(FileFormat::Csv, b"id,name\n1,\"a\nstill a\"\n2,b");
    assert!(all(&mut s)
        .iter()
        .all(|r| matches!(r.record, Record::Item(_))));
}

#[test]
fn csv_record_longer_than_max_bytes_is_bad_data_at_its_first_line() {
    let mut text = b"id,name\n1,a\n2,\"".to_vec();
    text.extend(std::iter::repeat_n(b'x', 3000));
    text.extend(b"\"\n3,c\n");
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(&text).expect("write");
    let mut s = FileSource::open_at(f.path(), FileFormat::Csv, Cursor::default())
        .expect("open")
        .with_max_record(1000);
    let reads = all(&mut s);
    assert_eq!(lines_of(&reads), vec![2, 3, 4]);
    assert!(
        matches!(&reads[1].record, Record::Bad { line: 3, reason } if reason.contains("quote left open")),
        "{:?}",
        reads[1]
    );
    assert!(matches!(reads[2].record, Record::Item(_)));
}

#[test]
fn csv_header_with_a_quote_left_open_is_refused() {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(b"id,\"name\n1,a\n2,b\n").expect("write");
    match FileSource::open_at(f.path(), FileFormat::Csv, Cursor::default()) {
        Err(SourceError::Open { source, .. }) => {
            assert!(source.to_string().contains("never closed"), "{source}")
        }
        other => panic!("expected the header to be refused, got {other:?}"),
    }
}

mod hostile {
    //! Hostile input files: random bytes (invalid UTF-8, stray quotes, lone carriage returns,
    //! NULs) read as JSON Lines, CSV and lines. Reading never panics and never stops with an
    //! error: every record is an item or bad data with its line, lines only go forward, and
    //! every item is valid for its format. (A CSV header row that names no fields is refused
    //! at open, as designed.)
    use super::*;
    use proptest::prelude::*;

    fn check(format: FileFormat, bytes: &[u8]) -> Result<(), TestCaseError> {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        let mut s = match FileSource::open_at(f.path(), format, Cursor::default()) {
            Ok(s) => s,
            // A CSV file whose header row cannot name the fields is refused whole (exit 2).
            Err(SourceError::Open { .. }) if format == FileFormat::Csv => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{format:?}: {e}"))),
        };
        // At most one line per line ending (a CSV file may end its lines with `\r` alone).
        let newlines = bytes.iter().filter(|&&b| b == b'\n' || b == b'\r').count() as u64 + 1;
        let mut last = 0u64;
        loop {
            let read = match s.next() {
                Ok(Some(read)) => read,
                Ok(None) => return Ok(()),
                Err(e) => return Err(TestCaseError::fail(format!("{format:?}: {e}"))),
            };
            prop_assert!(read.start.line >= last && read.start.line <= newlines);
            prop_assert!(read.start.offset <= bytes.len() as u64);
            last = read.start.line;
            match read.record {
                Record::Item(item) => {
                    if format == FileFormat::Jsonl {
                        prop_assert!(serde_json::from_str::<IgnoredAny>(&item.data).is_ok());
                    }
                }
                Record::Bad { line, reason } => {
                    prop_assert!(line >= 1 && !reason.is_empty());
                }
            }
        }
    }

    fn noisy() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                4 => any::<u8>(),
                2 => Just(b'\n'),
                1 => Just(b'\r'),
                1 => Just(b'"'),
                1 => Just(b','),
                1 => Just(b'{'),
                1 => Just(b'}'),
            ],
            0..600,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_bytes_read_as_items_or_bad_data(bytes in noisy()) {
            for format in [FileFormat::Jsonl, FileFormat::Csv, FileFormat::Lines] {
                check(format, &bytes)?;
            }
        }
    }
}

/// Lines looked at inside the read-ahead and lines that cross its end (copied out first) are read
/// alike: with an 8 KiB read-ahead and lines of 1 to 700 bytes, every record, blank line, byte
/// order mark, CR LF and position comes out as with one line at a time.
#[test]
fn lines_across_the_read_ahead_read_as_lines_within_it() {
    let mut text = Vec::from(BOM);
    let mut expected = Vec::new();
    let (mut offset, mut line) = (0u64, 0u64);
    for i in 0..400u64 {
        let value = format!(
            "{{\"i\":{i},\"pad\":\"{}\"}}",
            "x".repeat((i * 37 % 680) as usize)
        );
        let ending = if i % 3 == 0 { "\r\n" } else { "\n" };
        let blank = if i % 7 == 0 { " \t\n" } else { "" };
        let start = offset;
        let record = format!("{value}{ending}{blank}");
        text.extend_from_slice(record.as_bytes());
        if i == 0 {
            offset += BOM.len() as u64;
        }
        offset += record.len() as u64;
        line += 1;
        expected.push((line, if i == 0 { 0 } else { start }, value));
        if !blank.is_empty() {
            line += 1;
        }
    }
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(&text).expect("write");
    let mut s = FileSource::open_span(f.path(), FileFormat::Jsonl, Cursor::default(), 8 * 1024)
        .expect("open");
    let reads = all(&mut s);
    let got: Vec<(u64, u64, String)> = reads
        .iter()
        .map(|r| match &r.record {
            Record::Item(item) => (r.start.line, r.start.offset, item.data.clone()),
            Record::Bad { reason, .. } => panic!("bad record: {reason}"),
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        s.cursor(),
        Cursor {
            offset: text.len() as u64,
            lines: line
        }
    );
}
