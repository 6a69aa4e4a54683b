//! `/metrics` of every worker role (ingress, fleet and core, which the operator deploys for a
//! pool, and the one-number `gateway` and `web-gateway`), each a real `whatsapp-worker`
//! process, scraped over HTTP after conversations have gone through them: a customer writes,
//! the rules agent answers, the customer asks for a human, a team member claims and replies;
//! another customer writes to the one-number gateway. Every unlabelled metric of
//! docs/runbook.md's table is served by every role (a labelled one from its first sample on),
//! and each counter and histogram the table says a role sets has moved in that role, with the
//! documented labels. A metric declared but never updated, or updated by another role than the
//! docs say, fails here.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Env, eventually_async, wait_count};
use fakes::scrape::{Documented, Sample, documented, parse, total};
use serde_json::{Value, json};

const NS: &str = "default";
const ACCOUNT_NAME: &str = "line-00";
const MEMBER_TOKEN: &str = "alice-token-0123456789abcdef";
const SOLO_ACCOUNT: &str = "default/line-solo";

/// A role the test runs, and what docs/runbook.md calls it in the "Set by" column.
const ROLES: &[&str] = &["ingress", "fleet", "core", "gateway", "web-gateway"];

/// "fleet (WhatsApp Web)" is a fleet with WhatsApp Web numbers; this test's one number is a
/// Cloud API number, so those counts are not checked here.
const NOT_HERE: &[&str] = &["(WhatsApp Web)"];

struct Role {
    name: &'static str,
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn spawn(
    name: &'static str,
    args: &[&str],
    pod: &str,
    env: &Env,
    dir: &Path,
    extra: &[(&str, &str)],
) -> Role {
    let port = free_port();
    let log = dir.join(format!("{pod}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whatsapp-worker"));
    cmd.args(args)
        .env("DATABASE_URL", &env.db.url)
        .env("DB_MAX_CONNECTIONS", "4")
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", NS)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("WA_DRAIN_SECONDS", "0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Role {
        name,
        child: cmd.spawn().expect("start whatsapp-worker"),
        base: format!("http://127.0.0.1:{port}"),
        log,
    }
}

fn b64(s: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).expect("base64")
}

/// The pool's one Cloud API number and its Secret, as `kubectl apply` leaves them.
fn apply_account(env: &Env) {
    env.kube.put(
        &format!("/api/v1/namespaces/{NS}/secrets/line-creds"),
        json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
            "data": {
                "accessToken": b64(env.cloud.access_token()),
                "appSecret": b64(env.cloud.app_secret()),
                "verifyToken": b64("verify-line"),
            }
        }),
    );
    env.kube.put(
        &format!(
            "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/{NS}/whatsappaccounts/{ACCOUNT_NAME}"
        ),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "generation": 1, "uid": "uid-line-00" },
            "spec": {
                "phoneNumber": "+15550000001",
                "provider": { "cloudApi": {
                    "phoneNumberId": env.cloud.phone_number_id(),
                    "apiBaseUrl": env.cloud.api_base_url(),
                    "credentialsSecretRef": { "name": "line-creds" }
                }},
                "agentPoolRef": { "name": "support" },
                "lease": { "durationSeconds": 3, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 1 },
                "delivery": { "ratePerSecond": 1000, "perRecipientBurst": 45, "backoffSeconds": 1 }
            }
        }),
    );
}

