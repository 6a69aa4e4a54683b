//! Webhook changes for numbers that have no account yet, kept until the account appears.
//!
//! The shared ingress verifies a delivery against the namespace's app secrets before anything
//! here is written, so only Meta's own deliveries are kept. The table is bounded: past
//! [`MAX_KEPT`] rows a new one is refused (the webhook answers 503 and Meta delivers it again
//! later), and rows older than [`RETENTION`] (Meta stops redelivering after seven days) go.

use sqlx::PgPool;

use crate::error::{Result, StepExt};

/// At most this many unrouted changes are kept per namespace.
pub const MAX_KEPT: i64 = 10_000;
/// Kept this long: Meta retries a delivery for up to seven days.
pub const RETENTION_DAYS: i32 = 7;

/// One kept change.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unrouted {
    pub id: i64,
    pub value: serde_json::Value,
}

/// Keep `value` for `phone_number_id`; false when the namespace already keeps [`MAX_KEPT`].
pub async fn keep(
    db: &PgPool,
    namespace: &str,
    phone_number_id: &str,
    value: &serde_json::Value,
) -> Result<bool> {
    let kept = sqlx::query(
        "INSERT INTO unrouted_webhooks (namespace, phone_number_id, value)
         SELECT $1, $2, $3
         WHERE (SELECT count(*) FROM unrouted_webhooks WHERE namespace = $1) < $4",
    )
    .bind(namespace)
    .bind(phone_number_id)
    .bind(value)
    .bind(MAX_KEPT)
    .execute(db)
    .await
    .step("keeping an unrouted webhook")?;
    Ok(kept.rows_affected() == 1)
}

/// The kept changes of a number, oldest first.
pub async fn kept_for(
    db: &PgPool,
    namespace: &str,
    phone_number_id: &str,
    limit: i64,
) -> Result<Vec<Unrouted>> {
    sqlx::query_as(
        "SELECT id, value FROM unrouted_webhooks
         WHERE namespace = $1 AND phone_number_id = $2 ORDER BY id LIMIT $3",
    )
    .bind(namespace)
    .bind(phone_number_id)
    .bind(limit)
    .fetch_all(db)
    .await
    .step("reading unrouted webhooks")
}

/// Forget changes once they were ingested (the ingest dedupes, so a replay twice is harmless).
pub async fn forget(db: &PgPool, ids: &[i64]) -> Result<u64> {
    let done = sqlx::query("DELETE FROM unrouted_webhooks WHERE id = ANY($1)")
        .bind(ids)
        .execute(db)
        .await
        .step("forgetting replayed webhooks")?;
    Ok(done.rows_affected())
}

/// Drop what is older than [`RETENTION_DAYS`]; returns how many.
pub async fn expire(db: &PgPool) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM unrouted_webhooks WHERE received_at < now() - make_interval(days => $1)",
    )
    .bind(RETENTION_DAYS)
    .execute(db)
    .await
    .step("expiring unrouted webhooks")?;
    Ok(done.rows_affected())
}

/// How many changes a namespace keeps.
pub async fn count(db: &PgPool, namespace: &str) -> Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM unrouted_webhooks WHERE namespace = $1")
            .bind(namespace)
            .fetch_one(db)
            .await
            .step("counting unrouted webhooks")?;
    Ok(n)
}
