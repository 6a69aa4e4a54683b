//! Queue behaviour on a real Postgres (a throwaway cluster, or DATABASE_URL).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use queue::jobs::{self, NewJob};
use queue::outbound::{self, DeliveryStatus, NewOutbound};
use queue::rescuer::{Rescuer, RescuerConfig};
use queue::runner::{self, Handler, Outcome, RunnerConfig};
use queue::testing::{
    TestDb, eventually, generic_plan_nodes, plan_field, statements_with_full_scans,
};
use queue::{fence, stats};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Barrier, Notify};
use tokio_util::sync::CancellationToken;

const LOCK: Duration = Duration::from_secs(30);

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .expect("count query")
}

/// Claim what `queue` has runnable (at most `limit`) and complete each in its own transaction;
/// returns the jobs, in the order they ran.
async fn claim_and_complete(pool: &PgPool, queue: &str, limit: i64) -> Vec<queue::ClaimedJob> {
    let claimed = jobs::claim(pool, queue, limit, "w", LOCK)
        .await
        .expect("claim");
    for j in &claimed {
        let mut tx = pool.begin().await.expect("begin");
        assert!(
            jobs::complete_if_claimed(&mut tx, j.id, j.claim_token, "ok")
                .await
                .expect("complete")
        );
        tx.commit().await.expect("commit");
    }
    claimed
}

async fn enqueue_one(pool: &PgPool, job: NewJob) -> i64 {
    let mut tx = pool.begin().await.expect("begin");
    let id = jobs::enqueue(&mut tx, &job).await.expect("enqueue");
    tx.commit().await.expect("commit");
    id
}

