//! Webhook endpoints: the shared ingress of a namespace's Cloud API numbers. Any gateway pod may
//! serve them; they never send.
//!
//! - `GET /webhook`: Meta's verification handshake (`hub.mode=subscribe`, any of the numbers'
//!   verify tokens compared in constant time, `hub.challenge` echoed as plain text; else 403).
//! - `POST /webhook`: the signature is checked over the raw bytes against the app secrets of
//!   the namespace's numbers (401 and nothing stored when none matches), JSON parsed (400 when
//!   malformed), bodies over 3 MB refused (413). Each change is routed by
//!   `metadata.phone_number_id` to its account; a change for a number of another app than the
//!   one that signed is refused whole (401, nothing stored). A change for a number no account
//!   has yet is kept and replayed when the account appears ([`replay_unrouted`]). Each message
//!   is stored in its own transaction (deduped by provider message id) and statuses update
//!   outbound rows (group-committed, `status_writer`); then 200, fast. Events we ignore still
//!   get 200, or Meta retries them for days. A database error answers 500, and no answer from
//!   the database within 5 s answers 503, so Meta redelivers; dedupe makes that safe.

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

use super::ingest;
use super::payload::{self, ChangeValue, Webhook};
use super::routes::{Route, Routes};
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
    /// The numbers served, with their app secrets and ingest targets.
    pub routes: Routes,
    /// The namespace whose numbers these are: kept webhooks are replayed within it.
    pub namespace: Arc<str>,
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
    let token_ok = s.routes.current().verify_token_matches(token);
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
        Err(AppError::UnroutedFull) => "unrouted_full",
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
    let table = s.routes.current();
    let Some(signer) = table.signer(body, sig) else {
        return Err(AppError::BadSignature);
    };
    let hook: Webhook =
        serde_json::from_slice(body).map_err(|e| AppError::Malformed(e.to_string()))?;
    if hook.object != "whatsapp_business_account" {
        tracing::debug!(object = %hook.object, "ignoring webhook for another object");
        return Ok(StatusCode::OK);
    }
    // Route every change before storing any: a delivery naming a number of another app than
    // the one that signed it is refused whole.
    let mut routed: Vec<(&Arc<Route>, &ChangeValue)> = Vec::new();
    let mut unrouted: Vec<(usize, usize, &str)> = Vec::new();
    let mut template_updates: Vec<(&str, &ChangeValue)> = Vec::new();
    for (e, entry) in hook.entry.iter().enumerate() {
        for (c, change) in entry.changes.iter().enumerate() {
            if change.field == "message_template_status_update" {
                // About the WABA (`entry.id`), not a number: ours when one of our numbers of
                // that WABA belongs to the signing app.
                if table.knows_waba(&entry.id, signer) {
                    template_updates.push((&entry.id, &change.value));
                } else {
                    tracing::debug!(waba_id = %entry.id, "template status for a WhatsApp Business Account no number names; ignored");
                }
                continue;
            }
            if change.field != "messages" {
                continue;
            }
            let v = &change.value;
            let phone = v
                .metadata
                .as_ref()
                .map(|m| m.phone_number_id.as_str())
                .unwrap_or("");
            match table.get(phone) {
                Some(route) if route.app_secret == *signer => routed.push((route, v)),
                Some(_) => {
                    tracing::warn!(phone_number_id = %phone, "webhook for a number of another Meta app than the one that signed it; refused");
                    return Err(AppError::BadSignature);
                }
                None if phone.is_empty() => {
                    tracing::warn!("webhook change without metadata.phone_number_id; ignored");
                }
                None if v.messages.is_empty() => {
                    // Statuses of a number with no account: no outbound row can match them.
                    tracing::debug!(phone_number_id = %phone, "statuses for an unknown number; ignored");
                }
                None => unrouted.push((e, c, phone)),
            }
        }
    }
    if !unrouted.is_empty() {
        keep_unrouted(s, body, &unrouted).await?;
    }
    for (route, v) in routed {
        process(s, route, v).await?;
    }
    for (waba_id, v) in template_updates {
        let moved = super::templates::apply_status_update(&s.pool, waba_id, v).await?;
        // The holders of this WABA's numbers list it now (a new or edited template).
        s.publisher
            .publish(queue::notifier::TEMPLATES_CHANNEL, waba_id.to_string());
        tracing::info!(%waba_id, template = v.message_template_name.as_deref().unwrap_or_default(),
            event = v.event.as_deref().unwrap_or_default(), moved, "template status update");
    }
    Ok(StatusCode::OK)
}

/// Keep changes for numbers without an account, as Meta sent them, to replay later.
async fn keep_unrouted(
    s: &WebhookState,
    body: &Bytes,
    unrouted: &[(usize, usize, &str)],
) -> Result<(), AppError> {
    let raw: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AppError::Malformed(e.to_string()))?;
    for &(e, c, phone) in unrouted {
        let value = &raw["entry"][e]["changes"][c]["value"];
        if !queue::unrouted::keep(&s.pool, &s.namespace, phone, value).await? {
            return Err(AppError::UnroutedFull);
        }
        s.metrics.unrouted_webhooks.inc();
        tracing::warn!(phone_number_id = %phone, "webhook for a phone number id no WhatsAppAccount names yet; kept for replay");
    }
    Ok(())
}

/// Store one change of a routed number: its messages, then its statuses.
async fn process(s: &WebhookState, route: &Route, v: &ChangeValue) -> Result<(), AppError> {
    for raw in &v.messages {
        let Some(m) = payload::interpret(raw, &v.contacts) else {
            s.metrics
                .inbound_messages
                .get_or_create(&Outcome::of("unreadable"))
                .inc();
            tracing::warn!("inbound message without id or sender; ignored");
            continue;
        };
        let outcome = ingest::ingest(&s.pool, &route.target, &m, &s.publisher).await?;
        s.metrics
            .inbound_messages
            .get_or_create(&Outcome::of(outcome.as_str()))
            .inc();
        tracing::info!(account = %route.target.account, provider_message_id = %m.provider_message_id, message_type = %m.message_type, outcome = outcome.as_str(), "inbound message");
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
    Ok(())
}

/// Ingest what was kept for `phone_number_id` before its account existed, then forget it.
/// Safe to run in several pods at once: the ingest dedupes by provider message id.
pub async fn replay_unrouted(s: &WebhookState, phone_number_id: &str) -> Result<usize, AppError> {
    let table = s.routes.current();
    let Some(route) = table.get(phone_number_id) else {
        return Ok(0);
    };
    let mut replayed = 0;
    loop {
        let kept = queue::unrouted::kept_for(&s.pool, &s.namespace, phone_number_id, 100).await?;
        if kept.is_empty() {
            return Ok(replayed);
        }
        let mut ids = Vec::with_capacity(kept.len());
        for k in kept {
            match serde_json::from_value::<ChangeValue>(k.value) {
                Ok(v) => process(s, route, &v).await?,
                Err(error) => {
                    tracing::warn!(id = k.id, %error, "a kept webhook no longer parses; dropped")
                }
            }
            ids.push(k.id);
        }
        replayed += ids.len();
        queue::unrouted::forget(&s.pool, &ids).await?;
        tracing::info!(phone_number_id = %phone_number_id, replayed, "replayed kept webhooks of a new account");
    }
}

/// `biz_opaque_callback_data` we set on sends: `ob:<outbound id>`.
pub fn callback_data(outbound_id: i64) -> String {
    format!("ob:{outbound_id}")
}

fn parse_callback(s: &str) -> Option<i64> {
    s.strip_prefix("ob:")?.parse().ok()
}
