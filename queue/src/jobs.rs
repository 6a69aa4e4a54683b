//! Jobs: enqueue, claim, heartbeat, complete, fail, replay.
//!
//! A job's `concurrency_key` (a conversation id, for agent turns) serializes it with the other
//! jobs of that key: at most one of them is `pending` or `running` (a unique partial index says
//! so), the rest are `waiting` and are promoted one at a time, in insertion order, as each
//! finishes. Claims never look at waiting jobs, so a busy conversation never delays another.
//!
//! Every claim hands out a fresh `claim_token`; heartbeats, completions and failures present it,
//! so a worker that lost its job (lock expired, job rescued and claimed again) changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, Postgres, Transaction};

use crate::error::{Result, StepExt};
use crate::notifier::JOBS_CHANNEL;

const INSERT_ACTIVE: &str = include_str!("../sql/job_insert_active.sql");
const INSERT_WAITING: &str = include_str!("../sql/job_insert_waiting.sql");
const INSERT_MANY_UNKEYED: &str = include_str!("../sql/job_insert_many_unkeyed.sql");
const INSERT_MANY_KEYED: &str = include_str!("../sql/job_insert_many_keyed.sql");
const CLAIM: &str = include_str!("../sql/job_claim.sql");
const HEARTBEAT: &str = include_str!("../sql/job_heartbeat_if_claimed.sql");
const COMPLETE_MANY: &str = include_str!("../sql/job_complete_many_if_claimed.sql");
const PROMOTE_NEXT: &str = include_str!("../sql/job_promote_next.sql");
const FAIL: &str = include_str!("../sql/job_fail_if_claimed.sql");
const PROMOTE_NEXT_CHAINED: &str = include_str!("../sql/job_promote_next_chained.sql");
const DELETE_MANY: &str = include_str!("../sql/job_delete_many_if_claimed.sql");

/// Default attempts before a job is dead.
pub const MAX_ATTEMPTS_DEFAULT: i32 = 5;

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Queue name; for agent turns, the AgentPool's queue.
    pub queue: String,
    /// What the job does (`agent_turn`, `noop`, ...).
    pub kind: String,
    /// Jobs with the same key run one at a time, in order.
    pub concurrency_key: Option<String>,
    pub payload: Value,
    pub max_attempts: i32,
    /// Not before this time. Default: now.
    pub run_at: Option<DateTime<Utc>>,
}

impl NewJob {
    pub fn new(queue: impl Into<String>, kind: impl Into<String>, payload: Value) -> Self {
        Self {
            queue: queue.into(),
            kind: kind.into(),
            concurrency_key: None,
            payload,
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            run_at: None,
        }
    }

    pub fn keyed(mut self, key: impl Into<String>) -> Self {
        self.concurrency_key = Some(key.into());
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
}

/// A job this worker holds.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub concurrency_key: Option<String>,
    pub payload: Value,
    /// This attempt's number, 1-based.
    pub attempts: i32,
    pub max_attempts: i32,
    /// Presented by every later write of this attempt.
    pub claim_token: i64,
    pub created_at: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
}

/// Enqueue one job in the caller's transaction and notify workers of its queue (delivered on
/// commit; a rolled-back transaction leaves neither job nor notification).
pub async fn enqueue(tx: &mut Transaction<'_, Postgres>, job: &NewJob) -> Result<i64> {
    let id = enqueue_unnotified(tx, job).await?;
    notify(&mut **tx, &job.queue).await?;
    Ok(id)
}

/// Enqueue without notifying: the caller wakes workers after commit (for example through
/// [`crate::notifier::Publisher`]), keeping its transaction off Postgres' notify lock.
pub async fn enqueue_unnotified(tx: &mut Transaction<'_, Postgres>, job: &NewJob) -> Result<i64> {
    let run_at = job.run_at.unwrap_or_else(Utc::now);
    let conn: &mut PgConnection = tx;
    let (id, inserted): (i64, bool) = sqlx::query_as(INSERT_ACTIVE)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(&job.concurrency_key)
        .bind(&job.payload)
        .bind(job.max_attempts)
        .bind(run_at)
        .fetch_one(&mut *conn)
        .await
        .step("inserting job")?;
    let id = if inserted {
        id
    } else {
        let (id,): (i64,) = sqlx::query_as(INSERT_WAITING)
            .bind(&job.queue)
            .bind(&job.kind)
            .bind(&job.concurrency_key)
            .bind(&job.payload)
            .bind(job.max_attempts)
            .bind(run_at)
            .fetch_one(&mut *conn)
            .await
            .step("inserting waiting job")?;
        id
    };
    Ok(id)
}

