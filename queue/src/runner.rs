//! The claim loop: claims jobs in batches for free slots, runs them concurrently, heartbeats
//! them, and completes them in batches.
//!
//! - Claims take as many jobs as there are free slots (up to `claim_batch`). A slot is held from
//!   claim until the completion commits; `concurrency` of them run the handler at once, and
//!   `prefetch` more may wait locally for an execution permit (FIFO) or for their completion
//!   to commit. Prefetched jobs are `running` in the database under our claim and heartbeated
//!   like the rest, so a worker that dies holding them loses none (the rescuer returns them).
//!   With `prefetch` 0 a worker never holds a job it cannot start.
//! - It sleeps on a LISTEN/NOTIFY wake-up or the poll interval when the queue is empty, so an
//!   idle worker does not spin.
//! - Completions go through one task that gathers whatever finished meanwhile into one
//!   transaction: under load, hundreds of jobs per commit.
//! - A job keeps its slot until its completion commits; the slot then passes to the next job of
//!   the same conversation, taken straight to running by the completion (chaining), unless an
//!   older job of the queue is pending. So a busy conversation stays on one worker and costs one
//!   statement per batch, while FIFO order across conversations holds.
//! - A heartbeat task extends the locks of running jobs every `lock / 3`; a job the database no
//!   longer lists as ours (rescued after a stall) is aborted locally.
//! - On cancel it stops claiming, lets running jobs finish (up to `shutdown_grace`) and flushes
//!   completions; jobs still running after that are left to the rescuer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::jobs::{self, ClaimedJob, Completion, FailState};
use crate::rescuer::error_chain;

/// What a handler says about a job it ran.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done; the runner completes it (batched) with this outcome label.
    Complete(String),
    /// The handler already completed it in its own transaction (or found the claim gone).
    Finished,
    /// Failed; retried with backoff unless `permanent` or out of attempts.
    Fail { error: String, permanent: bool },
}

/// Runs one job.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, job: ClaimedJob) -> impl Future<Output = Outcome> + Send;
}

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The queue to work.
    pub queue: String,
    /// Identifies this worker in job rows (pod name plus a random suffix).
    pub processor_id: String,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Jobs held beyond `concurrency`: claimed ahead, or finished and waiting for their
    /// completion to commit. Raises throughput at low concurrency (the handler need not wait
    /// for the completion round trip); costs fairness across workers, since a prefetched job
    /// waits here rather than on an idle worker. Default 0.
    pub prefetch: usize,
    /// Most jobs claimed per query.
    pub claim_batch: usize,
    /// Lock duration of a claim; heartbeats extend it every third of it.
    pub lock: Duration,
    /// Poll interval when no notification arrives.
    pub poll_interval: Duration,
    /// Most completions per transaction.
    pub complete_batch: usize,
    /// How long the completer waits for more completions once one arrived, so that a burst of
    /// finishing jobs shares one transaction.
    pub complete_linger: Duration,
    /// How long to wait for running jobs on shutdown.
    pub shutdown_grace: Duration,
    /// When a job of a conversation completes, run the conversation's next job here with the
    /// freed slot, taken straight to running (one write and one claim saved).
    pub chain: bool,
    /// Keep completed rows (deleted after retention) rather than deleting them at once.
    pub retain_completed: bool,
    /// Completion transactions in flight at once; each takes what finished meanwhile.
    pub complete_parallelism: usize,
}

impl RunnerConfig {
    /// Slots: jobs held at once (running, waiting to run, or waiting for their completion).
    pub fn capacity(&self) -> usize {
        self.concurrency.max(1) + self.prefetch
    }

    pub fn new(queue: impl Into<String>, processor_id: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            processor_id: processor_id.into(),
            concurrency: 8,
            prefetch: 0,
            claim_batch: 100,
            lock: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            complete_batch: 1000,
            complete_linger: Duration::from_millis(2),
            shutdown_grace: Duration::from_secs(25),
            chain: true,
            retain_completed: true,
            complete_parallelism: 4,
        }
    }
}

