//! Outbound messages: the transactional outbox of agent turns, delivered by the account's fence
//! holder only.
//!
//! States move forward only: `queued -> sending -> sent -> delivered -> read`, and `failed` is
//! terminal. `sending` rows claimed under an older epoch are "in doubt" (the old holder may or
//! may not have reached WhatsApp); the status webhook that WhatsApp sends for every accepted
//! message carries our row id (`biz_opaque_callback_data`) and resolves them, and only rows still
//! in doubt after a grace period are queued again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use crate::error::{Result, StepExt};
use crate::notifier::OUTBOUND_CHANNEL;

const ENQUEUE: &str = include_str!("../sql/outbound_enqueue.sql");
const CLAIM: &str = include_str!("../sql/outbound_claim_fenced.sql");
const COMPLETE: &str = include_str!("../sql/outbound_complete_fenced.sql");
const FAIL: &str = include_str!("../sql/outbound_fail_fenced.sql");
const REQUEUE_IN_DOUBT: &str = include_str!("../sql/outbound_requeue_in_doubt.sql");
const APPLY_STATUSES: &str = include_str!("../sql/outbound_apply_statuses.sql");

/// Default attempts before an outbound message fails for good (WhatsAppAccount
/// `spec.delivery.maxAttempts` when it is not set).
pub const MAX_ATTEMPTS_DEFAULT: i32 = 8;

/// A message to send.
#[derive(Debug, Clone)]
pub struct NewOutbound {
    pub account_id: String,
    pub conversation_id: Option<i64>,
    pub job_id: Option<i64>,
    pub recipient: String,
    /// The Cloud API message object without `messaging_product`/`to`, e.g.
    /// `{"type":"text","text":{"body":"Hi"}}`.
    pub message: Value,
    pub sent_by_agent: bool,
    /// The team member who wrote a human reply.
    pub sent_by_member: Option<String>,
    /// None: the account's `spec.delivery.maxAttempts` (stored on its row).
    pub max_attempts: Option<i32>,
}

/// Insert outbound messages (in the caller's transaction) and notify their accounts' senders, in
/// one statement; returns the ids in input order.
pub async fn enqueue(conn: &mut PgConnection, messages: &[NewOutbound]) -> Result<Vec<i64>> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    // One array per column, in message order.
    fn column<T>(messages: &[NewOutbound], f: impl Fn(&NewOutbound) -> T) -> Vec<T> {
        messages.iter().map(f).collect()
    }
    let ids: Vec<i64> = sqlx::query_scalar(ENQUEUE)
        .bind(column(messages, |m| m.account_id.clone()))
        .bind(column(messages, |m| m.conversation_id))
        .bind(column(messages, |m| m.job_id))
        .bind(column(messages, |m| m.recipient.clone()))
        .bind(column(messages, |m| m.message.clone()))
        .bind(column(messages, |m| m.sent_by_agent))
        .bind(column(messages, |m| m.sent_by_member.clone()))
        .bind(column(messages, |m| m.max_attempts))
        .bind(OUTBOUND_CHANNEL)
        .fetch_all(&mut *conn)
        .await
        .step("inserting outbound messages")?;
    Ok(ids)
}

/// An outbound message claimed for sending under an epoch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedOutbound {
    pub id: i64,
    pub account_id: String,
    pub conversation_id: Option<i64>,
    pub recipient: String,
    pub message: Value,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// Claim queued messages of an account; empty unless `epoch` is the account's current fence.
pub async fn claim_fenced<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    epoch: i64,
    limit: i64,
    claimed_by: &str,
) -> Result<Vec<ClaimedOutbound>> {
    sqlx::query_as(CLAIM)
        .bind(account)
        .bind(epoch)
        .bind(limit)
        .bind(claimed_by)
        .fetch_all(db)
        .await
        .step("claiming outbound messages")
}

/// Record the provider message id of an accepted send. False when the fence moved on.
pub async fn complete_fenced<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    epoch: i64,
    provider_message_id: &str,
) -> Result<bool> {
    let recorded =
        complete_many_fenced(db, epoch, &[(id, provider_message_id.to_string())]).await?;
    Ok(!recorded.is_empty())
}

/// [`complete_fenced`] for a batch of `(id, provider message id)`, in one statement; returns the
/// ids recorded (the others' epoch is no longer the fence).
pub async fn complete_many_fenced<'e>(
    db: impl PgExecutor<'e>,
    epoch: i64,
    sent: &[(i64, String)],
) -> Result<Vec<i64>> {
    if sent.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, provider_ids): (Vec<i64>, Vec<&str>) =
        sent.iter().map(|(id, p)| (*id, p.as_str())).unzip();
    sqlx::query_scalar(COMPLETE)
        .bind(ids)
        .bind(epoch)
        .bind(provider_ids)
        .fetch_all(db)
        .await
        .step("completing outbound messages")
}

