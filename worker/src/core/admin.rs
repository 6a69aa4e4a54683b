//! The pool's admin API, for `kubectl whatsapp` (jobs, handoffs, resume): what lives only in
//! Postgres, answered by a core worker of the pool it belongs to.
//!
//! The plugin reaches it through the API server's pod proxy, so a caller needs RBAC for
//! `pods/proxy` and for reading the pool's admin Secret (`ap-<pool>-admin`, made by the
//! operator); the API server strips `Authorization` from proxied requests, so the token rides in
//! `X-Admin-Token` (or `Authorization: Bearer`, for a port-forward and curl). Without a token
//! configured every route answers 403 (`disabled`); with a wrong one, 401. Everything is scoped to this
//! worker's pool: another pool's job or conversation is "not found" / 403.
//!
//! | route | what |
//! |---|---|
//! | `GET  /admin/v1/jobs/dead?limit=N` | dead jobs, newest first |
//! | `POST /admin/v1/jobs/{id}/replay` | replay one dead job (404 if it is not a dead job of this pool) |
//! | `POST /admin/v1/jobs/replay-all` | replay every dead job of the pool, oldest first |
//! | `GET  /admin/v1/handoffs` | open handoffs, oldest first |
//! | `POST /admin/v1/conversations/{id}/resume` | the agent answers the conversation again |

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use service::secret::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::inbox::InboxError;
use super::inbox::auth::Member;
use super::inbox::store::{self, View};

/// The header that carries the token through the API server's proxy.
pub const TOKEN_HEADER: &str = "x-admin-token";
/// Who acted, as the plugin reports it (kept in the audit trail; the token is what authorizes).
pub const ACTOR_HEADER: &str = "x-admin-actor";
/// Dead jobs listed at most per request.
const DEAD_LIMIT_MAX: i64 = 1_000;

#[derive(Clone)]
pub struct AdminState {
    pub db: PgPool,
    /// Queue name of the pool: `<namespace>/<pool>`.
    pub pool: String,
    /// SHA-256 of the admin token; `None` disables the API.
    token_digest: Option<[u8; 32]>,
}

impl AdminState {
    pub fn new(db: PgPool, pool: String, token: Option<&SecretString>) -> Self {
        let token_digest = token
            .map(|t| t.expose_secret().trim().to_string())
            .filter(|t| !t.is_empty())
            .map(|t| Sha256::digest(t.as_bytes()).into());
        Self {
            db,
            pool,
            token_digest,
        }
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/v1/jobs/dead", get(dead_jobs))
        .route("/admin/v1/jobs/replay-all", post(replay_all))
        .route("/admin/v1/jobs/{id}/replay", post(replay))
        .route("/admin/v1/handoffs", get(handoffs))
        .route("/admin/v1/conversations/{id}/resume", post(resume))
        .with_state(state)
}

/// Why an admin request failed; bodies are JSON `{"error": code, "message": text}` like the
/// inbox's.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin API is disabled: this worker has no admin token (WA_ADMIN_TOKEN)")]
    Disabled,
    #[error("missing or wrong admin token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Inbox(#[from] InboxError),
    #[error(transparent)]
    Queue(#[from] queue::Error),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = |status: StatusCode, code: &str, message: String| {
            (status, Json(json!({ "error": code, "message": message }))).into_response()
        };
        match self {
            Self::Inbox(e) => e.into_response(),
            Self::Queue(e) => {
                tracing::error!(error = %queue::rescuer::error_chain(&e), "admin request failed");
                body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".into(),
                )
            }
            // Not 503: clients retry that, and this does not pass with time.
            Self::Disabled => body(
                StatusCode::FORBIDDEN,
                "disabled",
                Self::Disabled.to_string(),
            ),
            Self::Unauthorized => body(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Self::Unauthorized.to_string(),
            ),
            Self::NotFound(m) => body(StatusCode::NOT_FOUND, "not_found", m),
        }
    }
}

/// An authenticated admin caller; `actor` names them in the audit trail.
pub struct Admin {
    actor: Member,
}

impl FromRequestParts<AdminState> for Admin {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.token_digest else {
            return Err(AdminError::Disabled);
        };
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let presented = header(TOKEN_HEADER)
            .or_else(|| {
                header(header::AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer "))
            })
            .map(str::trim)
            .ok_or(AdminError::Unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if !bool::from(digest.ct_eq(expected)) {
            return Err(AdminError::Unauthorized);
        }
        let who: String = header(ACTOR_HEADER)
            .unwrap_or("unknown")
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        Ok(Admin {
            actor: Member {
                id: format!("kubectl:{who}"),
                name: None,
            },
        })
    }
}

#[derive(Deserialize)]
struct DeadQuery {
    limit: Option<i64>,
}

async fn dead_jobs(
    State(s): State<AdminState>,
    _: Admin,
    Query(q): Query<DeadQuery>,
) -> Result<Json<Vec<queue::jobs::DeadJob>>, AdminError> {
    let limit = q.limit.unwrap_or(100).clamp(1, DEAD_LIMIT_MAX);
    Ok(Json(queue::jobs::list_dead(&s.db, &s.pool, limit).await?))
}

async fn replay(
    State(s): State<AdminState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let mut tx = s.db.begin().await.map_err(InboxError::from)?;
    let Some(new_id) = queue::jobs::replay_dead(&mut tx, Some(&s.pool), id).await? else {
        return Err(AdminError::NotFound(format!(
            "job {id} is not a dead job of {} (or was replayed already)",
            s.pool
        )));
    };
    tx.commit().await.map_err(InboxError::from)?;
    tracing::info!(pool = %s.pool, actor = %admin.actor.id, job = id, replayed_as = new_id, "admin: replayed a dead job");
    Ok(Json(json!({ "job": id, "replayed_as": new_id })))
}

async fn replay_all(
    State(s): State<AdminState>,
    admin: Admin,
) -> Result<Json<serde_json::Value>, AdminError> {
    let n = queue::jobs::replay_all_dead(&s.db, &s.pool).await?;
    tracing::info!(pool = %s.pool, actor = %admin.actor.id, replayed = n, "admin: replayed every dead job");
    Ok(Json(json!({ "replayed": n })))
}

async fn handoffs(
    State(s): State<AdminState>,
    admin: Admin,
) -> Result<Json<Vec<store::InboxItem>>, AdminError> {
    Ok(Json(
        store::list(&s.db, &s.pool, &admin.actor, View::All).await?,
    ))
}

async fn resume(
    State(s): State<AdminState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let answering = store::resume(&s.db, &s.pool, &admin.actor, id).await?;
    tracing::info!(pool = %s.pool, actor = %admin.actor.id, conversation = id, "admin: resumed the agent");
    Ok(Json(
        json!({ "conversation": id, "agent_enabled": true, "agent_answers_pending": answering }),
    ))
}
