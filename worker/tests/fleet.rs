//! A gateway fleet: several fleet pods (in-process, each with its own HTTP server, Lease
//! electors and membership) on the fake API server and real Postgres serve many numbers from
//! one webhook URL, spread the Leases evenly, take a dead pod's numbers, and rebalance when a
//! pod joins, answering every message exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Env, eventually};
use fakes::cloud_api::{CloudApiConfig, FakeCloudApi};
use serde_json::{Value, json};
use worker::fleet::{FleetSettings, RunningFleet};
use worker::metrics::Metrics;

const NS: &str = "default";
const APP_SECRET: &str = "app-a-secret";

fn account_path(name: &str) -> String {
    format!("/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/{NS}/whatsappaccounts/{name}")
}

fn b64(s: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).expect("base64")
}

/// A Cloud API account of the `support` pool and its credentials Secret, as `kubectl apply`
/// would leave them.
fn apply_cloud_account(env: &Env, name: &str, cloud: &FakeCloudApi) {
    let secret = format!("{name}-creds");
    env.kube.put(
        &format!("/api/v1/namespaces/{NS}/secrets/{secret}"),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "namespace": NS },
            "data": {
                "accessToken": b64(cloud.access_token()),
                "appSecret": b64(cloud.app_secret()),
                "verifyToken": b64(&format!("verify-{name}")),
            }
        }),
    );
    env.kube.put(
        &account_path(name),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "generation": 1, "uid": format!("uid-{name}") },
            "spec": {
                "phoneNumber": "+15550000001",
                "provider": { "cloudApi": {
                    "phoneNumberId": cloud.phone_number_id(),
                    "apiBaseUrl": cloud.api_base_url(),
                    "credentialsSecretRef": { "name": secret }
                }},
                "agentPoolRef": { "name": "support" },
                "lease": { "durationSeconds": 3, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 1 },
                "delivery": { "ratePerSecond": 1000, "perRecipientBurst": 45, "backoffSeconds": 1 }
            }
        }),
    );
}

/// `n` Cloud API numbers of one Meta app, applied as accounts `line-00`.. of the pool.
async fn cloud_numbers(env: &Env, n: usize) -> (Vec<FakeCloudApi>, Vec<String>) {
    let mut numbers = Vec::new();
    let mut names = Vec::new();
    for i in 0..n {
        let number = number(i, APP_SECRET).await;
        let name = format!("line-{i:02}");
        apply_cloud_account(env, &name, &number);
        numbers.push(number);
        names.push(name);
    }
    (numbers, names)
}

async fn number(i: usize, app_secret: &str) -> FakeCloudApi {
    FakeCloudApi::start(CloudApiConfig {
        phone_number_id: format!("10654035224{i:04}"),
        app_secret: app_secret.into(),
        ..Default::default()
    })
    .await
    .expect("fake cloud api")
}

/// A kube client for a fleet pod: no read timeout shorter than a watch's quiet periods.
fn kube_client(env: &Env) -> kube::Client {
    let mut cfg = kube::Config::new(env.kube.url().parse().expect("fake kube url"));
    cfg.default_namespace = NS.into();
    cfg.read_timeout = Some(Duration::from_secs(30));
    cfg.write_timeout = Some(Duration::from_secs(2));
    kube::Client::try_from(cfg).expect("kube client")
}

async fn fleet_pod(env: &Env, identity: &str) -> RunningFleet {
    let mut settings = FleetSettings::new("support", NS, identity, "127.0.0.1:0");
    settings.round = Duration::from_millis(300);
    settings.member_ttl = Duration::from_secs(2);
    start_pod(env, settings).await
}

/// A fleet or ingress pod with its probes (readiness follows its drain).
async fn start_pod(env: &Env, mut settings: FleetSettings) -> RunningFleet {
    settings.drain = Duration::ZERO;
    let (metrics, registry) = Metrics::new();
    let draining = worker::http::Draining::default();
    let probes = worker::http::router(worker::http::Probes {
        pool: env.db.pool.clone(),
        registry: std::sync::Arc::new(registry),
        draining: draining.clone(),
    });
    worker::fleet::start(
        env.db.pool.clone(),
        kube_client(env),
        settings,
        metrics,
        draining,
        probes,
    )
    .await
    .expect("pod starts")
}

