//! Shared test setup: real Postgres, fake Cloud API, fake Kubernetes API, gateways.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use fakes::cloud_api::{CloudApiConfig, FakeCloudApi};
use fakes::kube_api::FakeKubeApi;
use queue::testing::TestDb;
use worker::config::AccountArgs;
use worker::gateway::lease::LeaseSettings;
use worker::gateway::{self, GatewaySettings, RunningGateway};
use worker::metrics::Metrics;

pub const ACCOUNT: &str = "default/support-line";
pub const POOL: &str = "default/support";
/// The WhatsApp Web account of the web tests, its Lease and its phone number.
pub const WEB_ACCOUNT: &str = "default/sales-line";
pub const WEB_LEASE: &str = "whatsapp-sales-line";
pub const WEB_PHONE: &str = "+5511987650001";

pub struct Env {
    pub db: TestDb,
    pub cloud: FakeCloudApi,
    pub kube: FakeKubeApi,
}

impl Env {
    pub async fn new() -> Self {
        Self::with_pool_size(30).await
    }

    pub async fn with_pool_size(connections: u32) -> Self {
        worker::install_crypto_provider();
        let db = TestDb::with_pool_size(connections)
            .await
            .expect("test database");
        let cloud = FakeCloudApi::start(CloudApiConfig::default())
            .await
            .expect("fake cloud api");
        let kube = FakeKubeApi::start().await.expect("fake kube api");
        Self { db, cloud, kube }
    }

    pub fn account(&self) -> AccountArgs {
        AccountArgs {
            id: ACCOUNT.into(),
            phone_number_id: self.cloud.phone_number_id().into(),
            api_base_url: self.cloud.api_base_url(),
            waba_id: Some(self.cloud.waba_id().into()),
            routing: routing(),
            access_token: self.cloud.access_token().into(),
            app_secret: self.cloud.app_secret().into(),
            verify_token: "verify-me".into(),
            rate_per_second: 1000,
            per_recipient_burst: 45,
            retry: worker::config::RetryArgs {
                max_attempts: 8,
                backoff_seconds: 1,
                in_doubt_grace_seconds: 2,
            },
            media: Default::default(),
        }
    }

    pub fn kube_client(&self) -> kube::Client {
        let mut cfg = kube::Config::new(self.kube.url().parse().expect("fake kube url"));
        cfg.default_namespace = "default".into();
        cfg.read_timeout = Some(Duration::from_secs(2));
        cfg.write_timeout = Some(Duration::from_secs(2));
        kube::Client::try_from(cfg).expect("kube client")
    }

    pub fn lease(&self, identity: &str, duration: u64, renew: u64, retry: u64) -> LeaseSettings {
        LeaseSettings {
            duty: lease::Duty::Send,
            name: "whatsapp-support-line".into(),
            namespace: "default".into(),
            identity: identity.into(),
            duration: Duration::from_secs(duration),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        }
    }

    /// An ingress-only gateway that the fake Cloud API delivers its webhooks to.
    pub async fn ingress(&self) -> RunningGateway {
        let gw = self.gateway("ingress", true).await;
        self.cloud
            .set_webhook_url(format!("http://{}/webhook", gw.addr));
        gw
    }

    pub async fn gateway(&self, identity: &str, ingress_only: bool) -> RunningGateway {
        self.gateway_with(identity, ingress_only, self.lease(identity, 3, 2, 1))
            .await
    }

    pub async fn gateway_with(
        &self,
        identity: &str,
        ingress_only: bool,
        lease: LeaseSettings,
    ) -> RunningGateway {
        self.gateway_for(self.account(), identity, ingress_only, lease)
            .await
    }

    /// A gateway for `account` (the test account with some setting changed).
    pub async fn gateway_for(
        &self,
        account: AccountArgs,
        identity: &str,
        ingress_only: bool,
        lease: LeaseSettings,
    ) -> RunningGateway {
        // Each gateway's sends carry its identity as the Graph version segment, so the fake
        // Cloud API can tell who sent what.
        let account = AccountArgs {
            api_base_url: self.cloud.api_base_url_tagged(identity),
            ..account
        };
        let settings = GatewaySettings {
            account,
            lease,
            listen: "127.0.0.1:0".into(),
            ingress_only,
        };
        let (metrics, _) = Metrics::new();
        gateway::start(
            self.db.pool.clone(),
            Some(self.kube_client()),
            settings,
            metrics,
            axum::Router::new(),
        )
        .await
        .expect("gateway starts")
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.db.pool)
            .await
            .expect("count")
    }

    pub fn lease_holder(&self) -> Option<String> {
        self.kube
            .get("/apis/coordination.k8s.io/v1/namespaces/default/leases/whatsapp-support-line")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
            .filter(|h| !h.is_empty())
    }
}

