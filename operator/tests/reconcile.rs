//! Reconcile logic without a cluster: the real kube client talks HTTP to the in-process fake
//! API server; queue depth comes from a real Postgres.

use std::sync::Arc;
use std::time::Duration;

use crds::{AgentPool, WhatsAppAccount};
use fakes::kube_api::FakeKubeApi;
use kube::runtime::controller::Action;
use operator::context::{Context, Settings};
use operator::metrics::Metrics;
use queue::jobs::{self, NewJob};
use queue::testing::TestDb;
use serde_json::{Value, json};

const NS: &str = "shop";
const ACCOUNTS: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/shop/whatsappaccounts";
const POOLS: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/shop/agentpools";

struct Harness {
    api: FakeKubeApi,
    ctx: Arc<Context>,
    db: TestDb,
}

async fn harness() -> Harness {
    service::install_crypto_provider();
    let api = FakeKubeApi::start().await.expect("fake api");
    let db = TestDb::new().await.expect("db");
    let mut cfg = kube::Config::new(api.url().parse().expect("url"));
    cfg.default_namespace = NS.into();
    let client = kube::Client::try_from(cfg).expect("client");
    let (metrics, _) = Metrics::new();
    let settings = Settings {
        worker_image: "example.com/worker:test".into(),
        database_url: "postgres://queue".into(),
        pool_resync_seconds: 3,
        account_resync_seconds: 10,
    };
    let ctx = Arc::new(Context::new(
        client,
        Some(db.pool.clone()),
        settings,
        metrics,
        "op-0",
    ));
    Harness { api, ctx, db }
}

fn account_json(spec_patch: Value) -> Value {
    let mut a = json!({
        "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
        "metadata": { "name": "support-line", "namespace": NS, "uid": "uid-account-1", "generation": 3 },
        "spec": {
            "phoneNumber": "+15550783881",
            "provider": { "cloudApi": { "phoneNumberId": "1065", "credentialsSecretRef": { "name": "creds" } } },
            "agentPoolRef": { "name": "support" }
        }
    });
    fakes::kube_api::merge(&mut a["spec"], &spec_patch);
    a
}

fn put_secret(h: &Harness, keys: &[&str]) {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| (k.to_string(), json!("dmFsdWU=")))
        .collect();
    h.api.put(&format!("/api/v1/namespaces/{NS}/secrets/creds"), json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS }, "data": data }));
}

/// Store the object in the fake and read it back as the controller would see it.
fn account(h: &Harness, obj: Value) -> Arc<WhatsAppAccount> {
    h.api.put(&format!("{ACCOUNTS}/support-line"), obj);
    Arc::new(
        serde_json::from_value(
            h.api
                .get(&format!("{ACCOUNTS}/support-line"))
                .expect("stored"),
        )
        .expect("typed"),
    )
}

fn get(h: &Harness, path: &str) -> Value {
    h.api
        .get(path)
        .unwrap_or_else(|| panic!("{path} was not created"))
}