/// The namespace's webhook ingress (the `ingress` role), in-process.
async fn ingress_pod(env: &Env, identity: &str) -> RunningFleet {
    start_pod(env, FleetSettings::ingress(NS, identity, "127.0.0.1:0")).await
}

/// An ingress once it routes `numbers` numbers, and its webhook URL.
async fn routing_ingress(env: &Env, numbers: usize) -> (RunningFleet, String) {
    let ingress = ingress_pod(env, "ingress-0").await;
    eventually(
        "the ingress routes every number",
        Duration::from_secs(20),
        || ingress.routed() == numbers,
    )
    .await;
    let url = format!("http://{}/webhook", ingress.addr);
    (ingress, url)
}

/// Holder of every `whatsapp-<name>` Lease, by account name.
fn holders(env: &Env, names: &[String]) -> BTreeMap<String, Option<String>> {
    holders_in(&env.kube, names)
}

fn holders_in(
    kube: &fakes::kube_api::FakeKubeApi,
    names: &[String],
) -> BTreeMap<String, Option<String>> {
    names
        .iter()
        .map(|n| {
            let holder = kube
                .get(&format!(
                    "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/whatsapp-{n}"
                ))
                .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
                .filter(|h| !h.is_empty());
            (n.clone(), holder)
        })
        .collect()
}

fn shares(h: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for holder in h.values().flatten() {
        *out.entry(holder.clone()).or_default() += 1;
    }
    out
}

fn settled(h: &BTreeMap<String, Option<String>>, pods: &[&str], lo: usize, hi: usize) -> bool {
    let s = shares(h);
    h.values().all(Option::is_some)
        && s.len() == pods.len()
        && pods
            .iter()
            .all(|p| s.get(*p).is_some_and(|n| (lo..=hi).contains(n)))
}

/// Send one inbound text per number to `url` (the one webhook URL of the namespace).
async fn write_to_every_number(numbers: &[FakeCloudApi], url: &str, round: usize) {
    for (i, n) in numbers.iter().enumerate() {
        n.set_webhook_url(url.to_string());
        let (_, hook) = n.inbound_text(&format!("4917{i:04}{round:04}"), "Customer", "hi");
        assert_eq!(n.deliver(&hook).await.expect("delivered").as_u16(), 200);
    }
}

fn sends(numbers: &[FakeCloudApi]) -> usize {
    numbers.iter().map(|n| n.sends().len()).sum()
}

