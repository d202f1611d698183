//! MessagePack encoding of [`Chunk`]s and [`Reply`]s, inside a versioned envelope.
//!
//! The envelope is a map `{v, body}`; `v` is [`SCHEMA_VERSION`]. A message of another version is
//! refused with [`CodecError::SchemaVersion`] before its body is looked at, so a consumer of an
//! older release dead-letters a newer chunk instead of misreading it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::message::{Chunk, Reply};

/// The version of the message schema this build writes and reads.
pub const SCHEMA_VERSION: u16 = 1;

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

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u16,
    body: &'a T,
}

#[derive(Deserialize)]
struct Version {
    v: u16,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    body: T,
}

fn encode<T: Serialize>(what: &'static str, body: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(&EnvelopeOut {
        v: SCHEMA_VERSION,
        body,
    })
    .map_err(|source| CodecError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let Version { v } =
        rmp_serde::from_slice(bytes).map_err(|source| CodecError::Decode { what, source })?;
    if v != SCHEMA_VERSION {
        return Err(CodecError::SchemaVersion {
            what,
            found: v,
            expected: SCHEMA_VERSION,
        });
    }
    let env: EnvelopeIn<T> =
        rmp_serde::from_slice(bytes).map_err(|source| CodecError::Decode { what, source })?;
    Ok(env.body)
}

/// Encodes a chunk.
///
/// # Errors
/// Only on a serializer bug.
pub fn encode_chunk(chunk: &Chunk) -> Result<Vec<u8>, CodecError> {
    encode("chunk", chunk)
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
    encode("reply", reply)
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
        let bytes = rmp_serde::to_vec_named(&EnvelopeOut {
            v: SCHEMA_VERSION + 1,
            body: &chunk(),
        })
        .expect("encode");
        let err = decode_chunk(&bytes).expect_err("refused");
        assert!(matches!(
            err,
            CodecError::SchemaVersion {
                found: 2,
                expected: 1,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "chunk has schema version 2, this build reads version 1"
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
}
