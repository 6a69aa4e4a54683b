//! Worker benchmarks. Prints figures; asserts nothing. Postgres: DATABASE_URL, or a throwaway
//! cluster with default durability (fsync on).
//!
//! ```text
//! cargo run --release -p worker --bin worker-bench -- webhooks --rate 500 --seconds 10
//! cargo run --release -p worker --bin worker-bench -- turns --messages 3000 --conversations 300
//! cargo run --release -p worker --bin worker-bench -- inbox --handoffs 2000 --replies 2000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fakes::cloud_api::{CloudApiConfig, FakeCloudApi};
use fakes::llm::FakeLlm;
use serde_json::json;
use sqlx::PgPool;
use worker::config::AccountArgs;
use worker::gateway::lease::LeaseSettings;
use worker::gateway::{self, GatewaySettings};
use worker::metrics::Metrics;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Webhook ack latency at a fixed rate (open loop), then sustained ingest with concurrency.
    Webhooks {
        #[arg(long, default_value_t = 500)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 10_000)]
        sustained_messages: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Agent turns per second with a zero-latency fake model.
    Turns {
        #[arg(long, default_value_t = 3000)]
        messages: usize,
        #[arg(long, default_value_t = 300)]
        conversations: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: i32,
    },
    /// Team inbox over HTTP: list and transcript latency with many open handoffs, then human
    /// replies per second (each one a fenced-outbox insert, audit row and NOTIFY, fsync on).
    Inbox {
        #[arg(long, default_value_t = 2000)]
        handoffs: i64,
        #[arg(long, default_value_t = 20)]
        messages_per_conversation: i64,
        #[arg(long, default_value_t = 200)]
        reads: usize,
        #[arg(long, default_value_t = 2000)]
        replies: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn database() -> Result<PgPool> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => queue::testing::start_cluster(queue::testing::Durability::Default)?.url,
    };
    Ok(queue::connect(&url, 40).await?)
}

fn account(cloud: &FakeCloudApi) -> AccountArgs {
    AccountArgs {
        id: "bench/acct".into(),
        phone_number_id: cloud.phone_number_id().into(),
        api_base_url: cloud.api_base_url(),
        waba_id: Some(cloud.waba_id().into()),
        routing: worker::config::RoutingArgs {
            pool: "bench/pool".into(),
            handoff_message: "bye".into(),
            allowed_contacts: vec![],
            max_message_age_seconds: 86_400,
            answer_groups: false,
        },
        access_token: cloud.access_token().into(),
        app_secret: cloud.app_secret().into(),
        verify_token: "v".into(),
        rate_per_second: 1000,
        per_recipient_burst: 45,
        retry: worker::config::RetryArgs {
            max_attempts: 8,
            backoff_seconds: 1,
            in_doubt_grace_seconds: 30,
        },
        media: Default::default(),
    }
}

