//! Group commit for delivery status webhooks.
//!
//! Every message sent produces three or more status webhooks (sent, delivered, read), each a
//! small UPDATE that would otherwise be its own transaction with its own WAL flush. Handlers
//! hand their updates to one writer ([`crate::group_commit`]), which applies whatever queued
//! while the previous batch ran in a single statement (`queue::outbound::apply_statuses`). A
//! handler still answers 200 only after its update is durable; redelivering an update is
//! harmless, as states only move forward.

use queue::outbound::{self, StatusUpdate};
use sqlx::PgPool;

use crate::group_commit::GroupCommit;

/// Most updates applied in one statement.
const MAX_BATCH: usize = 256;

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct StatusWriter {
    writer: GroupCommit<StatusUpdate, bool>,
}

impl StatusWriter {
    /// Start the writer on `pool`. It stops when every handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let writer = GroupCommit::start(MAX_BATCH, move |updates: Vec<StatusUpdate>| {
            let pool = pool.clone();
            async move {
                outbound::apply_statuses(&pool, &updates)
                    .await
                    .map_err(|error| {
                        let message = queue::rescuer::error_chain(&error);
                        tracing::warn!(error = %message, updates = updates.len(), "could not apply delivery statuses");
                        message
                    })
            }
        });
        Self { writer }
    }

    /// Statements the writer has run so far (each applies a batch of updates).
    pub fn batches(&self) -> u64 {
        self.writer.batches()
    }

    /// Apply one update durably; true when it moved its row forward.
    pub async fn apply(&self, update: StatusUpdate) -> Result<bool, String> {
        self.writer.submit(update).await
    }
}