/// Wait for a condition, polling, with a deadline.
pub async fn eventually<F: FnMut() -> bool>(what: &str, timeout: Duration, mut check: F) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A core worker on the test database for the given AgentPool spec (JSON, defaults apply).
pub async fn core(env: &Env, spec: serde_json::Value) -> worker::core::RunningCore {
    core_with_metrics(env, spec, Metrics::new().0).await
}

/// [`core`], counting into `metrics` (turn outcomes, for instance).
pub async fn core_with_metrics(
    env: &Env,
    spec: serde_json::Value,
    metrics: Metrics,
) -> worker::core::RunningCore {
    let spec: crds::AgentPoolSpec = serde_json::from_value(spec).expect("valid AgentPool spec");
    worker::core::start(
        env.db.pool.clone(),
        worker::core::CoreSettings {
            queue: POOL.into(),
            spec,
            api_key: Some("sk-test".into()),
            processor_id: format!("core-{}", uuid::Uuid::new_v4().simple()),
            lock: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
        },
        metrics,
    )
    .await
    .expect("core starts")
}

/// Poll an async condition with a deadline.
pub use queue::testing::eventually as eventually_async;

/// Poll a `SELECT count(*) ...` until `ok(count)` holds, with a deadline.
pub async fn wait_count(
    env: &Env,
    what: &str,
    timeout: Duration,
    sql: &'static str,
    ok: impl Fn(i64) -> bool,
) {
    let pool = env.db.pool.clone();
    eventually_async(what, timeout, || {
        let pool = pool.clone();
        let ok = &ok;
        async move {
            ok(sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .expect("count"))
        }
    })
    .await;
}

/// Who answers the test account: the test pool, everyone allowed.
pub fn routing() -> worker::config::RoutingArgs {
    worker::config::RoutingArgs {
        pool: POOL.into(),
        handoff_message: "A human will reply soon.".into(),
        allowed_contacts: vec![],
        max_message_age_seconds: 86_400,
        answer_groups: false,
    }
}

/// `n` outbound text messages of the test account to distinct recipients (`from`..`from + n`).
pub async fn enqueue_messages(env: &Env, from: usize, n: usize) -> Vec<i64> {
    let mut conn = env.db.pool.acquire().await.expect("conn");
    let msgs: Vec<queue::outbound::NewOutbound> = (from..from + n)
        .map(|i| queue::outbound::NewOutbound {
            account_id: ACCOUNT.into(),
            conversation_id: None,
            job_id: None,
            recipient: format!("1555{i:07}"),
            message: serde_json::json!({"type": "text", "text": {"body": format!("message {i}")}}),
            sent_by_agent: true,
            sent_by_member: None,
            max_attempts: Some(8),
        })
        .collect();
    queue::outbound::enqueue(&mut conn, &msgs)
        .await
        .expect("enqueue outbound")
}

/// A WhatsApp Web gateway for [`WEB_ACCOUNT`] whose client connects to `url` (a stand-in).
pub async fn web_gateway(
    env: &Env,
    identity: &str,
    url: &str,
) -> worker::web::gateway::RunningWebGateway {
    web_gateway_for(
        env,
        WEB_ACCOUNT,
        WEB_PHONE,
        WEB_LEASE,
        identity,
        url,
        worker::web::owner::Pairing::QrCode,
    )
    .await
}

/// A WhatsApp Web gateway for `account` (number `phone`) under the Lease `lease_name`,
/// connecting to `url`.
pub async fn web_gateway_for(
    env: &Env,
    account: &str,
    phone: &str,
    lease_name: &str,
    identity: &str,
    url: &str,
    pairing: worker::web::owner::Pairing,
) -> worker::web::gateway::RunningWebGateway {
    web_gateway_versioned(
        env,
        account,
        phone,
        lease_name,
        identity,
        url,
        pairing,
        Some((2, 3000, 1_027_934_701)),
        worker::web::owner::VERSION_CHECK_URL,
    )
    .await
}

