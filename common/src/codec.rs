//! MessagePack encoding of [`Chunk`]s and [`Reply`]s, inside a versioned envelope.
//!
//! The envelope is a two-element array `[v, body]`; `v` is [`SCHEMA_VERSION`]. The version is
//! read first, without touching the body, and a message of another version is refused with
//! [`CodecError::SchemaVersion`], so a consumer of an older release dead-letters a newer chunk
//! instead of misreading it.
//!
//! Structs are encoded compactly (as arrays, not maps with field names): a chunk carries
//! thousands of items, and repeating field names in each would add about 8% to every byte the
//! broker stores and every consumer decodes. Evolution goes through the version instead.

use serde::{de::DeserializeOwned, Serialize};

use crate::message::{Chunk, Reply};

/// The version of the message schema this build writes and reads. Version 2 added the
/// `Processing` note to [`crate::Outcome`]; version 3 the key of a chunk of a query
/// ([`Chunk::key`], [`crate::BadItem::key`]).
pub const SCHEMA_VERSION: u16 = 3;

/// The content type of every Hopper message.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// A message that cannot be read. Such a message is poison: it goes to the dead queue.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not MessagePack, or not the shape of the expected message.
    #[error("undecodable {what}: {source}")]
    Decode {
        /// "chunk" or "reply".
        what: &'static str,
        /// The decoder's error.
        source: rmp_serde::decode::Error,
    },
    /// Written by a release with another message schema.
    #[error("{what} has schema version {found}, this build reads version {expected}")]
    SchemaVersion {
        /// "chunk" or "reply".
        what: &'static str,
        /// The version in the message.
        found: u16,
        /// [`SCHEMA_VERSION`].
        expected: u16,
    },
    /// The message could not be encoded (a bug, not bad input).
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// "chunk" or "reply".
        what: &'static str,
        /// The encoder's error.
        source: rmp_serde::encode::Error,
    },
}

fn encode<T: Serialize>(
    what: &'static str,
    body: &T,
    capacity: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(capacity);
    (SCHEMA_VERSION, body)
        .serialize(&mut rmp_serde::Serializer::new(&mut buf))
        .map_err(|source| CodecError::Encode { what, source })?;
    Ok(buf)
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let not_envelope = |detail: String| CodecError::Decode {
        what,
        source: rmp_serde::decode::Error::Syntax(format!("not a Hopper envelope: {detail}")),
    };
    let mut rest = bytes;
    match rmp::decode::read_array_len(&mut rest) {
        Ok(2) => {}
        Ok(n) => return Err(not_envelope(format!("an array of {n}, not 2"))),
        Err(e) => return Err(not_envelope(e.to_string())),
    }
    let v: u16 = rmp::decode::read_int(&mut rest).map_err(|e| not_envelope(e.to_string()))?;
    if v != SCHEMA_VERSION {
        return Err(CodecError::SchemaVersion {
            what,
            found: v,
            expected: SCHEMA_VERSION,
        });
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(rest);
    let body = T::deserialize(&mut de).map_err(|source| CodecError::Decode { what, source })?;
    Ok(body)
}

/// The most MessagePack adds to one item's data: an array header, its line (a u64) and a
/// string header.
const ITEM_FRAMING: u64 = 16;

/// The most the rest of a chunk takes: the envelope, the job's name (at most 100 bytes), run,
/// seq, attempt, position and the items' array header.
const CHUNK_FRAMING: u64 = 1024;

/// The largest encoded chunk of a job: its item data (at most `chunking.max_bytes`, for a first
/// reading and for `retry` alike), the framing of up to `chunking.items` items, and the rest.
/// The job file is refused when this passes the broker's message limit; a message on a chunk
/// queue larger than this was not sent by the job's dispatcher, and consumers park it unread.
pub fn chunk_size_bound(chunking: &crate::job::Chunking) -> u64 {
    chunking
        .max_bytes
        .saturating_add((chunking.items as u64).saturating_mul(ITEM_FRAMING))
        .saturating_add(CHUNK_FRAMING)
}

/// Encodes a chunk.
///
/// # Errors
/// Only on a serializer bug.
pub fn encode_chunk(chunk: &Chunk) -> Result<Vec<u8>, CodecError> {
    // Sized up front: growing a buffer of a few hundred KiB by doubling copies it again and again.
    let capacity =
        64 + chunk.job.len() + chunk.items.iter().map(|i| i.data.len() + 16).sum::<usize>();
    encode("chunk", chunk, capacity)
}

/// A chunk's items encoded on their own, ahead of the rest of the chunk: the dispatcher's reader
/// thread encodes (and frees) the items it read, and the dispatch loop, once it knows the
/// chunk's seq, only writes the few fields before them ([`encode_chunk_head`]). The bytes are
/// those [`encode_chunk`] writes for the same items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedItems {
    count: usize,
    bytes: Vec<u8>,
}

