//! Queue depth and outbound counters, one cheap query each.

use sqlx::PgExecutor;

use crate::error::{Result, StepExt};

const JOBS_BY_QUEUE: &str = include_str!("../sql/job_stats_by_queue.sql");
const OUTBOUND_BY_ACCOUNT: &str = include_str!("../sql/outbound_stats_by_account.sql");

/// Jobs of one queue (an AgentPool).
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct QueueStats {
    pub queue: String,
    /// Pending plus waiting: work not started.
    pub pending: i64,
    pub running: i64,
    pub dead: i64,
    /// Age of the oldest runnable job not started.
    pub oldest_pending_seconds: f64,
}

pub async fn jobs_by_queue<'e>(db: impl PgExecutor<'e>) -> Result<Vec<QueueStats>> {
    sqlx::query_as(JOBS_BY_QUEUE)
        .fetch_all(db)
        .await
        .step("reading queue stats")
}

/// Stats of one queue, zero when it has no unfinished jobs.
pub async fn for_queue<'e>(db: impl PgExecutor<'e>, queue: &str) -> Result<QueueStats> {
    Ok(jobs_by_queue(db)
        .await?
        .into_iter()
        .find(|s| s.queue == queue)
        .unwrap_or_else(|| QueueStats {
            queue: queue.to_string(),
            ..Default::default()
        }))
}

/// Outbound messages of one account.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct OutboundStats {
    pub account_id: String,
    pub queued: i64,
    pub sending: i64,
    pub sent: i64,
    pub failed: i64,
    /// Accepted by WhatsApp in the last five minutes.
    pub sent_recently: i64,
    /// Failed for good in the last five minutes.
    pub failed_recently: i64,
}

pub async fn outbound_by_account<'e>(db: impl PgExecutor<'e>) -> Result<Vec<OutboundStats>> {
    sqlx::query_as(OUTBOUND_BY_ACCOUNT)
        .fetch_all(db)
        .await
        .step("reading outbound stats")
}

/// Open handoffs of one pool (conversations waiting for or with a human).
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct HandoffStats {
    pub open: i64,
    /// Age of the oldest open handoff; 0 when none is open.
    pub oldest_seconds: f64,
}

pub async fn handoffs_for_pool<'e>(db: impl PgExecutor<'e>, pool: &str) -> Result<HandoffStats> {
    sqlx::query_as(
        "SELECT count(*) AS open, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_seconds
         FROM handoff_tasks WHERE pool = $1 AND state = 'open'",
    )
    .bind(pool)
    .fetch_one(db)
    .await
    .step("reading handoff stats")
}