/// Replies sent more than once (the same outbound row reached WhatsApp twice).
fn duplicate_sends(numbers: &[FakeCloudApi]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut dup = 0;
    for n in numbers {
        for s in n.sends() {
            let key = (
                n.phone_number_id().to_string(),
                s.biz_opaque_callback_data.clone(),
            );
            if !seen.insert(key) {
                dup += 1;
            }
        }
    }
    dup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_spreads_thirty_numbers_answers_each_once_and_survives_kill_and_join() {
    let env = Env::new().await;
    let (numbers, names) = cloud_numbers(&env, 30).await;
    let _core = common::core(&env, json!({})).await;
    let a = fleet_pod(&env, "gw-a").await;
    let b = fleet_pod(&env, "gw-b").await;
    let c = fleet_pod(&env, "gw-c").await;
    eventually("30 Leases spread 10/10/10", Duration::from_secs(40), || {
        settled(&holders(&env, &names), &["gw-a", "gw-b", "gw-c"], 10, 10)
    })
    .await;

    // One URL for every number: the namespace's ingress, whoever holds the number.
    let (ingress, url) = routing_ingress(&env, 30).await;
    write_to_every_number(&numbers, &url, 0).await;
    eventually("each number answered once", Duration::from_secs(30), || {
        numbers.iter().all(|n| n.sends().len() == 1)
    })
    .await;

    // SIGKILL of a pod: the survivors own its numbers within lease + retry (+ rounds).
    let killed_at = std::time::Instant::now();
    let before = holders(&env, &names);
    c.kill();
    eventually("the survivors own all 30", Duration::from_secs(15), || {
        let h = holders(&env, &names);
        settled(&h, &["gw-a", "gw-b"], 15, 15)
    })
    .await;
    let reowned = killed_at.elapsed();
    let moved = names
        .iter()
        .filter(|n| before[*n].as_deref() == Some("gw-c"))
        .count();
    assert_eq!(moved, 10, "the dead pod held its share");
    eprintln!("re-owned a dead pod's 10 numbers in {reowned:?}");
    // Lease duration (3 s) + retry period (1 s), plus the member TTL (2 s) that stops the
    // survivors' shares from counting the dead pod, plus a round or two of slack.
    assert!(reowned < Duration::from_secs(8), "re-owned in {reowned:?}");

    // A pod joins while messages flow: shares rebalance, nothing is sent twice.
    let joined_at = std::time::SystemTime::now();
    let d = fleet_pod(&env, "gw-d").await;
    // Rounds of one message per number, each sent once the previous one is answered, until
    // the shares have rebalanced: messages flow through every handover.
    let flow = {
        let (url, kube, names) = (url.clone(), env.kube.clone(), names.clone());
        let numbers: Vec<FakeCloudApi> = numbers.clone();
        tokio::spawn(async move {
            let mut round = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !settled(
                &holders_in(&kube, &names),
                &["gw-a", "gw-b", "gw-d"],
                10,
                10,
            ) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "shares did not rebalance"
                );
                round += 1;
                write_to_every_number(&numbers, &url, round).await;
                common::eventually("the round answered", Duration::from_secs(30), || {
                    sends(&numbers) == 30 * (round + 1)
                })
                .await;
            }
            // One more round, answered by the new holders.
            round += 1;
            write_to_every_number(&numbers, &url, round).await;
            round
        })
    };
    let rounds = flow.await.expect("flow");
    assert!(rounds > 0, "no message flowed during the rebalance");
    eventually("every message answered", Duration::from_secs(30), || {
        sends(&numbers) == 30 * (rounds + 1)
    })
    .await;
    // Nothing left that could be sent again later: every reply settled as sent (a row in
    // doubt would be resent after the grace).
    common::wait_count(
        &env,
        "every reply settled",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbound_messages WHERE state NOT IN ('sent', 'delivered', 'read')",
        |n| n == 0,
    )
    .await;
    assert_eq!(sends(&numbers), 30 * (rounds + 1));
    assert_eq!(duplicate_sends(&numbers), 0);
    let moved_to_d = holders(&env, &names)
        .values()
        .filter(|h| h.as_deref() == Some("gw-d"))
        .count();
    assert_eq!(moved_to_d, 10);
    // The handovers happened while messages flowed: numbers now held by d sent replies of
    // this phase both from their old holder and from d.
    let moved_mid_flow: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT account_id FROM outbound_messages
             WHERE created_at > $1 GROUP BY account_id
             HAVING bool_or(claimed_by = 'gw-d') AND bool_or(claimed_by <> 'gw-d')
         ) moved",
    )
    .bind(chrono::DateTime::<chrono::Utc>::from(joined_at))
    .fetch_one(&env.db.pool)
    .await
    .expect("moved mid-flow");
    assert!(
        moved_mid_flow > 0,
        "no number changed hands while messages flowed"
    );
    eprintln!("{moved_mid_flow} numbers changed hands while messages flowed");
    for pod in [a, b, d, ingress] {
        pod.shutdown().await;
    }
}

#[tokio::test]
async fn a_webhook_signed_by_another_app_for_this_apps_number_is_refused_and_nothing_stored() {
    let env = Env::new().await;
    let ours = number(1, APP_SECRET).await;
    let theirs = number(2, "app-b-secret").await;
    apply_cloud_account(&env, "line-a", &ours);
    apply_cloud_account(&env, "line-b", &theirs);
    let pod = ingress_pod(&env, "ingress-0").await;
    let url = format!("http://{}/webhook", pod.addr);
    // Both numbers routed (each app's own delivery is accepted).
    for n in [&ours, &theirs] {
        common::eventually_async("both numbers routed", Duration::from_secs(20), || async {
            n.set_webhook_url(url.clone());
            let (_, hook) = n.inbound_text("491700000001", "A", "hi");
            n.deliver(&hook).await.ok().map(|s| s.as_u16()) == Some(200)
        })
        .await;
    }
    let stored = env.count("SELECT count(*) FROM inbound_messages").await;
    // App B's secret over a payload naming app A's number.
    let (_, hook) = ours.inbound_text("491700000002", "Mallory", "hi");
    let body = fakes::cloud_api::meta_json_bytes(&hook);
    theirs.set_webhook_url(url.clone());
    let answer = theirs
        .deliver_raw(
            body.clone(),
            Some(fakes::cloud_api::sign("app-b-secret", &body)),
        )
        .await
        .expect("answered");
    assert_eq!(answer.as_u16(), 401);
    // A secret nobody has: 401 too.
    let answer = theirs
        .deliver_raw(body.clone(), Some(fakes::cloud_api::sign("nobody", &body)))
        .await
        .expect("answered");
    assert_eq!(answer.as_u16(), 401);
    assert_eq!(
        env.count("SELECT count(*) FROM inbound_messages").await,
        stored,
        "nothing stored"
    );
    assert_eq!(env.count("SELECT count(*) FROM unrouted_webhooks").await, 0);
    pod.shutdown().await;
}

