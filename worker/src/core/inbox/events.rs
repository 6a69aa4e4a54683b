//! Live updates for the team inbox: Postgres `NOTIFY team_events` fanned out to the inbox's
//! Server-Sent Events streams.
//!
//! Whatever changes a conversation a human may be looking at notifies: a handoff, a customer
//! message in a conversation the agent no longer answers, a human action. One listening
//! connection per core process feeds every open inbox page through a broadcast channel, so a
//! hundred open pages cost one connection and no polling. Events only say *which* conversation
//! changed; pages fetch what they show, so a missed event (listener reconnecting, a slow page
//! lagging behind) is repaired by a `resync` event that makes them fetch everything again.

use backon::Retryable;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::broadcast;

/// The NOTIFY channel.
pub const CHANNEL: &str = "team_events";

/// What changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TeamEvent {
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<i64>,
    /// `handoff`, `message` (customer), `reply` (human), `claim`, `assign`, `resume`, `close`,
    /// or `resync` (fetch everything: events may have been missed).
    pub kind: String,
}

impl TeamEvent {
    pub fn new(pool: &str, conversation_id: i64, kind: &str) -> Self {
        Self {
            pool: pool.to_string(),
            conversation_id: Some(conversation_id),
            kind: kind.to_string(),
        }
    }

    pub fn payload(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Notify inside the caller's transaction: delivered to listeners when it commits, never if it
/// rolls back. For rare events (handoffs, human actions); hot paths use the coalescing
/// `queue::notifier::Publisher` after commit instead.
pub async fn notify(conn: &mut PgConnection, event: &TeamEvent) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(event.payload())
        .execute(conn)
        .await?;
    Ok(())
}

/// The fan-out of one core process.
#[derive(Clone)]
pub struct TeamEvents {
    tx: broadcast::Sender<TeamEvent>,
    _listener: std::sync::Arc<AbortOnDrop>,
}

/// Stops the listener (and closes its connection) when the last handle goes.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TeamEvents {
    /// Start listening; the connection is re-established in the background after errors.
    pub fn start(db: PgPool) -> Self {
        let (tx, _) = broadcast::channel(1024);
        let task = tokio::spawn(listen_forever(db, tx.clone()));
        Self {
            tx,
            _listener: std::sync::Arc::new(AbortOnDrop(task.abort_handle())),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TeamEvent> {
        self.tx.subscribe()
    }
}

fn resync_all(tx: &broadcast::Sender<TeamEvent>) {
    let _ = tx.send(TeamEvent {
        pool: String::new(),
        conversation_id: None,
        kind: "resync".into(),
    });
}

async fn listen_forever(db: PgPool, tx: broadcast::Sender<TeamEvent>) {
    let _ = (|| listen(&db, &tx))
        .retry(queue::notifier::reconnect_backoff())
        .notify(|error, _| {
            tracing::warn!(%error, "team event listener failed; reconnecting");
        })
        .await;
}

async fn listen(db: &PgPool, tx: &broadcast::Sender<TeamEvent>) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen(CHANNEL).await?;
    // Whatever was notified before LISTEN took effect is gone: pages fetch everything again.
    resync_all(tx);
    loop {
        let n = listener.recv().await?;
        match serde_json::from_str::<TeamEvent>(n.payload()) {
            Ok(event) => {
                let _ = tx.send(event);
            }
            Err(error) => tracing::debug!(%error, "ignoring a malformed team event"),
        }
    }
}
