//! The operator with many numbers: how long reconciling N WhatsAppAccounts (Secrets present)
//! and their AgentPool takes until every account's status is observed and every Lease exists.
//!
//! `cargo bench -p operator --bench reconcile_scale -- --accounts 1000 --concurrency 16`
//!
//! Against the in-process fake API server (HTTP on loopback, the real kube client) and a
//! throwaway Postgres; a real API server adds its own latency per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::{AgentPool, WhatsAppAccount};
use fakes::kube_api::FakeKubeApi;
use futures::StreamExt;
use operator::context::{Context, Settings};
use serde_json::json;

const NS: &str = "bench";

async fn bench(accounts: usize, concurrency: usize) -> anyhow::Result<()> {
    service::install_crypto_provider();
    let api = FakeKubeApi::start().await?;
    let db = queue::testing::TestDb::unbounded(20).await?;
    let mut cfg = kube::Config::new(api.url().parse()?);
    cfg.default_namespace = NS.into();
    let client = kube::Client::try_from(cfg)?;
    let ctx = Arc::new(Context::new(
        client,
        Some(db.pool.clone()),
        Settings {
            worker_image: "example.com/worker:bench".into(),
            database_url: "postgres://queue".into(),
            pool_resync_seconds: 3,
            account_resync_seconds: 10,
        },
        operator::metrics::Metrics::new().0,
        "bench",
    ));
    let b64 = |s: &str| {
        serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap_or_default()
    };
    api.put(
        &format!("/api/v1/namespaces/{NS}/secrets/app-a"),
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "accessToken": b64("t"), "appSecret": b64("s"), "verifyToken": b64("v") } }),
    );
    let path = |name: &str| {
        format!("/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/{NS}/whatsappaccounts/{name}")
    };
    for i in 0..accounts {
        let name = format!("line-{i:05}");
        api.put(
            &path(&name),
            json!({ "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
                    "metadata": { "namespace": NS, "uid": format!("uid-{i}"), "generation": 1 },
                    "spec": { "phoneNumber": "+15550783881", "agentPoolRef": { "name": "support" },
                              "provider": { "cloudApi": { "phoneNumberId": format!("9{i:09}"), "credentialsSecretRef": { "name": "app-a" } } } } }),
        );
    }
    api.put(
        &format!("/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/{NS}/agentpools/support"),
        json!({ "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
                "metadata": { "namespace": NS, "uid": "uid-pool", "generation": 1 }, "spec": {} }),
    );
    let typed: Vec<Arc<WhatsAppAccount>> = (0..accounts)
        .map(|i| {
            let v = api.get(&path(&format!("line-{i:05}"))).unwrap_or_default();
            serde_json::from_value(v).map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    let pool: Arc<AgentPool> = Arc::new(serde_json::from_value(
        api.get(&format!(
            "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/{NS}/agentpools/support"
        ))
        .unwrap_or_default(),
    )?);
    api.clear_requests();

    let started = Instant::now();
    let pool_started = Instant::now();
    operator::pool::reconcile(pool, ctx.clone()).await?;
    let pool_took = pool_started.elapsed();
    let mut slowest = Duration::ZERO;
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(typed)
        .map(|a| {
            let ctx = ctx.clone();
            async move {
                let t = Instant::now();
                operator::account::reconcile(a, ctx).await?;
                Ok(t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for r in results {
        slowest = slowest.max(r?);
    }
    let took = started.elapsed();
    let observed = (0..accounts)
        .filter(|i| {
            api.get(&path(&format!("line-{i:05}")))
                .is_some_and(|a| a["status"]["observedGeneration"] == 1)
        })
        .count();
    let leases = (0..accounts)
        .filter(|i| {
            api.get(&format!(
                "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/whatsapp-line-{i:05}"
            ))
            .is_some()
        })
        .count();
    let requests = api.requests().len();
    println!(
        "reconcile_scale: {accounts} WhatsAppAccounts and their AgentPool, {concurrency} reconciles at once"
    );
    println!(
        "  pool (fleet objects, Role naming {accounts} Leases): {:.0} ms",
        pool_took.as_secs_f64() * 1e3
    );
    println!(
        "  every account reconciled: {:.2} s ({:.0} accounts/s, slowest {:.0} ms); statuses observed {observed}, Leases {leases}",
        took.as_secs_f64(),
        accounts as f64 / took.as_secs_f64(),
        slowest.as_secs_f64() * 1e3
    );
    println!(
        "  API requests: {requests} ({:.1} per account)",
        requests as f64 / accounts as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(
        value("--accounts").unwrap_or(1000),
        value("--concurrency").unwrap_or(16),
    ))
}