#[tokio::test]
async fn a_webhook_for_a_number_without_an_account_is_kept_and_replayed_when_it_appears() {
    let env = Env::new().await;
    let known = number(1, APP_SECRET).await;
    let early = number(2, APP_SECRET).await;
    apply_cloud_account(&env, "line-known", &known);
    let _core = common::core(&env, json!({})).await;
    let pod = ingress_pod(&env, "ingress-0").await;
    let sender = fleet_pod(&env, "gw-a").await;
    let url = format!("http://{}/webhook", pod.addr);
    common::eventually_async(
        "the known number routed",
        Duration::from_secs(20),
        || async {
            known.set_webhook_url(url.clone());
            let (_, hook) = known.inbound_text("491700000001", "A", "hi");
            known.deliver(&hook).await.ok().map(|s| s.as_u16()) == Some(200)
        },
    )
    .await;
    // Meta delivers for a number of the same app before its WhatsAppAccount exists.
    early.set_webhook_url(url.clone());
    let (wamid, hook): (String, Value) = early.inbound_text("491700000009", "Early", "hello?");
    assert_eq!(early.deliver(&hook).await.expect("answered").as_u16(), 200);
    assert_eq!(env.count("SELECT count(*) FROM unrouted_webhooks").await, 1);
    // Redelivered meanwhile (Meta retries): kept twice, ingested once.
    assert_eq!(early.deliver(&hook).await.expect("answered").as_u16(), 200);

    apply_cloud_account(&env, "line-early", &early);
    common::wait_count(
        &env,
        "the kept message ingested",
        Duration::from_secs(20),
        "SELECT count(*) FROM inbound_messages WHERE account_id = 'default/line-early'",
        |n| n == 1,
    )
    .await;
    let row: String = sqlx::query_scalar(
        "SELECT provider_message_id FROM inbound_messages WHERE account_id = 'default/line-early'",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("row");
    assert_eq!(row, wamid);
    eventually(
        "the early customer answered",
        Duration::from_secs(20),
        || early.sends().len() == 1,
    )
    .await;
    common::wait_count(
        &env,
        "kept rows forgotten",
        Duration::from_secs(5),
        "SELECT count(*) FROM unrouted_webhooks",
        |n| n == 0,
    )
    .await;
    pod.shutdown().await;
    sender.shutdown().await;
}

/// A TCP proxy to the fake API server that can be cut: one pod's view of a network partition.
struct Partition {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Partition {
    async fn to(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let (c, k) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                k.lock().expect("conns").push(task);
            }
        });
        Self { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.conns.lock().expect("conns").drain(..) {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_cut_off_from_the_api_server_stops_sending_for_every_number_by_the_renew_deadline() {
    let env = Env::new().await;
    let (numbers, names) = cloud_numbers(&env, 6).await;
    let _core = common::core(&env, json!({})).await;
    let a = fleet_pod(&env, "gw-a").await;
    let upstream = env.kube.url().trim_start_matches("http://").to_string();
    let partition = Partition::to(upstream).await;
    let b = {
        let mut cfg = kube::Config::new(format!("http://{}", partition.addr).parse().expect("url"));
        cfg.default_namespace = NS.into();
        cfg.read_timeout = Some(Duration::from_secs(30));
        cfg.write_timeout = Some(Duration::from_secs(2));
        cfg.connect_timeout = Some(Duration::from_secs(1));
        let mut settings = FleetSettings::new("support", NS, "gw-b", "127.0.0.1:0");
        settings.round = Duration::from_millis(300);
        settings.member_ttl = Duration::from_secs(2);
        settings.drain = Duration::ZERO;
        worker::fleet::start(
            env.db.pool.clone(),
            kube::Client::try_from(cfg).expect("client"),
            settings,
            Metrics::new().0,
            Default::default(),
            axum::Router::new(),
        )
        .await
        .expect("fleet pod b")
    };
    eventually("3 and 3", Duration::from_secs(30), || {
        settled(&holders(&env, &names), &["gw-a", "gw-b"], 3, 3)
    })
    .await;
    // The Leases say 3 and 3; b acts for its three once each term has started.
    common::eventually_async("b to act for its 3", Duration::from_secs(10), || async {
        b.held().await.len() == 3
    })
    .await;

    partition.cut();
    let cut_at = std::time::Instant::now();
    // The renew deadline is 2 s: by then b may act for none of its numbers.
    common::eventually_async("b to stop acting", Duration::from_secs(3), || async {
        b.held().await.is_empty()
    })
    .await;
    let stopped = cut_at.elapsed();
    assert!(
        stopped <= Duration::from_millis(2600),
        "stopped after {stopped:?}"
    );
    eprintln!("a partitioned pod stopped acting for its numbers {stopped:?} after the cut");
    // a takes them over, and every message is answered once, by a.
    eventually("a owns all 6", Duration::from_secs(15), || {
        settled(&holders(&env, &names), &["gw-a"], 6, 6)
    })
    .await;
    let (ingress, url) = routing_ingress(&env, 6).await;
    write_to_every_number(&numbers, &url, 1).await;
    eventually("every number answered", Duration::from_secs(20), || {
        sends(&numbers) == 6
    })
    .await;
    let by_b: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbound_messages WHERE claimed_by = 'gw-b'")
            .fetch_one(&env.db.pool)
            .await
            .expect("count");
    assert_eq!(by_b, 0, "the partitioned pod sent nothing");
    assert_eq!(duplicate_sends(&numbers), 0);
    a.shutdown().await;
    ingress.shutdown().await;
    b.kill();
}

fn apply_web_account(env: &Env, name: &str, phone: &str, server_url: &str) {
    env.kube.put(
        &account_path(name),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "generation": 1, "uid": format!("uid-{name}") },
            "spec": {
                "phoneNumber": phone,
                "provider": { "whatsappWeb": {
                    "pairing": "QrCode", "serverUrl": server_url, "clientVersion": "2.3000.1027934701"
                }},
                "agentPoolRef": { "name": "support" },
                "lease": { "durationSeconds": 3, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 1 }
            }
        }),
    );
}