/// Outcome of a failed send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailState {
    Retrying,
    Failed,
    /// The fence moved on or a status webhook resolved the row first; nothing was written.
    Stale,
}

/// Record a failed send: retry at `retry_at`, or fail for good.
pub async fn fail_fenced<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    epoch: i64,
    error_code: Option<i32>,
    error: &str,
    retry_at: DateTime<Utc>,
    permanent: bool,
) -> Result<SendFailState> {
    let row: Option<(String,)> = sqlx::query_as(FAIL)
        .bind(id)
        .bind(epoch)
        .bind(error_code)
        .bind(error)
        .bind(retry_at)
        .bind(permanent)
        .fetch_optional(db)
        .await
        .step("failing outbound message")?;
    Ok(match row {
        None => SendFailState::Stale,
        Some((s,)) if s == "failed" => SendFailState::Failed,
        Some(_) => SendFailState::Retrying,
    })
}

/// Queue again the rows a deposed holder left `sending` for longer than `grace`.
pub async fn requeue_in_doubt<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    epoch: i64,
    grace: Duration,
) -> Result<Vec<i64>> {
    let rows: Vec<(i64,)> = sqlx::query_as(REQUEUE_IN_DOUBT)
        .bind(account)
        .bind(epoch)
        .bind(grace.as_secs_f64())
        .fetch_all(db)
        .await
        .step("requeueing in-doubt outbound messages")?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// A delivery status from a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Sent,
    Delivered,
    Read,
    Failed,
}

impl DeliveryStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sent" => Some(Self::Sent),
            "delivered" => Some(Self::Delivered),
            // `played` (voice messages) implies read.
            "read" | "played" => Some(Self::Read),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Failed => "failed",
        }
    }
}

/// Apply a status webhook. Returns true when it moved a row forward (false for duplicates,
/// stale reorderings and unknown messages).
pub async fn apply_status<'e>(
    db: impl PgExecutor<'e>,
    our_id: Option<i64>,
    provider_message_id: &str,
    status: DeliveryStatus,
    error_code: Option<i32>,
    error: Option<&str>,
) -> Result<bool> {
    let update = StatusUpdate {
        our_id,
        provider_message_id: provider_message_id.to_string(),
        status,
        error_code,
        error: error.map(str::to_string),
    };
    Ok(apply_statuses(db, std::slice::from_ref(&update))
        .await?
        .first()
        .copied()
        .unwrap_or(false))
}

/// One delivery status webhook, for [`apply_statuses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub our_id: Option<i64>,
    pub provider_message_id: String,
    pub status: DeliveryStatus,
    pub error_code: Option<i32>,
    pub error: Option<String>,
}

/// Apply many status webhooks in one statement, with the effect of applying them one by one:
/// each row ends at the furthest state given for it, never behind where it was. Returns, per
/// input, whether it moved its row forward from where the row stood before the batch.
pub async fn apply_statuses<'e>(
    db: impl PgExecutor<'e>,
    updates: &[StatusUpdate],
) -> Result<Vec<bool>> {
    let mut our_ids = Vec::with_capacity(updates.len());
    let mut provider_ids = Vec::with_capacity(updates.len());
    let mut states = Vec::with_capacity(updates.len());
    let mut codes = Vec::with_capacity(updates.len());
    let mut errors = Vec::with_capacity(updates.len());
    for u in updates {
        our_ids.push(u.our_id);
        provider_ids.push(u.provider_message_id.as_str());
        states.push(u.status.as_str());
        codes.push(u.error_code);
        errors.push(u.error.as_deref());
    }
    let moved: Vec<(i64,)> = sqlx::query_as(APPLY_STATUSES)
        .bind(&our_ids)
        .bind(&provider_ids)
        .bind(&states)
        .bind(&codes)
        .bind(&errors)
        .fetch_all(db)
        .await
        .step("applying delivery statuses")?;
    let mut out = vec![false; updates.len()];
    for (ord,) in moved {
        if let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = true;
        }
    }
    Ok(out)
}

/// Give a claimed row its provider message id before the send, so a retry after an unknown
/// outcome reuses the id (the recipient's devices drop a repeated id) and receipts can match the
/// row before the send returns. Keeps an id already stored; returns the id to use, or `None`
/// when the fence moved on.
pub async fn reserve_message_id_fenced<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    epoch: i64,
    candidate: &str,
) -> Result<Option<String>> {
    let row: Option<(String,)> = sqlx::query_as(
        "UPDATE outbound_messages o
         SET provider_message_id = coalesce(o.provider_message_id, $3)
         FROM accounts a
         WHERE o.id = $1 AND o.claim_epoch = $2 AND o.state = 'sending'
           AND a.id = o.account_id AND a.fence_epoch = $2
         RETURNING o.provider_message_id",
    )
    .bind(id)
    .bind(epoch)
    .bind(candidate)
    .fetch_optional(db)
    .await
    .step("reserving a provider message id")?;
    Ok(row.map(|(id,)| id))
}
