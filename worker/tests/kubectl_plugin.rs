//! `kubectl whatsapp` commands that need a worker: `jobs dead|replay|replay-all`, `handoffs`,
//! `resume` go through the fake API server's pod proxy to a real core worker's admin API on
//! real Postgres; `release` asks a real gateway, electing on the fake API server, to hand its
//! Lease to a standby. Each command's output, and its error when the pool or account does not
//! exist, when RBAC forbids, and when no worker is reachable.

mod common;

use std::time::Duration;

use common::{ACCOUNT, Env, POOL, eventually_async};
use kubectl_whatsapp::admin::{self, PoolAdmin};
use kubectl_whatsapp::{Format, PluginError};
use queue::jobs::{self, NewJob};
use serde_json::{Value, json};
use worker::core::admin::{AdminState, router};

const NS: &str = "default";
const POOL_NAME: &str = "support";
const TOKEN: &str = "admin-token-for-tests-0123456789";
const POOLS: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/default/agentpools";
const ACCOUNTS: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/default/whatsappaccounts";
const PODS: &str = "/api/v1/namespaces/default/pods";
const SECRETS: &str = "/api/v1/namespaces/default/secrets";

/// Serve the pool's admin API as a core worker does; returns its port.
async fn admin_server(env: &Env, token: Option<&str>) -> u16 {
    let token = token.map(|t| service::secret::SecretString::from(t.to_string()));
    let app = router(AdminState::new(
        env.db.pool.clone(),
        POOL.into(),
        token.as_ref(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn core_pod(port: u16, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "namespace": NS, "creationTimestamp": "2026-11-30T10:00:00Z",
                      "labels": { "app.kubernetes.io/name": "whatsapp-core", "whatsapp.kube-agents.io/pool": POOL_NAME } },
        "spec": { "containers": [{ "name": "core", "image": "w", "ports": [{ "name": "http", "containerPort": port }] }] },
        "status": { "podIP": "127.0.0.1",
                    "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] }
    })
}

/// The pool, its admin Secret (as the operator makes it) and one ready core pod on `port`.
fn cluster(env: &Env, port: u16) {
    env.kube.put(
        &format!("{POOLS}/{POOL_NAME}"),
        json!({ "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
                "metadata": { "namespace": NS, "uid": "p1" }, "spec": {} }),
    );
    env.kube.put(
        &format!("{SECRETS}/{}", admin::admin_secret_name(POOL_NAME)),
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "token": k8s_openapi::ByteString(TOKEN.as_bytes().to_vec()) } }),
    );
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-abcde"),
        core_pod(port, true),
    );
    // A pod that is not ready is never picked.
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-zzzzz"),
        core_pod(1, false),
    );
}