fn events(h: &Harness) -> Vec<(String, String)> {
    h.api
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/events") && (r.method == "POST" || r.method == "PATCH"))
        .filter_map(|r| r.body)
        .map(|b| {
            (
                b["type"].as_str().unwrap_or_default().to_string(),
                b["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("env {name} missing"))
}

const FLEET: &str = "/apis/apps/v1/namespaces/shop/deployments/ap-support-gateway";

/// What a fleet's pods (or the Deployment controller) would report: `ready` pods of the pool's
/// gateway fleet.
fn fleet_ready(h: &Harness, ready: i32) {
    h.api.put(
        FLEET,
        json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "namespace": NS },
                "spec": { "replicas": ready }, "status": { "replicas": ready, "readyReplicas": ready } }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_gets_its_lease_no_pods_of_its_own_and_truthful_status() {
    let h = harness().await;
    put_secret(&h, &["accessToken", "appSecret", "verifyToken"]);
    // Left by an operator from before the fleets: removed on the first reconcile.
    h.api.put(
        "/apis/apps/v1/namespaces/shop/deployments/wa-support-line-gateway",
        json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "namespace": NS }, "spec": { "replicas": 2 } }),
    );
    h.api.put(
        "/api/v1/namespaces/shop/secrets/wa-support-line-db",
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS } }),
    );
    let acct = account(&h, account_json(json!({})));
    let action = operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    for legacy in [
        "/apis/apps/v1/namespaces/shop/deployments/wa-support-line-gateway",
        "/api/v1/namespaces/shop/secrets/wa-support-line-db",
        "/api/v1/namespaces/shop/services/wa-support-line-gateway",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/wa-support-line-gateway",
    ] {
        assert!(
            h.api.get(legacy).is_none(),
            "{legacy} is gone: the pool's fleet serves the number"
        );
    }
    let lease = get(
        &h,
        "/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-support-line",
    );
    assert_eq!(
        lease["metadata"]["ownerReferences"][0]["uid"], "uid-account-1",
        "the Lease goes with the account"
    );
    assert_eq!(
        lease["metadata"]["labels"]["whatsapp.kube-agents.io/pool"],
        "support"
    );
    assert_eq!(
        lease["metadata"]["labels"]["whatsapp.kube-agents.io/account"],
        "support-line"
    );

    let stored = get(&h, &format!("{ACCOUNTS}/support-line"));
    assert_eq!(stored["status"]["phase"], "Pending");
    assert_eq!(stored["status"]["observedGeneration"], 3);

    // A fleet pod takes the Lease and the fleet reports ready pods: Ready, owner shown.
    let now = jiff::Timestamp::now().to_string();
    let mut lease = lease;
    lease["spec"] = json!({ "holderIdentity": "ap-support-gateway-7d9f-abcde", "leaseDurationSeconds": 15, "renewTime": now, "leaseTransitions": 1 });
    h.api.put(
        "/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-support-line",
        lease,
    );
    fleet_ready(&h, 2);
    let acct = Arc::new(
        serde_json::from_value::<WhatsAppAccount>(get(&h, &format!("{ACCOUNTS}/support-line")))
            .expect("typed"),
    );
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let stored = get(&h, &format!("{ACCOUNTS}/support-line"));
    assert_eq!(stored["status"]["phase"], "Ready");
    assert_eq!(stored["status"]["owner"], "ap-support-gateway-7d9f-abcde");
    assert_eq!(stored["status"]["readyReplicas"], 2);
    assert_eq!(stored["status"]["leaseTransitions"], 1);
    let conds: Vec<(String, String)> = stored["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().into(),
                c["status"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    for t in ["Ready", "LeaseHeld", "CredentialsValid", "SpecValid"] {
        assert!(
            conds.contains(&(t.to_string(), "True".to_string())),
            "{t} should be True: {conds:?}"
        );
    }
    let evs = events(&h);
    assert!(
        evs.contains(&("Normal".into(), "LeaseAcquired".into())),
        "{evs:?}"
    );
    assert!(evs.contains(&("Normal".into(), "Ready".into())), "{evs:?}");

    // The holder stops renewing: the owner disappears from status (null clears it).
    let mut lease = get(
        &h,
        "/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-support-line",
    );
    lease["spec"]["renewTime"] =
        json!((jiff::Timestamp::now() - jiff::SignedDuration::from_secs(120)).to_string());
    h.api.put(
        "/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-support-line",
        lease,
    );
    let acct = Arc::new(
        serde_json::from_value::<WhatsAppAccount>(get(&h, &format!("{ACCOUNTS}/support-line")))
            .expect("typed"),
    );
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let stored = get(&h, &format!("{ACCOUNTS}/support-line"));
    assert_eq!(stored["status"]["owner"], Value::Null);
    assert_eq!(stored["status"]["phase"], "Degraded");
    assert!(events(&h).contains(&("Warning".into(), "LeaseLost".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_are_a_condition_not_a_crash() {
    let h = harness().await;
    let acct = account(&h, account_json(json!({})));
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile succeeds");
    let stored = get(&h, &format!("{ACCOUNTS}/support-line"));
    let cond = stored["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "CredentialsValid")
        .expect("condition")
        .clone();
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("SecretNotFound"))
    );
    assert_eq!(stored["status"]["phase"], "Degraded");
    // A Secret missing a key names the key.
    put_secret(&h, &["accessToken", "verifyToken"]);
    let acct = Arc::new(
        serde_json::from_value::<WhatsAppAccount>(get(&h, &format!("{ACCOUNTS}/support-line")))
            .expect("typed"),
    );
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let stored = get(&h, &format!("{ACCOUNTS}/support-line"));
    let cond = stored["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "CredentialsValid")
        .expect("condition")
        .clone();
    assert_eq!(cond["reason"], "KeysMissing");
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or_default()
            .contains("appSecret")
    );
    assert_eq!(
        events(&h)
            .iter()
            .filter(|e| e.1 == "CredentialsInvalid")
            .count(),
        1,
        "one warning per transition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_waits_for_a_change_and_suspend_says_so() {
    let h = harness().await;
    put_secret(&h, &["accessToken", "appSecret", "verifyToken"]);
    // As if CEL did not run (an old API server): the operator still refuses.
    let acct = account(&h, account_json(json!({ "phoneNumber": "555-0100" })));
    let action = operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change(), "no hot loop on a bad spec");
    let stored = get(&h, &format!("{ACCOUNTS}/support-line"));
    let cond = stored["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "SpecValid")
        .expect("condition")
        .clone();
    assert_eq!(cond["status"], "False");
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or_default()
            .contains("E.164")
    );
    assert!(events(&h).contains(&("Warning".into(), "InvalidSpec".into())));

    // The per-number replicas of old manifests: accepted, ignored, and said so.
    let acct = account(&h, account_json(json!({ "suspend": true, "replicas": 2 })));
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let status = get(&h, &format!("{ACCOUNTS}/support-line"))["status"].clone();
    let deprecated = condition(&status, "Deprecated").expect("Deprecated");
    assert_eq!(deprecated["status"], "True");
    assert!(
        deprecated["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.gateways")
    );
    assert_eq!(
        get(&h, &format!("{ACCOUNTS}/support-line"))["status"]["phase"],
        "Suspended"
    );
    assert!(events(&h).contains(&("Normal".into(), "Suspended".into())));
}

fn pool_json(spec: Value) -> Value {
    json!({
        "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
        "metadata": { "name": "support", "namespace": NS, "uid": "uid-pool-1", "generation": 1 },
        "spec": spec
    })
}

fn pool(h: &Harness, obj: Value) -> Arc<AgentPool> {
    h.api.put(&format!("{POOLS}/support"), obj);
    Arc::new(
        serde_json::from_value(h.api.get(&format!("{POOLS}/support")).expect("stored"))
            .expect("typed"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_scales_its_core_deployment_from_queue_depth() {
    let h = harness().await;
    let spec = json!({ "minReplicas": 1, "maxReplicas": 6, "targetPendingPerReplica": 20, "scaleDownStabilizationSeconds": 0,
                       "model": { "provider": "openai", "model": "m", "apiKeySecretRef": { "name": "llm", "key": "k" } } });
    let p = pool(&h, pool_json(spec.clone()));
    let action = operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
    let dep = get(
        &h,
        "/apis/apps/v1/namespaces/shop/deployments/ap-support-core",
    );
    assert_eq!(dep["spec"]["replicas"], 1, "idle pool at minReplicas");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_value(c, "LLM_API_KEY")["valueFrom"]["secretKeyRef"],
        json!({ "name": "llm", "key": "k" })
    );
    assert_eq!(env_value(c, "WA_POOL")["value"], "shop/support");
    // The admin API token (kubectl whatsapp jobs|handoffs|resume): made once, owned by the pool,
    // read by the core pods.
    assert_eq!(
        env_value(c, "WA_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"],
        json!({ "name": "ap-support-admin", "key": "token", "optional": true })
    );
    let admin = get(&h, "/api/v1/namespaces/shop/secrets/ap-support-admin");
    let token = admin["data"]["token"].as_str().expect("token").to_string();
    assert!(token.len() >= 56, "43 random characters, base64: {token}");
    assert_eq!(admin["metadata"]["ownerReferences"][0]["kind"], "AgentPool");
    let cm = get(&h, "/api/v1/namespaces/shop/configmaps/ap-support-spec");
    let mounted: crds::AgentPoolSpec =
        serde_json::from_str(cm["data"]["pool.json"].as_str().expect("pool.json"))
            .expect("spec json");
    assert_eq!(mounted.max_replicas, 6);

    // A burst: 100 pending jobs for this pool -> ceil(100 / 20) = 5 replicas.
    let mut tx = h.db.pool.begin().await.expect("begin");
    for i in 0..100 {
        jobs::enqueue(
            &mut tx,
            &NewJob::new("shop/support", "agent_turn", json!({})).keyed(format!("c{i}")),
        )
        .await
        .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let p = Arc::new(
        serde_json::from_value::<AgentPool>(get(&h, &format!("{POOLS}/support"))).expect("typed"),
    );
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(
        get(
            &h,
            "/apis/apps/v1/namespaces/shop/deployments/ap-support-core"
        )["spec"]["replicas"],
        5
    );
    let status = get(&h, &format!("{POOLS}/support"))["status"].clone();
    assert_eq!(status["queueDepth"], 100);
    assert_eq!(status["desiredReplicas"], 5);
    assert!(status["lastScaleTime"].is_string());
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/name=whatsapp-core,whatsapp.kube-agents.io/pool=support"
    );
    assert!(events(&h).contains(&("Normal".into(), "ScaledUp".into())));
    assert_eq!(
        get(&h, "/api/v1/namespaces/shop/secrets/ap-support-admin")["data"]["token"],
        json!(token),
        "a reconcile never replaces the admin token"
    );

    // An HPA (or a person) sets spec.replicas through /scale: the operator follows it.
    let mut fixed = spec.clone();
    fixed["replicas"] = json!(3);
    let p = pool(&h, pool_json(fixed));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(
        get(
            &h,
            "/apis/apps/v1/namespaces/shop/deployments/ap-support-core"
        )["spec"]["replicas"],
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pools_and_tools_are_conditions_and_events() {
    let h = harness().await;
    let p = pool(
        &h,
        pool_json(
            json!({ "minReplicas": 4, "maxReplicas": 2, "tools": [{ "id": "teleport" }, { "id": "business_hours", "config": { "openHour": 99 } }] }),
        ),
    );
    let action = operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    let status = get(&h, &format!("{POOLS}/support"))["status"].clone();
    let cond = |t: &str| {
        status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == t)
            .expect("condition")
            .clone()
    };
    assert_eq!(cond("SpecValid")["status"], "False");
    assert!(
        cond("SpecValid")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("minReplicas (4)")
    );
    assert_eq!(cond("ToolsValid")["status"], "False");
    let msg = cond("ToolsValid")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("teleport") && msg.contains("config.openHour"),
        "{msg}"
    );
    let evs = events(&h);
    assert!(evs.contains(&("Warning".into(), "ToolsRejected".into())));
    assert!(evs.contains(&("Warning".into(), "InvalidSpec".into())));
}

fn condition(status: &Value, ty: &str) -> Option<Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_inbox_gets_tokens_mounted_a_service_and_a_condition_that_names_who_cannot_log_in() {
    let h = harness().await;
    let service = "/api/v1/namespaces/shop/services/ap-support-inbox";
    let spec = json!({
        "team": [{ "id": "alice@example.com" }, { "id": "bob", "tokenKey": "bob-token" }],
        "inbox": { "enabled": true, "tokensSecretRef": { "name": "team-tokens" } }
    });
    // Only Alice has a usable token (Bob's is too short).
    let b64 = |s: &str| {
        serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).expect("base64")
    };
    h.api.put(
        "/api/v1/namespaces/shop/secrets/team-tokens",
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "alice_example.com": b64("alice-token-0123456789"), "bob-token": b64("short") } }),
    );
    // Open handoffs are counted from the database.
    sqlx::query("INSERT INTO accounts (id, phone_number_id, pool) VALUES ('shop/line', '1', 'shop/support')")
        .execute(&h.db.pool)
        .await
        .expect("account");
    sqlx::query("INSERT INTO contacts (account_id, contact_key) VALUES ('shop/line', '1')")
        .execute(&h.db.pool)
        .await
        .expect("contact");
    sqlx::query("INSERT INTO conversations (account_id, contact_id, pool) SELECT 'shop/line', id, 'shop/support' FROM contacts")
        .execute(&h.db.pool)
        .await
        .expect("conversation");
    sqlx::query("INSERT INTO handoff_tasks (account_id, conversation_id, pool, created_at) SELECT 'shop/line', id, 'shop/support', now() - interval '90 seconds' FROM conversations")
        .execute(&h.db.pool)
        .await
        .expect("task");

    let p = pool(&h, pool_json(spec.clone()));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    let svc = get(&h, service);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        svc["spec"]["selector"]["whatsapp.kube-agents.io/pool"],
        "support"
    );
    let dep = get(
        &h,
        "/apis/apps/v1/namespaces/shop/deployments/ap-support-core",
    );
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        env_value(c, "TEAM_TOKENS_DIR")["value"],
        "/etc/whatsapp/team-tokens"
    );
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "team-tokens")
        .expect("tokens volume");
    assert_eq!(volume["secret"]["secretName"], "team-tokens");
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    let status = get(&h, &format!("{POOLS}/support"))["status"].clone();
    let inbox = condition(&status, "InboxReady").expect("InboxReady");
    assert_eq!(inbox["status"], "False");
    assert_eq!(inbox["reason"], "TokensMissing");
    let message = inbox["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("bob") && !message.contains("alice"),
        "{message}"
    );
    assert_eq!(status["openHandoffs"], 1);
    assert!(status["oldestHandoffSeconds"].as_i64().unwrap_or_default() >= 90);

    // Bob gets a real token: ready.
    h.api.put(
        "/api/v1/namespaces/shop/secrets/team-tokens",
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "alice_example.com": b64("alice-token-0123456789"), "bob-token": b64("bob-token-0123456789") } }),
    );
    let p = pool(&h, pool_json(spec.clone()));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    let status = get(&h, &format!("{POOLS}/support"))["status"].clone();
    assert_eq!(
        condition(&status, "InboxReady").expect("InboxReady")["status"],
        "True"
    );

    // The inbox is turned off: the Service goes, and so does the condition.
    let p = pool(&h, pool_json(json!({ "team": spec["team"] })));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert!(h.api.get(service).is_none(), "inbox Service deleted");
    let status = get(&h, &format!("{POOLS}/support"))["status"].clone();
    assert!(condition(&status, "InboxReady").is_none());
    let dep = get(
        &h,
        "/apis/apps/v1/namespaces/shop/deployments/ap-support-core",
    );
    assert!(
        !dep.to_string().contains("TEAM_TOKENS_DIR"),
        "no tokens mounted without an inbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_account_needs_no_secret_and_shows_how_to_pair_until_connected() {
    let h = harness().await;
    let mut obj = account_json(json!({}));
    obj["spec"]["provider"] = json!({ "whatsappWeb": { "pairing": "QrCode", "pushName": "Acme" } });
    let acct = account(&h, obj.clone());
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let status = get(&h, &format!("{ACCOUNTS}/support-line"))["status"].clone();
    assert_eq!(status["provider"], "WhatsAppWeb");
    let paired = condition(&status, "Paired").expect("Paired");
    assert_eq!(
        (paired["status"].as_str(), paired["reason"].as_str()),
        (Some("False"), Some("PairingRequired"))
    );
    assert_eq!(
        condition(&status, "CredentialsValid").expect("creds")["reason"],
        "NotNeeded"
    );
    assert_eq!(status["pairing"]["method"], "QrCode");

    // The Lease holder shows a QR code: it reaches status.pairing and an Event.
    let now = jiff::Timestamp::now().to_string();
    h.api.put(
        "/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-support-line",
        json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": { "name": "whatsapp-support-line", "namespace": NS },
                "spec": { "holderIdentity": "gw-0", "leaseDurationSeconds": 15, "renewTime": now } }),
    );
    queue::fence::upsert_account(
        &h.db.pool,
        "shop/support-line",
        "web:+15550783881",
        "shop/support",
        "hi",
        &[],
    )
    .await
    .expect("account row");
    let epoch = queue::fence::bump(&h.db.pool, "shop/support-line", "gw-0")
        .await
        .expect("bump");
    assert!(
        queue::web_session::set_pairing_code(
            &h.db.pool,
            "shop/support-line",
            epoch,
            "gw-0",
            "QrCode",
            Some("2@qr-ref,key,adv"),
            None,
            chrono::Utc::now() + chrono::Duration::seconds(20)
        )
        .await
        .expect("code")
    );
    let acct = account(&h, get(&h, &format!("{ACCOUNTS}/support-line")));
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let status = get(&h, &format!("{ACCOUNTS}/support-line"))["status"].clone();
    assert_eq!(status["pairing"]["qrCode"], "2@qr-ref,key,adv");
    assert_eq!(
        status["fenceEpoch"], epoch,
        "the epoch the holder acts under"
    );
    let instructions = status["pairing"]["instructions"]
        .as_str()
        .unwrap_or_default();
    assert!(instructions.contains("Linked devices"), "{instructions}");
    assert!(
        instructions.contains("svc/ap-support-gateway")
            && instructions.contains("/pairing/support-line"),
        "the fleet's page for this number: {instructions}"
    );
    assert!(events(&h).iter().any(|(_, reason)| reason == "PairingCode"));
    assert_ne!(status["phase"], "Ready");

    // Linked and connected: Paired, Connected, Ready, and the pairing block is gone.
    assert!(
        queue::web_session::set_state(
            &h.db.pool,
            "shop/support-line",
            epoch,
            "gw-0",
            queue::web_session::SessionState::Connected,
            Some("15550783881:3@s.whatsapp.net"),
            "connected"
        )
        .await
        .expect("state")
    );
    fleet_ready(&h, 2);
    let acct = account(&h, get(&h, &format!("{ACCOUNTS}/support-line")));
    operator::account::reconcile(acct, h.ctx.clone())
        .await
        .expect("reconcile");
    let status = get(&h, &format!("{ACCOUNTS}/support-line"))["status"].clone();
    assert_eq!(
        condition(&status, "Paired").expect("Paired")["status"],
        "True"
    );
    assert_eq!(
        condition(&status, "Connected").expect("Connected")["status"],
        "True"
    );
    assert_eq!(status["phase"], "Ready");
    assert!(status.get("pairing").is_none() || status["pairing"].is_null());

    // A stale (deposed) epoch cannot report: the row keeps saying connected.
    assert!(
        !queue::web_session::set_state(
            &h.db.pool,
            "shop/support-line",
            epoch - 1,
            "gw-old",
            queue::web_session::SessionState::LoggedOut,
            None,
            "x"
        )
        .await
        .expect("fenced write")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_reaches_objects_status_or_events() {
    let h = harness().await;
    let b64 = |s: &str| {
        serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).expect("base64")
    };
    let secrets = [
        ("accessToken", "EAAG-known-access-token-7731"),
        ("appSecret", "known-app-secret-91ac"),
        ("verifyToken", "known-verify-token-55e2"),
    ];
    let data: serde_json::Map<String, Value> = secrets
        .iter()
        .map(|(k, v)| (k.to_string(), b64(v)))
        .collect();
    h.api.put(
        &format!("/api/v1/namespaces/{NS}/secrets/creds"),
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS }, "data": data }),
    );
    h.api.put(
        "/api/v1/namespaces/shop/secrets/llm",
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "k": b64("sk-known-llm-key-0c4e") } }),
    );
    h.api.put(
        "/api/v1/namespaces/shop/secrets/team-tokens",
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "alice_example.com": b64("known-team-token-aa01"), "bob": b64("short") } }),
    );
    // Normal paths, and error paths: a pool whose team member has no usable token.
    operator::account::reconcile(account(&h, account_json(json!({}))), h.ctx.clone())
        .await
        .expect("account reconcile");
    let spec = json!({
        "model": { "provider": "openai", "model": "m", "apiKeySecretRef": { "name": "llm", "key": "k" } },
        "team": [{ "id": "alice@example.com" }, { "id": "bob" }],
        "inbox": { "enabled": true, "tokensSecretRef": { "name": "team-tokens" } }
    });
    operator::pool::reconcile(pool(&h, pool_json(spec)), h.ctx.clone())
        .await
        .expect("pool reconcile");

    // Everything the operator wrote, except the Secrets it owns (the database URL).
    let written: Vec<String> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET" && !r.path.contains("/secrets/"))
        .filter_map(|r| r.body.map(|b| b.to_string()))
        .collect();
    assert!(
        written
            .iter()
            .any(|w| w.contains("\"kind\":\"Event\"") || w.contains("reason")),
        "events and status were written"
    );
    let known = secrets.iter().map(|(_, v)| *v).chain([
        "sk-known-llm-key-0c4e",
        "known-team-token-aa01",
        "postgres://queue",
    ]);
    for secret in known {
        let encoded = b64(secret).as_str().unwrap_or_default().to_string();
        for w in &written {
            assert!(
                !w.contains(secret) && !w.contains(&encoded),
                "{secret} leaked into {w}"
            );
        }
    }
    // Debug of the operator's settings redacts the database URL.
    assert!(!format!("{:?}", h.ctx.settings).contains("postgres://queue"));
}

