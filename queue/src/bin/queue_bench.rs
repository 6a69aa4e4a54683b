//! Queue benchmark. Prints figures; asserts nothing.
//!
//! ```text
//! cargo run --release -p queue --bin queue-bench -- all
//! DATABASE_URL=postgres://... queue-bench enqueue 50000 --conversations 1000
//! DATABASE_URL=postgres://... queue-bench drain --concurrency 1000
//! ```
//! `enqueue` and `drain` each print one line `RESULT jobs=N seconds=S jobs_per_s=X`, so an
//! external harness can drive them. Without DATABASE_URL a throwaway cluster with Postgres'
//! default durability (fsync on) is started.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use queue::jobs;
use queue::notifier::Notifier;
use queue::outbound::{self, NewOutbound};
use queue::runner::{self, Handler, Outcome, RunnerConfig};
use queue::{ClaimedJob, fence};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const QUEUE: &str = "bench";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Insert N no-op jobs spread over C conversations (per-conversation serialization on).
    Enqueue {
        n: usize,
        #[arg(long, default_value_t = 1000)]
        conversations: usize,
    },
    /// Run every job of the bench queue to completion with one process.
    Drain {
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        #[arg(long, default_value_t = 1000)]
        claim_batch: usize,
        #[arg(long, default_value_t = 1000)]
        complete_batch: usize,
        /// Delete completed jobs at once instead of keeping them (graphile-worker's choice).
        #[arg(long)]
        delete_completed: bool,
        /// Do not hand a conversation's next job straight to the completing worker.
        #[arg(long)]
        no_chain: bool,
        /// Completion transactions in parallel per batch.
        #[arg(long, default_value_t = 4)]
        complete_parallelism: usize,
        /// Jobs held beyond the concurrency (claimed ahead, or waiting for their completion);
        /// graphile-worker's `localQueue.size` plays this part.
        #[arg(long, default_value_t = 0)]
        prefetch: usize,
    },
    /// Enqueue-to-claim latency with LISTEN/NOTIFY at a steady rate.
    Latency {
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        #[arg(long, default_value_t = 500)]
        rate: u64,
    },
    /// Fenced outbound claim + completion throughput (no HTTP).
    Outbound {
        #[arg(long, default_value_t = 20000)]
        messages: usize,
    },
    /// Everything above with the defaults, on a fresh schema.
    All,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let cluster = queue::testing::start_cluster(queue::testing::Durability::Default)?;
            eprintln!(
                "started a throwaway Postgres (default durability, fsync on) at {}",
                cluster.url
            );
            cluster.url
        }
    };
    let pool = queue::connect(&url, 40).await.context("connecting")?;
    match cli.cmd {
        Cmd::Enqueue { n, conversations } => enqueue(&pool, n, conversations).await?,
        Cmd::Drain {
            concurrency,
            claim_batch,
            complete_batch,
            delete_completed,
            no_chain,
            complete_parallelism,
            prefetch,
        } => {
            let opts = DrainOpts {
                concurrency,
                claim_batch,
                complete_batch,
                retain: !delete_completed,
                chain: !no_chain,
                complete_parallelism,
                prefetch,
            };
            drain(&pool, &opts).await?
        }
        Cmd::Latency { jobs, rate } => latency(&pool, jobs, rate).await?,
        Cmd::Outbound { messages } => outbound_bench(&pool, messages).await?,
        Cmd::All => {
            sqlx::query("TRUNCATE jobs").execute(&pool).await?;
            enqueue(&pool, 50_000, 1000).await?;
            drain(&pool, &DrainOpts::default()).await?;
            latency(&pool, 2000, 500).await?;
            outbound_bench(&pool, 20_000).await?;
        }
    }
    Ok(())
}

fn result(n: usize, elapsed: Duration) {
    let s = elapsed.as_secs_f64();
    println!(
        "RESULT jobs={n} seconds={s:.3} jobs_per_s={:.0}",
        n as f64 / s
    );
}

async fn enqueue(pool: &PgPool, n: usize, conversations: usize) -> Result<()> {
    let start = Instant::now();
    let chunk = 5000;
    let mut i = 0;
    while i < n {
        let m = chunk.min(n - i);
        let keys: Vec<String> = (i..i + m)
            .map(|j| format!("conv-{}", j % conversations.max(1)))
            .collect();
        let payloads: Vec<_> = (i..i + m).map(|j| json!({ "n": j })).collect();
        let mut tx = pool.begin().await?;
        jobs::enqueue_many_keyed(&mut tx, QUEUE, "noop", &keys, &payloads, 5).await?;
        tx.commit().await?;
        i += m;
    }
    eprintln!("enqueue: {n} jobs over {conversations} conversations");
    result(n, start.elapsed());
    Ok(())
}

struct Noop(std::sync::atomic::AtomicUsize);
impl Handler for Noop {
    async fn handle(&self, _job: ClaimedJob) -> Outcome {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Outcome::Complete("ok".into())
    }
}

async fn remaining(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE queue = $1 AND state IN ('waiting','pending','running')",
    )
    .bind(QUEUE)
    .fetch_one(pool)
    .await?)
}

struct DrainOpts {
    concurrency: usize,
    claim_batch: usize,
    complete_batch: usize,
    retain: bool,
    chain: bool,
    complete_parallelism: usize,
    prefetch: usize,
}

