//! Egress: the Lease holder claims the account's outbound messages under its fencing epoch and
//! hands them to a [`Delivery`] (the Cloud API, or a WhatsApp Web socket), paced per number and
//! per recipient.
//!
//! - Nothing is claimed or sent unless [`Leadership::may_act`] gives an epoch; it is checked
//!   again right before each HTTP request.
//! - Messages are claimed in batches (one per conversation, oldest first) and sent concurrently;
//!   the next batch is claimed when the batch is done, so a conversation's replies leave in order.
//! - Each send is recognisable later (Cloud API: `biz_opaque_callback_data = ob:<row id>`;
//!   WhatsApp Web: a message id stored on the row before the send): statuses settle rows whose
//!   send outcome is unknown (a timeout, or a holder that died mid-send), and only rows still
//!   unsettled after the in-doubt grace are sent again.
//! - On shutdown the loop finishes the batch in flight and returns; the caller then releases
//!   the Lease.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use queue::outbound::{self, ClaimedOutbound, SendFailState};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cloud_api::{CloudApi, SendError};
use super::lease::Leadership;
use super::webhook::callback_data;
use crate::group_commit::GroupCommit;
use crate::metrics::{Metrics, Outcome};

/// How a claimed message leaves: one attempt, returning the provider message id.
pub trait Delivery: Send + Sync + 'static {
    fn deliver(
        &self,
        msg: &ClaimedOutbound,
        epoch: i64,
    ) -> impl Future<Output = Result<String, SendError>> + Send;
}

impl Delivery for CloudApi {
    async fn deliver(&self, msg: &ClaimedOutbound, _epoch: i64) -> Result<String, SendError> {
        self.send(
            &msg.recipient,
            &msg.message,
            &callback_data(msg.id),
            msg.attempts,
        )
        .await
    }
}

/// Send pacing: messages per number, and per recipient.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub per_number: Quota,
    pub per_recipient: Quota,
}

impl Pacing {
    /// The Cloud API: the number's throughput per second, and Meta's pair limit of about one
    /// message per 6 s to one user, with bursts borrowed from later.
    pub fn cloud_api(rate_per_second: u32, per_recipient_burst: u32) -> Self {
        let rate = NonZeroU32::new(rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(per_recipient_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            per_number: Quota::per_second(rate),
            per_recipient: Quota::with_period(Duration::from_secs(6) / burst.get())
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                .allow_burst(burst),
        }
    }

    /// WhatsApp Web: an ordinary number, so evenly spaced sends with small bursts (a person
    /// answering a few messages in a row), never a flood that looks like a bulk sender.
    pub fn whatsapp_web(per_minute: u32, per_recipient_per_minute: u32) -> Self {
        let spaced = |n: u32| {
            let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            Quota::with_period(Duration::from_secs(60) / n.get())
                .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
                .allow_burst(n.min(NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN)))
        };
        Self {
            per_number: spaced(per_minute),
            per_recipient: spaced(per_recipient_per_minute),
        }
    }
}

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub account: String,
    pub identity: String,
    pub pacing: Pacing,
    pub backoff: Duration,
    pub in_doubt_grace: Duration,
    /// Messages sent at once (different conversations).
    pub concurrency: usize,
    pub poll_interval: Duration,
}

pub struct Sender<D> {
    pool: PgPool,
    cfg: SenderConfig,
    api: D,
    leadership: Arc<Leadership>,
    wake: Arc<Notify>,
    metrics: Metrics,
    per_number: DefaultDirectRateLimiter,
    per_recipient: DefaultKeyedRateLimiter<String>,
    /// Accepted sends `(epoch, id, provider message id)`, recorded group-committed: true when
    /// the row was recorded under the fence.
    recorder: GroupCommit<(i64, i64, String), bool>,
}