/// Bulk-enqueue jobs without keys; one statement, one notification.
pub async fn enqueue_many_unkeyed<'e>(
    db: impl PgExecutor<'e> + Copy,
    queue: &str,
    kind: &str,
    payloads: &[Value],
    max_attempts: i32,
) -> Result<Vec<i64>> {
    let ids: Vec<(i64,)> = sqlx::query_as(INSERT_MANY_UNKEYED)
        .bind(queue)
        .bind(kind)
        .bind(payloads)
        .bind(max_attempts)
        .fetch_all(db)
        .await
        .step("bulk inserting jobs")?;
    notify(db, queue).await?;
    Ok(ids.into_iter().map(|(id,)| id).collect())
}

/// Bulk-enqueue keyed jobs, in order per key. For loads where nothing else enqueues the same keys
/// concurrently (benchmarks, imports); the unique index rejects any violation.
pub async fn enqueue_many_keyed(
    tx: &mut Transaction<'_, Postgres>,
    queue: &str,
    kind: &str,
    keys: &[String],
    payloads: &[Value],
    max_attempts: i32,
) -> Result<Vec<i64>> {
    let conn: &mut PgConnection = tx;
    let ids: Vec<(i64,)> = sqlx::query_as(INSERT_MANY_KEYED)
        .bind(queue)
        .bind(kind)
        .bind(keys)
        .bind(payloads)
        .bind(max_attempts)
        .fetch_all(&mut *conn)
        .await
        .step("bulk inserting keyed jobs")?;
    notify(&mut *conn, queue).await?;
    Ok(ids.into_iter().map(|(id,)| id).collect())
}

async fn notify<'e>(db: impl PgExecutor<'e>, queue: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(JOBS_CHANNEL)
        .bind(queue)
        .execute(db)
        .await
        .step("notifying workers")?;
    Ok(())
}

/// Claim up to `limit` runnable jobs of `queue`.
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    queue: &str,
    limit: i64,
    processor_id: &str,
    lock: Duration,
) -> Result<Vec<ClaimedJob>> {
    sqlx::query_as(CLAIM)
        .bind(queue)
        .bind(limit)
        .bind(processor_id)
        .bind(lock.as_secs_f64())
        .fetch_all(db)
        .await
        .step("claiming jobs")
}

/// Extend the locks of held jobs; returns the ids this worker still holds.
pub async fn heartbeat<'e>(
    db: impl PgExecutor<'e>,
    held: &[(i64, i64)],
    lock: Duration,
) -> Result<Vec<i64>> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let rows: Vec<(i64,)> = sqlx::query_as(HEARTBEAT)
        .bind(&ids)
        .bind(&tokens)
        .bind(lock.as_secs_f64())
        .fetch_all(db)
        .await
        .step("heartbeating jobs")?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// One completion: job id, claim token, outcome.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: i64,
    pub claim_token: i64,
    pub outcome: String,
}

/// Complete jobs still held under their tokens and promote the next waiting job of each key.
/// Returns (completed ids, promoted count). Must run in a transaction so the promotion is atomic
/// with the completion.
pub async fn complete_many(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Completion],
) -> Result<(Vec<i64>, u64)> {
    let conn: &mut PgConnection = tx;
    let ids: Vec<i64> = items.iter().map(|c| c.id).collect();
    let tokens: Vec<i64> = items.iter().map(|c| c.claim_token).collect();
    let outcomes: Vec<&str> = items.iter().map(|c| c.outcome.as_str()).collect();
    let done: Vec<(i64, String, Option<String>)> = sqlx::query_as(COMPLETE_MANY)
        .bind(&ids)
        .bind(&tokens)
        .bind(&outcomes)
        .fetch_all(&mut *conn)
        .await
        .step("completing jobs")?;
    let promoted = promote_next(
        &mut *conn,
        done.iter().map(|(_, q, k)| (q.as_str(), k.as_deref())),
    )
    .await?;
    Ok((done.into_iter().map(|(id, _, _)| id).collect(), promoted))
}

