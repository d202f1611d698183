//! Reading a recorded chunk again from its position, to publish it again (a resumed run's
//! unconfirmed chunks, a stuck chunk): the records between its start and its end offset, less
//! what was bad data when it was first read; for a query, the rows of its range of keys.

use hopper_common::job::{Chunking, SourceSpec};
use hopper_common::Item;

use super::{open_keyed, open_span, Bounds, Cursor, Read, Record, SourceError};
use crate::context::{ChunkRecord, Keys};

/// The items of a recorded chunk, read again from its position: the records between its start
/// and its end offset, less what was bad data when it was first read.
pub(crate) fn reread(
    spec: &SourceSpec,
    limits: Chunking,
    chunk: &ChunkRecord,
) -> Result<Vec<Item>, SourceError> {
    if let Some(keys) = &chunk.keys {
        return reread_keys(spec, limits, chunk, keys);
    }
    let at = Cursor {
        offset: chunk.position.offset,
        lines: chunk.position.line.saturating_sub(1),
    };
    let span = chunk.end_offset.saturating_sub(chunk.position.offset);
    let mut source = open_span(spec, at, span, limits.max_bytes)?;
    let mut items = Vec::with_capacity(chunk.items as usize);
    while let Some(Read { record, start, .. }) = source.next()? {
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

/// The rows of a recorded chunk of a query, read again by its keys, as they are now. A row
/// changed or deleted since is read as it is now: the chunk may have been applied already
/// (its processor then knows it by its run and seq), or another writer changed the rows.
fn reread_keys(
    spec: &SourceSpec,
    limits: Chunking,
    chunk: &ChunkRecord,
    keys: &Keys,
) -> Result<Vec<Item>, SourceError> {
    let bounds = match keys {
        Keys::Range { after, last, .. } => Bounds::Range {
            after: after.clone(),
            last: last.clone(),
        },
        Keys::Rows(rows) => Bounds::Rows(rows.iter().cloned().collect()),
    };
    let mut source = open_keyed(spec, bounds, chunk.position.line.saturating_sub(1))?;
    let mut items = Vec::with_capacity(chunk.items as usize);
    while let Some(Read { record, .. }) = source.next()? {
        match record {
            Record::Item(item) if limits.too_large(&item).is_none() => items.push(item),
            Record::Item(_) | Record::Bad { .. } => {}
        }
    }
    if items.len() as u64 != chunk.items {
        tracing::warn!(
            seq = chunk.seq,
            recorded = chunk.items,
            now = items.len(),
            "the rows of a chunk read again changed since it was first read"
        );
    }
    Ok(items)
}