/// Bulk-enqueue `total` keyed no-op jobs spread round-robin over `conversations` keys.
async fn enqueue_keyed(
    pool: &PgPool,
    queue: &str,
    total: usize,
    conversations: usize,
    max_attempts: i32,
) {
    let keys: Vec<String> = (0..total)
        .map(|i| format!("c{}", i % conversations))
        .collect();
    let payloads: Vec<_> = (0..total).map(|i| json!({ "i": i })).collect();
    let mut tx = pool.begin().await.expect("begin");
    jobs::enqueue_many_keyed(&mut tx, queue, "noop", &keys, &payloads, max_attempts)
        .await
        .expect("bulk keyed");
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_complete_every_job_exactly_once() {
    let db = TestDb::with_pool_size(30).await.expect("test db");
    let pool = db.pool.clone();
    const JOBS: usize = 20_000;
    const CLAIMERS: usize = 8;
    // Half the jobs keyed over 500 conversations, half free: both paths under contention.
    let payloads: Vec<_> = (0..JOBS / 2).map(|i| json!({ "i": i })).collect();
    jobs::enqueue_many_unkeyed(&pool, "q", "noop", &payloads, 5)
        .await
        .expect("bulk unkeyed");
    enqueue_keyed(&pool, "q", JOBS / 2, 500, 5).await;

    let barrier = Arc::new(Barrier::new(CLAIMERS));
    let mut tasks = Vec::new();
    for c in 0..CLAIMERS {
        let pool = pool.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let claimed = jobs::claim(&pool, "q", 64, &format!("claimer-{c}"), LOCK)
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    // Nothing claimable now: done once no job is left unfinished, else
                    // another claimer's completion is about to promote one.
                    let unfinished = count(
                        &pool,
                        "SELECT count(*) FROM jobs WHERE state IN ('waiting', 'pending', 'running')",
                    )
                    .await;
                    if unfinished == 0 {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{unfinished} jobs never finished");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let items: Vec<_> = claimed
                    .iter()
                    .map(|j| jobs::Completion {
                        id: j.id,
                        claim_token: j.claim_token,
                        outcome: "ok".into(),
                    })
                    .collect();
                mine.extend(claimed.iter().map(|j| j.id));
                let mut tx = pool.begin().await.expect("begin");
                let (done, _) = jobs::complete_many(&mut tx, &items)
                    .await
                    .expect("complete");
                tx.commit().await.expect("commit");
                assert_eq!(
                    done.len(),
                    items.len(),
                    "every claimed job completes under its own token"
                );
            }
            mine
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for id in t.await.expect("claimer task") {
            assert!(seen.insert(id), "job {id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), JOBS);
    // Verified from the table: every job completed, on its first attempt.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM jobs WHERE state = 'completed' AND attempts = 1"
        )
        .await,
        JOBS as i64
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM jobs").await, JOBS as i64);
}

/// Records, per key, the jobs in the order they ran, and fails if two of a key overlap.
#[derive(Default)]
struct SerialCheck {
    in_flight: Mutex<HashSet<String>>,
    order: Mutex<HashMap<String, Vec<i64>>>,
    overlaps: Mutex<u32>,
    /// The most jobs (of any keys) that ran at once.
    peak: Mutex<usize>,
}

impl SerialCheck {
    /// Jobs of each key, in the order they ran; asserts each key's jobs ran in id order.
    fn assert_in_order(&self) -> HashMap<String, Vec<i64>> {
        let order = self.order.lock().unwrap().clone();
        for (key, ids) in order.iter() {
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            assert_eq!(ids, &sorted, "jobs of {key} ran out of order");
        }
        order
    }
}

/// A runner on `pool` with `handler` until `cancel` fires.
fn spawn_runner(
    pool: &PgPool,
    cfg: RunnerConfig,
    handler: &Arc<SerialCheck>,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(runner::run(
        pool.clone(),
        cfg,
        handler.clone(),
        Arc::new(Notify::new()),
        cancel.clone(),
    ))
}

impl Handler for SerialCheck {
    async fn handle(&self, job: queue::ClaimedJob) -> Outcome {
        let key = job.concurrency_key.clone().unwrap_or_default();
        {
            let mut in_flight = self.in_flight.lock().unwrap();
            if !in_flight.insert(key.clone()) {
                *self.overlaps.lock().unwrap() += 1;
            }
            let mut peak = self.peak.lock().unwrap();
            *peak = (*peak).max(in_flight.len());
        }
        self.order
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(job.id);
        // A job's work takes a moment: long enough for another runner to claim the key's next
        // job if the queue let it.
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.in_flight.lock().unwrap().remove(&key);
        Outcome::Complete("ok".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_running_job_per_conversation_in_order_across_runners() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("queue=debug")
        .try_init();
    let db = TestDb::with_pool_size(30).await.expect("test db");
    let pool = db.pool.clone();
    let total = 3_000usize;
    enqueue_keyed(&pool, "serial", total, 30, 3).await;
    let handler = Arc::new(SerialCheck::default());
    let cancel = CancellationToken::new();
    let mut runners = Vec::new();
    for r in 0..4 {
        let mut cfg = RunnerConfig::new("serial", format!("runner-{r}"));
        cfg.concurrency = 16;
        // Prefetching runners hold jobs they have not started; order and exclusivity must hold
        // all the same.
        cfg.prefetch = [0, 8, 32, 100][r];
        cfg.poll_interval = Duration::from_millis(20);
        runners.push(spawn_runner(&pool, cfg, &handler, &cancel));
    }
    // The handler checks exclusivity as each job starts (no sampling); here we only wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&pool, "SELECT count(*) FROM jobs WHERE state = 'completed'").await != total as i64
    {
        if Instant::now() >= deadline {
            let states: Vec<(String, Option<String>, i64)> = sqlx::query_as(
                "SELECT state, processor_id, count(*) FROM jobs WHERE state <> 'completed' GROUP BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .expect("states");
            panic!("timed out waiting for all serialized jobs to complete; unfinished: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    for r in runners {
        r.await.expect("runner");
    }
    assert_eq!(
        *handler.overlaps.lock().unwrap(),
        0,
        "jobs of one key overlapped"
    );
    // The dangerous moment happened: many conversations ran at once, so one key's next job was
    // claimable by several runners while its previous one ran.
    let peak = *handler.peak.lock().unwrap();
    assert!(peak >= 8, "only {peak} jobs ever ran at once");
    let order = handler.assert_in_order();
    assert_eq!(order.len(), 30);
    for ids in order.values() {
        assert_eq!(ids.len(), 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_conversation_does_not_block_others_and_enqueue_waits_behind_the_active_job() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let a1 = enqueue_one(&pool, NewJob::new("q", "turn", json!({})).keyed("a")).await;
    let a2 = enqueue_one(&pool, NewJob::new("q", "turn", json!({})).keyed("a")).await;
    let b1 = enqueue_one(&pool, NewJob::new("q", "turn", json!({})).keyed("b")).await;
    let claimed = jobs::claim(&pool, "q", 10, "w", LOCK).await.expect("claim");
    let ids: HashSet<i64> = claimed.iter().map(|j| j.id).collect();
    assert_eq!(
        ids,
        HashSet::from([a1, b1]),
        "a2 waits behind a1; b1 is not blocked by a"
    );
    let a1_job = claimed.iter().find(|j| j.id == a1).expect("a1 claimed");
    // A message arriving while a1 runs queues behind it.
    let a3 = enqueue_one(&pool, NewJob::new("q", "turn", json!({})).keyed("a")).await;
    assert!(
        jobs::claim(&pool, "q", 10, "w", LOCK)
            .await
            .expect("claim")
            .is_empty()
    );
    let mut tx = pool.begin().await.expect("begin");
    assert!(
        jobs::complete_if_claimed(&mut tx, a1, a1_job.claim_token, "ok")
            .await
            .expect("complete")
    );
    tx.commit().await.expect("commit");
    let next = jobs::claim(&pool, "q", 10, "w", LOCK).await.expect("claim");
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a2]);
    let mut tx = pool.begin().await.expect("begin");
    assert!(
        jobs::complete_if_claimed(&mut tx, a2, next[0].claim_token, "ok")
            .await
            .expect("complete")
    );
    tx.commit().await.expect("commit");
    let last = jobs::claim(&pool, "q", 10, "w", LOCK).await.expect("claim");
    assert_eq!(last.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_and_completions_of_one_key_never_strand_a_job() {
    enqueues_racing_completions_of_one_key(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_and_one_statement_completions_never_strand_a_job() {
    enqueues_racing_completions_of_one_key(true).await;
}

/// The lost-wakeup race: a job enqueued as `waiting` while the active job completes must still
/// run. Many rounds of enqueue racing completion on one key, completing through the general
/// path (`complete_if_claimed`: a statement and a follow-up) or `complete_one`.
async fn enqueues_racing_completions_of_one_key(one_statement: bool) {
    let db = TestDb::with_pool_size(20).await.expect("test db");
    let pool = db.pool;
    let rounds = 200;
    let producer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..rounds {
                enqueue_one(&pool, NewJob::new("race", "turn", json!({})).keyed("k")).await;
            }
        })
    };
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < rounds {
        assert!(
            Instant::now() < deadline,
            "stranded: only {done} of {rounds} jobs ran"
        );
        let ran = if one_statement {
            let claimed = jobs::claim(&pool, "race", 10, "w", LOCK)
                .await
                .expect("claim");
            for j in &claimed {
                assert!(
                    jobs::complete_one(&pool, j.id, j.claim_token, "ok")
                        .await
                        .expect("complete")
                );
            }
            claimed
        } else {
            claim_and_complete(&pool, "race", 10).await
        };
        assert!(ran.len() <= 1, "two jobs of one key claimed at once");
        done += ran.len();
    }
    producer.await.expect("producer");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM jobs WHERE state <> 'completed'"
        )
        .await,
        0
    );
}

/// Wait until one session of the test database waits for a lock.
async fn one_session_waits_for_a_lock(pool: &PgPool, what: &str) {
    eventually(what, Duration::from_secs(10), || async {
        count(
            pool,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
}

/// Lock the key's row (the conversation row in the worker), then enqueue `job` behind its key's
/// running job, in a transaction left open.
async fn enqueue_under_lock<'a>(
    pool: &'a PgPool,
    key: i32,
    job: &NewJob,
) -> sqlx::Transaction<'a, sqlx::Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM key_rows WHERE id = $1 FOR UPDATE")
        .bind(key)
        .execute(&mut *tx)
        .await
        .expect("key lock");
    jobs::enqueue(&mut tx, job).await.expect("enqueue");
    tx
}

/// An agent turn's commit reduced to its locking: one statement that locks the key's row, then
/// completes the job under its claim and promotes the key's next job, through
/// queue_promote_next_after or, with `inline_promotion`, inside the statement from the
/// statement's own snapshot. Returns (completed, promoted).
async fn complete_locking_key_in_statement(
    pool: &PgPool,
    key: i32,
    job: &queue::ClaimedJob,
    inline_promotion: bool,
) -> (i64, i64) {
    let promoted = if inline_promotion {
        "UPDATE jobs j SET state = 'pending'
         FROM done d CROSS JOIN LATERAL (
             SELECT w.id FROM jobs w
             WHERE w.queue = d.queue AND w.concurrency_key = d.concurrency_key
               AND w.state = 'waiting' AND w.id > d.id
             ORDER BY w.id LIMIT 1) head
         WHERE j.id = head.id RETURNING j.id"
    } else {
        "SELECT queue_promote_next_after(d.queue, d.concurrency_key, d.id, 'queue_jobs') AS id FROM done d"
    };
    let sql = format!(
        "WITH locked AS MATERIALIZED (SELECT id FROM key_rows WHERE id = $1 FOR UPDATE),
         done AS (
             UPDATE jobs j SET state = 'completed', finished_at = now(), locked_until = NULL
             FROM locked
             WHERE j.id = $2 AND j.claim_token = $3 AND j.state = 'running'
             RETURNING j.id, j.queue, j.concurrency_key),
         promoted AS MATERIALIZED ({promoted})
         SELECT (SELECT count(*) FROM done), (SELECT count(id) FROM promoted)"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(key)
        .bind(job.id)
        .bind(job.claim_token)
        .fetch_one(pool)
        .await
        .expect("completion")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_locks_the_key_in_its_own_statement_never_strands_a_job() {
    // The lost-wakeup race of an agent turn's one-statement commit, played out step by step: an
    // enqueue takes the key's row and queues a job behind the running one, and holds its
    // transaction open while the running job completes in a statement that takes the same row
    // first. That statement's snapshot predates the enqueue's commit, so a promotion from it
    // misses the queued job, which would never run (no rescuer runs here): the control shows
    // that it does. queue_promote_next_after takes a fresh snapshot after the lock and finds it.
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    sqlx::raw_sql(
        "CREATE TABLE key_rows (id int PRIMARY KEY); INSERT INTO key_rows VALUES (1), (2)",
    )
    .execute(&pool)
    .await
    .expect("key rows");
    for (key, inline_promotion) in [(1, true), (2, false)] {
        let job = NewJob::new("locked", "turn", json!({})).keyed(format!("k{key}"));
        enqueue_one(&pool, job.clone()).await;
        let running = jobs::claim(&pool, "locked", 10, "w", LOCK)
            .await
            .expect("claim");
        assert_eq!(running.len(), 1);
        let enqueue = enqueue_under_lock(&pool, key, &job).await;
        let completion = {
            let (pool, first) = (pool.clone(), running[0].clone());
            tokio::spawn(async move {
                complete_locking_key_in_statement(&pool, key, &first, inline_promotion).await
            })
        };
        one_session_waits_for_a_lock(&pool, "the completion to wait for the key's row").await;
        enqueue.commit().await.expect("commit the enqueue");
        let (completed, promoted) = completion.await.expect("completion task");
        assert_eq!(completed, 1, "the claim was ours");
        let next = jobs::claim(&pool, "locked", 10, "w", LOCK)
            .await
            .expect("claim");
        if inline_promotion {
            assert_eq!(
                (promoted, next.len()),
                (0, 0),
                "the statement's own snapshot misses the job queued behind (the control)"
            );
        } else {
            assert_eq!(promoted, 1, "the function saw the job queued behind");
            assert_eq!(next.len(), 1, "the job queued behind was promoted and runs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_statement_completion_promotes_a_job_queued_while_it_waited() {
    // As above, without a key row: the enqueue touches the running job's row and holds its
    // transaction open; `complete_one` waits for that row inside its statement, and promotes the
    // job queued behind from a snapshot taken after the wait.
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let job = NewJob::new("one", "turn", json!({})).keyed("k");
    enqueue_one(&pool, job.clone()).await;
    let running = jobs::claim(&pool, "one", 10, "w", LOCK)
        .await
        .expect("claim");
    assert_eq!(running.len(), 1);
    let mut enqueue = pool.begin().await.expect("begin");
    jobs::enqueue(&mut enqueue, &job).await.expect("enqueue");
    let completion = {
        let (pool, first) = (pool.clone(), running[0].clone());
        tokio::spawn(async move {
            jobs::complete_one(&pool, first.id, first.claim_token, "ok")
                .await
                .expect("complete")
        })
    };
    one_session_waits_for_a_lock(&pool, "the completion to wait for the job's row").await;
    enqueue.commit().await.expect("commit the enqueue");
    assert!(
        completion.await.expect("completion task"),
        "the claim was ours"
    );
    let next = jobs::claim(&pool, "one", 10, "w", LOCK)
        .await
        .expect("claim");
    assert_eq!(next.len(), 1, "the job queued behind was promoted and runs");
    assert!(
        !jobs::complete_one(&pool, running[0].id, running[0].claim_token, "again")
            .await
            .expect("complete"),
        "a completed job's claim is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promotion_function_probes_the_waiting_index_on_a_fresh_install() {
    // queue_promote_next_after plans its query once per session, on whatever the tables held
    // then; on a fresh install's empty tables it must still probe by key, not scan `jobs`.
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let mut tx = pool.begin().await.expect("begin");
    // This backend's counters not yet flushed (they hold the migrations' scans too): the
    // promotion's own scans are the difference.
    let scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs'";
    let before: (i64, i64) = sqlx::query_as(scans)
        .fetch_one(&mut *tx)
        .await
        .expect("scans before");
    let promoted: Option<i64> =
        sqlx::query_scalar("SELECT queue_promote_next_after('q', 'k', 0, 'queue_jobs')")
            .fetch_one(&mut *tx)
            .await
            .expect("promotion");
    assert_eq!(promoted, None);
    let after: (i64, i64) = sqlx::query_as(scans)
        .fetch_one(&mut *tx)
        .await
        .expect("scans after");
    let (seq_scans, index_scans) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(seq_scans, 0, "the promotion scanned jobs in full");
    assert!(index_scans > 0, "the promotion probed no index");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_enqueues_racing_completions_of_their_keys_never_strand_a_job_and_keep_order() {
    // As above, with bulk enqueues: each batch adds two jobs to each of two keys whose active
    // jobs are being completed meanwhile.
    let db = TestDb::with_pool_size(20).await.expect("test db");
    let pool = db.pool;
    let rounds = 100usize;
    let producer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for r in 0..rounds {
                let keys: Vec<String> =
                    ["a", "b", "a", "b"].iter().map(|k| k.to_string()).collect();
                let payloads: Vec<_> = (0..4).map(|i| json!({ "r": r, "i": i })).collect();
                let mut tx = pool.begin().await.expect("begin");
                let ids = jobs::enqueue_many_keyed(&mut tx, "bulk", "turn", &keys, &payloads, 3)
                    .await
                    .expect("bulk enqueue");
                assert_eq!(ids.len(), 4);
                assert!(
                    ids[0] < ids[2] && ids[1] < ids[3],
                    "ids follow input order per key: {ids:?}"
                );
                tx.commit().await.expect("commit");
            }
        })
    };
    let total = rounds * 4;
    let mut ran: HashMap<String, Vec<i64>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ran.values().map(Vec::len).sum::<usize>() < total {
        assert!(
            Instant::now() < deadline,
            "stranded: only {} of {total} jobs ran",
            ran.values().map(Vec::len).sum::<usize>()
        );
        let claimed = claim_and_complete(&pool, "bulk", 10).await;
        assert!(claimed.len() <= 2, "two jobs of one key claimed at once");
        for j in claimed {
            ran.entry(j.concurrency_key.unwrap_or_default())
                .or_default()
                .push(j.id);
        }
    }
    producer.await.expect("producer");
    for (key, ids) in &ran {
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, &sorted, "jobs of {key} ran out of order");
    }
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM jobs WHERE state <> 'completed'"
        )
        .await,
        0
    );
}

/// Runs a job at a time and never finishes it: a worker stuck or about to be killed, holding
/// its prefetched jobs.
#[derive(Default)]
struct Stuck {
    started: Mutex<Vec<i64>>,
}

impl Handler for Stuck {
    async fn handle(&self, job: queue::ClaimedJob) -> Outcome {
        self.started.lock().unwrap().push(job.id);
        futures::future::pending::<Outcome>().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_prefetched_jobs_loses_none_and_order_holds() {
    let db = TestDb::with_pool_size(20).await.expect("test db");
    let pool = db.pool.clone();
    // 10 conversations x 6 jobs.
    enqueue_keyed(&pool, "pf", 60, 10, 5).await;
    let doomed = Arc::new(Stuck::default());
    let mut cfg = RunnerConfig::new("pf", "doomed");
    cfg.concurrency = 1;
    cfg.prefetch = 50;
    cfg.lock = Duration::from_millis(900);
    cfg.poll_interval = Duration::from_millis(20);
    // Its own runtime and connections, so that killing it stops every task it spawned
    // (heartbeats included), as a SIGKILL would.
    let doomed_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (url, handler) = (db.url.clone(), doomed.clone());
    doomed_rt.spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_lazy(&url)
            .expect("pool");
        runner::run(
            pool,
            cfg,
            handler,
            Arc::new(Notify::new()),
            CancellationToken::new(),
        )
        .await
    });
    // It holds the head job of every conversation: one running, nine prefetched, all under its
    // claim, their locks extended by its heartbeats.
    eventually("the prefetch", Duration::from_secs(10), || async {
        count(
            &pool,
            "SELECT count(*) FROM jobs WHERE state = 'running' AND processor_id = 'doomed'",
        )
        .await
            >= 10
    })
    .await;
    assert_eq!(
        doomed.started.lock().unwrap().len(),
        1,
        "one runs, the rest wait locally"
    );
    // Heartbeats keep prefetched jobs ours past the locks they were claimed with.
    let first_locks: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(locked_until) FROM jobs WHERE processor_id = 'doomed'")
            .fetch_one(&pool)
            .await
            .expect("locks");
    eventually(
        "the first locks to pass",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, bool>("SELECT now() > $1")
                .bind(first_locks)
                .fetch_one(&pool)
                .await
                .expect("clock")
        },
    )
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs WHERE state = 'running' AND processor_id = 'doomed' AND locked_until > now()").await,
        10,
        "prefetched jobs are heartbeated"
    );
    // Killed: no heartbeat, no completion, nothing handed back.
    doomed_rt.shutdown_background();
    let rescuer = Rescuer::new(pool.clone(), RescuerConfig::default());
    let rescued = std::sync::atomic::AtomicU64::new(0);
    eventually(
        "the killed worker's 10 jobs to be rescued",
        Duration::from_secs(15),
        || async {
            let n = rescuer.run_once().await.expect("rescue").retried;
            rescued.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n >= 10
        },
    )
    .await;
    // A survivor (prefetching too) runs everything, once each, in each conversation's order.
    let survivor = Arc::new(SerialCheck::default());
    let cancel = CancellationToken::new();
    let mut cfg = RunnerConfig::new("pf", "survivor");
    cfg.concurrency = 4;
    cfg.prefetch = 16;
    cfg.poll_interval = Duration::from_millis(20);
    let task = spawn_runner(&pool, cfg, &survivor, &cancel);
    eventually(
        "the survivor to drain after the kill",
        Duration::from_secs(30),
        || async {
            count(&pool, "SELECT count(*) FROM jobs WHERE state = 'completed'").await >= 60
        },
    )
    .await;
    cancel.cancel();
    task.await.expect("survivor");
    let order = survivor.assert_in_order();
    let ran: usize = order.values().map(Vec::len).sum();
    assert_eq!(ran, 60, "every job ran on the survivor exactly once");
    assert_eq!(*survivor.overlaps.lock().unwrap(), 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs WHERE attempts = 2").await,
        10,
        "the killed worker's jobs count one attempt each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_claimer_job_is_rescued_and_its_late_completion_rejected() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let id = enqueue_one(&pool, NewJob::new("q", "turn", json!({})).keyed("conv")).await;
    // The "crashed" worker: claims with a short lock, then its task is aborted mid-job.
    let crashed = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let claimed = jobs::claim(&pool, "q", 1, "doomed", Duration::from_millis(300))
                .await
                .expect("claim");
            let token = claimed[0].claim_token;
            // Hand the token out, then hang forever as a stuck job would.
            (token, futures::future::pending::<()>())
        })
    };
    let (stale_token, _) = crashed.await.expect("crashed task");
    let rescuer = Rescuer::new(pool.clone(), RescuerConfig::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while rescuer.run_once().await.expect("rescue").retried == 0 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the expired job to be rescued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another worker takes it over (after the short retry delay) and completes it.
    let claimed = loop {
        let c = jobs::claim(&pool, "q", 1, "survivor", LOCK)
            .await
            .expect("claim");
        if !c.is_empty() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the rescued job to be claimable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(claimed[0].id, id);
    assert_eq!(claimed[0].attempts, 2);
    // The dead claimer wakes up: its heartbeat and completion match nothing.
    assert!(
        jobs::heartbeat(&pool, &[(id, stale_token)], LOCK)
            .await
            .expect("heartbeat")
            .is_empty()
    );
    let mut tx = pool.begin().await.expect("begin");
    assert!(
        !jobs::complete_if_claimed(&mut tx, id, stale_token, "late")
            .await
            .expect("stale complete")
    );
    assert!(
        jobs::complete_if_claimed(&mut tx, id, claimed[0].claim_token, "ok")
            .await
            .expect("complete")
    );
    tx.commit().await.expect("commit");
    let (state, outcome): (String, String) =
        sqlx::query_as("SELECT state, outcome FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!((state.as_str(), outcome.as_str()), ("completed", "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescuer_leaves_live_locks_alone_and_kills_jobs_out_of_attempts() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let live = enqueue_one(&pool, NewJob::new("q", "a", json!({}))).await;
    let doomed = enqueue_one(
        &pool,
        NewJob::new("q", "b", json!({})).keyed("k").max_attempts(1),
    )
    .await;
    let behind = enqueue_one(&pool, NewJob::new("q", "c", json!({})).keyed("k")).await;
    let c1 = jobs::claim(&pool, "q", 10, "w", LOCK).await.expect("claim");
    assert_eq!(c1.len(), 2);
    // Expire only the doomed job's lock.
    sqlx::query("UPDATE jobs SET locked_until = now() - interval '1 second' WHERE id = $1")
        .bind(doomed)
        .execute(&pool)
        .await
        .expect("expire");
    let stats = Rescuer::new(pool.clone(), RescuerConfig::default())
        .run_once()
        .await
        .expect("rescue");
    assert_eq!((stats.retried, stats.dead), (0, 1));
    let state = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("state")
        }
    };
    assert_eq!(state(live).await, "running");
    assert_eq!(state(doomed).await, "dead");
    assert_eq!(
        state(behind).await,
        "pending",
        "the dead job's successor was promoted"
    );
    // Dead jobs are inspectable and replayable.
    let dead = jobs::list_dead(&pool, "q", 10).await.expect("list dead");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("lock expired")
    );
    let mut tx = pool.begin().await.expect("begin");
    assert_eq!(
        jobs::replay_dead(&mut tx, Some("another-pool"), doomed)
            .await
            .expect("replay in another queue"),
        None,
        "a replay scoped to another queue leaves the job alone"
    );
    let replayed = jobs::replay_dead(&mut tx, Some("q"), doomed)
        .await
        .expect("replay")
        .expect("was dead");
    tx.commit().await.expect("commit");
    assert_eq!(
        state(replayed).await,
        "waiting",
        "the replay queues behind the key's active job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_back_off_then_die_keeping_the_error() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let id = enqueue_one(&pool, NewJob::new("q", "x", json!({})).max_attempts(2)).await;
    let j = jobs::claim(&pool, "q", 1, "w", LOCK)
        .await
        .expect("claim")
        .remove(0);
    let mut tx = pool.begin().await.expect("begin");
    let retry_at = chrono::Utc::now() + chrono::Duration::seconds(3600);
    let s = jobs::fail_if_claimed(&mut tx, id, j.claim_token, "boom 1", retry_at, false)
        .await
        .expect("fail");
    tx.commit().await.expect("commit");
    assert_eq!(s, Some(jobs::FailState::Retrying));
    assert!(
        jobs::claim(&pool, "q", 1, "w", LOCK)
            .await
            .expect("claim")
            .is_empty(),
        "not before run_at"
    );
    sqlx::query("UPDATE jobs SET run_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect("advance");
    let j = jobs::claim(&pool, "q", 1, "w", LOCK)
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(j.attempts, 2);
    let mut tx = pool.begin().await.expect("begin");
    let s = jobs::fail_if_claimed(&mut tx, id, j.claim_token, "boom 2", retry_at, false)
        .await
        .expect("fail");
    tx.commit().await.expect("commit");
    assert_eq!(s, Some(jobs::FailState::Dead));
    let err: String = sqlx::query_scalar("SELECT last_error FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(err, "boom 2");
    let st = stats::for_queue(&pool, "q").await.expect("stats");
    assert_eq!((st.pending, st.running, st.dead), (0, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_in_a_rolled_back_transaction_leaves_no_job() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let mut tx = pool.begin().await.expect("begin");
    jobs::enqueue(&mut tx, &NewJob::new("q", "x", json!({})).keyed("k"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    assert_eq!(count(&pool, "SELECT count(*) FROM jobs").await, 0);
    let st = stats::for_queue(&pool, "q").await.expect("stats");
    assert_eq!(st.pending, 0);
}

/// Account `ns/acct` with its fence taken by `pod-a`; returns the epoch.
async fn fenced_account(pool: &PgPool) -> i64 {
    fence::upsert_account(pool, "ns/acct", "123", "pool", "bye", &[])
        .await
        .expect("account");
    fence::bump(pool, "ns/acct", "pod-a").await.expect("bump")
}

/// Text `m<n>` from `ns/acct` to its own recipient.
fn text_message(n: i32) -> NewOutbound {
    NewOutbound {
        account_id: "ns/acct".into(),
        conversation_id: None,
        job_id: None,
        recipient: format!("1555000{n}"),
        message: json!({"type": "text", "text": {"body": format!("m{n}")}}),
        sent_by_agent: true,
        sent_by_member: None,
        max_attempts: Some(3),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_fencing_epoch_can_neither_claim_nor_complete() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let old = fenced_account(&pool).await;
    let mut conn = pool.acquire().await.expect("conn");
    outbound::enqueue(&mut conn, &[text_message(1), text_message(2)])
        .await
        .expect("enqueue");
    drop(conn);
    let claimed = outbound::claim_fenced(&pool, "ns/acct", old, 1, "pod-a")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    // pod-b takes the Lease and the fence.
    let new = fence::bump(&pool, "ns/acct", "pod-b").await.expect("bump");
    assert!(new > old);
    assert!(
        outbound::claim_fenced(&pool, "ns/acct", old, 10, "pod-a")
            .await
            .expect("claim")
            .is_empty()
    );
    assert!(
        !outbound::complete_fenced(&pool, claimed[0].id, old, "wamid.x")
            .await
            .expect("complete")
    );
    let fail = outbound::fail_fenced(
        &pool,
        claimed[0].id,
        old,
        None,
        "e",
        chrono::Utc::now(),
        false,
    )
    .await
    .expect("fail");
    assert_eq!(fail, outbound::SendFailState::Stale);
    // The new holder sends the unclaimed message; the in-doubt one waits for its grace period.
    let c2 = outbound::claim_fenced(&pool, "ns/acct", new, 10, "pod-b")
        .await
        .expect("claim");
    assert_eq!(c2.len(), 1);
    assert!(
        outbound::complete_fenced(&pool, c2[0].id, new, "wamid.2")
            .await
            .expect("complete")
    );
    assert!(
        outbound::requeue_in_doubt(&pool, "ns/acct", new, Duration::from_secs(3600))
            .await
            .expect("requeue")
            .is_empty()
    );
    let requeued = outbound::requeue_in_doubt(&pool, "ns/acct", new, Duration::ZERO)
        .await
        .expect("requeue");
    assert_eq!(requeued, vec![claimed[0].id]);
    // A stale holder cannot requeue either.
    assert!(
        outbound::requeue_in_doubt(&pool, "ns/acct", old, Duration::ZERO)
            .await
            .expect("requeue")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_sends_is_recorded_only_under_the_fence_and_never_moves_a_state_back() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let epoch = fenced_account(&pool).await;
    let mut conn = pool.acquire().await.expect("conn");
    let messages: Vec<NewOutbound> = (1..=3).map(text_message).collect();
    let ids = outbound::enqueue(&mut conn, &messages)
        .await
        .expect("enqueue");
    drop(conn);
    let claimed = outbound::claim_fenced(&pool, "ns/acct", epoch, 10, "pod-a")
        .await
        .expect("claim");
    assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
    // The third row's "delivered" webhook arrived before the sender recorded its send.
    outbound::apply_status(
        &pool,
        Some(ids[2]),
        &format!("wamid.{}", ids[2]),
        outbound::DeliveryStatus::Delivered,
        None,
        None,
    )
    .await
    .expect("status");
    let sent: Vec<(i64, String)> = ids.iter().map(|id| (*id, format!("wamid.{id}"))).collect();
    // Under an epoch that is no longer the fence, nothing is recorded.
    assert!(
        outbound::complete_many_fenced(&pool, epoch - 1, &sent)
            .await
            .expect("stale")
            .is_empty()
    );
    let mut recorded = outbound::complete_many_fenced(&pool, epoch, &sent)
        .await
        .expect("record");
    recorded.sort_unstable();
    assert_eq!(recorded, ids);
    let states: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, provider_message_id FROM outbound_messages ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(
        states,
        ids.iter()
            .zip(["sent", "sent", "delivered"])
            .map(|(id, state)| (state.to_string(), Some(format!("wamid.{id}"))))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_leaves_in_order_per_conversation_and_statuses_only_move_forward() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    fence::upsert_account(&pool, "a", "1", "p", "bye", &[])
        .await
        .expect("account");
    let epoch = fence::bump(&pool, "a", "me").await.expect("bump");
    let (contact,): (i64,) = sqlx::query_as(
        "INSERT INTO contacts (account_id, contact_key) VALUES ('a', 'u') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .expect("contact");
    let (conv,): (i64,) = sqlx::query_as("INSERT INTO conversations (account_id, contact_id, pool) VALUES ('a', $1, 'p') RETURNING id")
        .bind(contact)
        .fetch_one(&pool)
        .await
        .expect("conversation");
    let mut conn = pool.acquire().await.expect("conn");
    let ids = outbound::enqueue(
        &mut conn,
        &(0..3)
            .map(|i| NewOutbound {
                account_id: "a".into(),
                conversation_id: Some(conv),
                job_id: None,
                recipient: "u".into(),
                message: json!({"type": "text", "text": {"body": format!("{i}")}}),
                sent_by_agent: true,
                sent_by_member: None,
                max_attempts: Some(3),
            })
            .collect::<Vec<_>>(),
    )
    .await
    .expect("enqueue");
    drop(conn);
    for expected in &ids {
        let c = outbound::claim_fenced(&pool, "a", epoch, 10, "me")
            .await
            .expect("claim");
        assert_eq!(
            c.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![*expected],
            "one at a time, in order"
        );
        assert!(
            outbound::complete_fenced(&pool, *expected, epoch, &format!("wamid.{expected}"))
                .await
                .expect("complete")
        );
    }
    let first = ids[0];
    let pmid = format!("wamid.{first}");
    assert!(
        outbound::apply_status(&pool, None, &pmid, DeliveryStatus::Read, None, None)
            .await
            .expect("read")
    );
    assert!(
        !outbound::apply_status(&pool, None, &pmid, DeliveryStatus::Delivered, None, None)
            .await
            .expect("late delivered")
    );
    assert!(
        !outbound::apply_status(&pool, Some(first), &pmid, DeliveryStatus::Read, None, None)
            .await
            .expect("dup read")
    );
    let state: String = sqlx::query_scalar("SELECT state FROM outbound_messages WHERE id = $1")
        .bind(first)
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(state, "read");
    assert!(
        outbound::apply_status(
            &pool,
            Some(ids[1]),
            "wamid.other",
            DeliveryStatus::Failed,
            Some(131047),
            Some("window")
        )
        .await
        .expect("failed")
    );
    assert!(
        !outbound::apply_status(
            &pool,
            Some(ids[1]),
            "wamid.other",
            DeliveryStatus::Read,
            None,
            None
        )
        .await
        .expect("after failed")
    );
}

/// Gateway replicas start together: concurrent first upserts of one account all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_creating_one_account_at_once_all_succeed() {
    let db = TestDb::with_pool_size(16).await.expect("test db");
    for round in 0..10 {
        let account = format!("ns/line-{round}");
        let phone = format!("phone-{round}");
        let upserts: Vec<_> = (0..8)
            .map(|_| {
                let (pool, account, phone) = (db.pool.clone(), account.clone(), phone.clone());
                tokio::spawn(async move {
                    fence::upsert_account(&pool, &account, &phone, "p", "bye", &[]).await
                })
            })
            .collect();
        for u in upserts {
            u.await.expect("task").expect("upsert");
        }
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(n, 10);
}

/// Status batches (the gateway's group commit) end where applying the same webhooks one by one
/// would, and two batches over the same rows in opposite orders neither deadlock nor go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_batches_move_rows_forward_like_one_by_one() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let ids = queue::testing::sent_outbound_rows(&pool, 40)
        .await
        .expect("sent rows");
    let update = |id: i64, by_provider_id: bool, status| outbound::StatusUpdate {
        our_id: (!by_provider_id).then_some(id),
        provider_message_id: format!("wamid.{id}"),
        status,
        error_code: None,
        error: None,
    };
    let state = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM outbound_messages WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("row")
        }
    };
    use outbound::DeliveryStatus::{Delivered, Failed, Read, Sent};
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let moved = outbound::apply_statuses(
        &pool,
        &[
            update(a, false, Delivered),
            update(a, true, Read),
            update(a, false, Delivered), // late: the row is read by the end
            update(b, true, Delivered),
            update(9_999_999, false, Read), // not ours
            outbound::StatusUpdate {
                our_id: None,
                provider_message_id: "wamid.unknown".into(),
                status: Read,
                error_code: None,
                error: None,
            },
            outbound::StatusUpdate {
                error_code: Some(131047),
                error: Some("re-engagement window".into()),
                ..update(c, false, Failed)
            },
        ],
    )
    .await
    .expect("batch");
    // Each moved its row past where it stood before the batch (`sent`), except the unknown ones.
    assert_eq!(moved, vec![true, true, true, true, false, false, true]);
    assert_eq!(state(a).await, "read");
    assert_eq!(state(b).await, "delivered");
    assert_eq!(state(c).await, "failed");
    let (code, error): (Option<i32>, Option<String>) =
        sqlx::query_as("SELECT error_code, last_error FROM outbound_messages WHERE id = $1")
            .bind(c)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(
        (code, error.as_deref()),
        (Some(131047), Some("re-engagement window"))
    );
    // Nothing moves back: read stays read, failed stays failed.
    let moved = outbound::apply_statuses(&pool, &[update(a, false, Sent), update(c, true, Read)])
        .await
        .expect("stale batch");
    assert_eq!(moved, vec![false, false]);
    assert_eq!(state(a).await, "read");
    assert_eq!(state(c).await, "failed");

    // Two gateways batch the remaining rows at once, in opposite orders and with different
    // states: no deadlock, every row ends at the furthest state either batch gave it.
    let rest: Vec<i64> = ids[3..].to_vec();
    let forward: Vec<_> = rest
        .iter()
        .map(|id| update(*id, false, Delivered))
        .collect();
    let backward: Vec<_> = rest
        .iter()
        .rev()
        .map(|id| update(*id, true, Read))
        .collect();
    for _ in 0..5 {
        let (x, y) = tokio::join!(
            outbound::apply_statuses(&pool, &forward),
            outbound::apply_statuses(&pool, &backward)
        );
        x.expect("forward batch");
        y.expect("backward batch");
    }
    for id in rest {
        assert_eq!(state(id).await, "read", "row {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_on_complete_keeps_order_and_leaves_no_rows() {
    let db = TestDb::with_pool_size(20).await.expect("test db");
    let pool = db.pool.clone();
    let total = 600usize;
    enqueue_keyed(&pool, "del", total, 12, 3).await;
    let handler = Arc::new(SerialCheck::default());
    let cancel = CancellationToken::new();
    let mut cfg = RunnerConfig::new("del", "deleter");
    cfg.concurrency = 8;
    cfg.retain_completed = false;
    cfg.poll_interval = Duration::from_millis(20);
    let runner = spawn_runner(&pool, cfg, &handler, &cancel);
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&pool, "SELECT count(*) FROM jobs").await > 0 {
        assert!(Instant::now() < deadline, "jobs left after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    runner.await.expect("runner");
    assert_eq!(*handler.overlaps.lock().unwrap(), 0);
    let order = handler.assert_in_order();
    let ran: usize = order.values().map(Vec::len).sum();
    assert_eq!(
        ran, total,
        "every job ran exactly once before its row was deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaining_yields_to_a_job_pending_longer() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    let opts = jobs::CompleteOptions {
        retain: true,
        chain_up_to: 10,
        processor_id: "w",
        lock: LOCK,
    };
    let finish = |job: queue::ClaimedJob| jobs::Completion {
        id: job.id,
        claim_token: job.claim_token,
        outcome: "ok".into(),
    };

    // Nothing older is pending: a2 is handed straight to the completing worker.
    let _a1 = enqueue_one(&pool, NewJob::new("fair", "turn", json!({})).keyed("a")).await;
    let a2 = enqueue_one(&pool, NewJob::new("fair", "turn", json!({})).keyed("a")).await;
    let a3 = enqueue_one(&pool, NewJob::new("fair", "turn", json!({})).keyed("a")).await;
    let claimed = jobs::claim(&pool, "fair", 10, "w", LOCK)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let mut tx = pool.begin().await.expect("begin");
    let done = jobs::complete_many_chained(&mut tx, &[finish(claimed[0].clone())], &opts)
        .await
        .expect("complete");
    tx.commit().await.expect("commit");
    assert_eq!(
        done.chained.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![a2]
    );

    // b1 has been pending since before a3 was enqueued: a3 goes to the back of the line
    // (pending) instead of jumping ahead on this worker.
    let b1 = enqueue_one(
        &pool,
        NewJob::new("fair", "turn", json!({}))
            .keyed("b")
            .run_at(chrono::Utc::now() - chrono::Duration::hours(1)),
    )
    .await;
    let mut tx = pool.begin().await.expect("begin");
    let done = jobs::complete_many_chained(&mut tx, &[finish(done.chained[0].clone())], &opts)
        .await
        .expect("complete");
    tx.commit().await.expect("commit");
    assert!(done.chained.is_empty(), "chained past an older pending job");
    assert_eq!(done.promoted, 1);
    let next = jobs::claim(&pool, "fair", 10, "w", LOCK)
        .await
        .expect("claim");
    assert_eq!(
        next.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![b1, a3],
        "claimed oldest first"
    );
}

/// A statement built from shared parts, as it is sent to the database.
fn composed(file: &str) -> &'static str {
    jobs::composed_statements()
        .into_iter()
        .find(|(name, _)| *name == file)
        .map(|(_, text)| text)
        .unwrap_or_else(|| panic!("{file} is not a composed statement"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_probe_indexes_when_planned_on_a_fresh_install() {
    // A connection keeps a statement's generic plan until the table is analyzed again. Planned
    // on a fresh install's never-analyzed tables with the default random_page_cost, a batch
    // completion joined its ids against a sequential scan of `jobs` and kept doing so as the
    // table grew (10 ms for one job at 20,000 rows) until autovacuum came by. The pool's session
    // settings (`queue::session_settings`) keep these statements on their indexes.
    let db = TestDb::new().await.expect("test db");
    let mut conn = db.pool.acquire().await.expect("connection");
    let statements = [
        composed("job_claim.sql"),
        composed("job_finish_and_chain.sql"),
        include_str!("../sql/job_finish_one.sql"),
        composed("job_promote_next_chained.sql"),
        composed("job_promote_next.sql"),
        include_str!("../sql/job_heartbeat_if_claimed.sql"),
        include_str!("../sql/job_fail_if_claimed.sql"),
        include_str!("../sql/job_insert_active.sql"),
        include_str!("../sql/job_insert_waiting.sql"),
        include_str!("../sql/outbound_claim_fenced.sql"),
        include_str!("../sql/outbound_complete_fenced.sql"),
        include_str!("../sql/outbound_fail_fenced.sql"),
        include_str!("../sql/outbound_enqueue.sql"),
        include_str!("../sql/outbound_apply_statuses.sql"),
    ];
    let failures = statements_with_full_scans(&mut conn, &statements)
        .await
        .expect("generic plans");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_statements_probe_by_key_even_with_stale_statistics() {
    // Statistics that say no job is running or waiting once led the planner to scan a partial
    // index in full for every row of a batch (250 ms per 1,000 completions instead of 10).
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    enqueue_keyed(&pool, "q", 5000, 50, 5).await;
    sqlx::raw_sql("UPDATE jobs SET state = 'completed'; ANALYZE jobs")
        .execute(&pool)
        .await
        .expect("stale statistics");
    let mut conn = pool.acquire().await.expect("connection");
    let statements = [
        composed("job_finish_and_chain.sql"),
        include_str!("../sql/job_finish_one.sql"),
        composed("job_promote_next_chained.sql"),
        composed("job_promote_next.sql"),
        include_str!("../sql/job_heartbeat_if_claimed.sql"),
    ];
    for sql in statements {
        let nodes = generic_plan_nodes(&mut conn, sql)
            .await
            .expect("generic plan");
        let head = sql.lines().next().unwrap_or_default();
        let seq_scans: Vec<&str> = nodes
            .iter()
            .filter(|n| plan_field(n, "Node Type") == "Seq Scan")
            .map(|n| plan_field(n, "Relation Name"))
            .collect();
        assert!(seq_scans.is_empty(), "{head}: reads {seq_scans:?} in full");
        let scans: Vec<(String, String)> = nodes
            .iter()
            .filter(|n| !plan_field(n, "Index Name").is_empty())
            .map(|n| {
                (
                    plan_field(n, "Index Name").to_string(),
                    plan_field(n, "Index Cond").to_string(),
                )
            })
            .collect();
        assert!(!scans.is_empty(), "{head}: no index scan at all");
        for (index, cond) in scans {
            // Every scan is bounded by its condition; the waiting index only ever per key.
            let bounded = !cond.is_empty()
                && index != "jobs_running_lock_idx"
                && (index != "jobs_waiting_idx" || cond.contains("concurrency_key"));
            assert!(bounded, "{head}: scans {index} unbounded ({cond:?})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_rows_get_the_accounts_max_attempts_unless_the_enqueue_says() {
    let db = TestDb::new().await.expect("test db");
    let pool = db.pool;
    // The account's gateway writes its spec.delivery.maxAttempts.
    let set_max_attempts = |n: i32| {
        let pool = pool.clone();
        async move {
            fence::upsert_account_row(
                &pool,
                &fence::AccountRow {
                    id: "ns/acct",
                    phone_number_id: "123",
                    pool: "ns/pool",
                    handoff_message: "bye",
                    allowed_contacts: &[],
                    outbound_max_attempts: n,
                    waba_id: None,
                },
            )
            .await
            .expect("account")
        }
    };
    set_max_attempts(3).await;
    let message = |max_attempts: Option<i32>| NewOutbound {
        account_id: "ns/acct".into(),
        conversation_id: None,
        job_id: None,
        recipient: "15550001".into(),
        message: json!({ "type": "text", "text": { "body": "hi" } }),
        sent_by_agent: true,
        sent_by_member: None,
        max_attempts,
    };
    let mut conn = pool.acquire().await.expect("conn");
    let ids = outbound::enqueue(&mut conn, &[message(None), message(Some(5))])
        .await
        .expect("enqueue");
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT max_attempts FROM outbound_messages WHERE id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(attempts, vec![3, 5]);
    // The spec changes: later messages follow it, queued ones keep theirs.
    set_max_attempts(12).await;
    let later = outbound::enqueue(&mut conn, &[message(None)])
        .await
        .expect("enqueue");
    let attempts: i32 =
        sqlx::query_scalar("SELECT max_attempts FROM outbound_messages WHERE id = $1")
            .bind(later[0])
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(attempts, 12);
}