/// How a batch completion treats finished rows and the conversations they free.
#[derive(Debug, Clone)]
pub struct CompleteOptions<'a> {
    /// Keep completed rows (`state = 'completed'`, deleted after retention) or delete them now.
    pub retain: bool,
    /// Take up to this many freed keys' next jobs straight to `running` for this processor.
    pub chain_up_to: usize,
    pub processor_id: &'a str,
    pub lock: Duration,
}

/// A job the chained promotion touched: now running for us, or pending for anyone.
#[derive(sqlx::FromRow)]
struct PromotedRow {
    id: i64,
    queue: String,
    kind: String,
    concurrency_key: Option<String>,
    payload: Value,
    attempts: i32,
    max_attempts: i32,
    claim_token: Option<i64>,
    created_at: DateTime<Utc>,
    run_at: DateTime<Utc>,
    state: String,
}

/// Complete jobs (batch), then hand the next job of up to `chain_up_to` freed keys straight to
/// this processor as running; the other freed keys' next jobs become pending. Returns the
/// completed ids and the chained jobs, which the caller must run.
pub async fn complete_many_chained(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Completion],
    opts: &CompleteOptions<'_>,
) -> Result<(Vec<i64>, Vec<ClaimedJob>)> {
    let conn: &mut PgConnection = tx;
    let ids: Vec<i64> = items.iter().map(|c| c.id).collect();
    let tokens: Vec<i64> = items.iter().map(|c| c.claim_token).collect();
    let done: Vec<(i64, String, Option<String>)> = if opts.retain {
        let outcomes: Vec<&str> = items.iter().map(|c| c.outcome.as_str()).collect();
        sqlx::query_as(COMPLETE_MANY)
            .bind(&ids)
            .bind(&tokens)
            .bind(&outcomes)
            .fetch_all(&mut *conn)
            .await
    } else {
        sqlx::query_as(DELETE_MANY)
            .bind(&ids)
            .bind(&tokens)
            .fetch_all(&mut *conn)
            .await
    }
    .step("completing jobs")?;
    let completed: Vec<i64> = done.iter().map(|(id, _, _)| *id).collect();
    let keyed: Vec<(&str, &str)> = done
        .iter()
        .filter_map(|(_, q, k)| k.as_deref().map(|k| (q.as_str(), k)))
        .collect();
    if keyed.is_empty() {
        return Ok((completed, Vec::new()));
    }
    let queues: Vec<&str> = keyed.iter().map(|(q, _)| *q).collect();
    let keys: Vec<&str> = keyed.iter().map(|(_, k)| *k).collect();
    let chain: Vec<bool> = (0..keyed.len()).map(|i| i < opts.chain_up_to).collect();
    let rows: Vec<PromotedRow> = sqlx::query_as(PROMOTE_NEXT_CHAINED)
        .bind(&queues)
        .bind(&keys)
        .bind(&chain)
        .bind(opts.processor_id)
        .bind(opts.lock.as_secs_f64())
        .fetch_all(&mut *conn)
        .await
        .step("promoting waiting jobs")?;
    let mut chained = Vec::new();
    let mut notify_queues: Vec<String> = Vec::new();
    for r in rows {
        match (r.state.as_str(), r.claim_token) {
            ("running", Some(claim_token)) => chained.push(ClaimedJob {
                id: r.id,
                queue: r.queue,
                kind: r.kind,
                concurrency_key: r.concurrency_key,
                payload: r.payload,
                attempts: r.attempts,
                max_attempts: r.max_attempts,
                claim_token,
                created_at: r.created_at,
                run_at: r.run_at,
            }),
            _ => notify_queues.push(r.queue),
        }
    }
    notify_queues.sort_unstable();
    notify_queues.dedup();
    for queue in &notify_queues {
        notify(&mut *conn, queue).await?;
    }
    Ok((completed, chained))
}