impl EncodedItems {
    /// Encodes `items`.
    ///
    /// # Errors
    /// Only on a serializer bug.
    pub fn encode(items: &[crate::message::Item]) -> Result<EncodedItems, CodecError> {
        let capacity = 8 + items.iter().map(|i| i.data.len() + 16).sum::<usize>();
        let mut bytes = Vec::with_capacity(capacity);
        items
            .serialize(&mut rmp_serde::Serializer::new(&mut bytes))
            .map_err(|source| CodecError::Encode {
                what: "chunk",
                source,
            })?;
        Ok(EncodedItems {
            count: items.len(),
            bytes,
        })
    }

    /// How many items.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Everything of a [`Chunk`] but its items, for [`encode_chunk_head`].
#[derive(Debug, Clone, Copy)]
pub struct ChunkHead<'a> {
    /// [`Chunk::job`].
    pub job: &'a str,
    /// [`Chunk::run`].
    pub run: u64,
    /// [`Chunk::seq`].
    pub seq: u64,
    /// [`Chunk::attempt`].
    pub attempt: u32,
    /// [`Chunk::position`].
    pub position: crate::message::Position,
    /// [`Chunk::key`].
    pub key: &'a [String],
}

/// Encodes a chunk whose items were encoded already: the same bytes as [`encode_chunk`] of the
/// whole chunk.
///
/// # Errors
/// Only on a serializer bug.
pub fn encode_chunk_head(head: ChunkHead<'_>, items: &EncodedItems) -> Result<Vec<u8>, CodecError> {
    let err = |source| CodecError::Encode {
        what: "chunk",
        source,
    };
    let mut buf = Vec::with_capacity(64 + head.job.len() + items.bytes.len());
    // The envelope `[v, body]`, the body a chunk's seven fields in order, as serde writes them
    // (arrays this short have a one-byte header).
    buf.push(rmp::Marker::FixArray(2).to_u8());
    {
        let mut ser = rmp_serde::Serializer::new(&mut buf);
        SCHEMA_VERSION.serialize(&mut ser).map_err(err)?;
    }
    buf.push(rmp::Marker::FixArray(7).to_u8());
    {
        let mut ser = rmp_serde::Serializer::new(&mut buf);
        head.job.serialize(&mut ser).map_err(err)?;
        head.run.serialize(&mut ser).map_err(err)?;
        head.seq.serialize(&mut ser).map_err(err)?;
        head.attempt.serialize(&mut ser).map_err(err)?;
        head.position.serialize(&mut ser).map_err(err)?;
        head.key.serialize(&mut ser).map_err(err)?;
    }
    buf.extend_from_slice(&items.bytes);
    Ok(buf)
}

/// Decodes a chunk, refusing other schema versions.
///
/// # Errors
/// [`CodecError::Decode`] or [`CodecError::SchemaVersion`]: dead-letter the message.
pub fn decode_chunk(bytes: &[u8]) -> Result<Chunk, CodecError> {
    decode("chunk", bytes)
}

