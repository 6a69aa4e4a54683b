//! The whole path on one machine: a message typed in the sandbox chat page becomes a signed
//! webhook, an inbound row and a job, an agent turn, an outbox row, and a send by the Lease
//! holder that the fake Cloud API receives.

mod common;

use std::time::{Duration, Instant};

use queue::testing::TestDb;
use serde_json::json;
use worker::sandbox::{Sandbox, SandboxArgs};

/// The sandbox on free ports, with the rules agent.
async fn sandbox(db: &TestDb, team_token: Option<&str>) -> Sandbox {
    Sandbox::start(SandboxArgs {
        addr: "127.0.0.1:0".into(),
        database_url: Some(db.url.as_str().into()),
        llm_base_url: None,
        llm_model: None,
        llm_api_key: None,
        inbox_addr: "127.0.0.1:0".into(),
        team_token: team_token.map(Into::into),
    })
    .await
    .expect("sandbox starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_typed_in_the_chat_page_is_answered_through_the_real_pipeline() {
    worker::install_crypto_provider();
    let db = TestDb::new().await.expect("test database");
    let sandbox = sandbox(&db, None).await;
    let http = reqwest::Client::new();
    let page = http
        .get(sandbox.cloud.url())
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(page.contains("WhatsApp sandbox"));
    let resp = http
        .post(format!("{}/chat/send", sandbox.cloud.url()))
        .json(&json!({ "from": "+1 555 123 4567", "text": "Hi! What are your prices?" }))
        .send()
        .await
        .expect("chat send");
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        body["webhook_status"], 200,
        "the gateway accepted the signed webhook"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        if let Some(s) = sandbox
            .cloud
            .sends()
            .into_iter()
            .find(|s| s.to == "15551234567")
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no reply reached the fake Cloud API"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // "Hi! What are your prices?" names both the info lane ("hi") and the commerce lane
    // ("prices"): the rules router must pick commerce, the more specific one.
    let lane_reply = |name: &str| {
        crds::agent_pool::default_lanes()
            .into_iter()
            .find(|l| l.name == name)
            .and_then(|l| l.replies.into_iter().next())
            .expect("a default lane")
    };
    assert_eq!(
        reply.text(),
        Some(lane_reply("commerce").as_str()),
        "the commerce lane's reply, not the info lane's ({:?})",
        lane_reply("info")
    );
    assert!(
        reply
            .biz_opaque_callback_data
            .as_deref()
            .unwrap_or_default()
            .starts_with("ob:")
    );
    // The page's message feed shows both sides.
    let lines: Vec<serde_json::Value> = http
        .get(format!("{}/chat/messages?after=0", sandbox.cloud.url()))
        .send()
        .await
        .expect("messages")
        .json()
        .await
        .expect("json");
    assert_eq!(lines.len(), 2);
    // Status webhooks come back and move the row to read.
    let pool = sqlx::PgPool::connect(&db.url).await.expect("db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state: String = sqlx::query_scalar("SELECT state FROM outbound_messages")
            .fetch_one(&pool)
            .await
            .expect("row");
        if state == "read" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status webhooks did not settle the row (state {state})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sandbox.shutdown().await;
}

/// Both sides of the sandbox over HTTP: the customer asks for a human, Alice answers from the
/// team inbox, the customer gets her reply, and resuming brings the agent back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_team_inbox_answers_a_handed_off_customer() {
    worker::install_crypto_provider();
    let db = TestDb::new().await.expect("test database");
    let token = "sandbox-test-token-0123456789";
    let sandbox = sandbox(&db, Some(token)).await;
    let http = reqwest::Client::new();
    let say = |text: &'static str| {
        let http = http.clone();
        let url = format!("{}/chat/send", sandbox.cloud.url());
        async move {
            let resp = http
                .post(url)
                .json(&json!({ "from": "15550001111", "text": text }))
                .send()
                .await
                .expect("chat send");
            assert_eq!(resp.status().as_u16(), 200);
        }
    };
    let sent_to_customer = |pattern: &'static str| {
        sandbox
            .cloud
            .sends()
            .iter()
            .filter(|s| s.to == "15550001111" && s.text().unwrap_or_default().contains(pattern))
            .count()
    };
    let wait_for = |pattern: &'static str, n: usize| async move {
        let what = format!("the customer to get {pattern:?}");
        common::eventually(&what, Duration::from_secs(30), || {
            sent_to_customer(pattern) >= n
        })
        .await;
    };
    let api = |path: String| {
        let http = http.clone();
        let url = format!("{}{path}", sandbox.inbox.url());
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("inbox")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        }
    };
    say("human please").await;
    wait_for("member of our team", 1).await;
    let list = api("/api/inbox?view=mine".into()).await;
    let conversation = list[0]["conversation_id"]
        .as_i64()
        .expect("a handoff for Alice");
    let resp = http
        .post(format!(
            "{}/api/conversations/{conversation}/messages",
            sandbox.inbox.url()
        ))
        .bearer_auth(token)
        .json(&json!({ "text": "Alice here, happy to help." }))
        .send()
        .await
        .expect("reply");
    assert_eq!(resp.status().as_u16(), 201);
    wait_for("Alice here", 1).await;
    let resp = http
        .post(format!(
            "{}/api/conversations/{conversation}/resume",
            sandbox.inbox.url()
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("resume");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(api("/api/inbox".into()).await, json!([]));
    say("what are your prices?").await;
    wait_for("order", 1).await;
    assert_eq!(
        sent_to_customer("Alice here"),
        1,
        "the human reply went out once"
    );
    sandbox.shutdown().await;
}
