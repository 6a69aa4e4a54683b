//! The team inbox: the human side of handoff, served by a pool's core workers.
//!
//! Every `/api/*` route needs `Authorization: Bearer <token>` of a member of this pool's team
//! (401 without or with a wrong one) and answers 403 for another pool's conversations.
//!
//! | route | what |
//! |---|---|
//! | `GET  /inbox` | the web inbox (the page itself holds no data; it asks for a token) |
//! | `GET  /api/me` | who the token belongs to |
//! | `GET  /api/inbox?view=mine\|unassigned\|all` | open handoffs, oldest first |
//! | `GET  /api/conversations/{id}` | the conversation, its open handoff and its transcript |
//! | `POST /api/conversations/{id}/claim` | take an unassigned handoff (409 if someone has it) |
//! | `POST /api/conversations/{id}/assign` | `{"member": id}`: give it to a team member |
//! | `POST /api/conversations/{id}/messages` | `{"text": ...}`: reply as a human (422 outside the 24 h window) |
//! | `GET  /api/conversations/{id}/templates` | the templates the number's WhatsApp Business Account has (`wabaId`), approved first, with their parameters |
//! | `POST /api/conversations/{id}/template` | `{"name", "language", "parameters": [...]}`: send an approved template (any time; Cloud API numbers) |
//! | `POST /api/conversations/{id}/resume` | the agent answers again |
//! | `POST /api/conversations/{id}/close` | resolved: the next customer message starts fresh |
//! | `POST /api/conversations/{id}/files?filename=&caption=` | body: the file, `Content-Type` its type: send it (image, audio, video or document; Cloud API numbers; 24-hour window) |
//! | `GET  /api/media/{id}` | a customer's photo, voice note, document, ... (images, audio and video inline, the rest as a download) |
//! | `GET  /api/events` | Server-Sent Events: which conversations changed |

pub mod auth;
pub mod events;
pub mod store;

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use crate::metrics::{Metrics, Outcome};
use auth::{Member, SharedTokens};
use events::TeamEvents;
use store::View;

/// Messages a transcript shows at most (the latest).
const TRANSCRIPT_LIMIT: i64 = 500;

/// What the inbox handlers share.
#[derive(Clone)]
pub struct InboxState {
    pub db: PgPool,
    /// Queue name of the pool: `<namespace>/<pool>`.
    pub pool: String,
    pub tokens: SharedTokens,
    pub events: TeamEvents,
    pub metrics: Metrics,
}

pub fn router(state: InboxState) -> Router {
    Router::new()
        .route("/inbox", get(page))
        .route("/api/me", get(me))
        .route("/api/inbox", get(list))
        .route("/api/events", get(live))
        .route("/api/conversations/{id}", get(conversation))
        .route("/api/conversations/{id}/claim", post(claim))
        .route("/api/conversations/{id}/assign", post(assign))
        .route("/api/conversations/{id}/messages", post(reply))
        .route("/api/conversations/{id}/template", post(template))
        .route("/api/conversations/{id}/templates", get(templates))
        .route("/api/media/{id}", get(media))
        .route(
            "/api/conversations/{id}/files",
            post(send_file).layer(axum::extract::DefaultBodyLimit::max(MAX_FILE_BYTES)),
        )
        .route("/api/conversations/{id}/resume", post(resume))
        .route("/api/conversations/{id}/close", post(close))
        .with_state(state)
}

/// Why an inbox request failed. Bodies are JSON `{"error": code, "message": text}`.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this conversation belongs to another pool")]
    Forbidden,
    #[error("no such conversation")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "outside WhatsApp's 24-hour customer service window (the customer last wrote {}): only a template message can be sent now",
        last_customer_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
    )]
    OutsideWindow {
        last_customer_at: Option<DateTime<Utc>>,
    },
    #[error(transparent)]
    Queue(#[from] queue::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl InboxError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::OutsideWindow { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "outside_service_window")
            }
            Self::Queue(_) | Self::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for InboxError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        let message = if status.is_server_error() {
            tracing::error!(error = %queue::rescuer::error_chain(&self), "inbox request failed");
            "internal error".to_string()
        } else {
            self.to_string()
        };
        let mut response =
            (status, Json(json!({ "error": code, "message": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"whatsapp-team-inbox\""),
            );
        }
        response
    }
}

