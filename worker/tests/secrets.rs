//! Secrets never leave: a gateway and a core worker run with known credentials through their
//! normal paths and their error paths (a forged webhook, a wrong verify token, a database that
//! cannot be reached with a password in its URL, team inbox calls with a wrong token, a model
//! endpoint and a Cloud API that echo the rejected key), with every log line captured as
//! production writes it (JSON, debug level). None of the values may appear in the logs, the metrics, any
//! row of the database, or an error body. `Debug` of the config types redacts them.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use common::{Env, POOL, wait_count};
use fakes::cloud_api::Fault;
use fakes::llm::{FakeLlm, Reply};
use serde_json::json;
use worker::metrics::Metrics;

const LLM_KEY: &str = "sk-known-llm-key-6b1f03";
const DB_PASSWORD: &str = "known-db-password-e42a";
const TEAM_TOKEN: &str = "known-team-token-77c3-0123456789abcdef";

/// Every log line of this test binary, JSON-formatted as in production.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

#[test]
fn debug_of_config_types_redacts_secrets() {
    use clap::Parser;
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        common: worker::config::Common,
        #[command(flatten)]
        account: worker::config::AccountArgs,
    }
    #[derive(Parser, Debug)]
    struct CoreCli {
        #[command(flatten)]
        pool: worker::config::PoolArgs,
    }
    let url = format!("postgres://app:{DB_PASSWORD}@db:5432/queue");
    let cli = Cli::parse_from([
        "w",
        "--database-url",
        &url,
        "--account",
        "ns/line",
        "--phone-number-id",
        "1",
        "--pool",
        "ns/pool",
        "--access-token",
        "EAAG-known-access-token",
        "--app-secret",
        "known-app-secret",
        "--verify-token",
        "known-verify-token",
    ]);
    let core = CoreCli::parse_from(["w", "--pool", "ns/pool", "--llm-api-key", LLM_KEY]);
    let printed = format!("{cli:?} {core:?}");
    for secret in [
        DB_PASSWORD,
        "EAAG-known-access-token",
        "known-app-secret",
        "known-verify-token",
        LLM_KEY,
    ] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
    assert!(printed.contains("ns/line"), "the rest still prints");
    let sandbox = worker::sandbox::SandboxArgs {
        addr: "a".into(),
        database_url: Some(url.as_str().into()),
        llm_base_url: None,
        llm_model: None,
        llm_api_key: Some(LLM_KEY.into()),
        inbox_addr: "b".into(),
        team_token: Some(TEAM_TOKEN.into()),
    };
    let printed = format!("{sandbox:?}");
    for secret in [DB_PASSWORD, LLM_KEY, TEAM_TOKEN] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_rows_or_error_bodies() {
    let logs = logs();
    let env = Env::new().await;
    let account = env.account();
    let access_token = env.cloud.access_token().to_string();
    let app_secret = env.cloud.app_secret().to_string();
    let verify_token = "verify-me".to_string();
    assert_eq!(
        service::secret::ExposeSecret::expose_secret(&account.verify_token),
        verify_token
    );

    // A sending gateway, with its metrics served.
    let gw = env.gateway("gw-secrets", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let http = reqwest::Client::new();
    let mut bodies = Vec::new();

    // A forged webhook, a wrong verify token, a malformed body: their answers.
    let (_, payload) = env.cloud.inbound_text("16505550001", "Eve", "hi");
    let bytes = fakes::cloud_api::meta_json_bytes(&payload);
    let forged = http
        .post(format!("http://{}/webhook", gw.addr))
        .header(
            "x-hub-signature-256",
            fakes::cloud_api::sign("guess", &bytes),
        )
        .body(bytes)
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    bodies.push(forged.text().await.expect("body"));
    let wrong = http
        .get(format!(
            "http://{}/webhook?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=c",
            gw.addr
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    bodies.push(wrong.text().await.expect("body"));
    let junk = b"{not json".to_vec();
    let sig = fakes::cloud_api::sign(&app_secret, &junk);
    let malformed = http
        .post(format!("http://{}/webhook", gw.addr))
        .header("x-hub-signature-256", sig)
        .body(junk)
        .send()
        .await
        .expect("post");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    bodies.push(malformed.text().await.expect("body"));

    // The model endpoint rejects the key and names it; then the Cloud API does the same.
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::Error {
            status: 401,
            type_: "invalid_request_error".into(),
            code: Some("invalid_api_key".into()),
            headers: vec![],
        },
        Reply::text("Hello! How can I help?"),
    ]);
    env.cloud.inject([Fault {
        http_status: 401,
        code: 190,
        message: format!("Invalid OAuth access token - Cannot parse access token: {access_token}"),
    }]);
    let spec: crds::AgentPoolSpec = serde_json::from_value(json!({
        "model": { "provider": "openai", "baseUrl": llm.base_url(), "model": "gpt-test" }
    }))
    .expect("spec");
    let (metrics, core_registry) = Metrics::new();
    let core = worker::core::start(
        env.db.pool.clone(),
        worker::core::CoreSettings {
            queue: POOL.into(),
            spec,
            api_key: Some(LLM_KEY.into()),
            processor_id: "core-secrets".into(),
            lock: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
        },
        metrics,
    )
    .await
    .expect("core");
    for (from, text) in [("16505550002", "first"), ("16505550003", "second")] {
        let (_, payload) = env.cloud.inbound_text(from, "Customer", text);
        assert_eq!(
            env.cloud.deliver(&payload).await.expect("deliver"),
            StatusCode::OK
        );
    }
    wait_count(
        &env,
        "the rejected key to fail a turn for good",
        Duration::from_secs(30),
        "SELECT count(*) FROM jobs WHERE state = 'dead' AND last_error LIKE '%[REDACTED]%'",
        |n| n == 1,
    )
    .await;
    wait_count(
        &env,
        "the rejected token to fail a send for good",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbound_messages WHERE state = 'failed' AND last_error LIKE '%[REDACTED]%'",
        |n| n == 1,
    )
    .await;

    // The team inbox: its member's token on a normal call, a near miss and none on error paths.
    let team: Vec<crds::agent_pool::TeamMember> =
        serde_json::from_value(json!([{ "id": "alice@example.com" }])).expect("team");
    let (tokens, problems) = worker::core::inbox::auth::TeamTokens::from_pairs(
        &team,
        [("alice_example.com".to_string(), TEAM_TOKEN.to_string())],
    );
    assert!(problems.is_empty(), "{problems:?}");
    let (inbox_metrics, inbox_registry) = Metrics::new();
    let inbox = fakes::Server::start(worker::core::inbox::router(
        worker::core::inbox::InboxState {
            db: env.db.pool.clone(),
            pool: POOL.into(),
            tokens: worker::core::inbox::auth::SharedTokens::new(tokens),
            events: worker::core::inbox::events::TeamEvents::start(env.db.pool.clone()),
            metrics: inbox_metrics,
        },
    ))
    .await
    .expect("inbox");
    let near_miss = format!("{TEAM_TOKEN}x");
    for (token, expected) in [
        (Some(TEAM_TOKEN), StatusCode::OK),
        (Some(near_miss.as_str()), StatusCode::UNAUTHORIZED),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let mut req = http.get(format!("{}/api/inbox", inbox.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("inbox call");
        assert_eq!(resp.status(), expected);
        bodies.push(resp.text().await.expect("inbox body"));
    }

    // The database URL in a connection error (a wrong host, a database that is down).
    let unreachable = format!("postgres://app:{DB_PASSWORD}@127.0.0.1:1/queue");
    let error = queue::connect(&unreachable, 1)
        .await
        .expect_err("nothing listens on port 1");
    tracing::warn!(error = %queue::rescuer::error_chain(&error), "could not connect");
    bodies.push(format!("{error} {error:?}"));

    // What an operator or an attacker could read.
    let gateway_metrics = http
        .get(format!("http://{}/metrics", gw.addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let mut core_metrics = String::new();
    prometheus_client::encoding::text::encode(&mut core_metrics, &core_registry).expect("encode");
    prometheus_client::encoding::text::encode(&mut core_metrics, &inbox_registry)
        .expect("encode inbox metrics");
    let database: String = sqlx::query_scalar("SELECT database_to_xml(true, false, '')::text")
        .fetch_one(&env.db.pool)
        .await
        .expect("database dump");
    core.shutdown().await;
    gw.kill();
    let log_text =
        String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(
        log_text.contains("send failed for good") && log_text.contains("model"),
        "the error paths were logged"
    );
    assert!(database.contains("[REDACTED]"));
    let places = [
        ("logs", &log_text),
        ("gateway metrics", &gateway_metrics),
        ("core metrics", &core_metrics),
        ("database", &database),
        ("error bodies and messages", &bodies.join("\n")),
    ];
    // Every secret that went through the system above: the Meta credentials, the model key, the
    // database password (in the URL of a failed connection) and the team token (used, and a near
    // miss of it refused).
    for secret in [
        &access_token,
        &app_secret,
        &verify_token,
        &LLM_KEY.to_string(),
        &DB_PASSWORD.to_string(),
        &TEAM_TOKEN.to_string(),
        &near_miss,
    ] {
        for (place, text) in places {
            assert!(
                !text.contains(secret.as_str()),
                "{secret} leaked into the {place}"
            );
        }
    }
}
