//! The outstanding set: chunks published and not yet finally answered, which the throttle's
//! window counts, and the confirm of every publish, kept until it resolves.
//!
//! A chunk keeps its encoded bytes until the broker confirms it, so that a nack, a returned
//! (unroutable) message or a lost connection publishes it again from those bytes; once
//! confirmed, the broker holds it durably and only its position is kept.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use hopper_common::{Label, TransportError};

use crate::context::ChunkRecord;

/// A chunk published and not yet finally answered.
pub(super) struct Outstanding {
    /// Where it is in the source, to read it again if it must be published again.
    pub(super) record: ChunkRecord,
    /// Since when it has been waiting for its final reply (reset by a retry).
    pub(super) since: Instant,
    /// When it was first published (or taken over by this process): what its time to a final
    /// outcome counts from.
    pub(super) published: Instant,
    /// Kept until the broker confirms, to publish again on a nack.
    pub(super) message: Option<(Arc<Vec<u8>>, Label)>,
    /// Times the broker refused it so far.
    pub(super) refusals: u32,
}

/// A publish's confirm, with the chunk it is about.
pub(super) type ConfirmFuture = BoxFuture<'static, (u64, Result<(), TransportError>)>;

impl Outstanding {
    /// A chunk about to be published from `message`.
    pub(super) fn publishing(record: ChunkRecord, message: Option<(Arc<Vec<u8>>, Label)>) -> Self {
        Outstanding {
            record,
            since: Instant::now(),
            published: Instant::now(),
            message,
            refusals: 0,
        }
    }

    /// True once the broker confirmed it: it no longer needs its bytes.
    pub(super) fn confirmed(&self) -> bool {
        self.message.is_none()
    }
}