type Running = Arc<Mutex<HashMap<i64, (i64, tokio::task::AbortHandle)>>>;

/// A job that ran to completion, still holding its slot until the completion commits.
struct Done {
    completion: Completion,
    slot: OwnedSemaphorePermit,
}

/// Run the loop until `cancel` fires.
pub async fn run<H: Handler>(
    pool: PgPool,
    cfg: RunnerConfig,
    handler: Arc<H>,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(cfg.capacity()));
    let exec = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let running: Running = Arc::default();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let local_wake = Arc::new(Notify::new());

    let completer = tokio::spawn(complete_loop(
        Completer {
            pool: pool.clone(),
            cfg: cfg.clone(),
            wake: local_wake.clone(),
            handler: handler.clone(),
            exec: exec.clone(),
            running: running.clone(),
            done: done_tx.downgrade(),
            cancel: cancel.clone(),
        },
        done_rx,
    ));
    let hb_cancel = CancellationToken::new();
    let heartbeater = tokio::spawn(heartbeat_loop(
        pool.clone(),
        cfg.lock,
        running.clone(),
        hb_cancel.clone(),
    ));

    loop {
        if cancel.is_cancelled() {
            break;
        }
        // Take the slots before claiming, so a claim never returns more jobs than slots.
        let want = slots.available_permits().min(cfg.claim_batch);
        let mut permits = match (want > 0)
            .then(|| slots.clone().try_acquire_many_owned(want as u32).ok())
            .flatten()
        {
            Some(p) => p,
            None => {
                // Wait for a slot to free up.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    permit = slots.clone().acquire_owned() => drop(permit),
                }
                continue;
            }
        };
        let free = permits.num_permits();
        let claimed = match jobs::claim(&pool, &cfg.queue, free as i64, &cfg.processor_id, cfg.lock)
            .await
        {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), queue = %cfg.queue, "claim failed");
                drop(permits);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                }
                continue;
            }
        };
        let got = claimed.len();
        for job in claimed {
            // At most `free` jobs were claimed, so a permit is always there.
            let Some(permit) = permits.split(1) else {
                tracing::error!(
                    job_id = job.id,
                    "claimed more jobs than slots; leaving it to the rescuer"
                );
                continue;
            };
            spawn_job(
                &pool,
                handler.clone(),
                job,
                permit,
                exec.clone(),
                done_tx.clone(),
                running.clone(),
            );
        }
        // Unused slots go back before we sleep.
        drop(permits);
        if got < free {
            // Queue drained (for now): sleep until notified, a completion promoted a job, or poll.
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = wake.notified() => {}
                _ = local_wake.notified() => {}
                _ = tokio::time::sleep(cfg.poll_interval) => {}
            }
        }
    }

    // Shutdown: let running jobs finish, then flush completions.
    let all = cfg.capacity() as u32;
    if tokio::time::timeout(cfg.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(queue = %cfg.queue, "jobs still running after the shutdown grace; the rescuer will return them");
    }
    hb_cancel.cancel();
    drop(done_tx);
    let _ = heartbeater.await;
    let _ = completer.await;
}

