//! Postgres goes away under load and comes back (`pg_ctl stop -m fast`, then `-m immediate`):
//! webhooks keep arriving at a steady rate, a core worker answers, the gateway sends. Every
//! webhook that got 200 is answered exactly once (counted at the fake Cloud API by recipient
//! and by `biz_opaque_callback_data`); every webhook refused meanwhile got a 5xx, so Meta would
//! retry it (and we do, as Meta does, and it is answered once too); `/readyz` says not ready
//! while the database is down and ready after; the same processes carry on (no restart); every
//! job ends completed and every outbound row sent, and nothing is sent again for longer than the
//! in-doubt grace after that.
//!
//! The cluster is this test's own, with Postgres' durability defaults (fsync and
//! synchronous_commit on): an acknowledged webhook must survive an immediate stop.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::{Env, POOL, eventually_async};
use queue::testing::{Durability, StopMode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use worker::gateway::{self, GatewaySettings};
use worker::metrics::Metrics;

/// Webhooks per second while the test runs.
const RATE: u64 = 20;

#[derive(Default)]
struct Outcomes {
    acked: Vec<String>,
    refused: Vec<(String, Value)>,
    other: Vec<(String, String)>,
}

/// Sends one new customer's message every 1/RATE s until cancelled, each on its own task so a
/// slow answer does not slow the rate.
fn load(env: &Env, stop: CancellationToken) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Outcomes>>) {
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let cloud = env.cloud.clone();
    let out = outcomes.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
        let mut in_flight = tokio::task::JoinSet::new();
        for n in 0u64.. {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let contact = format!("1777{n:07}");
            let (_, payload) = cloud.inbound_text(&contact, "Customer", "what are your hours?");
            let (cloud, out) = (cloud.clone(), out.clone());
            in_flight.spawn(async move {
                let status = cloud.deliver(&payload).await;
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                match status {
                    Ok(StatusCode::OK) => o.acked.push(contact),
                    Ok(s) if s.is_server_error() => o.refused.push((contact, payload)),
                    Ok(s) => o.other.push((contact, s.to_string())),
                    Err(e) => o.other.push((contact, e.to_string())),
                }
            });
        }
        while in_flight.join_next().await.is_some() {}
    });
    (task, outcomes)
}