async fn scrape(http: &reqwest::Client, role: &Role) -> Option<String> {
    let resp = http
        .get(format!("{}/metrics", role.base))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

async fn ready(http: &reqwest::Client, role: &Role) -> bool {
    http.get(format!("{}/readyz", role.base))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_the_documented_metrics_and_moves_the_ones_it_sets() {
    let env = Env::new().await;
    let dir = std::env::temp_dir().join(format!("scrape-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("tokens")).expect("temp dir");
    let kubeconfig = env.kube.write_kubeconfig(&dir, NS).expect("kubeconfig");
    std::fs::rename(&kubeconfig, dir.join("kubeconfig")).expect("kubeconfig in place");
    std::fs::write(dir.join("tokens/alice"), MEMBER_TOKEN).expect("token");
    std::fs::write(
        dir.join("pool.json"),
        json!({
            "model": { "provider": "rules" },
            "lanes": [
                { "name": "info", "keywords": ["hello"], "replies": ["Hi! How can we help?"] },
                { "name": "human", "keywords": ["human"], "handoff": true }
            ],
            "team": [{ "id": "alice" }]
        })
        .to_string(),
    )
    .expect("pool spec");
    apply_account(&env);

    let pool = format!("{NS}/support");
    let dir_s = dir.to_string_lossy().to_string();
    let pool_file = format!("{dir_s}/pool.json");
    let tokens = format!("{dir_s}/tokens");
    let fleet_env = [
        ("WA_POOL", pool.as_str()),
        ("WA_FLEET_ROUND_MILLIS", "300"),
        ("WA_FLEET_MEMBER_TTL_SECONDS", "2"),
    ];
    // The one-number roles (local runs and `all`): a Cloud API gateway and its standby for a
    // second number, and a WhatsApp Web gateway (it takes its Lease before any pairing).
    let solo = fakes::cloud_api::FakeCloudApi::start(fakes::cloud_api::CloudApiConfig {
        phone_number_id: "106540352240777".into(),
        ..Default::default()
    })
    .await
    .expect("second number");
    let solo_base = solo.api_base_url();
    let solo_env = [
        ("WA_ACCOUNT", SOLO_ACCOUNT),
        ("WA_PHONE_NUMBER_ID", solo.phone_number_id()),
        ("WA_API_BASE_URL", solo_base.as_str()),
        ("WA_ACCESS_TOKEN", solo.access_token()),
        ("WA_APP_SECRET", solo.app_secret()),
        ("WA_VERIFY_TOKEN", "verify-solo"),
        ("WA_POOL", pool.as_str()),
        ("WA_LEASE_NAME", "whatsapp-line-solo"),
        ("WA_LEASE_DURATION_SECONDS", "3"),
        ("WA_LEASE_RENEW_DEADLINE_SECONDS", "2"),
        ("WA_LEASE_RETRY_PERIOD_SECONDS", "1"),
    ];
    let stand_in = fakes::whatsapp_web::WebServer::start("+5511987650001")
        .await
        .expect("WhatsApp Web stand-in");
    let web_env = [
        ("WA_ACCOUNT", "default/web-solo"),
        ("WA_PHONE_NUMBER", "+5511987650001"),
        ("WA_WEB_SERVER_URL", stand_in.url()),
        ("WA_WEB_CLIENT_VERSION", "2.3000.1027934701"),
        ("WA_POOL", pool.as_str()),
        ("WA_LEASE_NAME", "whatsapp-web-solo"),
    ];
    let roles = [
        spawn("ingress", &["ingress"], "ingress-0", &env, &dir, &[]),
        spawn("gateway", &["gateway"], "solo-a", &env, &dir, &solo_env),
        spawn("gateway", &["gateway"], "solo-b", &env, &dir, &solo_env),
        spawn(
            "web-gateway",
            &["web-gateway"],
            "web-a",
            &env,
            &dir,
            &web_env,
        ),
        spawn("fleet", &["fleet"], "gw-a", &env, &dir, &fleet_env),
        spawn("fleet", &["fleet"], "gw-b", &env, &dir, &fleet_env),
        spawn(
            "core",
            &["core"],
            "core-0",
            &env,
            &dir,
            &[
                ("WA_POOL", pool.as_str()),
                ("AGENT_POOL_SPEC_FILE", pool_file.as_str()),
                ("TEAM_TOKENS_DIR", tokens.as_str()),
            ],
        ),
    ];
    let http = reqwest::Client::new();
    for role in &roles {
        eventually_async(
            &format!("{} ready ({})", role.name, role.log.display()),
            Duration::from_secs(60),
            || ready(&http, role),
        )
        .await;
    }
    let ingress = &roles[0];
    let core = roles.iter().find(|r| r.name == "core").expect("core");
    env.cloud
        .set_webhook_url(format!("{}/webhook", ingress.base));
    // The ingress learns the number from the account (and keeps a webhook for a number it does
    // not know yet: the unrouted counter).
    eventually_async(
        "the ingress routes the number",
        Duration::from_secs(30),
        || async {
            scrape(&http, ingress)
                .await
                .is_some_and(|t| total(&parse(&t).1, "whatsapp_worker_fleet_accounts") == 1.0)
        },
    )
    .await;
    let stranger = fakes::cloud_api::FakeCloudApi::start(fakes::cloud_api::CloudApiConfig {
        phone_number_id: "999000111".into(),
        app_secret: env.cloud.app_secret().into(),
        ..Default::default()
    })
    .await
    .expect("a number without an account");
    stranger.set_webhook_url(format!("{}/webhook", ingress.base));
    let (_, payload) = stranger.inbound_text("15550009999", "Someone", "hello?");
    assert_eq!(
        stranger.deliver(&payload).await.expect("deliver"),
        reqwest::StatusCode::OK
    );

    // A conversation: an answer from the agent, a handoff, a human's claim and reply.
    let (_, payload) = env.cloud.inbound_text("15551230000", "Customer", "hello");
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        reqwest::StatusCode::OK
    );
    let (_, payload) = env
        .cloud
        .inbound_text("15551230000", "Customer", "a human please");
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        reqwest::StatusCode::OK
    );
    wait_count(
        &env,
        "the handoff",
        Duration::from_secs(30),
        "SELECT count(*) FROM handoff_tasks WHERE state = 'open'",
        |n| n == 1,
    )
    .await;
    let conversation: i64 = sqlx::query_scalar("SELECT id FROM conversations LIMIT 1")
        .fetch_one(&env.db.pool)
        .await
        .expect("conversation");
    for (path, body) in [
        (
            format!("/api/conversations/{conversation}/claim"),
            json!({}),
        ),
        (
            format!("/api/conversations/{conversation}/messages"),
            json!({ "text": "Alice here, how can I help?" }),
        ),
    ] {
        let resp = http
            .post(format!("{}{path}", core.base))
            .bearer_auth(MEMBER_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("team action");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
    // A customer of the second number writes to its one-number gateway (both pods get the
    // webhook, as behind a Service; the Lease holder sends the answer).
    for gw in roles.iter().filter(|r| r.name == "gateway") {
        solo.set_webhook_url(format!("{}/webhook", gw.base));
        let (_, payload) = solo.inbound_text("15551239999", "Solo", "hello");
        assert_eq!(
            solo.deliver(&payload).await.expect("deliver"),
            reqwest::StatusCode::OK
        );
    }
    let holder = eventually_holder(&env, "whatsapp-line-solo").await;
    let holder_gw = roles
        .iter()
        .find(|r| r.name == "gateway" && r.log.ends_with(format!("{holder}.log")))
        .expect("the holder is one of the gateways");
    solo.set_webhook_url(format!("{}/webhook", holder_gw.base));
    wait_count(
        &env,
        "the second number's answer delivered",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbound_messages
         WHERE account_id = 'default/line-solo' AND state IN ('delivered', 'read')",
        |n| n >= 1,
    )
    .await;

    // A photo from each number's customer: fetched by the number's Lease holder (a fleet pod,
    // the one-number gateway).
    let photo = vec![7u8; 2048];
    let fleet_photo = env.cloud.add_media(photo.clone(), "image/jpeg");
    let (_, payload) =
        env.cloud
            .inbound_media("15551230000", "Customer", "image", &fleet_photo, json!({}));
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        reqwest::StatusCode::OK
    );
    let solo_photo = solo.add_media(photo, "image/jpeg");
    let (_, payload) = solo.inbound_media("15551239999", "Solo", "image", &solo_photo, json!({}));
    assert_eq!(
        solo.deliver(&payload).await.expect("deliver"),
        reqwest::StatusCode::OK
    );
    wait_count(
        &env,
        "both photos fetched",
        Duration::from_secs(30),
        "SELECT count(*) FROM media WHERE state = 'stored'",
        |n| n == 2,
    )
    .await;

    // The agent's answer and the human's reply (and a handoff notice, if the lane has one),
    // each sent, with their status webhooks back.
    wait_count(
        &env,
        "replies delivered",
        Duration::from_secs(30),
        "SELECT CASE WHEN bool_and(state IN ('delivered', 'read')) THEN count(*) ELSE 0 END
         FROM outbound_messages",
        |n| n >= 2,
    )
    .await;

    // Every documented series served by every role; every counter and histogram moved in each
    // role that the docs say sets it, with the documented labels.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = documented(&root, "whatsapp_worker_");
    assert!(docs.len() >= 20, "the table was not found");
    // Every role the table names runs here; a new role must be added.
    for d in &docs {
        for role in d.roles() {
            assert!(
                ROLES.contains(&role),
                "{} is set by {role}, which this test does not run",
                d.sample
            );
        }
    }
    // Counters move as the conversations finish: look again at every tick until all show.
    let mut failures = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let settled = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tick.tick().await;
            failures = check(&http, &roles, &docs).await;
            if failures.is_empty() {
                return;
            }
        }
    })
    .await;
    assert!(settled.is_ok(), "after 30 s:\n{}", failures.join("\n"));

    // One fleet pod holds the number's Lease.
    let mut held = 0.0;
    for role in roles.iter().filter(|r| r.name == "fleet") {
        let text = scrape(&http, role).await.expect("scrape");
        held += total(&parse(&text).1, "whatsapp_worker_leases_held");
    }
    assert_eq!(held, 1.0, "leases held across the fleet");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Lease `name`'s holder, once there is one.
async fn eventually_holder(env: &Env, name: &str) -> String {
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{name}");
    let mut holder = None;
    common::eventually("a holder", Duration::from_secs(30), || {
        holder = env
            .kube
            .get(&path)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string));
        holder.is_some()
    })
    .await;
    holder.unwrap_or_default()
}