fn spawn_job<H: Handler>(
    pool: &PgPool,
    handler: Arc<H>,
    job: ClaimedJob,
    permit: OwnedSemaphorePermit,
    exec: Arc<Semaphore>,
    done: mpsc::UnboundedSender<Done>,
    running: Running,
) {
    let pool = pool.clone();
    let (id, token, attempts) = (job.id, job.claim_token, job.attempts);
    let running_for_task = running.clone();
    // Register before the task can finish, so its removal never precedes its insertion.
    let mut guard = running.lock().unwrap_or_else(|e| e.into_inner());
    let task = tokio::spawn(async move {
        // Prefetched jobs wait here, in claim order; the permit goes back as soon as the
        // handler returns, not when the completion commits.
        let outcome = match exec.acquire_owned().await {
            Ok(running_now) => {
                let outcome = handler.handle(job).await;
                drop(running_now);
                outcome
            }
            // Never closed; if it were, the job is still ours and the rescuer returns it.
            Err(_) => return,
        };
        match outcome {
            Outcome::Complete(outcome) => {
                // The slot travels with the completion (see `Done`).
                let _ = done.send(Done {
                    completion: Completion {
                        id,
                        claim_token: token,
                        outcome,
                    },
                    slot: permit,
                });
            }
            Outcome::Finished => drop(permit),
            Outcome::Fail { error, permanent } => {
                // Boxed: the failure path's transaction future is large, and every job task
                // would otherwise carry (and copy) it.
                let recorded = Box::pin(fail(&pool, id, token, attempts, &error, permanent)).await;
                if let Err(e) = recorded {
                    tracing::warn!(job_id = id, error = %error_chain(&e), "recording job failure failed; the rescuer will retry it");
                }
                drop(permit);
            }
        }
        running_for_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    });
    guard.insert(id, (token, task.abort_handle()));
}

async fn fail(
    pool: &PgPool,
    id: i64,
    token: i64,
    attempts: i32,
    error: &str,
    permanent: bool,
) -> crate::Result<()> {
    let mut tx = pool.begin().await.map_err(|source| crate::Error::Query {
        step: "beginning fail",
        source,
    })?;
    let retry_at = backoff::at(backoff::job_retry_delay(attempts));
    let state = jobs::fail_if_claimed(&mut tx, id, token, error, retry_at, permanent).await?;
    tx.commit().await.map_err(|source| crate::Error::Query {
        step: "committing fail",
        source,
    })?;
    match state {
        Some(FailState::Dead) => {
            tracing::warn!(job_id = id, attempt = attempts, error, "job is dead")
        }
        Some(FailState::Retrying) => tracing::info!(
            job_id = id,
            attempt = attempts,
            error,
            "job failed; will retry"
        ),
        None => tracing::info!(job_id = id, "job failed after its claim was lost; ignored"),
    }
    Ok(())
}

/// What the completion task needs, including what it takes to start chained jobs.
struct Completer<H> {
    pool: PgPool,
    cfg: RunnerConfig,
    wake: Arc<Notify>,
    handler: Arc<H>,
    exec: Arc<Semaphore>,
    running: Running,
    /// Weak, so the channel closes once the run loop and every job task are done.
    done: mpsc::WeakUnboundedSender<Done>,
    cancel: CancellationToken,
}