async fn dead_job(env: &Env, key: &str, error: &str) -> i64 {
    let mut tx = env.db.pool.begin().await.expect("begin");
    let id = jobs::enqueue(
        &mut tx,
        &NewJob::new(POOL, "agent_turn", json!({ "conversation_id": 1 })).keyed(key),
    )
    .await
    .expect("enqueue");
    sqlx::query(
        "UPDATE jobs SET state = 'dead', attempts = 5, last_error = $2, finished_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(&mut *tx)
    .await
    .expect("dead");
    tx.commit().await.expect("commit");
    id
}

/// A conversation of the test pool handed off to a human, with the customer's last message.
async fn handed_off_conversation(env: &Env, phone: &str, text: &str) -> i64 {
    let db = &env.db.pool;
    sqlx::query("INSERT INTO accounts (id, phone_number_id, pool) VALUES ($1, 'phone-1', $2) ON CONFLICT DO NOTHING")
        .bind(ACCOUNT)
        .bind(POOL)
        .execute(db)
        .await
        .expect("account");
    let contact: i64 = sqlx::query_scalar("INSERT INTO contacts (account_id, contact_key, wa_id, display_name) VALUES ($1, $2, $2, 'Maria') RETURNING id")
        .bind(ACCOUNT)
        .bind(phone)
        .fetch_one(db)
        .await
        .expect("contact");
    let conversation: i64 = sqlx::query_scalar("INSERT INTO conversations (account_id, contact_id, pool, agent_enabled, state, lane) VALUES ($1, $2, $3, false, 'handed_off', 'human') RETURNING id")
        .bind(ACCOUNT)
        .bind(contact)
        .bind(POOL)
        .fetch_one(db)
        .await
        .expect("conversation");
    sqlx::query("INSERT INTO inbound_messages (account_id, conversation_id, provider_message_id, message_type, body, payload, runs_agent) VALUES ($1, $2, $3, 'text', $4, '{}', true)")
        .bind(ACCOUNT)
        .bind(conversation)
        .bind(format!("wamid.{phone}"))
        .bind(text)
        .execute(db)
        .await
        .expect("inbound");
    sqlx::query(
        "INSERT INTO handoff_tasks (account_id, conversation_id, pool) VALUES ($1, $2, $3)",
    )
    .bind(ACCOUNT)
    .bind(conversation)
    .bind(POOL)
    .execute(db)
    .await
    .expect("task");
    conversation
}

/// The client as the plugin builds it (no retries of 503s).
fn plugin_client(env: &Env) -> kube::Client {
    let mut cfg = kube::Config::new(env.kube.url().parse().expect("fake kube url"));
    cfg.default_namespace = NS.into();
    kubectl_whatsapp::client(cfg).expect("client")
}

async fn connect(env: &Env) -> Result<PoolAdmin, PluginError> {
    PoolAdmin::connect(&plugin_client(env), NS, POOL_NAME, "alice").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_handoffs_are_listed_replayed_and_resumed_through_the_pod_proxy() {
    let env = Env::new().await;
    let port = admin_server(&env, Some(TOKEN)).await;
    cluster(&env, port);
    let first = dead_job(
        &env,
        "conversation:901",
        "model endpoint: 401 invalid api key",
    )
    .await;
    let admin = connect(&env).await.expect("connects to the ready core pod");
    assert_eq!(admin.pod, "ap-support-core-7c9d-abcde");

    // jobs dead
    let dead = admin.dead_jobs(100).await.expect("dead jobs");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, first);
    let table = admin::render_dead(POOL, &dead, Format::Table).expect("table");
    assert!(table.starts_with("JOB"), "{table}");
    assert!(
        table.contains("model endpoint: 401 invalid api key"),
        "{table}"
    );
    assert!(table.contains("conversation:901"), "{table}");
    let json: Value =
        serde_json::from_str(&admin::render_dead(POOL, &dead, Format::Json).expect("json"))
            .expect("valid json");
    assert_eq!(json[0]["id"], first);
    assert!(
        admin::render_dead(POOL, &[], Format::Table)
            .expect("empty")
            .contains("No dead jobs")
    );

    // jobs replay: a new pending job, the dead one points at it; a second replay is refused.
    let new = admin.replay(first).await.expect("replay");
    let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(new)
        .fetch_one(&env.db.pool)
        .await
        .expect("state");
    assert_eq!(state, "pending");
    let again = admin.replay(first).await.expect_err("replayed already");
    assert!(again.to_string().contains("is not a dead job"), "{again}");

    // jobs replay-all, oldest first; another pool's dead job stays dead.
    dead_job(&env, "conversation:902", "boom").await;
    dead_job(&env, "conversation:903", "boom").await;
    let mut tx = env.db.pool.begin().await.expect("begin");
    let foreign = jobs::enqueue(
        &mut tx,
        &NewJob::new("default/other", "agent_turn", json!({})),
    )
    .await
    .expect("enqueue");
    sqlx::query("UPDATE jobs SET state = 'dead' WHERE id = $1")
        .bind(foreign)
        .execute(&mut *tx)
        .await
        .expect("dead");
    tx.commit().await.expect("commit");
    let refused = admin.replay(foreign).await.expect_err("another pool's job");
    assert!(
        refused.to_string().contains("is not a dead job"),
        "{refused}"
    );
    assert_eq!(admin.replay_all().await.expect("replay all"), 2);
    assert!(admin.dead_jobs(100).await.expect("dead").is_empty());
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'dead' AND replayed_as IS NULL")
            .await,
        1,
        "only the other pool's dead job is left"
    );

    // handoffs
    let conversation = handed_off_conversation(&env, "5511999990001", "I want a refund").await;
    let handoffs = admin.handoffs().await.expect("handoffs");
    assert_eq!(handoffs.len(), 1);
    assert_eq!(handoffs[0].conversation_id, conversation);
    let table = admin::render_handoffs(POOL, &handoffs, Format::Table).expect("table");
    assert!(table.starts_with("CONVERSATION"), "{table}");
    assert!(table.contains("Maria (5511999990001)"), "{table}");
    assert!(table.contains("I want a refund"), "{table}");
    let yaml = admin::render_handoffs(POOL, &handoffs, Format::Yaml).expect("yaml");
    assert!(
        yaml.contains(&format!("conversation_id: {conversation}")),
        "{yaml}"
    );

    // resume: the agent answers again (the customer's message is still unanswered), the
    // handoff closes, and the audit trail names who did it.
    assert!(admin.resume(conversation).await.expect("resume"));
    let (enabled, task_state): (bool, String) = sqlx::query_as(
        "SELECT c.agent_enabled, t.state FROM conversations c JOIN handoff_tasks t ON t.conversation_id = c.id WHERE c.id = $1",
    )
    .bind(conversation)
    .fetch_one(&env.db.pool)
    .await
    .expect("conversation");
    assert_eq!((enabled, task_state.as_str()), (true, "closed"));
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE queue = 'default/support' AND state = 'pending'"
        )
        .await,
        4,
        "the replays and the resumed conversation's turn are queued"
    );
    let member: String = sqlx::query_scalar(
        "SELECT member_id FROM team_audit WHERE action = 'resume' AND conversation_id = $1",
    )
    .bind(conversation)
    .fetch_one(&env.db.pool)
    .await
    .expect("audit row");
    assert_eq!(member, "kubectl:alice");
    assert!(admin.handoffs().await.expect("handoffs").is_empty());
    let missing = admin
        .resume(999_999)
        .await
        .expect_err("no such conversation");
    assert!(
        missing.to_string().contains("no such conversation"),
        "{missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_say_what_is_missing_forbidden_or_unreachable() {
    let env = Env::new().await;
    let client = plugin_client(&env);

    // No such pool.
    let e = PoolAdmin::connect(&client, NS, "nope", "alice")
        .await
        .err()
        .expect("no pool");
    assert_eq!(
        e.to_string(),
        "AgentPool \"nope\" not found in namespace \"default\""
    );
    assert!(matches!(
        admin::only_pool(&client, NS).await,
        Err(PluginError::Api(m)) if m.contains("no AgentPools")
    ));

    let port = admin_server(&env, Some(TOKEN)).await;
    cluster(&env, port);
    assert_eq!(
        admin::only_pool(&client, NS).await.expect("one pool"),
        POOL_NAME
    );

    // The operator has not made the admin Secret yet.
    let secret = format!("{SECRETS}/{}", admin::admin_secret_name(POOL_NAME));
    let saved = env.kube.get(&secret).expect("secret");
    let _ = client
        .request_text(
            axum::http::Request::delete(&secret)
                .body(Vec::new())
                .expect("request"),
        )
        .await;
    let e = connect(&env).await.err().expect("no token");
    assert!(matches!(e, PluginError::NoAdminToken { .. }), "{e}");
    assert!(e.to_string().contains("ap-support-admin"), "{e}");
    env.kube.put(&secret, saved);

    // A wrong token (the Secret changed, the pods did not restart).
    let other = admin_server(&env, Some("another-token-of-forty-chars-000000")).await;
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-abcde"),
        core_pod(other, true),
    );
    let e = connect(&env)
        .await
        .expect("connects")
        .dead_jobs(10)
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("refused the admin token"), "{e}");

    // A worker without a token configured.
    let disabled = admin_server(&env, None).await;
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-abcde"),
        core_pod(disabled, true),
    );
    let e = connect(&env)
        .await
        .expect("connects")
        .handoffs()
        .await
        .expect_err("disabled");
    assert!(e.to_string().contains("admin API is disabled"), "{e}");

    // The picked pod does not answer (it just died): no worker reachable.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-abcde"),
        core_pod(closed, true),
    );
    let e = connect(&env)
        .await
        .expect("connects")
        .dead_jobs(10)
        .await
        .expect_err("unreachable");
    assert!(matches!(e, PluginError::NoWorker { .. }), "{e}");
    assert!(e.to_string().contains("did not answer"), "{e}");

    // No core pod is ready (the pool is scaled to zero, or crash-looping).
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-abcde"),
        core_pod(port, false),
    );
    let e = connect(&env).await.err().expect("none ready");
    assert!(matches!(e, PluginError::NoWorker { .. }), "{e}");
    assert!(e.to_string().contains("2 core pods, none ready"), "{e}");
    env.kube.put(
        &format!("{PODS}/ap-support-core-7c9d-abcde"),
        core_pod(port, true),
    );

    // RBAC: no reading the admin Secret; no pods/proxy.
    env.kube.forbid("/secrets/");
    let e = connect(&env).await.err().expect("forbidden secret");
    assert!(matches!(e, PluginError::Forbidden(_)), "{e}");
    assert!(
        e.to_string().contains("get on the Secret ap-support-admin"),
        "{e}"
    );

    let env = Env::new().await;
    cluster(&env, port);
    env.kube.forbid("/proxy/");
    let e = connect(&env)
        .await
        .expect("connects")
        .dead_jobs(10)
        .await
        .expect_err("forbidden proxy");
    assert!(matches!(e, PluginError::Forbidden(_)), "{e}");
    assert!(e.to_string().contains("create on pods/proxy"), "{e}");
}