/// [`web_gateway_for`] with the version unpinned (`None`: read from `version_check_url`).
#[allow(clippy::too_many_arguments)]
pub async fn web_gateway_versioned(
    env: &Env,
    account: &str,
    phone: &str,
    lease_name: &str,
    identity: &str,
    url: &str,
    pairing: worker::web::owner::Pairing,
    client_version: Option<(u32, u32, u32)>,
    version_check_url: &str,
) -> worker::web::gateway::RunningWebGateway {
    let (metrics, registry) = Metrics::new();
    let mut lease = env.lease(identity, 3, 2, 1);
    lease.duty = lease::Duty::Connect;
    lease.name = lease_name.into();
    worker::web::gateway::start(
        env.db.pool.clone(),
        env.kube_client(),
        worker::web::gateway::WebGatewaySettings {
            web: worker::web::owner::WebSettings {
                account: account.into(),
                phone_number: phone.into(),
                pairing,
                push_name: None,
                server_url: Some(url.into()),
                client_version,
                version_check_url: version_check_url.into(),
                identity: identity.into(),
                pacing: worker::gateway::sender::Pacing::whatsapp_web(20, 6),
                typing: Duration::ZERO,
                read_receipts: false,
                backoff: Duration::from_secs(1),
                in_doubt_grace: Duration::from_secs(60),
                max_attempts: 8,
                pool: routing().pool,
                media: worker::config::MediaArgs::default().limits(),
            },
            routing: routing(),
            lease,
            listen: "127.0.0.1:0".into(),
        },
        metrics,
        std::sync::Arc::new(registry),
    )
    .await
    .expect("web gateway starts")
}

/// The WhatsApp Web session row of [`WEB_ACCOUNT`].
pub async fn web_session(env: &Env) -> Option<queue::web_session::WebSession> {
    queue::web_session::get(&env.db.pool, WEB_ACCOUNT)
        .await
        .expect("session row")
}

/// Wait until the WhatsApp Web session row satisfies `ok`; returns it.
pub async fn wait_web_session(
    env: &Env,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&queue::web_session::WebSession) -> bool,
) -> queue::web_session::WebSession {
    let ok = &ok;
    eventually_async(what, timeout, || async move {
        web_session(env).await.is_some_and(|s| ok(&s))
    })
    .await;
    web_session(env).await.expect("session row")
}

/// Resident set size in KiB of a process (`"self"` or a pid), from /proc.
pub fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Who sent each message and who held the Lease `lease` at that moment, as the fake Cloud API
/// saw each send arrive (gateways tag their sends with their identity, see
/// [`Env::gateway_with`]). Checks "only the Lease holder sends" as it could break, not by
/// sampling afterwards.
#[derive(Clone, Default)]
pub struct SenderAudit(std::sync::Arc<std::sync::Mutex<Vec<SendSeen>>>);

/// `(sender, Lease holder when the send arrived)`.
type SendSeen = (String, Option<String>);

impl SenderAudit {
    /// Start auditing the sends of the test account (Lease `whatsapp-support-line`).
    pub fn start(env: &Env) -> Self {
        let audit = Self::default();
        let seen = audit.0.clone();
        let kube = env.kube.clone();
        env.cloud.on_send(move |sender, _| {
            let holder = kube
                .get("/apis/coordination.k8s.io/v1/namespaces/default/leases/whatsapp-support-line")
                .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
                .filter(|h| !h.is_empty());
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((sender.to_string(), holder));
        });
        audit
    }

    /// Sends per sender; fails the test if any send came from a gateway that was not the Lease
    /// holder when it arrived.
    pub fn assert_only_the_holder_sent(&self) -> std::collections::BTreeMap<String, usize> {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let strays: Vec<_> = seen
            .iter()
            .filter(|(sender, holder)| holder.as_deref() != Some(sender.as_str()))
            .collect();
        assert!(
            strays.is_empty(),
            "sends from a gateway that did not hold the Lease (sender, holder): {strays:?}"
        );
        let mut per_sender = std::collections::BTreeMap::new();
        for (sender, _) in seen {
            *per_sender.entry(sender).or_insert(0) += 1;
        }
        per_sender
    }
}

/// Assert that no send beyond `expected` reaches the fake Cloud API for `window`: an absence
/// (no late resend) observed for as long as it could still happen, failing the moment a send
/// is accepted.
pub async fn no_send_after(cloud: &FakeCloudApi, expected: usize, window: Duration) {
    let mut accepted = cloud.accepted_sends();
    assert_eq!(*accepted.borrow_and_update(), expected, "sends so far");
    let late = tokio::time::timeout(window, accepted.wait_for(|n| *n != expected)).await;
    assert!(
        late.is_err(),
        "a send came after the last expected one: {} accepted, {expected} expected",
        cloud.sends().len()
    );
}

/// A `whatsapp-worker web-gateway` process (as in a pod) for [`WEB_ACCOUNT`]; killed when
/// dropped.
pub struct WebGatewayProcess {
    pub name: &'static str,
    pub child: std::process::Child,
}

