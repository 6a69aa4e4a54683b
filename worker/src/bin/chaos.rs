//! Chaos run: real `whatsapp-worker` processes (two gateways, two core workers) on one Postgres,
//! the fake Cloud API and the fake Kubernetes API, while messages arrive at a steady rate.
//! Processes are killed at random (SIGKILL or SIGTERM) and started again, as Kubernetes would
//! replace a pod, and Postgres is restarted once (`pg_ctl -m immediate`). Webhooks that do not
//! get a 200 are delivered again, as Meta does. At the end it prints what was lost, what was
//! answered twice, reply latency, the machine's CPU time per message (every process, from
//! `/proc/stat`), and how long the Lease took to change hands.
//!
//! Prints figures; asserts nothing. Build the worker binary first, in the same profile:
//!
//! ```text
//! cargo build --release -p worker --bins
//! target/release/worker-chaos --messages 10000 --rate 100
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fakes::cloud_api::{CloudApiConfig, FakeCloudApi};
use fakes::kube_api::FakeKubeApi;
use queue::testing::{Durability, StopMode};
use rand::Rng;
use tokio_util::sync::CancellationToken;

const ACCOUNT: &str = "chaos/line";
const POOL: &str = "chaos/agents";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/chaos/leases/whatsapp-line";

#[derive(Parser)]
struct Cli {
    /// Messages to send, each from its own customer.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Messages per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Seconds between kills.
    #[arg(long, default_value_t = 6)]
    kill_every: u64,
    /// Seconds to wait for the last replies after the last message.
    #[arg(long, default_value_t = 120)]
    drain_seconds: u64,
    /// No kills and no Postgres restart: a steady-load ingest benchmark (webhook ack latency
    /// measured from this separate process, a core worker answering, the gateway sending).
    #[arg(long)]
    steady: bool,
    /// Gateway processes (one holds the Lease and sends; all take webhooks).
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Core worker processes.
    #[arg(long, default_value_t = 2)]
    cores: usize,
    /// No sent / delivered / read status webhooks after each send (Meta sends them; on by default).
    #[arg(long)]
    no_statuses: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Gateway,
    Core,
}

/// One supervised worker process, replaced when it dies (a Deployment's pod: the replacement
/// has a new name, hence a new Lease identity).
struct Proc {
    base: String,
    generation: u32,
    name: String,
    role: Role,
    port: u16,
    child: Option<Child>,
}

struct Setup {
    worker: PathBuf,
    dir: PathBuf,
    database_url: String,
    kubeconfig: PathBuf,
    cloud: FakeCloudApi,
}

impl Setup {
    fn spawn(&self, p: &mut Proc) -> Result<()> {
        p.generation += 1;
        p.name = format!("{}-{}", p.base, p.generation);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", p.name)))?;
        let mut cmd = Command::new(&self.worker);
        cmd.arg(match p.role {
            Role::Gateway => "gateway",
            Role::Core => "core",
        })
        .env("DATABASE_URL", &self.database_url)
        .env("KUBECONFIG", &self.kubeconfig)
        .env("POD_NAME", &p.name)
        .env("POD_NAMESPACE", "chaos")
        .env("LISTEN_ADDR", format!("127.0.0.1:{}", p.port))
        .env("WA_POOL", POOL)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        match p.role {
            Role::Gateway => {
                cmd.env("WA_ACCOUNT", ACCOUNT)
                    .env("WA_PHONE_NUMBER_ID", self.cloud.phone_number_id())
                    .env("WA_API_BASE_URL", self.cloud.api_base_url())
                    .env("WA_ACCESS_TOKEN", self.cloud.access_token())
                    .env("WA_APP_SECRET", self.cloud.app_secret())
                    .env("WA_VERIFY_TOKEN", "chaos")
                    .env("WA_LEASE_NAME", "whatsapp-line")
                    .env("WA_LEASE_DURATION_SECONDS", "6")
                    .env("WA_LEASE_RENEW_DEADLINE_SECONDS", "4")
                    .env("WA_LEASE_RETRY_PERIOD_SECONDS", "1")
                    .env("WA_IN_DOUBT_GRACE_SECONDS", "10")
                    .env("WA_RATE_PER_SECOND", "1000")
                    .env("WA_PER_RECIPIENT_BURST", "45");
            }
            Role::Core => {
                cmd.env("JOB_LOCK_SECONDS", "10");
            }
        }
        p.child = Some(cmd.spawn().context("starting whatsapp-worker")?);
        Ok(())
    }
}