async fn session(env: &Env, account: &str) -> Option<queue::web_session::WebSession> {
    queue::web_session::get(&env.db.pool, account)
        .await
        .expect("session row")
}

/// A fleet pod as a real process (`whatsapp-worker fleet`, as in a pod), so that SIGKILL cuts
/// its sockets the way a crash does.
struct FleetProcess(std::process::Child);

impl Drop for FleetProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_fleet(
    env: &Env,
    kubeconfig: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
) -> FleetProcess {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_whatsapp-worker"))
        .arg("fleet")
        .env("DATABASE_URL", &env.db.url)
        .env("DB_MAX_CONNECTIONS", "6")
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", NS)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("WA_POOL", format!("{NS}/support"))
        .env("WA_FLEET_ROUND_MILLIS", "300")
        .env("WA_FLEET_MEMBER_TTL_SECONDS", "2")
        .env("WA_DRAIN_SECONDS", "0")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start whatsapp-worker fleet");
    FleetProcess(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_web_numbers_in_a_fleet_keep_one_socket_each_and_move_without_re_pairing() {
    let env = Env::new().await;
    let dir = std::env::temp_dir().join(format!("fleet-web-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = env.kube.write_kubeconfig(&dir, NS).expect("kubeconfig");
    let mut servers = Vec::new();
    let mut ids = Vec::new();
    for i in 0..4 {
        let phone = format!("+55119876500{i:02}");
        let server = fakes::whatsapp_web::WebServer::start(&phone)
            .await
            .expect("stand-in");
        let name = format!("web-{i}");
        apply_web_account(&env, &name, &phone, server.url());
        servers.push(server);
        ids.push(format!("{NS}/{name}"));
    }
    let names: Vec<String> = (0..4).map(|i| format!("web-{i}")).collect();
    let _a = spawn_fleet(&env, &kubeconfig, "gw-a", &dir);
    let mut b = spawn_fleet(&env, &kubeconfig, "gw-b", &dir);
    eventually("2 and 2", Duration::from_secs(30), || {
        settled(&holders(&env, &names), &["gw-a", "gw-b"], 2, 2)
    })
    .await;
    // Link every number once, through whichever pod holds it.
    for (id, server) in ids.iter().zip(&servers) {
        common::eventually_async("a QR code", Duration::from_secs(20), || async {
            session(&env, id).await.is_some_and(|s| s.qr_code.is_some())
        })
        .await;
        let qr = session(&env, id).await.and_then(|s| s.qr_code).expect("qr");
        server.link(&qr).expect("linked");
    }
    for id in &ids {
        common::eventually_async("connected", Duration::from_secs(20), || async {
            session(&env, id)
                .await
                .is_some_and(|s| s.state == "connected")
        })
        .await;
    }
    let pairings: Vec<usize> = servers.iter().map(|s| s.pair_requests()).collect();
    let logins: Vec<usize> = servers.iter().map(|s| s.total_sockets()).collect();

    // SIGKILL of b: a logs its numbers in again under the fence, with the stored sessions.
    let b_numbers: Vec<String> = holders(&env, &names)
        .into_iter()
        .filter(|(_, h)| h.as_deref() == Some("gw-b"))
        .map(|(n, _)| format!("{NS}/{n}"))
        .collect();
    assert_eq!(b_numbers.len(), 2);
    b.0.kill().expect("kill -9");
    let _ = b.0.wait();
    eventually("a owns all 4", Duration::from_secs(15), || {
        settled(&holders(&env, &names), &["gw-a"], 4, 4)
    })
    .await;
    for id in &b_numbers {
        common::eventually_async(
            "connected again under a",
            Duration::from_secs(20),
            || async {
                session(&env, id)
                    .await
                    .is_some_and(|s| s.state == "connected" && s.holder.as_deref() == Some("gw-a"))
            },
        )
        .await;
    }
    for (i, (id, server)) in ids.iter().zip(&servers).enumerate() {
        assert_eq!(
            server.peak_per_device(),
            1,
            "{id}: never two sessions for one device"
        );
        assert_eq!(server.pair_requests(), pairings[i], "{id}: no re-pairing");
        if b_numbers.contains(id) {
            assert!(
                server.total_sockets() > logins[i],
                "{id}: a new socket after the kill"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_pods_fail_readiness_first_and_answer_every_webhook_while_endpoints_move() {
    let env = Env::new().await;
    let (numbers, names) = cloud_numbers(&env, 4).await;
    let _core = common::core(&env, json!({})).await;
    let gw_a = fleet_pod(&env, "gw-a").await;
    let gw_b = fleet_pod(&env, "gw-b").await;
    let mut a = ingress_pod(&env, "ingress-a").await;
    let b = ingress_pod(&env, "ingress-b").await;
    eventually("2 and 2", Duration::from_secs(30), || {
        settled(&holders(&env, &names), &["gw-a", "gw-b"], 2, 2)
    })
    .await;
    eventually(
        "both ingress pods route the numbers",
        Duration::from_secs(20),
        || a.routed() == 4 && b.routed() == 4,
    )
    .await;
    // The endpoints lag: they move half a second after readiness fails; the pod keeps serving
    // webhooks for its drain period meanwhile.
    a.set_drain(Duration::from_secs(1));
    let (a_url, b_url) = (a.addr, b.addr);
    let http = reqwest::Client::new();
    let delivered_rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Readiness checks that found a ready: the endpoints will keep pointing at it for the
    // next half second, whatever happens to the pod meanwhile.
    let ready_probes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let numbers = numbers.clone();
        let delivered_rounds = delivered_rounds.clone();
        let ready_probes = ready_probes.clone();
        tokio::spawn(async move {
            // Meta's traffic: a round of webhooks every 50 ms.
            let mut rate = tokio::time::interval(Duration::from_millis(50));
            let mut target = a_url;
            let mut last_probe = std::time::Instant::now();
            let (mut answers, mut moved_after) = (Vec::new(), None);
            for round in 0..60 {
                rate.tick().await;
                // The endpoint controller's view, half a second behind the pod.
                if target == a_url && last_probe.elapsed() > Duration::from_millis(500) {
                    last_probe = std::time::Instant::now();
                    let ready = http
                        .get(format!("http://{a_url}/readyz"))
                        .send()
                        .await
                        .map(|r| r.status().as_u16());
                    if ready.ok() != Some(200) {
                        target = b_url;
                        moved_after = Some(round);
                    } else {
                        ready_probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                for (i, n) in numbers.iter().enumerate() {
                    n.set_webhook_url(format!("http://{target}/webhook"));
                    let (_, hook) = n.inbound_text(&format!("4917{i:04}{round:04}"), "C", "hi");
                    answers.push(
                        n.deliver(&hook)
                            .await
                            .map(|s| s.as_u16())
                            .map_err(|e| e.to_string()),
                    );
                }
                delivered_rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (answers, moved_after)
        })
    };
    eventually(
        "traffic flowing to a, just seen ready",
        Duration::from_secs(10),
        || {
            delivered_rounds.load(std::sync::atomic::Ordering::SeqCst) >= 6
                && ready_probes.load(std::sync::atomic::Ordering::SeqCst) >= 1
        },
    )
    .await;
    // A rolling stop: the ingress pod, and, once it has started draining, a fleet pod whose
    // numbers move while replies flow.
    let a_draining = a.draining.clone();
    let (_, ()) = tokio::join!(a.shutdown(), async {
        eventually("a draining", Duration::from_secs(5), || {
            a_draining.is_draining()
        })
        .await;
        gw_a.shutdown().await;
    });
    let (answers, moved_after) = sender.await.expect("sender");
    let moved_after = moved_after.expect("readiness never failed");
    assert!(
        moved_after > 5,
        "readiness failed only once the pod stopped: round {moved_after}"
    );
    let bad: Vec<_> = answers
        .iter()
        .filter(|a| a.as_ref().ok() != Some(&200))
        .collect();
    assert!(
        bad.is_empty(),
        "answers other than 200 while a pod stopped: {bad:?}"
    );
    eventually("every message answered", Duration::from_secs(30), || {
        sends(&numbers) == 4 * 60
    })
    .await;
    assert_eq!(duplicate_sends(&numbers), 0);
    b.shutdown().await;
    gw_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_moves_one_number_to_another_fleet_pod_even_when_every_pod_is_at_its_share() {
    let env = Env::new().await;
    let (_numbers, names) = cloud_numbers(&env, 4).await;
    let a = fleet_pod(&env, "gw-a").await;
    let b = fleet_pod(&env, "gw-b").await;
    eventually("2 and 2", Duration::from_secs(30), || {
        settled(&holders(&env, &names), &["gw-a", "gw-b"], 2, 2)
    })
    .await;
    // `kubectl whatsapp release` of one of a's numbers: the annotation names the holder.
    let (name, _) = holders(&env, &names)
        .into_iter()
        .find(|(_, h)| h.as_deref() == Some("gw-a"))
        .expect("a holds one");
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/whatsapp-{name}");
    let mut lease = env.kube.get(&path).expect("lease");
    lease["metadata"]["annotations"] = json!({ (lease::RELEASE_ANNOTATION): "gw-a" });
    env.kube.put(&path, lease);
    eventually("the number moves to b", Duration::from_secs(15), || {
        holders(&env, std::slice::from_ref(&name))[&name].as_deref() == Some("gw-b")
    })
    .await;
    // It stays there: the shares even out with another number, not this one.
    eventually("2 and 2 again", Duration::from_secs(20), || {
        settled(&holders(&env, &names), &["gw-a", "gw-b"], 2, 2)
    })
    .await;
    assert_eq!(
        holders(&env, std::slice::from_ref(&name))[&name].as_deref(),
        Some("gw-b")
    );
    a.shutdown().await;
    b.shutdown().await;
}
