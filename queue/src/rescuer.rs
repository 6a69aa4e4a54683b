//! The rescuer: returns jobs whose lock expired to pending (or dead), and keeps the table lean.
//!
//! Every worker runs one. `SKIP LOCKED` in the rescue query means two rescuers never touch the
//! same job, and only locks that are already past `locked_until` are considered, so a live
//! worker that heartbeats is never robbed. A job is rescued within one interval of its expiry.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::error::{Result, StepExt};
use crate::jobs::promote_next;

const RESCUE: &str = include_str!("../sql/job_rescue_expired.sql");
const PROMOTE_ORPHANS: &str = include_str!("../sql/job_promote_orphans.sql");
const DELETE_FINISHED: &str = include_str!("../sql/job_delete_finished.sql");

/// How often the rescuer runs. Default: 1 s.
pub const RESCUE_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// How long completed jobs are kept. Default: 24 h.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(24 * 3600);
const BATCH: i64 = 1000;

/// Rescuer settings.
#[derive(Debug, Clone)]
pub struct RescuerConfig {
    /// Time between runs.
    pub interval: Duration,
    /// Completed jobs older than this are deleted.
    pub retention: Duration,
}

impl Default for RescuerConfig {
    fn default() -> Self {
        Self {
            interval: RESCUE_INTERVAL_DEFAULT,
            retention: RETENTION_DEFAULT,
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RescueStats {
    /// Jobs returned to pending.
    pub retried: u64,
    /// Jobs out of attempts, now dead.
    pub dead: u64,
    /// Waiting jobs promoted because their key had no active job.
    pub orphans_promoted: u64,
    /// Completed jobs deleted for retention.
    pub deleted: u64,
}

/// Retention deletes run at most this often (they scan completed jobs in id order).
const CLEANUP_INTERVAL: Duration = Duration::from_secs(60);

pub struct Rescuer {
    pool: PgPool,
    cfg: RescuerConfig,
    last_cleanup: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Rescuer {
    pub fn new(pool: PgPool, cfg: RescuerConfig) -> Self {
        Self {
            pool,
            cfg,
            last_cleanup: std::sync::Mutex::new(None),
        }
    }

    /// One pass. Tests call it directly.
    pub async fn run_once(&self) -> Result<RescueStats> {
        let mut stats = RescueStats::default();
        let mut tx = self.pool.begin().await.step("beginning rescue")?;
        let rescued: Vec<(i64, String, String, Option<String>)> = sqlx::query_as(RESCUE)
            .bind(BATCH)
            .bind(backoff::at(backoff::retry_delay(
                1,
                Duration::from_millis(100),
                Duration::from_secs(1),
            )))
            .fetch_all(&mut *tx)
            .await
            .step("rescuing expired jobs")?;
        for (id, state, _, _) in &rescued {
            if state == "dead" {
                stats.dead += 1;
                tracing::warn!(
                    job_id = id,
                    "job lock expired on its last attempt; job is dead"
                );
            } else {
                stats.retried += 1;
                tracing::info!(job_id = id, "job lock expired; returned to pending");
            }
        }
        promote_next(
            &mut tx,
            rescued
                .iter()
                .filter(|r| r.1 == "dead")
                .map(|(_, _, q, k)| (q.as_str(), k.as_deref())),
        )
        .await?;
        if stats.retried > 0 {
            let mut queues: Vec<&str> = rescued.iter().map(|r| r.2.as_str()).collect();
            queues.sort_unstable();
            queues.dedup();
            for queue in queues {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(crate::notifier::JOBS_CHANNEL)
                    .bind(queue)
                    .execute(&mut *tx)
                    .await
                    .step("notifying rescued jobs")?;
            }
        }
        tx.commit().await.step("committing rescue")?;

        // The orphan sweep races benignly with completions: the unique index rejects a second
        // active job, and the next pass retries.
        match sqlx::query(PROMOTE_ORPHANS)
            .bind(BATCH)
            .execute(&self.pool)
            .await
        {
            Ok(r) => stats.orphans_promoted = r.rows_affected(),
            Err(error) => tracing::debug!(%error, "orphan promotion raced; retrying next pass"),
        }
        {
            let mut last = self.last_cleanup.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < CLEANUP_INTERVAL) {
                return Ok(stats);
            }
            *last = Some(std::time::Instant::now());
        }
        let cutoff = Utc::now()
            - chrono::Duration::from_std(self.cfg.retention).unwrap_or(chrono::Duration::MAX);
        stats.deleted = sqlx::query(DELETE_FINISHED)
            .bind(cutoff)
            .bind(BATCH * 10)
            .execute(&self.pool)
            .await
            .step("deleting finished jobs")?
            .rows_affected();
        Ok(stats)
    }

    /// Run until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.run_once().await {
                tracing::warn!(error = %error_chain(&error), "rescuer pass failed");
            }
        }
    }
}

/// Render an error with its sources, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}
