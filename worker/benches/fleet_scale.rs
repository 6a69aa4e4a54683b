//! A gateway fleet at scale: many numbers on a few `whatsapp-worker fleet` processes.
//!
//! `cargo bench -p worker --bench fleet_scale -- --cloud 1000 --web 200 --pods 2`
//!
//! The fake Kubernetes API, the WhatsApp Web stand-in and a throwaway Postgres run beside the
//! fleet processes (their memory is not counted). The bench starts the fleet pods with no
//! accounts (baseline RSS), applies the accounts (Cloud API ones with credentials Secrets,
//! WhatsApp Web ones pointed at the stand-in), and prints: the time until every number's Lease
//! is held, the time until every WhatsApp Web number is linked and connected, each process's
//! RSS and the memory per number, the fleet's Postgres connections, and after a SIGKILL of one
//! process the time until the survivors hold every Lease again and every WhatsApp Web number is
//! connected again.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

const NS: &str = "bench";

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Pod {
    name: String,
    child: Child,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    env: &common::Env,
    kubeconfig: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Pod> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(env!("CARGO_BIN_EXE_whatsapp-worker"))
        .arg("fleet")
        .env("DATABASE_URL", &env.db.url)
        .env("DB_MAX_CONNECTIONS", "10")
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", NS)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("WA_POOL", format!("{NS}/support"))
        .env("WA_DRAIN_SECONDS", "0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting whatsapp-worker fleet")?;
    Ok(Pod {
        name: name.into(),
        child,
    })
}

fn holders(env: &common::Env, names: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for n in names {
        if let Some(h) = env
            .kube
            .get(&format!(
                "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/whatsapp-{n}"
            ))
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
            .filter(|h| !h.is_empty())
        {
            *out.entry(h).or_default() += 1;
        }
    }
    out
}

async fn wait_owned(
    env: &common::Env,
    names: &[String],
    by: &[&str],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let h = holders(env, names);
        let owned: usize = by.iter().map(|p| h.get(*p).copied().unwrap_or(0)).sum();
        if owned == names.len() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "only {owned} of {} numbers owned by {by:?} after {timeout:?}: {h:?}",
                names.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connected(env: &common::Env, ids: &[String]) -> anyhow::Result<usize> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM wa_web_sessions WHERE account_id = ANY($1) AND state = 'connected'",
    )
    .bind(ids)
    .fetch_one(&env.db.pool)
    .await?;
    Ok(n as usize)
}