fn lease() -> LeaseSettings {
    LeaseSettings {
        duty: lease::Duty::Send,
        name: "bench".into(),
        namespace: "bench".into(),
        identity: "bench".into(),
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

/// A webhook-only gateway (no Lease, no sending) for the fake Cloud API's account.
async fn ingress_gateway(
    pool: &PgPool,
    cloud: &FakeCloudApi,
    metrics: Metrics,
) -> Result<gateway::RunningGateway> {
    let settings = GatewaySettings {
        account: account(cloud),
        lease: lease(),
        listen: "127.0.0.1:0".into(),
        ingress_only: true,
    };
    gateway::start(pool.clone(), None, settings, metrics, axum::Router::new())
        .await
        .context("starting the ingress gateway")
}

#[tokio::main]
async fn main() -> Result<()> {
    worker::install_crypto_provider();
    let cli = Cli::parse();
    let pool = database().await?;
    match cli.cmd {
        Cmd::Webhooks {
            rate,
            seconds,
            sustained_messages,
            concurrency,
        } => webhooks(pool, rate, seconds, sustained_messages, concurrency).await,
        Cmd::Turns {
            messages,
            conversations,
            concurrency,
        } => turns(pool, messages, conversations, concurrency).await,
        Cmd::Inbox {
            handoffs,
            messages_per_conversation,
            reads,
            replies,
            concurrency,
        } => {
            inbox(
                pool,
                handoffs,
                messages_per_conversation,
                reads,
                replies,
                concurrency,
            )
            .await
        }
    }
}

async fn webhooks(
    pool: PgPool,
    rate: u64,
    seconds: u64,
    sustained: usize,
    concurrency: usize,
) -> Result<()> {
    let cloud = FakeCloudApi::start(CloudApiConfig::default()).await?;
    let gw = ingress_gateway(&pool, &cloud, Metrics::new().0).await?;
    let url = format!("http://{}/webhook", gw.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // Pre-sign the bodies so the client's work is not in the measurement.
    let total = (rate * seconds) as usize;
    let bodies: Vec<(Vec<u8>, String)> = (0..total + sustained)
        .map(|i| {
            let (_, payload) = cloud.inbound_text(
                &format!("1555{:07}", i % 5000),
                "Bench",
                &format!("message {i} ☕"),
            );
            let body = fakes::cloud_api::meta_json_bytes(&payload);
            let sig = fakes::cloud_api::sign(cloud.app_secret(), &body);
            (body, sig)
        })
        .collect();
    let bodies = Arc::new(bodies);

    // Open loop: each request starts at its scheduled time whether or not earlier ones finished.
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (http, url, bodies) = (http.clone(), url.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let (body, sig) = &bodies[i];
            let t = Instant::now();
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", sig)
                .body(body.clone())
                .send()
                .await;
            (
                t.elapsed().as_secs_f64() * 1000.0,
                r.map(|r| r.status().as_u16()).unwrap_or(0),
            )
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut failed = 0;
    for t in tasks {
        let (ms, status) = t.await?;
        if status != 200 {
            failed += 1;
        }
        lat.push(ms);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "WEBHOOK_LATENCY rate_per_s={rate} requests={total} non_200={failed} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );

    // Sustained: as fast as `concurrency` clients can go.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(total));
    let end = total + sustained;
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, bodies, next) = (http.clone(), url.clone(), bodies.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return;
                }
                let (body, sig) = &bodies[i];
                let _ = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", sig)
                    .body(body.clone())
                    .send()
                    .await;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM inbound_messages")
        .fetch_one(&pool)
        .await?;
    println!(
        "WEBHOOK_INGEST messages={sustained} seconds={secs:.2} messages_per_s={:.0} concurrency={concurrency} inbound_rows_total={stored}",
        sustained as f64 / secs
    );
    gw.kill();
    Ok(())
}

async fn turns(
    pool: PgPool,
    messages: usize,
    conversations: usize,
    concurrency: i32,
) -> Result<()> {
    let cloud = FakeCloudApi::start(CloudApiConfig::default()).await?;
    let llm = FakeLlm::start().await?;
    let (metrics, _) = Metrics::new();
    let gw = ingress_gateway(&pool, &cloud, metrics.clone()).await?;
    let target = worker::gateway::ingest::IngestTarget {
        account: "bench/acct".into(),
        pool: "bench/pool".into(),
        allowed_contacts: vec![],
        max_message_age_seconds: 86_400,
        answer_groups: false,
    };
    // Queue the inbound messages first (through the real ingest), then time the drain.
    let publisher = queue::notifier::Publisher::start(pool.clone());
    for i in 0..messages {
        let (_, payload) = cloud.inbound_text(
            &format!("1666{:07}", i % conversations),
            "Bench",
            &format!("hi {i}"),
        );
        let v = &payload["entry"][0]["changes"][0]["value"];
        let contacts: Vec<worker::gateway::payload::Contact> =
            serde_json::from_value(v["contacts"].clone())?;
        let m = worker::gateway::payload::interpret(&v["messages"][0], &contacts)
            .ok_or_else(|| anyhow::anyhow!("unreadable"))?;
        worker::gateway::ingest::ingest(&pool, &target, &m, &publisher).await?;
    }
    let spec = json!({ "concurrencyPerReplica": concurrency, "model": { "provider": "openai", "baseUrl": llm.base_url(), "model": "zero-latency" } });
    let t0 = Instant::now();
    let core = worker::core::start(
        pool.clone(),
        worker::core::CoreSettings {
            queue: "bench/pool".into(),
            spec: serde_json::from_value(spec)?,
            api_key: Some("k".into()),
            processor_id: "bench-core".into(),
            lock: Duration::from_secs(60),
            poll_interval: Duration::from_millis(200),
        },
        metrics,
    )
    .await?;
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE state IN ('waiting','pending','running')",
        )
        .fetch_one(&pool)
        .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (turns, answered, coalesced): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'answered'), count(*) FILTER (WHERE outcome = 'coalesced') FROM jobs",
    )
    .fetch_one(&pool)
    .await?;
    let mut turn_ms: Vec<f64> = sqlx::query_scalar::<_, i32>("SELECT latency_ms FROM agent_turns")
        .fetch_all(&pool)
        .await?
        .into_iter()
        .map(f64::from)
        .collect();
    turn_ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "TURNS jobs={turns} answered={answered} coalesced={coalesced} seconds={secs:.2} jobs_per_s={:.0} model_calls={} concurrency={concurrency}",
        turns as f64 / secs,
        llm.requests().len()
    );
    println!(
        "TURN_OVERHEAD (from the turn's start to its commit: load + model call to a zero-latency fake) p50_ms={:.1} p99_ms={:.1}",
        percentile(&turn_ms, 0.5),
        percentile(&turn_ms, 0.99)
    );
    core.shutdown().await;
    gw.kill();
    Ok(())
}

