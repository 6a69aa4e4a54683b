//! Wake-ups over LISTEN/NOTIFY, with polling as the fallback.
//!
//! One connection listens on four channels: [`JOBS_CHANNEL`] (payload: queue name),
//! [`OUTBOUND_CHANNEL`] and [`MEDIA_CHANNEL`] (payload: account id), [`TEMPLATES_CHANNEL`]
//! (payload: WhatsApp Business Account id). Subscribers get a [`tokio::sync::Notify`] per
//! topic. A notification only shortens the wait: claim loops also poll, so a lost notification
//! (listener reconnecting) costs at most one poll interval. On reconnect every subscriber is
//! woken, since notifications sent meanwhile are gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

/// Channel for new or promoted jobs.
pub const JOBS_CHANNEL: &str = "queue_jobs";
/// Channel for new outbound messages.
pub const OUTBOUND_CHANNEL: &str = "queue_outbound";
/// Channel for media a customer sent, to fetch.
pub const MEDIA_CHANNEL: &str = "queue_media";
/// Channel for a template listing asked for (payload: WhatsApp Business Account id).
pub const TEMPLATES_CHANNEL: &str = "queue_templates";

type Topics = Arc<Mutex<HashMap<(String, String), Arc<Notify>>>>;

/// Hands out wake-up handles fed by one listening connection.
#[derive(Clone)]
pub struct Notifier {
    topics: Topics,
    _task: Arc<AbortOnDrop>,
}

impl Notifier {
    /// Start listening. The connection is re-established in the background after errors.
    pub fn start(pool: PgPool) -> Self {
        let topics: Topics = Arc::default();
        let task = tokio::spawn(listen_forever(pool, topics.clone()));
        Self {
            topics,
            _task: Arc::new(AbortOnDrop(task.abort_handle())),
        }
    }

    /// Wake-ups for new jobs of `queue`.
    pub fn jobs(&self, queue: &str) -> Arc<Notify> {
        self.topic(JOBS_CHANNEL, queue)
    }

    /// Wake-ups for new outbound messages of `account`.
    pub fn outbound(&self, account: &str) -> Arc<Notify> {
        self.topic(OUTBOUND_CHANNEL, account)
    }

    /// Wake-ups for new media of `account` to fetch.
    pub fn media(&self, account: &str) -> Arc<Notify> {
        self.topic(MEDIA_CHANNEL, account)
    }

    /// Wake-ups when a listing of `waba_id`'s templates is asked for.
    pub fn templates(&self, waba_id: &str) -> Arc<Notify> {
        self.topic(TEMPLATES_CHANNEL, waba_id)
    }

    fn topic(&self, channel: &str, key: &str) -> Arc<Notify> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics
            .entry((channel.to_string(), key.to_string()))
            .or_default()
            .clone()
    }
}

/// How a listening connection is re-established: quickly at first, then every 5 s at most,
/// forever (a listener that gives up would leave its subscribers polling for good).
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter()
}

async fn listen_forever(pool: PgPool, topics: Topics) {
    let _ = (|| listen(&pool, &topics))
        .retry(reconnect_backoff())
        .notify(|error, _| {
            tracing::warn!(%error, "notification listener failed; reconnecting");
            // Notifications may have been missed: let everyone poll once.
            wake_all(&topics);
        })
        .await;
}

async fn listen(pool: &PgPool, topics: &Topics) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([
            JOBS_CHANNEL,
            OUTBOUND_CHANNEL,
            MEDIA_CHANNEL,
            TEMPLATES_CHANNEL,
        ])
        .await?;
    // Anything sent before LISTEN took effect was missed: let everyone poll once.
    wake_all(topics);
    loop {
        let n = listener.recv().await?;
        let key = (n.channel().to_string(), n.payload().to_string());
        let notify = topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(notify) = notify {
            notify.notify_one();
        }
    }
}

fn wake_all(topics: &Topics) {
    for notify in topics.lock().unwrap_or_else(|e| e.into_inner()).values() {
        notify.notify_one();
    }
}

/// Aborts the listener task when the last [`Notifier`] clone is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends notifications outside the callers' transactions, coalesced.
///
/// `NOTIFY` inside a transaction takes a global lock that is held through commit, so every
/// notifying transaction commits (and fsyncs) one after the other. Hot paths (webhook ingest)
/// therefore commit without notifying and hand the wake-up to this publisher, which sends all
/// distinct notifications queued meanwhile in one statement. A notification lost to a crash
/// between commit and publish costs one poll interval, never a job.
#[derive(Clone)]
pub struct Publisher {
    tx: tokio::sync::mpsc::UnboundedSender<(&'static str, String)>,
}

impl Publisher {
    pub fn start(pool: PgPool) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, String)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = std::collections::BTreeSet::from([first]);
                while let Ok(next) = rx.try_recv() {
                    batch.insert(next);
                }
                let (channels, payloads): (Vec<&str>, Vec<String>) = batch.into_iter().unzip();
                if let Err(error) = sqlx::query(
                    "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                )
                .bind(&channels)
                .bind(&payloads)
                .execute(&pool)
                .await
                {
                    tracing::debug!(%error, "publishing notifications failed; workers will poll");
                }
            }
        });
        Self { tx }
    }

    /// Wake the workers of `queue` (after the enqueueing transaction committed).
    pub fn jobs(&self, queue: &str) {
        let _ = self.tx.send((JOBS_CHANNEL, queue.to_string()));
    }

    /// Wake the sender of `account`.
    pub fn outbound(&self, account: &str) {
        let _ = self.tx.send((OUTBOUND_CHANNEL, account.to_string()));
    }

    /// Wake the media fetcher of `account`.
    pub fn media(&self, account: &str) {
        let _ = self.tx.send((MEDIA_CHANNEL, account.to_string()));
    }

    /// Any other notification (after the transaction it reports on committed).
    pub fn publish(&self, channel: &'static str, payload: String) {
        let _ = self.tx.send((channel, payload));
    }
}