/// Complete one job inside the caller's transaction (an agent turn completes its job in the same
/// transaction that writes its replies). Returns false when the claim is no longer ours.
pub async fn complete_if_claimed(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    claim_token: i64,
    outcome: &str,
) -> Result<bool> {
    let (done, _) = complete_many(
        tx,
        &[Completion {
            id,
            claim_token,
            outcome: outcome.to_string(),
        }],
    )
    .await?;
    Ok(!done.is_empty())
}

/// Promote the next waiting job of each (queue, key); notify workers when any was promoted.
pub(crate) async fn promote_next<'a>(
    conn: &mut PgConnection,
    keys: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<u64> {
    let (queues, keys): (Vec<&str>, Vec<&str>) =
        keys.filter_map(|(q, k)| k.map(|k| (q, k))).unzip();
    if keys.is_empty() {
        return Ok(0);
    }
    let promoted = sqlx::query(PROMOTE_NEXT)
        .bind(&queues)
        .bind(&keys)
        .execute(&mut *conn)
        .await
        .step("promoting waiting jobs")?
        .rows_affected();
    if promoted > 0 {
        let mut distinct = queues.clone();
        distinct.sort_unstable();
        distinct.dedup();
        for queue in distinct {
            notify(&mut *conn, queue).await?;
        }
    }
    Ok(promoted)
}

/// What happened to a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailState {
    /// Pending again, to run at the retry time.
    Retrying,
    /// Out of attempts (or a permanent error): dead, kept for inspection and replay.
    Dead,
}

/// Record a failed attempt. `None` when the claim is no longer ours.
pub async fn fail_if_claimed(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    claim_token: i64,
    error: &str,
    retry_at: DateTime<Utc>,
    permanent: bool,
) -> Result<Option<FailState>> {
    let conn: &mut PgConnection = tx;
    let row: Option<(i64, String, String, Option<String>)> = sqlx::query_as(FAIL)
        .bind(id)
        .bind(claim_token)
        .bind(error)
        .bind(retry_at)
        .bind(permanent)
        .fetch_optional(&mut *conn)
        .await
        .step("failing job")?;
    let Some((_, state, queue, key)) = row else {
        return Ok(None);
    };
    if state == "dead" {
        promote_next(
            &mut *conn,
            std::iter::once((queue.as_str(), key.as_deref())),
        )
        .await?;
        Ok(Some(FailState::Dead))
    } else {
        Ok(Some(FailState::Retrying))
    }
}

/// Re-enqueue a dead job as a new job (same queue, kind, key, payload). The dead row is kept and
/// points at its replacement. Returns the new job id, or `None` if the job is not dead.
pub async fn replay_dead(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<Option<i64>> {
    let row: Option<(String, String, Option<String>, Value, i32)> = sqlx::query_as(
        "SELECT queue, kind, concurrency_key, payload, max_attempts FROM jobs
         WHERE id = $1 AND state = 'dead' AND replayed_as IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .step("loading dead job")?;
    let Some((queue, kind, key, payload, max_attempts)) = row else {
        return Ok(None);
    };
    let mut job = NewJob::new(queue, kind, payload).max_attempts(max_attempts);
    job.concurrency_key = key;
    let new_id = enqueue(tx, &job).await?;
    sqlx::query("UPDATE jobs SET replayed_as = $2 WHERE id = $1")
        .bind(id)
        .bind(new_id)
        .execute(&mut **tx)
        .await
        .step("marking dead job replayed")?;
    Ok(Some(new_id))
}

/// Dead jobs of a queue, newest first: what failed and why.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadJob {
    pub id: i64,
    pub kind: String,
    pub concurrency_key: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn list_dead<'e>(
    db: impl PgExecutor<'e>,
    queue: &str,
    limit: i64,
) -> Result<Vec<DeadJob>> {
    sqlx::query_as(
        "SELECT id, kind, concurrency_key, attempts, last_error, finished_at FROM jobs
         WHERE queue = $1 AND state = 'dead' AND replayed_as IS NULL ORDER BY id DESC LIMIT $2",
    )
    .bind(queue)
    .bind(limit)
    .fetch_all(db)
    .await
    .step("listing dead jobs")
}
