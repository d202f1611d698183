//! Planning and reading a retry over a fixed input.

use hopper_common::job::{Chunking, SourceSpec};
use hopper_common::{FileFormat, Position};

use super::plan::Plan;
use super::reader::RetryReader;
use crate::chunker::{Chunks, RawChunk};
use crate::context::{FailedChunk, FailureClass, OpenFailure, Retried, Retryable};
use crate::source::SourceError;

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
            end_line: 6,
            keys: None,
        }],
        failures: vec![
            OpenFailure {
                id: 10,
                seq: None,
                line: 3,
                class: FailureClass::BadData,
                span: Some((at(3), offsets[3], 3)),
                key: None,
            },
            OpenFailure {
                id: 11,
                seq: Some(3),
                line: 8,
                class: FailureClass::BadItem,
                span: None,
                key: None,
            },
        ],
        hosts: vec![FailedChunk {
            seq: 3,
            position: at(7),
            end_offset: size_before,
            end_line: 9,
            keys: None,
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
            key: None,
        }],
        ..Retryable::default()
    };
    let err = RetryReader::new(&spec(&path), LIMITS, &Plan::new(&failed))
        .check(14)
        .expect_err("moved");
    assert!(matches!(err, SourceError::Moved { .. }), "{err}");
}

/// Regression (the protocol issue, finding 3): a retry read a failed stretch as one chunk
/// however large the fixes made it, past `max_bytes` and the broker's message limit. It now goes
/// out in pieces within the job's chunking, and takes over its failure with the last one.
#[test]
fn a_stretch_larger_than_a_chunk_goes_out_in_pieces_taking_over_with_the_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.jsonl");
    let text: String = (1..=5).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    std::fs::write(&path, &text).expect("write");
    let failed = Retryable {
        chunks: vec![FailedChunk {
            seq: 1,
            position: Position { line: 1, offset: 0 },
            end_offset: text.len() as u64,
            end_line: 5,
            keys: None,
        }],
        ..Retryable::default()
    };
    let limits = Chunking {
        items: 10,
        max_bytes: 17,
    };
    let plan = Plan::new(&failed);
    let mut reader = RetryReader::new(&spec(&path), limits, &plan);
    let chunks: Vec<RawChunk> =
        std::iter::from_fn(|| reader.next_chunk().expect("chunk")).collect();
    assert_eq!(lines(&chunks), vec![vec![1, 2], vec![3, 4], vec![5]]);
    let takeovers: Vec<Vec<Retried>> = chunks
        .iter()
        .map(|c| c.retry.clone().unwrap_or_default().retried)
        .collect();
    assert_eq!(takeovers, vec![vec![], vec![], vec![Retried::Chunk(1)]]);
    // Each piece is a contiguous range that can be read again by its position.
    for c in &chunks {
        let range = &text[c.position.offset as usize..c.end.offset as usize];
        assert_eq!(range.lines().count(), c.items.len(), "{range:?}");
    }
}
