//! Webhook endpoints. Any gateway replica may serve them; they never send.
//!
//! - `GET /webhook`: Meta's verification handshake (`hub.mode=subscribe`, the verify token
//!   compared in constant time, `hub.challenge` echoed as plain text; otherwise 403).
//! - `POST /webhook`: signature checked over the raw bytes (401 and nothing stored when missing
//!   or wrong), JSON parsed (400 when malformed), bodies over 3 MB refused (413). Each message is
//!   stored in its own transaction (deduped by provider message id) and statuses update
//!   outbound rows (group-committed with concurrent webhooks' statuses, `status_writer`); then
//!   200, fast. Events we ignore still get 200, or Meta retries them for
//!   days. A database error answers 500, and no answer from the database within 5 s answers
//!   503, so Meta redelivers; dedupe makes that safe.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use queue::outbound::{self, DeliveryStatus};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::ingest::{self, IngestTarget};
use super::payload::{self, Webhook};
use crate::error::AppError;
use crate::metrics::{Metrics, Outcome};

/// Meta's documented maximum webhook payload.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// A webhook gets an answer within this, even while the database is down (the pool would wait
/// 10 s for a connection): 503, and Meta delivers it again. Dropping the work mid-commit is safe,
/// since a redelivery of a message that did commit is a duplicate.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// What the webhook handlers need.
#[derive(Clone)]
pub struct WebhookState {
    pub pool: PgPool,
    pub app_secret: Arc<str>,
    pub verify_token: Arc<str>,
    pub phone_number_id: Arc<str>,
    pub target: Arc<IngestTarget>,
    pub metrics: Metrics,
    pub publisher: queue::notifier::Publisher,
    /// Group commit for status updates.
    pub statuses: super::status_writer::StatusWriter,
}

pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/webhook", get(verify).post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn verify(
    State(s): State<WebhookState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<String, AppError> {
    let mode_ok = q.get("hub.mode").is_some_and(|m| m == "subscribe");
    let token = q.get("hub.verify_token").map(String::as_str).unwrap_or("");
    let token_ok: bool = token.as_bytes().ct_eq(s.verify_token.as_bytes()).into();
    match q.get("hub.challenge") {
        Some(challenge) if mode_ok && token_ok => Ok(challenge.clone()),
        _ => Err(AppError::VerifyFailed),
    }
}

async fn receive(
    State(s): State<WebhookState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, AppError> {
    let started = Instant::now();
    let result = tokio::time::timeout(DEADLINE, handle(&s, &headers, &body))
        .await
        .unwrap_or(Err(AppError::Timeout(DEADLINE)));
    s.metrics
        .webhook_seconds
        .observe(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(_) => "ok",
        Err(AppError::BadSignature) => "bad_signature",
        Err(AppError::Malformed(_)) => "malformed",
        Err(AppError::Timeout(_)) => "timeout",
        Err(_) => "error",
    };
    s.metrics
        .webhooks
        .get_or_create(&Outcome::of(outcome))
        .inc();
    result
}

async fn handle(
    s: &WebhookState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<StatusCode, AppError> {
    let sig = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !super::signature::verify(&s.app_secret, body, sig) {
        return Err(AppError::BadSignature);
    }
    let hook: Webhook =
        serde_json::from_slice(body).map_err(|e| AppError::Malformed(e.to_string()))?;
    if hook.object != "whatsapp_business_account" {
        tracing::debug!(object = %hook.object, "ignoring webhook for another object");
        return Ok(StatusCode::OK);
    }
    for change in hook.entry.iter().flat_map(|e| &e.changes) {
        if change.field != "messages" {
            continue;
        }
        let v = &change.value;
        let phone = v
            .metadata
            .as_ref()
            .map(|m| m.phone_number_id.as_str())
            .unwrap_or("");
        if phone != &*s.phone_number_id {
            tracing::warn!(phone_number_id = %phone, "webhook for another phone number id; ignored");
            continue;
        }
        for raw in &v.messages {
            let Some(m) = payload::interpret(raw, &v.contacts) else {
                s.metrics
                    .inbound_messages
                    .get_or_create(&Outcome::of("unreadable"))
                    .inc();
                tracing::warn!("inbound message without id or sender; ignored");
                continue;
            };
            let outcome = ingest::ingest(&s.pool, &s.target, &m, &s.publisher).await?;
            s.metrics
                .inbound_messages
                .get_or_create(&Outcome::of(outcome.as_str()))
                .inc();
            tracing::info!(provider_message_id = %m.provider_message_id, message_type = %m.message_type, outcome = outcome.as_str(), "inbound message");
        }
        for st in &v.statuses {
            let Some(status) = DeliveryStatus::parse(&st.status) else {
                continue;
            };
            let our_id = st
                .biz_opaque_callback_data
                .as_deref()
                .and_then(parse_callback);
            let error = st.errors.first();
            let code = error
                .and_then(|e| e.code)
                .and_then(|c| i32::try_from(c).ok());
            let detail = error.and_then(|e| e.message.clone().or_else(|| e.title.clone()));
            let moved = s
                .statuses
                .apply(outbound::StatusUpdate {
                    our_id,
                    provider_message_id: st.id.clone(),
                    status,
                    error_code: code,
                    error: detail,
                })
                .await
                .map_err(AppError::Batch)?;
            s.metrics
                .statuses
                .get_or_create(&Outcome::of(if moved {
                    status.as_str()
                } else {
                    "unchanged"
                }))
                .inc();
        }
    }
    Ok(StatusCode::OK)
}

/// `biz_opaque_callback_data` we set on sends: `ob:<outbound id>`.
pub fn callback_data(outbound_id: i64) -> String {
    format!("ob:{outbound_id}")
}

fn parse_callback(s: &str) -> Option<i64> {
    s.strip_prefix("ob:")?.parse().ok()
}