fn account_object() -> Value {
    json!({
        "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
        "metadata": { "namespace": NS, "uid": "a1" },
        "spec": { "phoneNumber": "+15550783881",
                  "provider": { "cloudApi": { "phoneNumberId": "1065", "credentialsSecretRef": { "name": "creds" } } },
                  "agentPoolRef": { "name": POOL_NAME } }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_hands_the_lease_to_the_standby_while_sending_without_a_duplicate() {
    assert_eq!(
        kubectl_whatsapp::release::RELEASE_ANNOTATION,
        lease::RELEASE_ANNOTATION
    );
    let env = Env::new().await;
    let client = plugin_client(&env);
    env.kube
        .put(&format!("{ACCOUNTS}/support-line"), account_object());

    // Nobody holds the Lease yet.
    let e = kubectl_whatsapp::release::release(&client, NS, "support-line", Duration::from_secs(1))
        .await
        .expect_err("not held");
    assert!(matches!(e, PluginError::NotHeld(_)), "{e}");
    let e = kubectl_whatsapp::release::release(&client, NS, "nope", Duration::from_secs(1))
        .await
        .expect_err("no account");
    assert_eq!(
        e.to_string(),
        "WhatsAppAccount \"nope\" not found in namespace \"default\""
    );

    let audit = common::SenderAudit::start(&env);
    let a = env.gateway("gw-a", false).await;
    common::eventually("gw-a to hold the Lease", Duration::from_secs(10), || {
        a.leadership.may_act().is_some()
    })
    .await;
    let b = env.gateway("gw-b", false).await;
    // Messages keep flowing while the Lease moves.
    common::enqueue_messages(&env, 0, 300).await;
    let pool = env.db.pool.clone();
    eventually_async("some messages to be sent", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbound_messages WHERE state = 'sent'",
            )
            .fetch_one(&pool)
            .await
            .expect("count")
                > 0
        }
    })
    .await;

    // The release is asked while a batch is in flight at WhatsApp (the fake holds it until the
    // request is on the Lease): the holder must finish and record it before letting go.
    env.cloud.hold_sends();
    common::eventually("a batch in flight", Duration::from_secs(10), || {
        env.cloud.in_flight() > 0
    })
    .await;
    let releasing = tokio::spawn({
        let client = client.clone();
        async move {
            kubectl_whatsapp::release::release(&client, NS, "support-line", Duration::from_secs(20))
                .await
        }
    });
    common::eventually(
        "the release request on the Lease",
        Duration::from_secs(10),
        || {
            env.kube
                .get("/apis/coordination.k8s.io/v1/namespaces/default/leases/whatsapp-support-line")
                .is_some_and(|l| !l["metadata"]["annotations"][lease::RELEASE_ANNOTATION].is_null())
        },
    )
    .await;
    // The holder sees the request, stops taking new work and waits for its batch in flight.
    common::eventually("gw-a to stop", Duration::from_secs(10), || {
        a.leadership.may_act().is_none()
    })
    .await;
    assert!(env.cloud.in_flight() > 0, "the batch is still in flight");
    assert_eq!(
        env.lease_holder().as_deref(),
        Some("gw-a"),
        "not released while its batch is in flight"
    );
    env.cloud.release_held(true);
    let h = releasing.await.expect("release task").expect("handed over");
    assert_eq!((h.from.as_str(), h.to.as_str()), ("gw-a", "gw-b"));
    assert!(h.seconds < 5.0, "took {:.1}s", h.seconds);
    assert_eq!(h.lease_transitions, Some(1));
    let text = kubectl_whatsapp::release::render(&h);
    assert!(
        text.starts_with(
            "support-line: gw-a released the Lease whatsapp-support-line; gw-b took over in "
        ),
        "{text}"
    );
    assert!(a.leadership.may_act().is_none(), "the old holder stopped");
    let lease = env
        .kube
        .get("/apis/coordination.k8s.io/v1/namespaces/default/leases/whatsapp-support-line")
        .expect("lease");
    assert!(
        lease["metadata"]["annotations"][lease::RELEASE_ANNOTATION].is_null(),
        "the request was cleared: {lease}"
    );

    // Every message reaches WhatsApp exactly once across the handover.
    common::wait_count(
        &env,
        "every message sent",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbound_messages WHERE state = 'sent'",
        |n| n == 300,
    )
    .await;
    let mut recipients: Vec<String> = env.cloud.sends().into_iter().map(|s| s.to).collect();
    let total = recipients.len();
    recipients.sort();
    recipients.dedup();
    assert_eq!(
        (total, recipients.len()),
        (300, 300),
        "no message sent twice"
    );
    // A late resend would come within the in-doubt grace (2 s): keep counting past it.
    common::no_send_after(&env.cloud, 300, Duration::from_secs(3)).await;
    let per_sender = audit.assert_only_the_holder_sent();
    assert!(
        per_sender.get("gw-a").is_some_and(|n| *n > 0)
            && per_sender.get("gw-b").is_some_and(|n| *n > 0),
        "both holders sent: messages were still queued at the handover ({per_sender:?})"
    );
    // The old holder stays a standby: it does not grab the Lease back.
    assert_eq!(env.lease_holder().as_deref(), Some("gw-b"));
    a.shutdown().await;
    b.shutdown().await;

    // RBAC without leases: a clear refusal, nothing patched.
    env.kube.forbid("/leases/");
    let e = kubectl_whatsapp::release::release(&client, NS, "support-line", Duration::from_secs(1))
        .await
        .expect_err("forbidden");
    assert!(matches!(e, PluginError::Forbidden(_)), "{e}");
    assert!(e.to_string().contains("leases"), "{e}");
}
