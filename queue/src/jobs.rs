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
use crate::sql::{self, Statement};

const INSERT_ACTIVE: &str = include_str!("../sql/job_insert_active.sql");
const INSERT_WAITING: &str = include_str!("../sql/job_insert_waiting.sql");
const INSERT_MANY_UNKEYED: &str = include_str!("../sql/job_insert_many_unkeyed.sql");
const INSERT_MANY_HEADS: &str = include_str!("../sql/job_insert_many_heads.sql");
const INSERT_MANY_WAITING: &str = include_str!("../sql/job_insert_many_waiting.sql");
static CLAIM: Statement = Statement::new(|| {
    sql::compose(
        include_str!("../sql/job_claim.sql"),
        &[("take_running", sql::take_running("true", "$3", "$4"))],
    )
});
const HEARTBEAT: &str = include_str!("../sql/job_heartbeat_if_claimed.sql");
static PROMOTE_NEXT: Statement = Statement::new(|| {
    sql::compose(
        include_str!("../sql/job_promote_next.sql"),
        &[("next_waiting", sql::next_waiting("k.queue", "k.key", None))],
    )
});
const FAIL: &str = include_str!("../sql/job_fail_if_claimed.sql");
static PROMOTE_NEXT_CHAINED: Statement = Statement::new(|| {
    sql::compose(
        include_str!("../sql/job_promote_next_chained.sql"),
        &[
            ("oldest_pending", sql::oldest_pending("k")),
            ("next_waiting", sql::next_waiting("k.queue", "k.key", None)),
            ("take_running", sql::take_running("head.chain", "$4", "$5")),
        ],
    )
});
static FINISH_AND_CHAIN: Statement = Statement::new(|| {
    sql::compose(
        include_str!("../sql/job_finish_and_chain.sql"),
        &[
            ("oldest_pending", sql::oldest_pending("done")),
            (
                "next_waiting",
                sql::next_waiting("d.queue", "d.concurrency_key", Some("d.id")),
            ),
            ("take_running", sql::take_running("s.chain", "$6", "$7")),
        ],
    )
});

/// The statements built from parts (queue/src/sql.rs), by file name, as the database gets them:
/// for the plan tests, which must plan what runs, not the template.
#[cfg(any(test, feature = "testing"))]
pub fn composed_statements() -> Vec<(&'static str, &'static str)> {
    vec![
        ("job_claim.sql", CLAIM.as_str()),
        ("job_promote_next.sql", PROMOTE_NEXT.as_str()),
        (
            "job_promote_next_chained.sql",
            PROMOTE_NEXT_CHAINED.as_str(),
        ),
        ("job_finish_and_chain.sql", FINISH_AND_CHAIN.as_str()),
    ]
}
const FINISH_ONE: &str = include_str!("../sql/job_finish_one.sql");

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

/// Bulk-enqueue keyed jobs, in order per key; returns their ids in input order. Two statements
/// in the caller's transaction: each key's first job (pending, or queued behind the key's
/// active job, whose row it locks as a single enqueue does), then the rest as waiting. Safe
/// with concurrent completions of the same keys. The locks are taken in input order, so two
/// bulk enqueues (or a bulk enqueue and a completion batch) over the same busy keys can
/// deadlock; Postgres then aborts one, which the caller may retry. Used by bulk loads.
pub async fn enqueue_many_keyed(
    tx: &mut Transaction<'_, Postgres>,
    queue: &str,
    kind: &str,
    keys: &[String],
    payloads: &[Value],
    max_attempts: i32,
) -> Result<Vec<i64>> {
    let conn: &mut PgConnection = tx;
    let n = keys.len().min(payloads.len());
    // The first job of each key, in input order.
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, k) in keys[..n].iter().enumerate() {
        first.entry(k.as_str()).or_insert(i);
    }
    let mut heads: Vec<usize> = first.values().copied().collect();
    heads.sort_unstable();
    let head_keys: Vec<&str> = heads.iter().map(|&i| keys[i].as_str()).collect();
    let head_payloads: Vec<&Value> = heads.iter().map(|&i| &payloads[i]).collect();
    let inserted: Vec<(i64, String, bool)> = sqlx::query_as(INSERT_MANY_HEADS)
        .bind(queue)
        .bind(kind)
        .bind(&head_keys)
        .bind(&head_payloads)
        .bind(max_attempts)
        .fetch_all(&mut *conn)
        .await
        .step("bulk inserting each key's first job")?;
    let mut ids: Vec<Option<i64>> = vec![None; n];
    let head_of: std::collections::HashMap<&str, (i64, bool)> = inserted
        .iter()
        .map(|(id, k, ins)| (k.as_str(), (*id, *ins)))
        .collect();
    for &i in &heads {
        if let Some(&(id, true)) = head_of.get(keys[i].as_str()) {
            ids[i] = Some(id);
        }
    }
    let rest: Vec<usize> = (0..n).filter(|&i| ids[i].is_none()).collect();
    if !rest.is_empty() {
        let rest_keys: Vec<&str> = rest.iter().map(|&i| keys[i].as_str()).collect();
        let rest_payloads: Vec<&Value> = rest.iter().map(|&i| &payloads[i]).collect();
        let waiting: Vec<(i64,)> = sqlx::query_as(INSERT_MANY_WAITING)
            .bind(queue)
            .bind(kind)
            .bind(&rest_keys)
            .bind(&rest_payloads)
            .bind(max_attempts)
            .fetch_all(&mut *conn)
            .await
            .step("bulk inserting waiting jobs")?;
        for (&i, (id,)) in rest.iter().zip(waiting) {
            ids[i] = Some(id);
        }
    }
    notify(&mut *conn, queue).await?;
    Ok(ids.into_iter().flatten().collect())
}

