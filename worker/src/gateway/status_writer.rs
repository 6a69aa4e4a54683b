//! Group commit for delivery status webhooks.
//!
//! Every message sent produces three or more status webhooks (sent, delivered, read), each a
//! small UPDATE that would otherwise be its own transaction with its own WAL flush. Handlers
//! hand their updates to one writer task, which applies whatever has queued up while the
//! previous batch ran in a single statement (`queue::outbound::apply_statuses`) and answers
//! each handler after the commit. Nothing waits for a batch to fill: a lone webhook is applied
//! at once, and batches only form when webhooks arrive faster than one statement takes. A
//! handler still answers 200 only after its update is durable.

use queue::outbound::{self, StatusUpdate};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// Most updates applied in one statement.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<bool, String>>;

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::Sender<(StatusUpdate, Reply)>,
}

impl StatusWriter {
    /// Start the writer on `pool`. It stops when every handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(pool, rx));
        Self { tx }
    }

    /// Apply one update durably; true when it moved its row forward.
    pub async fn apply(&self, update: StatusUpdate) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((update, reply))
            .await
            .map_err(|_| "the status writer stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the status writer dropped the update".to_string())?
    }
}

async fn run(pool: PgPool, mut rx: mpsc::Receiver<(StatusUpdate, Reply)>) {
    let mut batch: Vec<(StatusUpdate, Reply)> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Handlers that gave up (their deadline passed) still get their update applied: a
        // redelivery of it is harmless, as states only move forward.
        let updates: Vec<StatusUpdate> = batch.iter().map(|(u, _)| u.clone()).collect();
        let result = outbound::apply_statuses(&pool, &updates).await;
        match result {
            Ok(moved) => {
                for ((_, reply), moved) in batch.drain(..).zip(moved) {
                    let _ = reply.send(Ok(moved));
                }
            }
            Err(error) => {
                let message = queue::rescuer::error_chain(&error);
                tracing::warn!(error = %message, updates = updates.len(), "could not apply delivery statuses");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}