async fn bench(cloud: usize, web: usize, pods: usize) -> anyhow::Result<()> {
    let env = common::Env::with_pool_size(4).await;
    let dir = std::env::temp_dir().join(format!("fleet-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = env.kube.write_kubeconfig(&dir, NS)?;
    let server = fakes::whatsapp_web::WebServer::start(common::WEB_PHONE).await?;
    let names: Vec<String> = (0..cloud + web).map(|i| format!("line-{i:05}")).collect();
    let web_ids: Vec<String> = names[cloud..].iter().map(|n| format!("{NS}/{n}")).collect();

    let mut fleet: Vec<Pod> = (0..pods)
        .map(|i| spawn(&env, &kubeconfig, &format!("gw-{i}"), &dir))
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base: Vec<u64> = fleet
        .iter()
        .map(|p| common::rss_kib(&p.child.id().to_string()))
        .collect();

    let b64 = |s: &str| {
        serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap_or_default()
    };
    env.kube.put(
        &format!("/api/v1/namespaces/{NS}/secrets/app-a"),
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "accessToken": b64("token"), "appSecret": b64("app-a-secret"), "verifyToken": b64("verify") } }),
    );
    for (i, name) in names.iter().enumerate() {
        let provider = if i < cloud {
            json!({ "cloudApi": { "phoneNumberId": format!("9{i:09}"), "apiBaseUrl": env.cloud.api_base_url(),
                                  "credentialsSecretRef": { "name": "app-a" } } })
        } else {
            json!({ "whatsappWeb": { "pairing": "QrCode", "serverUrl": server.url(), "clientVersion": "2.3000.1027934701" } })
        };
        env.kube.put(
            &format!("/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/{NS}/whatsappaccounts/{name}"),
            json!({ "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
                    "metadata": { "namespace": NS, "generation": 1, "uid": format!("uid-{name}") },
                    "spec": { "phoneNumber": format!("+5511{i:08}"), "provider": provider, "agentPoolRef": { "name": "support" } } }),
        );
    }
    let pod_names: Vec<String> = fleet.iter().map(|p| p.name.clone()).collect();
    let all: Vec<&str> = pod_names.iter().map(String::as_str).collect();
    let owned_in = wait_owned(&env, &names, &all, Duration::from_secs(600)).await?;
    println!(
        "fleet_scale: {cloud} Cloud API + {web} WhatsApp Web numbers on {pods} fleet processes"
    );
    println!(
        "  every Lease held after applying the accounts: {:.1} s  {:?}",
        owned_in.as_secs_f64(),
        holders(&env, &names)
    );

    // Link every WhatsApp Web number as its QR code shows up.
    let link_started = Instant::now();
    let mut linked = vec![false; web];
    while linked.iter().any(|l| !l) {
        if link_started.elapsed() > Duration::from_secs(300) {
            bail!("not every WhatsApp Web number showed a QR code in time");
        }
        for (i, done) in linked.iter_mut().enumerate() {
            if *done {
                continue;
            }
            let row = queue::web_session::get(&env.db.pool, &web_ids[i]).await?;
            if let Some(qr) = row.and_then(|r| r.qr_code) {
                server.link(&qr)?;
                *done = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while connected(&env, &web_ids).await? < web {
        if link_started.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} of {web} WhatsApp Web numbers connected",
                connected(&env, &web_ids).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  every WhatsApp Web number linked and connected: {:.1} s",
        link_started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let h = holders(&env, &names);
    for (p, b) in fleet.iter().zip(&base) {
        let now = common::rss_kib(&p.child.id().to_string());
        let held = h.get(&p.name).copied().unwrap_or(0);
        println!(
            "  {}: RSS {:.1} MiB (baseline {:.1} MiB), {} numbers, {:.3} MiB per number",
            p.name,
            mib(now),
            mib(*b),
            held,
            mib(now.saturating_sub(*b)) / held.max(1) as f64
        );
    }
    let (conns,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_one(&env.db.pool)
            .await?;
    println!(
        "  Postgres connections of the fleet: {} ({} processes; each at most DB_MAX_CONNECTIONS=10 + 1 LISTEN)",
        conns - env.db.pool.size() as i64,
        pods
    );

    // SIGKILL of one process: the survivors take its numbers.
    let victim = fleet.remove(0);
    let victim_held = h.get(&victim.name).copied().unwrap_or(0);
    let killed = Instant::now();
    drop(victim);
    let survivors: Vec<String> = fleet.iter().map(|p| p.name.clone()).collect();
    let by: Vec<&str> = survivors.iter().map(String::as_str).collect();
    let reowned = wait_owned(&env, &names, &by, Duration::from_secs(600)).await?;
    println!(
        "  SIGKILL of one process ({victim_held} numbers): every Lease held again after {:.1} s",
        reowned.as_secs_f64()
    );
    while connected(&env, &web_ids).await? < web {
        if killed.elapsed() > Duration::from_secs(600) {
            bail!("WhatsApp Web numbers did not reconnect");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  every WhatsApp Web number connected again after {:.1} s (peak sessions per device {})",
        killed.elapsed().as_secs_f64(),
        server.peak_per_device()
    );
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
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
        value("--cloud").unwrap_or(1000),
        value("--web").unwrap_or(200),
        value("--pods").unwrap_or(2),
    ))
}