async fn inbox(
    pool: PgPool,
    handoffs: i64,
    per_conversation: i64,
    reads: usize,
    replies: usize,
    concurrency: usize,
) -> Result<()> {
    use worker::core::inbox::{self, InboxState, auth, events::TeamEvents};
    // Open handoffs with some history each, half of them assigned to alice.
    let seed = |sql: &'static str| sqlx::query(sql).bind(handoffs).bind(per_conversation);
    for q in [
        seed("INSERT INTO accounts (id, phone_number_id, pool) SELECT 'bench/inbox', 'inbox-phone', 'bench/pool' WHERE $1 > 0 AND $2 > 0"),
        seed("INSERT INTO contacts (account_id, contact_key, wa_id, display_name)
              SELECT 'bench/inbox', '1777' || g, '1777' || g, 'Customer ' || g FROM generate_series(1, $1) g WHERE $2 > 0"),
        seed("INSERT INTO conversations (account_id, contact_id, pool, agent_enabled, state)
              SELECT 'bench/inbox', id, 'bench/pool', false, 'handed_off' FROM contacts
              WHERE account_id = 'bench/inbox' AND $1 > 0 AND $2 > 0"),
        seed("INSERT INTO inbound_messages (account_id, conversation_id, provider_message_id, message_type, body, payload, runs_agent)
              SELECT 'bench/inbox', c.id, 'wamid.inbox.' || c.id || '.' || k, 'text', 'message ' || k, '{}', true
              FROM conversations c, generate_series(1, $2) k WHERE c.account_id = 'bench/inbox' AND $1 > 0"),
        seed("INSERT INTO handoff_tasks (account_id, conversation_id, pool, assignee)
              SELECT 'bench/inbox', id, 'bench/pool', CASE WHEN id % 2 = 0 THEN 'alice' END
              FROM conversations WHERE account_id = 'bench/inbox' AND $1 > 0 AND $2 > 0"),
    ] {
        q.execute(&pool).await.context("seeding open handoffs")?;
    }
    sqlx::query("ANALYZE").execute(&pool).await?;
    let conversations: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM conversations WHERE account_id = 'bench/inbox' ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    let team: Vec<crds::agent_pool::TeamMember> =
        serde_json::from_value(json!([{ "id": "alice" }, { "id": "bob" }]))?;
    let token = "bench-token-0123456789abcdef";
    let (tokens, _) = auth::TeamTokens::from_pairs(
        &team,
        [
            ("alice".to_string(), token.to_string()),
            ("bob".to_string(), format!("{token}-bob")),
        ],
    );
    let (metrics, _) = Metrics::new();
    let server = fakes::Server::start(inbox::router(InboxState {
        db: pool.clone(),
        pool: "bench/pool".into(),
        tokens: auth::SharedTokens::new(tokens),
        events: TeamEvents::start(pool.clone()),
        metrics,
    }))
    .await?;
    let http = reqwest::Client::new();
    let timed_gets = |path: Box<dyn Fn(usize) -> String>| {
        let http = http.clone();
        let base = server.url();
        async move {
            let mut ms = Vec::with_capacity(reads);
            for i in 0..reads {
                let t = Instant::now();
                let resp = http
                    .get(format!("{base}{}", path(i)))
                    .bearer_auth(token)
                    .send()
                    .await?;
                anyhow::ensure!(
                    resp.status().is_success(),
                    "GET {}: {}",
                    path(i),
                    resp.status()
                );
                resp.bytes().await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            ms.sort_by(|a, b| a.total_cmp(b));
            anyhow::Ok(ms)
        }
    };
    let list = timed_gets(Box::new(|_| "/api/inbox?view=all".to_string())).await?;
    let mine = timed_gets(Box::new(|_| "/api/inbox?view=mine".to_string())).await?;
    let ids = conversations.clone();
    let transcript = timed_gets(Box::new(move |i| {
        format!("/api/conversations/{}", ids[(i * 7919) % ids.len()])
    }))
    .await?;
    for (name, ms) in [
        ("list_all", &list),
        ("list_mine", &mine),
        ("transcript", &transcript),
    ] {
        println!(
            "INBOX_READ {name} handoffs={handoffs} messages_per_conversation={per_conversation} p50_ms={:.1} p99_ms={:.1}",
            percentile(ms, 0.5),
            percentile(ms, 0.99)
        );
    }
    // Human replies, `concurrency` at a time, spread over the conversations.
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(replies);
    for i in 0..replies {
        let permit = sem.clone().acquire_owned().await?;
        let http = http.clone();
        let url = format!(
            "{}/api/conversations/{}/messages",
            server.url(),
            conversations[i % conversations.len()]
        );
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let status = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({ "text": format!("human reply {i}") }))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            drop(permit);
            (status, t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut ms = Vec::with_capacity(replies);
    let mut failed = 0;
    for t in tasks {
        let (status, elapsed) = t.await?;
        if status != 201 {
            failed += 1;
        }
        ms.push(elapsed);
    }
    let secs = t0.elapsed().as_secs_f64();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "INBOX_REPLIES replies={replies} failed={failed} concurrency={concurrency} seconds={secs:.2} replies_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        replies as f64 / secs,
        percentile(&ms, 0.5),
        percentile(&ms, 0.99)
    );
    Ok(())
}