/// a, b, c, ... for process names.
fn letter(i: usize) -> char {
    char::from(b'a' + (i % 26) as u8)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

fn worker_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory of the running binary")?;
    let worker = dir.join("whatsapp-worker");
    if !worker.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p worker --bins)",
            worker.display()
        );
    }
    Ok(worker)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn holder(kube: &FakeKubeApi) -> Option<String> {
    kube.get(LEASE)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

/// Per customer: when the webhook got its 200, after how many tries, and how long that took (ms).
type AckedWebhooks = Arc<Mutex<HashMap<String, (SystemTime, u32, f64)>>>;

/// Deliver one webhook to any live gateway until one answers 200 (Meta retries until then).
async fn deliver(
    http: &reqwest::Client,
    ports: &[u16],
    body: &[u8],
    signature: &str,
    stop: &CancellationToken,
) -> (SystemTime, u32, f64) {
    let mut attempts = 0;
    let first = Instant::now();
    loop {
        attempts += 1;
        let port = ports[rand::rng().random_range(0..ports.len())];
        let sent = http
            .post(format!("http://127.0.0.1:{port}/webhook"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", signature)
            .body(body.to_vec())
            .send()
            .await;
        let ack_ms = first.elapsed().as_secs_f64() * 1000.0;
        if matches!(&sent, Ok(r) if r.status() == reqwest::StatusCode::OK) {
            return (SystemTime::now(), attempts, ack_ms);
        }
        if stop.is_cancelled() {
            return (SystemTime::now(), attempts, ack_ms);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    worker::install_crypto_provider();
    let worker = worker_binary()?;
    let cluster = queue::testing::start_cluster(Durability::Default)?;
    let db = queue::connect(&cluster.url, 4).await?;
    let cloud = FakeCloudApi::start(CloudApiConfig::default()).await?;
    let kube = FakeKubeApi::start().await?;
    let dir = std::env::temp_dir().join(format!("wa-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let setup = Setup {
        worker,
        kubeconfig: kube.write_kubeconfig(&dir, "chaos")?,
        dir: dir.clone(),
        database_url: cluster.url.clone(),
        cloud: cloud.clone(),
    };
    cloud.emit_statuses(!cli.no_statuses);
    let roles = (0..cli.gateways.max(1))
        .map(|i| (format!("gateway-{}", letter(i)), Role::Gateway))
        .chain((0..cli.cores.max(1)).map(|i| (format!("core-{}", letter(i)), Role::Core)));
    let mut procs = Vec::new();
    for (name, role) in roles {
        let mut p = Proc {
            base: name,
            generation: 0,
            name: String::new(),
            role,
            port: free_port()?,
            child: None,
        };
        setup.spawn(&mut p)?;
        procs.push(p);
    }
    // Status webhooks (sent / delivered / read, carrying our row id) go to the first gateway's
    // port, which its replacements keep; the fake retries them for about 10 s.
    cloud.set_webhook_url(format!("http://127.0.0.1:{}/webhook", procs[0].port));
    let gateway_ports: Vec<u16> = procs
        .iter()
        .filter(|p| p.role == Role::Gateway)
        .map(|p| p.port)
        .collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    // Wait for a holder before the clock starts.
    let started = Instant::now();
    while holder(&kube).is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "no gateway took the Lease; see the logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{}: {} messages at {}/s; {} gateways, {} core workers, status webhooks {}; logs in {}",
        if cli.steady { "steady" } else { "chaos" },
        cli.messages,
        cli.rate,
        cli.gateways.max(1),
        cli.cores.max(1),
        if cli.no_statuses { "off" } else { "on" },
        dir.display()
    );

    // Load: one new customer per message.
    let cpu_at_start = MachineCpu::read();
    let acked: AckedWebhooks = Arc::default();
    let stop = CancellationToken::new();
    let load = {
        let (acked, cloud, http, ports, stop) = (
            acked.clone(),
            cloud.clone(),
            http.clone(),
            gateway_ports.clone(),
            stop.clone(),
        );
        let (messages, rate) = (cli.messages, cli.rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let mut in_flight = tokio::task::JoinSet::new();
            for n in 0..messages {
                tick.tick().await;
                let contact = format!("1888{n:07}");
                let (_, payload) = cloud.inbound_text(&contact, "Customer", "what are your hours?");
                let body = fakes::cloud_api::meta_json_bytes(&payload);
                let signature = fakes::cloud_api::sign(cloud.app_secret(), &body);
                let (acked, http, ports, stop) =
                    (acked.clone(), http.clone(), ports.clone(), stop.clone());
                in_flight.spawn(async move {
                    let at = deliver(&http, &ports, &body, &signature, &stop).await;
                    acked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(contact, at);
                });
            }
            while in_flight.join_next().await.is_some() {}
        })
    };

    // Chaos: kill a random process every few seconds; restart Postgres once, half-way.
    let mut handovers: Vec<(String, f64)> = Vec::new();
    let mut kills: BTreeMap<String, u32> = BTreeMap::new();
    let mut restarted_db = false;
    let run_for = Duration::from_secs_f64(cli.messages as f64 / cli.rate.max(1) as f64);
    let begun = Instant::now();
    while !load.is_finished() && !cli.steady {
        tokio::time::sleep(Duration::from_secs(cli.kill_every)).await;
        if load.is_finished() {
            break;
        }
        if !restarted_db && begun.elapsed() > run_for / 2 {
            restarted_db = true;
            let down = Instant::now();
            cluster.stop(StopMode::Immediate)?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster.start()?;
            println!(
                "  postgres restarted (-m immediate), down {:.1}s",
                down.elapsed().as_secs_f64()
            );
            continue;
        }
        // Half the kills go to the Lease holder, so handovers get measured.
        let current = holder(&kube);
        let i = match procs.iter().position(|p| Some(&p.name) == current.as_ref()) {
            Some(h) if rand::rng().random_bool(0.5) => h,
            _ => rand::rng().random_range(0..procs.len()),
        };
        let sig = if rand::rng().random_bool(0.5) {
            "-KILL"
        } else {
            "-TERM"
        };
        let was_holder = current.as_deref() == Some(procs[i].name.as_str());
        let p = &mut procs[i];
        let old = p.name.clone();
        let Some(mut child) = p.child.take() else {
            continue;
        };
        let killed_at = Instant::now();
        signal(&child, sig);
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        *kills.entry(format!("{} {sig}", p.base)).or_default() += 1;
        setup.spawn(p)?;
        if was_holder {
            while holder(&kube).is_none_or(|h| h == old)
                && killed_at.elapsed() < Duration::from_secs(60)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let took = killed_at.elapsed().as_secs_f64();
            println!("  {old} {sig} while holding the Lease: new holder after {took:.2}s");
            handovers.push((sig.to_string(), took));
        }
    }
    load.await?;
    let load_seconds = begun.elapsed().as_secs_f64();

    // Drain: wait for every acknowledged customer to be answered.
    let customers: Vec<(String, SystemTime, u32)> = acked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(c, (at, n, _))| (c.clone(), *at, *n))
        .collect();
    let mut ack: Vec<f64> = acked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|(_, _, ms)| *ms)
        .collect();
    ack.sort_by(f64::total_cmp);
    let deadline = Instant::now() + Duration::from_secs(cli.drain_seconds);
    loop {
        let answered: std::collections::HashSet<String> =
            cloud.sends().into_iter().map(|s| s.to).collect();
        let missing = customers
            .iter()
            .filter(|(c, _, _)| !answered.contains(c))
            .count();
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    let cpu = cpu_at_start.and_then(|start| start.busy_seconds_until(MachineCpu::read()?));

    let sends = cloud.sends();
    let mut first_reply: HashMap<&str, SystemTime> = HashMap::new();
    let mut replies: HashMap<&str, u32> = HashMap::new();
    for s in &sends {
        *replies.entry(s.to.as_str()).or_default() += 1;
        first_reply.entry(s.to.as_str()).or_insert(s.received_at);
    }
    let lost = customers
        .iter()
        .filter(|(c, _, _)| !replies.contains_key(c.as_str()))
        .count();
    let duplicated = replies.values().filter(|n| **n > 1).count();
    let retried = customers.iter().filter(|(_, _, n)| *n > 1).count();
    let mut latency: Vec<f64> = customers
        .iter()
        .filter_map(|(c, acked_at, _)| {
            first_reply
                .get(c.as_str())
                .and_then(|r| r.duration_since(*acked_at).ok())
                .map(|d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    latency.sort_by(f64::total_cmp);
    let rows: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM inbound_messages), (SELECT count(*) FROM outbound_messages)",
    )
    .fetch_one(&db)
    .await
    .unwrap_or((-1, -1));
    for p in &mut procs {
        if let Some(mut c) = p.child.take() {
            signal(&c, "-TERM");
            let _ = c.wait();
        }
    }
    print_top_statements(&db).await;

    println!("kills: {kills:?}");
    println!(
        "messages {}: acknowledged {}, webhooks delivered more than once (non-200 first) {retried}",
        cli.messages,
        customers.len()
    );
    println!("lost {lost}, answered more than once {duplicated}");
    println!(
        "webhook ack (first try to 200, from this process): p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
        percentile(&ack, 0.50),
        percentile(&ack, 0.99),
        ack.last().copied().unwrap_or(f64::NAN)
    );
    let status_acks = cloud.status_acks();
    let mut status_ms: Vec<f64> = status_acks.iter().flatten().copied().collect();
    status_ms.sort_by(f64::total_cmp);
    println!(
        "message webhooks: {:.0}/s over {load_seconds:.1}s; status webhooks {} ({} never acknowledged), \
         ack p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
        customers.len() as f64 / load_seconds,
        status_acks.len(),
        status_acks.len() - status_ms.len(),
        percentile(&status_ms, 0.50),
        percentile(&status_ms, 0.99),
        status_ms.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "reply latency after the 200: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&latency, 0.50),
        percentile(&latency, 0.99),
        latency.last().copied().unwrap_or(f64::NAN)
    );
    if let Some((busy, wall)) = cpu {
        println!(
            "machine CPU from the first message to the last reply: {busy:.1} s busy of {wall:.1} s on {} cores \
             ({:.0} %), {:.2} ms per message (every process: Postgres, workers, this load generator)",
            MachineCpu::cores(),
            100.0 * busy / (wall * MachineCpu::cores() as f64),
            1000.0 * busy / cli.messages.max(1) as f64
        );
    }
    for sig in ["-KILL", "-TERM"] {
        let mut t: Vec<f64> = handovers
            .iter()
            .filter(|(s, _)| s == sig)
            .map(|(_, t)| *t)
            .collect();
        t.sort_by(f64::total_cmp);
        if !t.is_empty() {
            println!(
                "Lease handover after {sig} of the holder: {} times, median {:.2}s, max {:.2}s",
                t.len(),
                percentile(&t, 0.5),
                t.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    println!(
        "rows: {} inbound, {} outbound; sends at the fake Cloud API {}",
        rows.0,
        rows.1,
        sends.len()
    );
    Ok(())
}

/// The machine's CPU time counters (`/proc/stat`, all cores): what a message costs across every
/// process, which latency alone hides once the machine is saturated.
#[derive(Clone, Copy)]
struct MachineCpu {
    busy: u64,
    total: u64,
    at: Instant,
}

impl MachineCpu {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal ...
        let [user, nice, system, idle, iowait, irq, softirq, steal, ..] = ticks[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq + steal;
        Some(Self {
            busy,
            total: busy + idle + iowait,
            at: Instant::now(),
        })
    }

    fn cores() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Busy CPU seconds (all cores) and wall seconds from `self` to `end`, without assuming the
    /// tick rate: the busy share of all ticks times wall time times cores.
    fn busy_seconds_until(self, end: Self) -> Option<(f64, f64)> {
        let total = end.total.checked_sub(self.total).filter(|t| *t > 0)?;
        let busy = end.busy.checked_sub(self.busy)?;
        let wall = end.at.duration_since(self.at).as_secs_f64();
        Some((
            busy as f64 / total as f64 * wall * Self::cores() as f64,
            wall,
        ))
    }
}

/// Where Postgres spent its time, when the run was started with
/// `TEST_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements"`.
async fn print_top_statements(db: &sqlx::PgPool) {
    if sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(db)
        .await
        .is_err()
    {
        return;
    }
    let rows: Vec<(i64, f64, f64, i64, String)> = match sqlx::query_as(
        "SELECT calls, total_exec_time, mean_exec_time,
                ((shared_blks_hit + shared_blks_read) / greatest(calls, 1))::bigint,
                regexp_replace(left(query, 100), '\\s+', ' ', 'g')
         FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 20",
    )
    .fetch_all(db)
    .await
    {
        Ok(rows) => rows,
        Err(_) => return,
    };
    let total: f64 = sqlx::query_scalar("SELECT sum(total_exec_time) FROM pg_stat_statements")
        .fetch_one(db)
        .await
        .unwrap_or(0.0);
    let calls: i64 = sqlx::query_scalar("SELECT sum(calls)::bigint FROM pg_stat_statements")
        .fetch_one(db)
        .await
        .unwrap_or(0);
    println!("postgres: {calls} statements, {total:.0} ms executing; top by time:");
    for (calls, total, mean, blocks, query) in rows {
        println!("  {total:8.0} ms {calls:8} calls {mean:7.3} ms {blocks:6} blocks/call  {query}");
    }
}