impl<D: Delivery> Sender<D> {
    pub fn new(
        pool: PgPool,
        cfg: SenderConfig,
        api: D,
        leadership: Arc<Leadership>,
        wake: Arc<Notify>,
        metrics: Metrics,
    ) -> Self {
        let recorder = {
            let pool = pool.clone();
            GroupCommit::start(256, move |sent: Vec<(i64, i64, String)>| {
                let pool = pool.clone();
                async move { record_sent(&pool, &sent).await }
            })
        };
        Self {
            recorder,
            per_number: RateLimiter::direct(cfg.pacing.per_number),
            per_recipient: RateLimiter::keyed(cfg.pacing.per_recipient),
            pool,
            cfg,
            api,
            leadership,
            wake,
            metrics,
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        let mut changes = this.leadership.subscribe();
        let mut last_in_doubt_check: Option<(i64, Instant)> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let Some(epoch) = this.leadership.may_act() else {
                this.metrics.standby_rounds.inc();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(this.cfg.poll_interval) => {}
                }
                continue;
            };
            let due = last_in_doubt_check
                .is_none_or(|(e, at)| e != epoch || at.elapsed() >= Duration::from_secs(1));
            if due {
                match outbound::requeue_in_doubt(
                    &this.pool,
                    &this.cfg.account,
                    epoch,
                    this.cfg.in_doubt_grace,
                )
                .await
                {
                    Ok(ids) if !ids.is_empty() => tracing::warn!(
                        count = ids.len(),
                        fence_epoch = epoch,
                        "sending again messages a previous holder left in doubt"
                    ),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(error = %queue::rescuer::error_chain(&error), "in-doubt check failed")
                    }
                }
                last_in_doubt_check = Some((epoch, Instant::now()));
            }
            // A planned handover waits for this guard: the Lease is released only once the
            // batch in flight has been sent and recorded.
            let work = this.leadership.working().await;
            if this.leadership.may_act() != Some(epoch) {
                continue;
            }
            let claimed = match outbound::claim_fenced(
                &this.pool,
                &this.cfg.account,
                epoch,
                this.cfg.concurrency as i64,
                &this.cfg.identity,
            )
            .await
            {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(error = %queue::rescuer::error_chain(&error), "outbound claim failed");
                    drop(work);
                    tokio::time::sleep(this.cfg.poll_interval).await;
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(work);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = this.wake.notified() => {}
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(this.cfg.poll_interval) => {}
                }
                continue;
            }
            // The batch runs to completion even if shutdown starts meanwhile: a send in flight is
            // finished and recorded, never abandoned half-way.
            let mut batch = tokio::task::JoinSet::new();
            for msg in claimed {
                let this = this.clone();
                batch.spawn(async move { this.deliver(epoch, msg).await });
            }
            while batch.join_next().await.is_some() {}
            drop(work);
        }
    }

    async fn deliver(&self, epoch: i64, msg: ClaimedOutbound) {
        self.per_number.until_ready().await;
        self.per_recipient.until_key_ready(&msg.recipient).await;
        if self.leadership.may_act() != Some(epoch) {
            // Lost the Lease (or the trust window closed) while waiting: do not start the send.
            // Hand the row back if the fence is still ours; otherwise the next holder settles it.
            let _ = outbound::fail_fenced(
                &self.pool,
                msg.id,
                epoch,
                None,
                "not sent: leadership lost before sending",
                chrono::Utc::now(),
                false,
            )
            .await;
            self.metrics
                .sends
                .get_or_create(&Outcome::of("abandoned"))
                .inc();
            return;
        }
        let result = self.api.deliver(&msg, epoch).await;
        match result {
            Ok(wamid) => match self.recorder.submit((epoch, msg.id, wamid.clone())).await {
                Ok(true) => {
                    self.metrics.sends.get_or_create(&Outcome::of("sent")).inc();
                    tracing::info!(outbound_id = msg.id, provider_message_id = %wamid, fence_epoch = epoch, "sent");
                }
                Ok(false) => {
                    // Sent, but the fence moved on: the status webhook records the id.
                    self.metrics
                        .sends
                        .get_or_create(&Outcome::of("sent_after_fence"))
                        .inc();
                    tracing::warn!(outbound_id = msg.id, provider_message_id = %wamid, "sent, but the fence moved on before it was recorded");
                }
                Err(error) => {
                    tracing::warn!(outbound_id = msg.id, error = %error, "recording a send failed; its status webhook will")
                }
            },
            Err(err) => self.record_failure(epoch, &msg, err).await,
        }
    }

    async fn record_failure(&self, epoch: i64, msg: &ClaimedOutbound, err: SendError) {
        let (delay, permanent) = match &err {
            SendError::Transient { delay_hint, .. } => (
                delay_hint.unwrap_or_else(|| {
                    queue::backoff::retry_delay(
                        msg.attempts,
                        self.cfg.backoff,
                        Duration::from_secs(300),
                    )
                }),
                false,
            ),
            SendError::InDoubt { .. } => (self.cfg.in_doubt_grace, false),
            SendError::Permanent { .. } => (Duration::ZERO, true),
        };
        let code = err.code().and_then(|c| i32::try_from(c).ok());
        let state = outbound::fail_fenced(
            &self.pool,
            msg.id,
            epoch,
            code,
            err.message(),
            queue::backoff::at(delay),
            permanent,
        )
        .await;
        self.metrics
            .sends
            .get_or_create(&Outcome::of(err.label()))
            .inc();
        match state {
            Ok(SendFailState::Failed) => {
                tracing::warn!(outbound_id = msg.id, error_code = ?code, error = err.message(), "send failed for good")
            }
            Ok(SendFailState::Retrying) => {
                tracing::info!(outbound_id = msg.id, error_code = ?code, retry_in_ms = delay.as_millis() as u64, "send failed; will retry")
            }
            Ok(SendFailState::Stale) => {}
            Err(error) => {
                tracing::warn!(outbound_id = msg.id, error = %queue::rescuer::error_chain(&error), "recording a failed send failed")
            }
        }
    }
}

/// Record a batch of accepted sends `(epoch, id, provider message id)`: one statement per epoch
/// (a batch spans two only around a Lease handover). True for each row recorded under its fence.
async fn record_sent(pool: &PgPool, sent: &[(i64, i64, String)]) -> Result<Vec<bool>, String> {
    let mut epochs: Vec<i64> = sent.iter().map(|(e, _, _)| *e).collect();
    epochs.sort_unstable();
    epochs.dedup();
    let mut recorded = Vec::new();
    for epoch in epochs {
        let batch: Vec<(i64, String)> = sent
            .iter()
            .filter(|(e, _, _)| *e == epoch)
            .map(|(_, id, wamid)| (*id, wamid.clone()))
            .collect();
        let ids = outbound::complete_many_fenced(pool, epoch, &batch)
            .await
            .map_err(|e| queue::rescuer::error_chain(&e))?;
        recorded.extend(ids.into_iter().map(|id| (epoch, id)));
    }
    Ok(sent
        .iter()
        .map(|(e, id, _)| recorded.contains(&(*e, *id)))
        .collect())
}