/// What the scrape of every role does not show yet (empty: all as documented).
async fn check(http: &reqwest::Client, roles: &[Role], docs: &[Documented]) -> Vec<String> {
    let mut failures = Vec::new();
    // Per role: every family and sample of its processes (only the fleet pod holding the
    // number sends, so a role has moved a counter when one of its pods has).
    let mut by_role: Vec<(&str, BTreeSet<String>, Vec<Sample>)> = Vec::new();
    for role in roles {
        let Some(text) = scrape(http, role).await else {
            failures.push(format!("{}: /metrics not served", role.name));
            continue;
        };
        let (families, samples) = parse(&text);
        for d in docs.iter().filter(|d| d.labels.is_empty()) {
            if !families.contains(d.family()) {
                failures.push(format!("{}: {} not served", role.name, d.sample));
            }
        }
        gauges(role.name, &samples, &mut failures);
        match by_role.iter_mut().find(|(name, _, _)| *name == role.name) {
            Some((_, f, s)) => {
                f.extend(families);
                s.extend(samples);
            }
            None => by_role.push((role.name, families, samples)),
        }
    }
    for (role, families, samples) in &by_role {
        // One holder per number: across its pods, the Lease is held once, under an epoch.
        if ["gateway", "web-gateway"].contains(role) {
            if total(samples, "whatsapp_worker_lease_held") != 1.0 {
                failures.push(format!("{role}: lease_held is not 1 across its pods"));
            }
            if total(samples, "whatsapp_worker_fence_epoch") <= 0.0 {
                failures.push(format!("{role}: no fence epoch"));
            }
        }
        for d in docs
            .iter()
            .filter(|d| d.set_by(role, NOT_HERE) && d.kind != "gauge")
        {
            if !families.contains(d.family()) {
                failures.push(format!("{role}: {} not served", d.sample));
                continue;
            }
            let series = match d.kind.as_str() {
                "histogram" => format!("{}_count", d.family()),
                _ => d.sample.clone(),
            };
            match samples.iter().find(|s| s.name == series && s.value > 0.0) {
                None => failures.push(format!("{role}: {} never moved", d.sample)),
                Some(s) if s.labels != d.labels => failures.push(format!(
                    "{role}: {} has labels {:?}, docs say {:?}",
                    d.sample, s.labels, d.labels
                )),
                Some(_) => {}
            }
        }
    }
    failures
}

/// The gauges' values this conversation leaves in one process of `role`.
fn gauges(role: &str, samples: &[Sample], failures: &mut Vec<String>) {
    let expected: &[(&str, f64)] = match role {
        "ingress" => &[("whatsapp_worker_fleet_accounts", 1.0)],
        "fleet" => &[
            ("whatsapp_worker_fleet_members", 2.0),
            ("whatsapp_worker_fleet_accounts", 1.0),
        ],
        "core" => &[("whatsapp_worker_handoffs_open", 1.0)],
        _ => &[],
    };
    for (name, value) in expected {
        let actual = total(samples, name);
        if actual != *value {
            failures.push(format!("{role}: {name} is {actual}, expected {value}"));
        }
    }
    if role == "core" && total(samples, "whatsapp_worker_handoff_oldest_seconds") <= 0.0 {
        failures.push("core: whatsapp_worker_handoff_oldest_seconds not set".into());
    }
}