async fn ready(http: &reqwest::Client, addr: std::net::SocketAddr) -> Option<bool> {
    let r = http
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some(r.status() == StatusCode::OK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_webhook_is_answered_once_across_database_restarts() {
    let env = Env::new().await;
    let cluster = queue::testing::start_cluster(Durability::Default).expect("own cluster");
    let db = queue::connect(&cluster.url, 20).await.expect("connect");
    let (metrics, registry) = Metrics::new();
    let probes = worker::http::router(worker::http::Probes {
        pool: db.clone(),
        registry: Arc::new(registry),
        draining: Default::default(),
    });
    let gw = gateway::start(
        db.clone(),
        Some(env.kube_client()),
        GatewaySettings {
            account: env.account(),
            lease: env.lease("gw-restart", 15, 10, 2),
            listen: "127.0.0.1:0".into(),
            ingress_only: false,
        },
        metrics.clone(),
        probes,
    )
    .await
    .expect("gateway");
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let spec: crds::AgentPoolSpec = serde_json::from_value(json!({})).expect("spec");
    let core = worker::core::start(
        db.clone(),
        worker::core::CoreSettings {
            queue: POOL.into(),
            spec,
            api_key: None,
            processor_id: "core-restart".into(),
            lock: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
        },
        metrics,
    )
    .await
    .expect("core");
    let http = reqwest::Client::new();
    assert_eq!(ready(&http, gw.addr).await, Some(true));

    let stop_load = CancellationToken::new();
    let (load_task, outcomes) = load(&env, stop_load.clone());
    let acked = || {
        outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acked
            .len()
    };
    for mode in [StopMode::Fast, StopMode::Immediate] {
        let before = acked();
        eventually_async(
            "traffic to be answered before the outage",
            Duration::from_secs(20),
            || async { acked() >= before + 20 },
        )
        .await;
        cluster.stop(mode).expect("pg_ctl stop");
        eventually_async(
            "/readyz to say not ready",
            Duration::from_secs(20),
            || async { ready(&http, gw.addr).await == Some(false) },
        )
        .await;
        let refused_before = outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused
            .len();
        eventually_async(
            "webhooks to be refused with a 5xx",
            Duration::from_secs(30),
            || async {
                outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .refused
                    .len()
                    > refused_before
            },
        )
        .await;
        cluster.start().expect("pg_ctl start");
        eventually_async(
            "/readyz to say ready again",
            Duration::from_secs(30),
            || async { ready(&http, gw.addr).await == Some(true) },
        )
        .await;
    }
    let before = acked();
    eventually_async(
        "traffic to be acknowledged after the outages",
        Duration::from_secs(30),
        || async { acked() >= before + 20 },
    )
    .await;
    stop_load.cancel();
    load_task.await.expect("load");
    let Outcomes {
        acked,
        refused,
        other,
    } = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
    assert!(other.is_empty(), "neither 200 nor 5xx: {other:?}");
    assert!(!refused.is_empty(), "the outages refused nothing");

    // Meta retries what got a 5xx; so do we, until it is accepted.
    for (_, payload) in &refused {
        eventually_async(
            "a refused webhook to be accepted on retry",
            Duration::from_secs(30),
            || async { env.cloud.deliver(payload).await.ok() == Some(StatusCode::OK) },
        )
        .await;
    }
    let customers: BTreeSet<String> = acked
        .iter()
        .cloned()
        .chain(refused.iter().map(|(c, _)| c.clone()))
        .collect();
    assert_eq!(customers.len(), acked.len() + refused.len());
    eventually_async(
        "every customer to be answered",
        Duration::from_secs(90),
        || async {
            let answered: BTreeSet<String> = env.cloud.sends().into_iter().map(|s| s.to).collect();
            customers.is_subset(&answered)
        },
    )
    .await;

    // Exactly once: one send per customer, one per outbound row.
    let sends = env.cloud.sends();
    let mut per_customer: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &sends {
        *per_customer.entry(s.to.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = per_customer.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    assert_eq!(sends.len(), customers.len(), "sends to unknown customers");
    let callbacks: BTreeSet<_> = sends
        .iter()
        .map(|s| s.biz_opaque_callback_data.clone())
        .collect();
    assert_eq!(
        callbacks.len(),
        sends.len(),
        "an outbound row was sent twice"
    );

    // Nothing is left to run or to send: every job completed and every row sent (sends are
    // recorded group-committed, so the last rows may still be in flight to Postgres the instant
    // the last customer is answered). A row still queued or a job still pending would answer
    // someone again.
    eventually_async(
        "every job completed and every outbound row sent",
        Duration::from_secs(15),
        || async {
            let counts: (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM jobs WHERE state <> 'completed'),
                        (SELECT count(*) FROM outbound_messages
                         WHERE state NOT IN ('sent', 'delivered', 'read'))",
            )
            .fetch_one(&db)
            .await
            .expect("counts");
            counts == (0, 0)
        },
    )
    .await;
    // A resend of a row left in doubt would come after the in-doubt grace (2 s): keep counting.
    common::no_send_after(&env.cloud, sends.len(), Duration::from_secs(3)).await;
    eprintln!(
        "acknowledged {}, refused during the outages {}, answered {}",
        acked.len(),
        refused.len(),
        sends.len()
    );
    core.shutdown().await;
    gw.kill();
}

/// A WhatsApp Web message decrypted while the database is down: its commit (which the client
/// waits for before it acknowledges the message) is retried and lands once Postgres is back,
/// instead of failing at once and leaving the message unacknowledged until WhatsApp redelivers
/// it after the next reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_web_message_met_by_a_database_outage_is_stored_when_it_returns() {
    use whatsapp_rust::prelude::{InboundMessage, MessageBuilderExt, MessageInfo, wa};
    let _deadline = queue::testing::deadline(queue::testing::test_deadline());
    worker::install_crypto_provider();
    let cluster = queue::testing::start_cluster(Durability::Fast).expect("own cluster");
    let db = queue::connect(&cluster.url, 4).await.expect("connect");
    let account = "default/sales-line";
    queue::fence::upsert_account(&db, account, "web:+5511987650001", POOL, "", &[])
        .await
        .expect("account row");
    let (metrics, registry) = Metrics::new();
    let inbound = worker::web::inbound::WebInbound::new(
        db.clone(),
        common::routing().ingest_target(account),
        metrics,
    );
    let jid: whatsapp_rust::Jid = "5511999990001@s.whatsapp.net".parse().expect("jid");
    let mut info = MessageInfo::default();
    info.source.chat = jid.clone();
    info.source.sender = jid;
    info.id = "3EB0OUTAGE".into();
    info.timestamp = chrono::Utc::now();
    let batch = vec![
        InboundMessage::builder()
            .message(Arc::new(wa::Message::text("are you there?")))
            .info(Arc::new(info))
            .build(),
    ];

    cluster.stop(StopMode::Fast).expect("stop");
    let storing = tokio::spawn({
        let inbound = inbound.clone();
        async move { inbound.commit_with_retry(&batch).await.map(|o| o.len()) }
    });
    // The dangerous moment: an attempt failed against the stopped database.
    let retried = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("metrics");
        text.contains("outcome=\"commit_retried\"")
    };
    common::eventually("a failed commit", Duration::from_secs(30), retried).await;
    assert!(
        !storing.is_finished(),
        "gave up while the database was down"
    );
    cluster.start().expect("start");
    let stored = tokio::time::timeout(Duration::from_secs(60), storing)
        .await
        .expect("stored within a minute of the restart")
        .expect("task")
        .expect("committed after retrying");
    assert_eq!(stored, 1);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbound_messages")
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(rows, 1, "the message is stored once");
}