impl Drop for WebGatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_web_gateway(
    env: &Env,
    kubeconfig: &std::path::Path,
    url: &str,
    name: &'static str,
    log: &std::path::Path,
) -> WebGatewayProcess {
    spawn_web_gateway_with(env, kubeconfig, url, name, log, &[])
}

/// [`spawn_web_gateway`] with more environment (pacing, log level).
pub fn spawn_web_gateway_with(
    env: &Env,
    kubeconfig: &std::path::Path,
    url: &str,
    name: &'static str,
    log: &std::path::Path,
    extra: &[(&str, &str)],
) -> WebGatewayProcess {
    let log = std::fs::File::create(log.join(format!("{name}.log"))).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_whatsapp-worker"))
        .arg("web-gateway")
        .env("DATABASE_URL", &env.db.url)
        .env("DB_MAX_CONNECTIONS", "4")
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", "default")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("WA_ACCOUNT", WEB_ACCOUNT)
        .env("WA_PHONE_NUMBER", WEB_PHONE)
        .env("WA_POOL", POOL)
        .env("WA_WEB_SERVER_URL", url)
        .env("WA_WEB_CLIENT_VERSION", "2.3000.1027934701")
        .env("WA_LEASE_NAME", WEB_LEASE)
        .env("WA_LEASE_DURATION_SECONDS", "4")
        .env("WA_LEASE_RENEW_DEADLINE_SECONDS", "3")
        .env("WA_LEASE_RETRY_PERIOD_SECONDS", "1")
        .env("RUST_LOG", "info")
        .envs(extra.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start whatsapp-worker web-gateway");
    WebGatewayProcess { name, child }
}

/// Two `web-gateway` processes for [`WEB_ACCOUNT`]: `web-a` linked (by the stand-in's phone)
/// and holding, `web-b` standing by.
pub struct HolderAndStandby {
    pub dir: std::path::PathBuf,
    pub first: WebGatewayProcess,
    pub second: WebGatewayProcess,
    pub gateway_jid: String,
}

impl HolderAndStandby {
    pub async fn start(env: &Env, server: &fakes::whatsapp_web::WebServer) -> Self {
        Self::start_with(env, server, &[]).await
    }

    pub async fn start_with(
        env: &Env,
        server: &fakes::whatsapp_web::WebServer,
        extra: &[(&str, &str)],
    ) -> Self {
        const WAIT: Duration = Duration::from_secs(30);
        let dir = std::env::temp_dir().join(format!("web-gw-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let kubeconfig = env
            .kube
            .write_kubeconfig(&dir, "default")
            .expect("kubeconfig");
        // The gateways trust the stand-in's media host (as a pod behind a TLS-inspecting
        // proxy would its CA).
        let ca = dir.join("media-ca.pem");
        std::fs::write(&ca, server.media().ca_pem()).expect("media CA");
        let ca = ca.to_string_lossy().into_owned();
        let mut extra = extra.to_vec();
        extra.push(("SSL_CERT_FILE", ca.as_str()));
        let extra = extra.as_slice();
        let first = spawn_web_gateway_with(env, &kubeconfig, server.url(), "web-a", &dir, extra);
        let row = wait_web_session(env, "a QR code", WAIT, |s| s.qr_code.is_some()).await;
        let gateway_jid = server.link(&row.qr_code.expect("qr")).expect("linked");
        wait_web_session(env, "web-a connected", WAIT, |s| {
            s.state == "connected" && s.holder.as_deref() == Some("web-a")
        })
        .await;
        let second = spawn_web_gateway_with(env, &kubeconfig, server.url(), "web-b", &dir, extra);
        Self {
            dir,
            first,
            second,
            gateway_jid,
        }
    }

    /// SIGKILL the holder (no goodbye, nothing flushed on the way out) and wait until the
    /// stand-in has seen its socket go (`others_online`: the sessions left, contacts').
    pub async fn kill_holder(
        &mut self,
        server: &fakes::whatsapp_web::WebServer,
        others_online: usize,
    ) {
        self.first.child.kill().expect("kill -9");
        self.first.child.wait().expect("reaped");
        eventually(
            "the stand-in to see the holder gone",
            Duration::from_secs(30),
            || server.online() == others_online,
        )
        .await;
    }

    pub async fn standby_connected(&self, env: &Env) {
        wait_web_session(env, "web-b connected", Duration::from_secs(30), |s| {
            s.state == "connected" && s.holder.as_deref() == Some(self.second.name)
        })
        .await;
    }
}

impl Drop for HolderAndStandby {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