/// Wake the workers of `queue` (delivered when the caller's transaction commits).
pub async fn notify<'e>(db: impl PgExecutor<'e>, queue: &str) -> Result<()> {
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
    sqlx::query_as(CLAIM.as_str())
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
    let opts = CompleteOptions {
        retain: true,
        chain_up_to: 0,
        processor_id: "",
        lock: Duration::ZERO,
    };
    let done = complete_many_chained(tx, items, &opts).await?;
    Ok((done.completed, done.promoted))
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

/// What a batch completion did.
#[derive(Debug, Default)]
pub struct Completed {
    /// Jobs completed (a stale claim token completes nothing).
    pub completed: Vec<i64>,
    /// Next jobs now running for this processor: the caller must run them.
    pub chained: Vec<ClaimedJob>,
    /// Next jobs promoted in all (chained or pending).
    pub promoted: u64,
}

/// A successor promoted by the chained promotion (job_promote_next_chained.sql).
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

/// One finished job and, when promoted in the same statement, its key's next job
/// (job_finish_and_chain.sql).
#[derive(sqlx::FromRow)]
struct FinishedRow {
    finished_id: i64,
    finished_queue: String,
    finished_key: Option<String>,
    id: Option<i64>,
    kind: Option<String>,
    payload: Option<Value>,
    attempts: Option<i32>,
    max_attempts: Option<i32>,
    claim_token: Option<i64>,
    created_at: Option<DateTime<Utc>>,
    run_at: Option<DateTime<Utc>>,
    state: Option<String>,
}

impl FinishedRow {
    /// The successor, when one was promoted: `Ok` if it is now running for us, `Err` (its queue)
    /// if it became pending.
    fn successor(self) -> Option<std::result::Result<ClaimedJob, String>> {
        let promoted = PromotedRow {
            id: self.id?,
            queue: self.finished_queue,
            kind: self.kind?,
            concurrency_key: self.finished_key,
            payload: self.payload?,
            attempts: self.attempts?,
            max_attempts: self.max_attempts?,
            claim_token: self.claim_token,
            created_at: self.created_at?,
            run_at: self.run_at?,
            state: self.state?,
        };
        Some(promoted.into_claimed())
    }
}

impl PromotedRow {
    fn into_claimed(self) -> std::result::Result<ClaimedJob, String> {
        match (self.state.as_str(), self.claim_token) {
            ("running", Some(claim_token)) => Ok(ClaimedJob {
                id: self.id,
                queue: self.queue,
                kind: self.kind,
                concurrency_key: self.concurrency_key,
                payload: self.payload,
                attempts: self.attempts,
                max_attempts: self.max_attempts,
                claim_token,
                created_at: self.created_at,
                run_at: self.run_at,
            }),
            _ => Err(self.queue),
        }
    }
}

/// Complete jobs (batch) and hand each freed key's next job on: straight to `running` for this
/// processor for up to `chain_up_to` keys, to `pending` for the others. Two statements at most:
/// one finishes and promotes what it can see, a second promotes for the keys whose next job
/// was enqueued while the first waited on a lock (usually none).
pub async fn complete_many_chained(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Completion],
    opts: &CompleteOptions<'_>,
) -> Result<Completed> {
    let conn: &mut PgConnection = tx;
    let ids: Vec<i64> = items.iter().map(|c| c.id).collect();
    let tokens: Vec<i64> = items.iter().map(|c| c.claim_token).collect();
    let outcomes: Vec<&str> = items.iter().map(|c| c.outcome.as_str()).collect();
    let rows: Vec<FinishedRow> = sqlx::query_as(FINISH_AND_CHAIN.as_str())
        .bind(&ids)
        .bind(&tokens)
        .bind(&outcomes)
        .bind(opts.retain)
        .bind(i64::try_from(opts.chain_up_to).unwrap_or(i64::MAX))
        .bind(opts.processor_id)
        .bind(opts.lock.as_secs_f64())
        .fetch_all(&mut *conn)
        .await
        .step("completing jobs")?;
    let mut out = Completed::default();
    let mut notify_queues: Vec<String> = Vec::new();
    // Keys freed with no successor visible to the first statement.
    let mut unpromoted: Vec<(String, String)> = Vec::new();
    for row in rows {
        out.completed.push(row.finished_id);
        let freed = row
            .finished_key
            .clone()
            .map(|key| (row.finished_queue.clone(), key));
        match row.successor() {
            Some(Ok(job)) => out.chained.push(job),
            Some(Err(queue)) => notify_queues.push(queue),
            None => unpromoted.extend(freed),
        }
    }
    out.promoted = (out.chained.len() + notify_queues.len()) as u64;
    if !unpromoted.is_empty() {
        let budget = opts.chain_up_to.saturating_sub(out.chained.len());
        let queues: Vec<&str> = unpromoted.iter().map(|(q, _)| q.as_str()).collect();
        let keys: Vec<&str> = unpromoted.iter().map(|(_, k)| k.as_str()).collect();
        let chain: Vec<bool> = (0..unpromoted.len()).map(|i| i < budget).collect();
        let rows: Vec<PromotedRow> = sqlx::query_as(PROMOTE_NEXT_CHAINED.as_str())
            .bind(&queues)
            .bind(&keys)
            .bind(&chain)
            .bind(opts.processor_id)
            .bind(opts.lock.as_secs_f64())
            .fetch_all(&mut *conn)
            .await
            .step("promoting waiting jobs")?;
        out.promoted += rows.len() as u64;
        for row in rows {
            match row.into_claimed() {
                Ok(job) => out.chained.push(job),
                Err(queue) => notify_queues.push(queue),
            }
        }
    }
    notify_queues.sort_unstable();
    notify_queues.dedup();
    for queue in &notify_queues {
        notify(&mut *conn, queue).await?;
    }
    Ok(out)
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

/// Complete one job, if the claim is still ours, in its own transaction of one statement
/// (job_finish_one.sql): the job queued behind it is promoted in the same round trip. Returns
/// false when the claim is no longer ours.
pub async fn complete_one(
    pool: &sqlx::PgPool,
    id: i64,
    claim_token: i64,
    outcome: &str,
) -> Result<bool> {
    let (completed, _promoted): (i64, i64) = sqlx::query_as(FINISH_ONE)
        .bind(id)
        .bind(claim_token)
        .bind(outcome)
        .bind(JOBS_CHANNEL)
        .fetch_one(pool)
        .await
        .step("completing a job")?;
    Ok(completed > 0)
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
    let promoted = sqlx::query(PROMOTE_NEXT.as_str())
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
/// points at its replacement. With `queue`, only a job of that queue is replayed (an admin API
/// scoped to one pool must not touch another's). Returns the new job id, or `None` if the job is
/// not dead (or not of `queue`).
pub async fn replay_dead(
    tx: &mut Transaction<'_, Postgres>,
    queue: Option<&str>,
    id: i64,
) -> Result<Option<i64>> {
    let row: Option<(String, String, Option<String>, Value, i32)> = sqlx::query_as(
        "SELECT queue, kind, concurrency_key, payload, max_attempts FROM jobs
         WHERE id = $1 AND state = 'dead' AND replayed_as IS NULL
           AND ($2::text IS NULL OR queue = $2) FOR UPDATE",
    )
    .bind(id)
    .bind(queue)
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

/// Replay every dead job of `queue` (after its cause was fixed), oldest first so that a
/// conversation's replays keep their order; one transaction per job, so a failure half-way
/// keeps what was replayed. Returns how many were replayed.
pub async fn replay_all_dead(db: &sqlx::PgPool, queue: &str) -> Result<u64> {
    let mut n = 0;
    loop {
        let dead = list_dead(db, queue, 500).await?;
        if dead.is_empty() {
            return Ok(n);
        }
        for j in dead.into_iter().rev() {
            let mut tx = db.begin().await.step("beginning a replay")?;
            if replay_dead(&mut tx, Some(queue), j.id).await?.is_some() {
                n += 1;
            }
            tx.commit().await.step("committing a replay")?;
        }
    }
}

/// Dead jobs of a queue, newest first: what failed and why.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
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