/// The caller, authenticated by bearer token.
impl FromRequestParts<InboxState> for Member {
    type Rejection = InboxError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &InboxState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(InboxError::Unauthorized(
                "missing Authorization: Bearer <team member token>",
            ))?;
        let token = auth::bearer(header).ok_or(InboxError::Unauthorized(
            "the Authorization header must be `Bearer <token>`",
        ))?;
        let tokens = state.tokens.current();
        if tokens.is_empty() {
            return Err(InboxError::Unauthorized(
                "no team tokens are configured for this pool (AgentPool spec.inbox.tokensSecretRef)",
            ));
        }
        tokens
            .verify(token)
            .cloned()
            .ok_or(InboxError::Unauthorized("unknown token"))
    }
}

async fn page() -> impl IntoResponse {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            // Media are shown from blob: URLs (fetched with the token).
            "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' blob:; media-src 'self' blob:",
        )],
        Html(include_str!("inbox.html")),
    )
}

async fn me(State(s): State<InboxState>, member: Member) -> Json<serde_json::Value> {
    Json(json!({ "id": member.id, "name": member.name, "pool": s.pool }))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    view: View,
}

async fn list(
    State(s): State<InboxState>,
    member: Member,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<store::InboxItem>>, InboxError> {
    Ok(Json(store::list(&s.db, &s.pool, &member, q.view).await?))
}

async fn conversation(
    State(s): State<InboxState>,
    _member: Member,
    Path(id): Path<i64>,
) -> Result<Json<store::Transcript>, InboxError> {
    Ok(Json(
        store::transcript(&s.db, &s.pool, id, TRANSCRIPT_LIMIT).await?,
    ))
}

fn counted(s: &InboxState, action: &str) {
    s.metrics
        .team_actions
        .get_or_create(&Outcome::of(action))
        .inc();
}

async fn claim(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
) -> Result<StatusCode, InboxError> {
    store::claim(&s.db, &s.pool, &member, id).await?;
    counted(&s, "claim");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct AssignBody {
    member: String,
}

async fn assign(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
    body: Result<Json<AssignBody>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, InboxError> {
    let Json(body) = body.map_err(|e| InboxError::BadRequest(e.body_text()))?;
    store::assign(&s.db, &s.pool, &member, id, &body.member).await?;
    counted(&s, "assign");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ReplyBody {
    text: String,
}

async fn reply(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
    body: Result<Json<ReplyBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<store::QueuedReply>), InboxError> {
    let Json(body) = body.map_err(|e| InboxError::BadRequest(e.body_text()))?;
    let queued = store::reply(&s.db, &s.pool, &member, id, &body.text)
        .await
        .inspect_err(|e| {
            if matches!(e, InboxError::OutsideWindow { .. }) {
                counted(&s, "refused_reply");
            }
        })?;
    counted(&s, "reply");
    if let Some(seconds) = queued.first_reply_seconds {
        s.metrics.handoff_first_reply_seconds.observe(seconds);
    }
    Ok((StatusCode::CREATED, Json(queued)))
}

/// Largest file a team member can send (WhatsApp's limit for audio and video; documents may
/// be larger at Meta, not here).
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Deserialize)]
struct FileQuery {
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    caption: Option<String>,
}

async fn send_file(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
    Query(q): Query<FileQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<store::QueuedReply>), InboxError> {
    let mime_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .unwrap_or("application/octet-stream")
        .to_string();
    let file = store::Attachment {
        bytes: body.to_vec(),
        mime_type,
        filename: q
            .filename
            .map(|f| f.chars().filter(|c| !c.is_control()).take(240).collect()),
        caption: q.caption,
    };
    let queued = store::send_file(&s.db, &s.pool, &member, id, file).await?;
    counted(&s, "file");
    if let Some(seconds) = queued.first_reply_seconds {
        s.metrics.handoff_first_reply_seconds.observe(seconds);
    }
    Ok((StatusCode::CREATED, Json(queued)))
}

/// Media types a browser may show inline; anything else (HTML, SVG, PDF, ...) is served as an
/// opaque download, so a customer's file never runs as a page of the inbox's origin.
const INLINE_TYPES: &[&str] = &[
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "audio/ogg",
    "audio/mpeg",
    "audio/mp4",
    "audio/aac",
    "audio/amr",
    "video/mp4",
    "video/3gpp",
];

async fn media(
    State(s): State<InboxState>,
    _member: Member,
    Path(id): Path<i64>,
) -> Result<Response, InboxError> {
    let m = store::media(&s.db, &s.pool, id).await?;
    let essence = m
        .mime_type
        .as_deref()
        .and_then(|t| t.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let inline = INLINE_TYPES.contains(&essence.as_str());
    let content_type = if inline {
        m.mime_type.clone().unwrap_or_default()
    } else {
        "application/octet-stream".to_string()
    };
    // The name as the customer sent it, reduced to what is safe in a header.
    let name: String = m
        .filename
        .unwrap_or_else(|| format!("{}-{id}", m.kind))
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ' '))
        .take(120)
        .collect();
    let disposition = format!(
        "{}; filename=\"{}\"",
        if inline { "inline" } else { "attachment" },
        if name.trim().is_empty() {
            "media"
        } else {
            name.trim()
        }
    );
    let mut response = m.bytes.into_response();
    let headers = response.headers_mut();
    for (key, value) in [
        (header::CONTENT_TYPE, content_type.as_str()),
        (header::CONTENT_DISPOSITION, disposition.as_str()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "private, no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox",
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(key, v);
        }
    }
    Ok(response)
}

async fn templates(
    State(s): State<InboxState>,
    _member: Member,
    Path(id): Path<i64>,
) -> Result<Json<store::Templates>, InboxError> {
    Ok(Json(store::templates(&s.db, &s.pool, id).await?))
}

async fn template(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
    body: Result<Json<store::TemplateSend>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<store::QueuedReply>), InboxError> {
    let Json(body) = body.map_err(|e| InboxError::BadRequest(e.body_text()))?;
    let queued = store::send_template(&s.db, &s.pool, &member, id, &body).await?;
    counted(&s, "template");
    if let Some(seconds) = queued.first_reply_seconds {
        s.metrics.handoff_first_reply_seconds.observe(seconds);
    }
    Ok((StatusCode::CREATED, Json(queued)))
}

async fn resume(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, InboxError> {
    let answering = store::resume(&s.db, &s.pool, &member, id).await?;
    counted(&s, "resume");
    Ok(Json(
        json!({ "agent_enabled": true, "agent_answers_pending": answering }),
    ))
}

async fn close(
    State(s): State<InboxState>,
    member: Member,
    Path(id): Path<i64>,
) -> Result<StatusCode, InboxError> {
    store::close(&s.db, &s.pool, &member, id).await?;
    counted(&s, "close");
    Ok(StatusCode::NO_CONTENT)
}

/// Server-Sent Events of this pool: `event: change`, data `{"conversation_id", "kind"}`. A
/// `resync` event means events may have been missed: fetch everything again.
async fn live(
    State(s): State<InboxState>,
    _member: Member,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = s.events.subscribe();
    let pool = s.pool.clone();
    let stream = futures::stream::unfold((rx, pool), |(mut rx, pool)| async move {
        loop {
            let event = match rx.recv().await {
                Ok(e) if e.kind == "resync" || e.pool == pool => e,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => events::TeamEvent {
                    pool: pool.clone(),
                    conversation_id: None,
                    kind: "resync".into(),
                },
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            let data = json!({ "conversation_id": event.conversation_id, "kind": event.kind });
            return Some((
                Ok(Event::default().event("change").data(data.to_string())),
                (rx, pool),
            ));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