fn put_account(h: &Harness, name: &str, pool: &str, provider: Value) {
    h.api.put(
        &format!("{ACCOUNTS}/{name}"),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "uid": format!("uid-{name}"), "generation": 1 },
            "spec": { "phoneNumber": "+15550783881", "provider": provider, "agentPoolRef": { "name": pool } }
        }),
    );
}

fn cloud(phone_number_id: &str, secret: &str) -> Value {
    json!({ "cloudApi": { "phoneNumberId": phone_number_id, "credentialsSecretRef": { "name": secret } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_runs_one_gateway_fleet_whose_pods_never_restart_for_a_number() {
    let h = harness().await;
    put_account(&h, "line-a", "support", cloud("1001", "creds-a"));
    put_account(
        &h,
        "line-web",
        "support",
        json!({ "whatsappWeb": { "pairing": "QrCode" } }),
    );
    put_account(&h, "sales-line", "sales", cloud("2001", "creds-sales"));
    let p = pool(&h, pool_json(json!({})));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");

    let dep = get(&h, FLEET);
    assert_eq!(
        dep["spec"]["replicas"], 2,
        "gateways.minReplicas for 2 numbers"
    );
    assert_eq!(dep["metadata"]["ownerReferences"][0]["uid"], "uid-pool-1");
    let template = dep["spec"]["template"].clone();
    let c = &template["spec"]["containers"][0];
    assert_eq!(c["args"], json!(["fleet"]));
    assert_eq!(env_value(c, "WA_POOL")["value"], "shop/support");
    for number_specific in [
        "WA_ACCOUNT",
        "WA_PHONE_NUMBER_ID",
        "WA_ACCESS_TOKEN",
        "1001",
        "creds-a",
    ] {
        assert!(
            !template.to_string().contains(number_specific),
            "{number_specific} must not be in the pod template: the pods learn numbers from the API server"
        );
    }
    assert!(
        template["metadata"]["labels"]
            .get("whatsapp.kube-agents.io/webhooks")
            .is_none(),
        "the fleet takes no webhooks: the namespace's ingress does"
    );

    // Least privilege, by name: this pool's Leases and this pool's credentials.
    let role = get(
        &h,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/ap-support-gateway",
    );
    let rules = role["rules"].as_array().expect("rules").clone();
    assert!(rules.contains(&json!({ "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["whatsapp-line-a", "whatsapp-line-web"], "verbs": ["get", "update"] })), "{rules:?}");
    assert!(rules.contains(&json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["creds-a"], "verbs": ["get"] })), "{rules:?}");
    assert!(
        rules
            .iter()
            .all(|r| r["verbs"] != json!(["create"]) && !r.to_string().contains("delete")),
        "{rules:?}"
    );
    let rb = get(
        &h,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/ap-support-gateway",
    );
    assert_eq!(rb["subjects"][0]["name"], "ap-support-gateway");
    assert_eq!(template["spec"]["serviceAccountName"], "ap-support-gateway");

    // The namespace's one webhook URL, co-owned by the pool (not its controller).
    let hooks = get(&h, "/api/v1/namespaces/shop/services/whatsapp-webhooks");
    assert_eq!(
        hooks["spec"]["selector"],
        json!({ "whatsapp.kube-agents.io/webhooks": "true" })
    );
    assert_eq!(hooks["metadata"]["ownerReferences"][0]["uid"], "uid-pool-1");
    assert_eq!(hooks["metadata"]["ownerReferences"][0]["controller"], false);
    // Its ingress, co-owned too: the only pods that read every Cloud API number's credentials;
    // no Lease.
    let ingress = get(
        &h,
        "/apis/apps/v1/namespaces/shop/deployments/whatsapp-ingress",
    );
    assert_eq!(
        ingress["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["ingress"])
    );
    assert_eq!(
        ingress["spec"]["template"]["metadata"]["labels"]["whatsapp.kube-agents.io/webhooks"],
        "true"
    );
    assert_eq!(
        ingress["metadata"]["ownerReferences"][0]["controller"],
        false
    );
    let ingress_role = get(
        &h,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/whatsapp-ingress",
    );
    assert_eq!(
        ingress_role["rules"],
        json!([
            { "apiGroups": ["whatsapp.kube-agents.io"], "resources": ["whatsappaccounts"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["creds-a", "creds-sales"], "verbs": ["get"] }
        ]),
        "no Lease, every Cloud API number's credentials by name"
    );
    let status = get(&h, &format!("{POOLS}/support"))["status"].clone();
    assert_eq!(status["numbers"], 2);
    assert_eq!(status["gatewayReplicas"], 2);

    // A number joins: the Role names its Lease, the pod template does not change (no restart).
    put_account(&h, "line-b", "support", cloud("1002", "creds-b"));
    let p = pool(&h, get(&h, &format!("{POOLS}/support")));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(
        get(&h, FLEET)["spec"]["template"],
        template,
        "no rollout for a new number"
    );
    let role = get(
        &h,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/ap-support-gateway",
    );
    assert!(role.to_string().contains("whatsapp-line-b") && role.to_string().contains("creds-b"));

    // Sized from numbersPerPod within min and max.
    let p = pool(
        &h,
        pool_json(
            json!({ "gateways": { "numbersPerPod": 1, "minReplicas": 1, "maxReplicas": 2 } }),
        ),
    );
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(
        get(&h, FLEET)["spec"]["replicas"],
        2,
        "3 numbers, 1 per pod, at most 2"
    );
    let p = pool(&h, pool_json(json!({ "gateways": { "replicas": 4 } })));
    operator::pool::reconcile(p, h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(get(&h, FLEET)["spec"]["replicas"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_number_is_one_accounts_and_a_deleted_accounts_number_can_be_used_again() {
    let h = harness().await;
    put_secret(&h, &["accessToken", "appSecret", "verifyToken"]);
    // What an account's gateway does before serving: write its row for phone number id 1065.
    let claim = |account: &'static str| {
        let db = h.db.pool.clone();
        async move {
            queue::fence::upsert_account(&db, account, "1065", "shop/support", "bye", &[]).await
        }
    };
    // `support-line` holds phone number id 1065 in the database (its gateway wrote the row).
    claim("shop/support-line").await.expect("row");
    h.api
        .put(&format!("{ACCOUNTS}/support-line"), account_json(json!({})));

    // A second resource names the same number: a condition naming the first, and no Lease.
    let mut second = account_json(json!({}));
    second["metadata"]["name"] = json!("sales-line");
    second["metadata"]["uid"] = json!("uid-account-2");
    h.api.put(&format!("{ACCOUNTS}/sales-line"), second);
    let typed = |name: &str| {
        Arc::new(
            serde_json::from_value::<WhatsAppAccount>(get(&h, &format!("{ACCOUNTS}/{name}")))
                .expect("typed"),
        )
    };
    operator::account::reconcile(typed("sales-line"), h.ctx.clone())
        .await
        .expect("reconcile");
    let stored = get(&h, &format!("{ACCOUNTS}/sales-line"));
    let conflict =
        condition(&stored["status"], "PhoneNumberConflict").expect("PhoneNumberConflict");
    assert_eq!(conflict["status"], "True");
    assert!(
        conflict["message"]
            .as_str()
            .is_some_and(|m| m.contains("shop/support-line")),
        "{conflict}"
    );
    assert_eq!(stored["status"]["phase"], "Degraded");
    assert!(
        h.api
            .get("/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-sales-line")
            .is_none(),
        "nothing runs for the second account"
    );
    // The fleet skips it for the same reason.
    assert!(typed("sales-line").phone_number_conflict().is_some());
    // And its gateway could not take the number anyway.
    let taken = claim("shop/sales-line").await.expect_err("in use");
    assert!(
        matches!(&taken, queue::error::Error::PhoneNumberInUse { by, .. } if by == "shop/support-line"),
        "{taken}"
    );

    // The first account is deleted: its row is released (history kept) and the second one
    // takes the number.
    h.api.remove(&format!("{ACCOUNTS}/support-line"));
    operator::account::reconcile(typed("sales-line"), h.ctx.clone())
        .await
        .expect("reconcile");
    let stored = get(&h, &format!("{ACCOUNTS}/sales-line"));
    let conflict =
        condition(&stored["status"], "PhoneNumberConflict").expect("PhoneNumberConflict");
    assert_eq!(conflict["status"], "False");
    assert!(
        h.api
            .get("/apis/coordination.k8s.io/v1/namespaces/shop/leases/whatsapp-sales-line")
            .is_some(),
        "the second account runs now"
    );
    let released: Option<String> =
        sqlx::query_scalar("SELECT released_at::text FROM accounts WHERE id = 'shop/support-line'")
            .fetch_one(&h.db.pool)
            .await
            .expect("the old row is kept");
    assert!(released.is_some(), "released, not deleted");
    claim("shop/sales-line").await.expect("the number is free");
    // Re-created under the old name later: the same row is taken back (its history continues)
    // once the number is free again.
    queue::fence::release_account(&h.db.pool, "shop/sales-line")
        .await
        .expect("release");
    claim("shop/support-line").await.expect("taken back");
    let back: Option<String> =
        sqlx::query_scalar("SELECT released_at::text FROM accounts WHERE id = 'shop/support-line'")
            .fetch_one(&h.db.pool)
            .await
            .expect("row");
    assert_eq!(back, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_database_url_rolls_every_worker_deployment() {
    let h = harness().await;
    put_account(&h, "line-a", "support", cloud("1001", "creds-a"));
    let deployments = [
        "/apis/apps/v1/namespaces/shop/deployments/ap-support-core",
        FLEET,
        "/apis/apps/v1/namespaces/shop/deployments/whatsapp-ingress",
    ];
    let hashes = |h: &Harness| -> Vec<String> {
        deployments
            .iter()
            .map(|d| {
                get(h, d)["spec"]["template"]["metadata"]["annotations"]
                    ["whatsapp.kube-agents.io/database-hash"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{d} has no database hash"))
                    .to_string()
            })
            .collect()
    };
    operator::pool::reconcile(pool(&h, pool_json(json!({}))), h.ctx.clone())
        .await
        .expect("reconcile");
    let before = hashes(&h);
    assert!(
        !before.iter().any(|v| v.contains("queue")),
        "a hash, not the URL"
    );

    // The operator restarts with another URL (a new password, another server).
    let (metrics, _) = Metrics::new();
    let moved = Arc::new(Context::new(
        h.ctx.client.clone(),
        Some(h.db.pool.clone()),
        Settings {
            worker_image: "example.com/worker:test".into(),
            database_url: "postgres://queue-elsewhere".into(),
            pool_resync_seconds: 3,
            account_resync_seconds: 10,
        },
        metrics,
        "op-1",
    ));
    operator::pool::reconcile(pool(&h, pool_json(json!({}))), moved)
        .await
        .expect("reconcile");
    let after = hashes(&h);
    for (d, (a, b)) in deployments.iter().zip(before.iter().zip(after.iter())) {
        assert_ne!(a, b, "{d} keeps its pods on the old database URL");
    }
}