/// Encodes a reply.
///
/// # Errors
/// Only on a serializer bug.
pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, CodecError> {
    encode("reply", reply, 256)
}

/// Decodes a reply, refusing other schema versions.
///
/// # Errors
/// [`CodecError::Decode`] or [`CodecError::SchemaVersion`]: drop the message.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, CodecError> {
    decode("reply", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{BadItem, Item, Outcome, Position};

    fn chunk() -> Chunk {
        Chunk {
            job: "j".into(),
            run: 7,
            seq: 3,
            attempt: 2,
            position: Position {
                line: 2001,
                offset: 400_123,
            },
            key: Vec::new(),
            items: vec![
                Item {
                    line: 2001,
                    data: r#"{"id":1,"name":"é"}"#.into(),
                },
                Item {
                    line: 2003,
                    data: "\"plain\"".into(),
                },
            ],
        }
    }

    #[test]
    fn a_chunk_of_encoded_items_is_the_chunk_encoded_whole() {
        let mut c = chunk();
        for (key, items) in [(vec![], c.items.clone()), (vec!["id".to_string()], vec![])] {
            c.key = key;
            c.items = items;
            let encoded = EncodedItems::encode(&c.items).expect("items");
            assert_eq!(encoded.len(), c.items.len());
            let head = ChunkHead {
                job: &c.job,
                run: c.run,
                seq: c.seq,
                attempt: c.attempt,
                position: c.position,
                key: &c.key,
            };
            assert_eq!(
                encode_chunk_head(head, &encoded).expect("head"),
                encode_chunk(&c).expect("whole")
            );
        }
    }

    #[test]
    fn chunk_round_trips() {
        let c = chunk();
        let bytes = encode_chunk(&c).expect("encode");
        assert_eq!(decode_chunk(&bytes).expect("decode"), c);
        assert_eq!(c.message_id(), "7/3/2");
    }

    #[test]
    fn reply_round_trips_every_outcome() {
        for outcome in [
            Outcome::Done {
                processed: 9,
                bad_items: vec![BadItem {
                    line: 4,
                    reason: "no price".into(),
                    key: None,
                }],
            },
            Outcome::Retrying {
                error: "exit 1".into(),
                next_attempt: 2,
            },
            Outcome::Dead { error: "x".into() },
            Outcome::Failed { error: "y".into() },
        ] {
            let r = Reply {
                job: "j".into(),
                run: 1,
                seq: 2,
                attempt: 1,
                consumer: "h/1".into(),
                outcome,
            };
            assert_eq!(
                decode_reply(&encode_reply(&r).expect("encode")).expect("decode"),
                r
            );
        }
    }

    #[test]
    fn another_schema_version_is_refused_clearly() {
        let bytes = rmp_serde::to_vec(&(SCHEMA_VERSION + 1, &chunk())).expect("encode");
        let err = decode_chunk(&bytes).expect_err("refused");
        assert!(matches!(
            err,
            CodecError::SchemaVersion {
                found: 4,
                expected: 3,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "chunk has schema version 4, this build reads version 3"
        );
    }

    #[test]
    fn garbage_and_a_reply_in_place_of_a_chunk_are_undecodable() {
        assert!(matches!(
            decode_chunk(b"not msgpack"),
            Err(CodecError::Decode { .. })
        ));
        let reply = Reply {
            job: "j".into(),
            run: 1,
            seq: 1,
            attempt: 1,
            consumer: "c".into(),
            outcome: Outcome::Dead { error: "e".into() },
        };
        let bytes = encode_reply(&reply).expect("encode");
        assert!(matches!(
            decode_chunk(&bytes),
            Err(CodecError::Decode { .. })
        ));
    }

    mod head {
        //! [`encode_chunk_head`] writes what [`encode_chunk`] writes, for any sizes and values.
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn encoded_items_and_head_are_the_whole_chunk(
                job in "[a-z_]{1,100}",
                run in any::<u64>(),
                seq in any::<u64>(),
                attempt in any::<u32>(),
                line in any::<u64>(),
                offset in any::<u64>(),
                key in proptest::collection::vec("[a-z]{0,40}", 0..3),
                items in proptest::collection::vec((any::<u64>(), ".{0,300}"), 0..40),
            ) {
                let chunk = Chunk {
                    job,
                    run,
                    seq,
                    attempt,
                    position: Position { line, offset },
                    key,
                    items: items.into_iter().map(|(line, data)| Item { line, data }).collect(),
                };
                let head = ChunkHead {
                    job: &chunk.job,
                    run,
                    seq,
                    attempt,
                    position: chunk.position,
                    key: &chunk.key,
                };
                let items = EncodedItems::encode(&chunk.items).expect("items");
                prop_assert_eq!(
                    encode_chunk_head(head, &items).expect("head"),
                    encode_chunk(&chunk).expect("whole")
                );
            }
        }
    }

    mod hostile {
        //! Hostile bytes on a queue: random ones, and valid messages mutated (bytes flipped,
        //! cut short, lengths inflated). Decoding never panics and never allocates what a
        //! length prefix claims before the bytes are there: it returns a message or a
        //! classified error.
        use super::*;
        use proptest::prelude::*;

        /// `bytes` with `edits` applied: (position, new byte), positions wrapped to its length.
        fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
            for &(at, b) in edits {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
            }
            bytes.truncate(bytes.len().saturating_sub(cut));
            bytes
        }

        fn classified(e: &CodecError) -> bool {
            matches!(
                e,
                CodecError::Decode { .. } | CodecError::SchemaVersion { .. }
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn random_bytes_are_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Err(e) = decode_chunk(&bytes) {
                    prop_assert!(classified(&e));
                }
                if let Err(e) = decode_reply(&bytes) {
                    prop_assert!(classified(&e));
                }
            }

            #[test]
            fn mutated_chunks_decode_or_are_refused(
                edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                cut in 0usize..8,
            ) {
                let bytes = mutate(encode_chunk(&chunk()).expect("encode"), &edits, cut);
                match decode_chunk(&bytes) {
                    // Whatever decodes is a chunk that encodes again.
                    Ok(c) => prop_assert!(encode_chunk(&c).is_ok()),
                    Err(e) => prop_assert!(classified(&e)),
                }
            }

            #[test]
            fn mutated_replies_decode_or_are_refused(
                edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                cut in 0usize..8,
            ) {
                let reply = Reply {
                    job: "j".into(),
                    run: 1,
                    seq: 2,
                    attempt: 1,
                    consumer: "h/1".into(),
                    outcome: Outcome::Done {
                        processed: 9,
                        bad_items: vec![BadItem { line: 4, reason: "no price".into(), key: Some("7".into()) }],
                    },
                };
                let bytes = mutate(encode_reply(&reply).expect("encode"), &edits, cut);
                if let Err(e) = decode_reply(&bytes) {
                    prop_assert!(classified(&e));
                }
            }
        }

        /// A length prefix claiming 4 GiB in a few bytes is refused at once, without trying
        /// to allocate it.
        #[test]
        fn an_inflated_length_is_refused_without_allocating_it() {
            let mut bytes = Vec::new();
            rmp::encode::write_array_len(&mut bytes, 2).expect("envelope");
            rmp::encode::write_uint(&mut bytes, u64::from(SCHEMA_VERSION)).expect("version");
            rmp::encode::write_array_len(&mut bytes, u32::MAX).expect("a huge array");
            rmp::encode::write_str_len(&mut bytes, u32::MAX).expect("a huge string");
            bytes.extend_from_slice(b"abc");
            assert!(matches!(
                decode_chunk(&bytes),
                Err(CodecError::Decode { .. })
            ));
            assert!(matches!(
                decode_reply(&bytes),
                Err(CodecError::Decode { .. })
            ));
        }
    }
}
