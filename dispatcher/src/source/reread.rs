//! Reading a recorded chunk again from its position, to publish it again (a resumed run's
//! unconfirmed chunks, a stuck chunk): the records between its start and its end offset, less
//! what was bad data when it was first read.

use hopper_common::job::{Chunking, SourceSpec};
use hopper_common::Item;

use super::{open_span, Cursor, Read, Record, SourceError};
use crate::context::ChunkRecord;

/// The items of a recorded chunk, read again from its position: the records between its start
/// and its end offset, less what was bad data when it was first read.
pub(crate) fn reread(
    spec: &SourceSpec,
    limits: Chunking,
    chunk: &ChunkRecord,
) -> Result<Vec<Item>, SourceError> {
    let at = Cursor {
        offset: chunk.position.offset,
        lines: chunk.position.line.saturating_sub(1),
    };
    let span = chunk.end_offset.saturating_sub(chunk.position.offset);
    let mut source = open_span(spec, at, span, limits.max_bytes)?;
    let mut items = Vec::with_capacity(chunk.items as usize);
    while let Some(Read { record, start }) = source.next()? {
        if start.offset >= chunk.end_offset {
            break;
        }
        match record {
            Record::Item(item) if limits.too_large(&item).is_none() => items.push(item),
            Record::Item(_) | Record::Bad { .. } => {}
        }
    }
    if items.len() as u64 != chunk.items {
        return Err(SourceError::Changed {
            seq: chunk.seq,
            line: chunk.position.line,
            expected: chunk.items,
            found: items.len() as u64,
        });
    }
    Ok(items)
}