/// Completions flow through up to `complete_parallelism` transactions at once: each takes
/// whatever finished while the others ran (up to `complete_batch`, and at most its share of the
/// slots), so the database always has work and batches grow with load.
async fn complete_loop<H: Handler>(c: Completer<H>, mut rx: mpsc::UnboundedReceiver<Done>) {
    let c = Arc::new(c);
    let parallelism = c.cfg.complete_parallelism.max(1);
    let in_flight = Arc::new(Semaphore::new(parallelism));
    // A batch takes at most its share of the slots: one transaction swallowing every completion
    // would leave the others idle and turn the pipeline into lock-step (measured: 29k jobs/s
    // with 1000-job batches against 46k with 250 at 1000 slots and 4 transactions).
    let batch_limit = c
        .cfg
        .complete_batch
        .min(c.cfg.capacity().div_ceil(parallelism))
        .max(1);
    loop {
        // Wait for a free transaction first, so completions pile up meanwhile.
        let Ok(turn) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else {
            break;
        };
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + c.cfg.complete_linger;
        while batch.len() < batch_limit {
            // Take what is queued at once; linger only when the queue is empty.
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let c = c.clone();
        tokio::spawn(async move {
            complete_and_chain(&c, batch).await;
            drop(turn);
        });
    }
    // Let the transactions in flight finish.
    let _ = in_flight.acquire_many(parallelism as u32).await;
}

/// Commit one batch of completions, then run the chained jobs in the slots the completed ones
/// held. Slots not passed on go back to the claim loop.
async fn complete_and_chain<H: Handler>(c: &Completer<H>, batch: Vec<Done>) {
    let (items, mut freed): (Vec<Completion>, Vec<OwnedSemaphorePermit>) =
        batch.into_iter().map(|d| (d.completion, d.slot)).unzip();
    // Every completed job's slot can carry its conversation's next job; none once shutdown began.
    let chain_up_to = if c.cfg.chain && !c.cancel.is_cancelled() {
        items.len()
    } else {
        0
    };
    let chained = complete_with_retry(&c.pool, &items, &c.cfg, chain_up_to, &c.cancel).await;
    // The promotion notified other workers if it made jobs pending; wake ours too.
    c.wake.notify_one();
    if chained.is_empty() {
        return;
    }
    let Some(done) = c.done.upgrade() else {
        tracing::warn!(
            jobs = chained.len(),
            "chained jobs after shutdown; the rescuer will return them"
        );
        return;
    };
    for job in chained {
        match freed.pop() {
            Some(slot) => spawn_job(
                &c.pool,
                c.handler.clone(),
                job,
                slot,
                c.exec.clone(),
                done.clone(),
                c.running.clone(),
            ),
            None => tracing::error!(
                job_id = job.id,
                "chained more jobs than slots; leaving it to the rescuer"
            ),
        }
    }
}

/// Commit a completion batch, retrying while the database is unavailable. Once shutdown began
/// a failing batch is given up: its jobs are still `running` under our tokens, and the rescuer
/// returns them when their locks expire (at least once, never lost).
async fn complete_with_retry(
    pool: &PgPool,
    items: &[Completion],
    cfg: &RunnerConfig,
    chain_up_to: usize,
    cancel: &CancellationToken,
) -> Vec<ClaimedJob> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter();
    let result = (|| complete_batch(pool, items, cfg, chain_up_to))
        .retry(backoff)
        .when(|_| !cancel.is_cancelled())
        .notify(|error, delay| {
            tracing::warn!(error = %error_chain(error), jobs = items.len(), retry_in_ms = delay.as_millis() as u64, "completing jobs failed; retrying")
        })
        .await;
    match result {
        Ok(chained) => chained,
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), jobs = items.len(), "completing jobs failed during shutdown; the rescuer will rerun them");
            Vec::new()
        }
    }
}

async fn complete_batch(
    pool: &PgPool,
    items: &[Completion],
    cfg: &RunnerConfig,
    chain_up_to: usize,
) -> crate::Result<Vec<ClaimedJob>> {
    let mut tx = pool.begin().await.map_err(|source| crate::Error::Query {
        step: "beginning completion",
        source,
    })?;
    let opts = jobs::CompleteOptions {
        retain: cfg.retain_completed,
        chain_up_to,
        processor_id: &cfg.processor_id,
        lock: cfg.lock,
    };
    let done = jobs::complete_many_chained(&mut tx, items, &opts).await?;
    tx.commit().await.map_err(|source| crate::Error::Query {
        step: "committing completion",
        source,
    })?;
    Ok(done.chained)
}

async fn heartbeat_loop(pool: PgPool, lock: Duration, running: Running, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(lock / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held: Vec<(i64, i64)> = running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, (token, _))| (*id, *token))
            .collect();
        if held.is_empty() {
            continue;
        }
        match jobs::heartbeat(&pool, &held, lock).await {
            Ok(still) => {
                let still: std::collections::HashSet<i64> = still.into_iter().collect();
                let mut map = running.lock().unwrap_or_else(|e| e.into_inner());
                for (id, _) in held.into_iter().filter(|(id, _)| !still.contains(id)) {
                    if let Some((_, handle)) = map.remove(&id) {
                        tracing::warn!(job_id = id, "lost the claim on a running job; aborting it");
                        handle.abort();
                    }
                }
            }
            Err(error) => tracing::warn!(error = %error_chain(&error), "heartbeat failed"),
        }
    }
}
