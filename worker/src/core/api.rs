//! The team API on core workers: what human agents need around a handoff.
//!
//! - `GET  /api/handoffs?pool=<ns>/<pool>`: open handoff tasks, oldest first.
//! - `POST /api/conversations/{id}/resume`: the human is done; the agent answers again and the
//!   conversation's open tasks close.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::error::AppError;

#[derive(Deserialize)]
struct PoolQuery {
    pool: String,
}

#[derive(Serialize, sqlx::FromRow)]
struct HandoffTask {
    id: i64,
    account_id: String,
    conversation_id: i64,
    assignee: Option<String>,
    reason: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
}

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/api/handoffs", get(open_handoffs))
        .route("/api/conversations/{id}/resume", post(resume))
        .with_state(pool)
}

async fn open_handoffs(
    State(db): State<PgPool>,
    Query(q): Query<PoolQuery>,
) -> Result<Json<Vec<HandoffTask>>, AppError> {
    let tasks = sqlx::query_as(
        "SELECT id, account_id, conversation_id, assignee, reason, created_at FROM handoff_tasks
         WHERE pool = $1 AND state = 'open' ORDER BY created_at, id",
    )
    .bind(&q.pool)
    .fetch_all(&db)
    .await?;
    Ok(Json(tasks))
}

async fn resume(State(db): State<PgPool>, Path(id): Path<i64>) -> Result<StatusCode, AppError> {
    Ok(if super::handoff::resume_agent(&db, id).await? {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    })
}