impl Default for DrainOpts {
    fn default() -> Self {
        Self {
            concurrency: 1000,
            claim_batch: 1000,
            complete_batch: 1000,
            retain: true,
            chain: true,
            complete_parallelism: 4,
            prefetch: 0,
        }
    }
}

async fn drain(pool: &PgPool, o: &DrainOpts) -> Result<()> {
    let (concurrency, claim_batch, complete_batch) =
        (o.concurrency, o.claim_batch, o.complete_batch);
    let total = remaining(pool).await? as usize;
    let done_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'completed'")
            .bind(QUEUE)
            .fetch_one(pool)
            .await?;
    let notifier = Notifier::start(pool.clone());
    let mut cfg = RunnerConfig::new(QUEUE, format!("bench-{}", std::process::id()));
    cfg.concurrency = concurrency;
    cfg.claim_batch = claim_batch;
    cfg.complete_batch = complete_batch;
    cfg.retain_completed = o.retain;
    cfg.chain = o.chain;
    cfg.complete_parallelism = o.complete_parallelism;
    cfg.prefetch = o.prefetch;
    cfg.poll_interval = Duration::from_millis(50);
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let handler = Arc::new(Noop(Default::default()));
    let task = tokio::spawn(runner::run(
        pool.clone(),
        cfg,
        handler.clone(),
        notifier.jobs(QUEUE),
        cancel.clone(),
    ));
    // Watch the in-process counter (a count(*) loop would steal a core from the run), then
    // confirm from the table that every completion committed.
    while handler.0.load(std::sync::atomic::Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while remaining(pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    cancel.cancel();
    task.await?;
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'completed'")
            .bind(QUEUE)
            .fetch_one(pool)
            .await?;
    let left = remaining(pool).await?;
    let verified = if o.retain {
        format!("{} completed rows", done - done_before)
    } else {
        format!("rows deleted on completion, {left} unfinished left")
    };
    eprintln!(
        "drain: concurrency={concurrency} prefetch={} claim_batch={claim_batch} complete_batch={complete_batch} parallel={} retain={} chain={}: {verified} (table count)",
        o.prefetch, o.complete_parallelism, o.retain, o.chain
    );
    result(total, elapsed);
    Ok(())
}

struct Timed(Mutex<Vec<f64>>);
impl Handler for Timed {
    async fn handle(&self, job: ClaimedJob) -> Outcome {
        let waited = (chrono::Utc::now() - job.created_at)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1000.0;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(waited);
        Outcome::Complete("ok".into())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(pool: &PgPool, n: usize, rate: u64) -> Result<()> {
    let notifier = Notifier::start(pool.clone());
    let handler = Arc::new(Timed(Mutex::new(Vec::with_capacity(n))));
    let mut cfg = RunnerConfig::new("latency", "bench-latency");
    cfg.concurrency = 64;
    // Long poll interval: wake-ups must come from NOTIFY.
    cfg.poll_interval = Duration::from_secs(5);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(runner::run(
        pool.clone(),
        cfg,
        handler.clone(),
        notifier.jobs("latency"),
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in 0..n {
        tick.tick().await;
        let mut tx = pool.begin().await?;
        jobs::enqueue(
            &mut tx,
            &jobs::NewJob::new("latency", "noop", json!({})).keyed(format!("c{}", i % 100)),
        )
        .await?;
        tx.commit().await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while handler.0.lock().unwrap_or_else(|e| e.into_inner()).len() < n && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    task.await?;
    let mut v = handler.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "LATENCY enqueue_to_claim jobs={} rate_per_s={rate} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        v.len(),
        percentile(&v, 0.50),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

async fn outbound_bench(pool: &PgPool, n: usize) -> Result<()> {
    fence::upsert_account(pool, "bench/acct", "bench-phone", "bench", "bye", &[]).await?;
    let epoch = fence::bump(pool, "bench/acct", "bench").await?;
    let mut conn = pool.acquire().await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let msgs: Vec<NewOutbound> = chunk
            .iter()
            .map(|i| NewOutbound {
                account_id: "bench/acct".into(),
                conversation_id: None,
                job_id: None,
                recipient: format!("1555{i:07}"),
                message: json!({"type": "text", "text": {"body": "hi"}}),
                sent_by_agent: true,
                sent_by_member: None,
                max_attempts: Some(3),
            })
            .collect();
        let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
        outbound::enqueue(&mut tx, &msgs).await?;
        tx.commit().await?;
    }
    drop(conn);
    let start = Instant::now();
    let mut sent = 0usize;
    loop {
        let claimed = outbound::claim_fenced(pool, "bench/acct", epoch, 200, "bench").await?;
        if claimed.is_empty() {
            break;
        }
        let provider_ids: Vec<String> = claimed.iter().map(|m| format!("wamid.{}", m.id)).collect();
        let results = futures::future::join_all(
            claimed
                .iter()
                .zip(&provider_ids)
                .map(|(m, pmid)| outbound::complete_fenced(pool, m.id, epoch, pmid)),
        )
        .await;
        for r in results {
            if r? {
                sent += 1;
            }
        }
    }
    let s = start.elapsed().as_secs_f64();
    println!(
        "OUTBOUND deliveries={sent} seconds={s:.3} deliveries_per_s={:.0} (fenced claim + complete, no HTTP)",
        sent as f64 / s
    );
    Ok(())
}
