//! Agent turns on a real Postgres; the LLM is the fake Chat Completions server over HTTP.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{Env, core, core_with_metrics, eventually_async, wait_count};
use fakes::llm::{FakeLlm, Reply};
use serde_json::{Value, json};
use worker::metrics::{Metrics, Outcome as MetricOutcome};

async fn send_text(env: &Env, from: &str, text: &str) -> String {
    let (id, payload) = env.cloud.inbound_text(from, "Customer", text);
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        StatusCode::OK
    );
    id
}

async fn outbound_texts(env: &Env) -> Vec<String> {
    sqlx::query_scalar("SELECT message->'text'->>'body' FROM outbound_messages ORDER BY id")
        .fetch_all(&env.db.pool)
        .await
        .expect("outbound")
}

async fn wait_outbound(env: &Env, n: i64) {
    let what = format!("{n} outbound messages");
    wait_count(
        env,
        &what,
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages",
        |c| c >= n,
    )
    .await;
}

async fn wait_turn_running(env: &Env) {
    wait_count(
        env,
        "the turn to be running",
        Duration::from_secs(10),
        "SELECT count(*) FROM jobs WHERE state = 'running'",
        |n| n > 0,
    )
    .await;
}

async fn wait_dead_job(env: &Env) -> (String, Option<String>, i32) {
    wait_count(
        env,
        "a dead job",
        Duration::from_secs(30),
        "SELECT count(*) FROM jobs WHERE state = 'dead'",
        |n| n > 0,
    )
    .await;
    sqlx::query_as(
        "SELECT state, last_error, attempts FROM jobs WHERE state = 'dead' ORDER BY id LIMIT 1",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("job")
}

fn openai_spec(llm: &FakeLlm, extra: Value) -> Value {
    let mut spec = json!({
        "model": { "provider": "openai", "baseUrl": llm.base_url(), "model": "gpt-test", "timeoutSeconds": 1, "maxSteps": 4 },
        "tools": [{ "id": "business_hours", "config": { "openHour": 9, "closeHour": 18 } }, { "id": "set_lane" }, { "id": "handoff" }],
        "team": [{ "id": "alice" }, { "id": "bob" }, { "id": "carol", "online": false }],
    });
    fakes::kube_api::merge(&mut spec, &extra);
    spec
}

async fn setup() -> (Env, worker::gateway::RunningGateway) {
    let env = Env::new().await;
    let gw = env.ingress().await;
    (env, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_mode_answers_with_no_model_configured() {
    let (env, gw) = setup().await;
    // The account's spec.delivery.maxAttempts, as its gateway wrote it.
    sqlx::query("UPDATE accounts SET outbound_max_attempts = 3")
        .execute(&env.db.pool)
        .await
        .expect("setting");
    let c = core(&env, json!({})).await;
    send_text(&env, "111", "hello, what are your hours?").await;
    wait_outbound(&env, 1).await;
    let texts = outbound_texts(&env).await;
    assert!(texts[0].contains("open Monday to Friday"), "{texts:?}");
    let (lane, sent_by_agent, max_attempts): (Option<String>, bool, i32) = sqlx::query_as(
        "SELECT c.lane, o.sent_by_agent, o.max_attempts FROM conversations c JOIN outbound_messages o ON o.conversation_id = c.id",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("row");
    assert_eq!(lane.as_deref(), Some("info"));
    assert!(sent_by_agent);
    assert_eq!(
        max_attempts, 3,
        "the reply carries the account's maxAttempts"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_round_trips_and_the_final_answer_is_one_outbound_row() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::tool("business_hours", "{}"),
        Reply::text("We're open 9 to 6!"),
    ]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    send_text(&env, "222", "are you open?").await;
    wait_outbound(&env, 1).await;
    assert_eq!(
        outbound_texts(&env).await,
        vec!["We're open 9 to 6!".to_string()]
    );
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    let tool_defs: Vec<&str> = reqs[0]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(tool_defs, vec!["business_hours", "set_lane", "handoff"]);
    let msgs = reqs[1]["messages"].as_array().expect("messages");
    let call_id = msgs
        .iter()
        .find(|m| m["role"] == "assistant")
        .expect("assistant")["tool_calls"][0]["id"]
        .clone();
    let tool_msg = msgs
        .iter()
        .find(|m| m["role"] == "tool")
        .expect("tool result");
    assert_eq!(tool_msg["tool_call_id"], call_id);
    assert!(
        tool_msg["content"]
            .as_str()
            .unwrap_or_default()
            .contains("Opening hours")
    );
    let (tokens, steps): (i32, i32) =
        sqlx::query_as("SELECT prompt_tokens + completion_tokens, steps FROM agent_turns")
            .fetch_one(&env.db.pool)
            .await
            .expect("turn");
    assert!(tokens > 0, "token usage recorded");
    assert_eq!(steps, 2);
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tool_arguments_are_reported_to_the_model_not_crashed_on() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::tool("set_lane", "{\"lane\": \"commerce\""),
        Reply::tool("set_lane", "{\"lane\": \"commerce\"}"),
        Reply::text("Let's shop."),
    ]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    send_text(&env, "333", "I want to buy").await;
    wait_outbound(&env, 1).await;
    let reqs = llm.requests();
    let first_tool = reqs[1]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["role"] == "tool")
        .expect("tool msg")
        .clone();
    assert!(
        first_tool["content"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error: arguments are not valid JSON"),
        "{first_tool}"
    );
    let lane: Option<String> = sqlx::query_scalar("SELECT lane FROM conversations")
        .fetch_one(&env.db.pool)
        .await
        .expect("lane");
    assert_eq!(
        lane.as_deref(),
        Some("commerce"),
        "the corrected call took effect"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_retried_after_retry_after_and_5xx_retried() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::rate_limited(300),
        Reply::server_error(500),
        Reply::text("finally"),
    ]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    let started = std::time::Instant::now();
    send_text(&env, "444", "hi").await;
    wait_outbound(&env, 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited at least retry-after-ms"
    );
    assert_eq!(outbound_texts(&env).await, vec!["finally".to_string()]);
    assert_eq!(llm.requests().len(), 3);
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM jobs")
        .fetch_one(&env.db.pool)
        .await
        .expect("job");
    assert_eq!(
        attempts, 1,
        "retried inside the turn, not by failing the job"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_quota_is_never_retried_and_the_job_dies_with_the_error() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::insufficient_quota(),
        Reply::text("must not be asked"),
    ]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    send_text(&env, "555", "hi").await;
    let (_, error, attempts) = wait_dead_job(&env).await;
    assert!(error.unwrap_or_default().contains("insufficient_quota"));
    assert_eq!(attempts, 1);
    assert_eq!(llm.requests().len(), 1);
    assert!(outbound_texts(&env).await.is_empty());
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_tool_is_off_unless_listed_and_queues_an_allowed_template_after_the_text() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::tool(
            "send_template",
            r#"{"name": "spring_promo", "language": "en_US"}"#,
        ),
        Reply::tool(
            "send_template",
            r##"{"name": "order_update", "language": "en_US", "parameters": ["Ana", "#1234"]}"##,
        ),
        Reply::text("I sent you the order update."),
    ]);
    let spec = openai_spec(
        &llm,
        json!({ "tools": [{ "id": "send_template", "config": { "allowed": ["order_update"] } }] }),
    );
    let c = core(&env, spec).await;
    send_text(&env, "333", "where is my order?").await;
    wait_outbound(&env, 2).await;
    let rows: Vec<Value> = sqlx::query_scalar("SELECT message FROM outbound_messages ORDER BY id")
        .fetch_all(&env.db.pool)
        .await
        .expect("outbound");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["text"]["body"], "I sent you the order update.");
    assert_eq!(rows[1]["type"], "template");
    assert_eq!(rows[1]["template"]["name"], "order_update");
    assert_eq!(
        rows[1]["template"]["components"][0]["parameters"][1]["text"],
        "#1234"
    );
    // The template outside the pool's allow-list was refused to the model, not queued.
    let reqs = llm.requests();
    let refusal = reqs[1]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["role"] == "tool")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(refusal.contains("not allowed"), "{refusal}");
    let offered: Vec<&str> = reqs[0]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(offered, vec!["send_template"]);
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_offers_reply_buttons_under_its_reply() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::tool("reply_buttons", r#"{"buttons": ["Yes, book it", "No"]}"#),
        Reply::text("Shall I book the 9:00 slot?"),
    ]);
    let spec = openai_spec(&llm, json!({ "tools": [{ "id": "reply_buttons" }] }));
    let c = core(&env, spec).await;
    send_text(&env, "444", "can I come tomorrow morning?").await;
    wait_outbound(&env, 1).await;
    let message: Value = sqlx::query_scalar("SELECT message FROM outbound_messages")
        .fetch_one(&env.db.pool)
        .await
        .expect("outbound");
    assert_eq!(message["type"], "interactive", "{message}");
    assert_eq!(
        message["interactive"]["body"]["text"],
        "Shall I book the 9:00 slot?"
    );
    assert_eq!(
        message["interactive"]["action"]["buttons"][0]["reply"]["title"],
        "Yes, book it"
    );
    assert_eq!(
        message["interactive"]["action"]["buttons"][1]["reply"]["title"],
        "No"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_timeout_fails_the_attempt_for_a_later_retry() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    let slow = || Reply::Delayed(Duration::from_secs(3), Box::new(Reply::text("too late")));
    llm.script([slow(), slow(), slow()]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    send_text(&env, "666", "hi").await;
    wait_count(&env, "the attempt to fail with a timeout", Duration::from_secs(20), "SELECT count(*) FROM jobs WHERE state = 'pending' AND attempts = 1 AND last_error LIKE '%timed out%'", |n| n > 0).await;
    assert!(outbound_texts(&env).await.is_empty());
    c.kill();
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_switched_off_mid_turn_sends_nothing() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([Reply::Delayed(
        Duration::from_millis(800),
        Box::new(Reply::text("should not be sent")),
    )]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    send_text(&env, "777", "hi").await;
    wait_turn_running(&env).await;
    // A human takes over while the model is thinking.
    sqlx::query("UPDATE conversations SET agent_enabled = false")
        .execute(&env.db.pool)
        .await
        .expect("toggle");
    wait_count(
        &env,
        "the job to complete",
        Duration::from_secs(10),
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
        |n| n > 0,
    )
    .await;
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM jobs")
        .fetch_one(&env.db.pool)
        .await
        .expect("job");
    assert_eq!(outcome, "agent_disabled");
    assert!(outbound_texts(&env).await.is_empty());
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_whose_claim_was_lost_mid_turn_records_and_sends_nothing() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::Delayed(
            Duration::from_millis(800),
            Box::new(Reply::text("stale answer")),
        ),
        Reply::text("fresh answer"),
    ]);
    let metrics = Metrics::new().0;
    let c = core_with_metrics(&env, openai_spec(&llm, json!({})), metrics.clone()).await;
    send_text(&env, "778", "hi").await;
    wait_turn_running(&env).await;
    // The first turn must be at the model (holding the delayed reply) before the rescue, or the
    // second claim could ask first and get it.
    common::eventually(
        "the first turn at the model",
        Duration::from_secs(10),
        || !llm.requests().is_empty(),
    )
    .await;
    // The job's lock expired while the model was thinking and the rescuer handed it back: the
    // worker claims it again and answers, and the first turn's claim is gone.
    sqlx::query(
        "UPDATE jobs SET state = 'pending', claim_token = NULL, processor_id = NULL, locked_until = NULL",
    )
    .execute(&env.db.pool)
    .await
    .expect("rescue");
    eventually_async(
        "the first turn to find its claim lost",
        Duration::from_secs(10),
        || async {
            metrics
                .turns
                .get_or_create(&MetricOutcome::of("claim_lost"))
                .get()
                == 1
        },
    )
    .await;
    wait_count(
        &env,
        "the job to complete once",
        Duration::from_secs(10),
        "SELECT count(*) FROM jobs WHERE state = 'completed' AND attempts = 2",
        |n| n == 1,
    )
    .await;
    assert_eq!(outbound_texts(&env).await, vec!["fresh answer".to_string()]);
    let turns: i64 = sqlx::query_scalar("SELECT count(*) FROM agent_turns")
        .fetch_one(&env.db.pool)
        .await
        .expect("turns");
    assert_eq!(turns, 1, "only the turn that held the claim is recorded");
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_sends_the_message_turns_the_agent_off_and_assigns_round_robin() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    for _ in 0..4 {
        llm.script([Reply::tool("handoff", "{\"reason\": \"wants a person\"}")]);
    }
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    for (i, from) in ["801", "802", "803", "804"].iter().enumerate() {
        send_text(&env, from, "let me talk to a person").await;
        wait_outbound(&env, i as i64 + 1).await;
    }
    let assignees: Vec<Option<String>> =
        sqlx::query_scalar("SELECT assignee FROM handoff_tasks ORDER BY id")
            .fetch_all(&env.db.pool)
            .await
            .expect("tasks");
    let names: Vec<&str> = assignees
        .iter()
        .map(|a| a.as_deref().unwrap_or("-"))
        .collect();
    assert_eq!(
        names,
        vec!["alice", "bob", "alice", "bob"],
        "least recently assigned online member; carol is offline"
    );
    let texts = outbound_texts(&env).await;
    assert!(
        texts.iter().all(|t| t == "A human will reply soon."),
        "{texts:?}"
    );
    let disabled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversations WHERE NOT agent_enabled AND state = 'handed_off'",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("count");
    assert_eq!(disabled, 4);
    // The conversation stays with the human: a new message is stored, but the agent is not run.
    send_text(&env, "801", "hello?").await;
    wait_count(
        &env,
        "the job to be skipped",
        Duration::from_secs(10),
        "SELECT count(*) FROM jobs WHERE outcome = 'agent_disabled'",
        |n| n == 1,
    )
    .await;
    assert_eq!(outbound_texts(&env).await.len(), 4);
    // A team member hands a conversation back to the agent (the inbox's resume; its HTTP side
    // is tested in team_inbox.rs).
    let conversation: i64 =
        sqlx::query_scalar("SELECT conversation_id FROM handoff_tasks ORDER BY id LIMIT 1")
            .fetch_one(&env.db.pool)
            .await
            .expect("task");
    let alice = worker::core::inbox::auth::Member {
        id: "alice".into(),
        name: None,
    };
    let inbox = worker::core::inbox::store::resume;
    inbox(&env.db.pool, common::POOL, &alice, conversation)
        .await
        .expect("resume");
    assert!(matches!(
        inbox(&env.db.pool, common::POOL, &alice, 999_999).await,
        Err(worker::core::inbox::InboxError::NotFound)
    ));
    let (enabled, open): (bool, i64) = sqlx::query_as(
        "SELECT c.agent_enabled, (SELECT count(*) FROM handoff_tasks t WHERE t.conversation_id = c.id AND t.state = 'open')
         FROM conversations c WHERE c.id = $1",
    )
    .bind(conversation)
    .fetch_one(&env.db.pool)
    .await
    .expect("conversation");
    assert!(enabled && open == 0, "agent back on, task closed");
    // Only that conversation is affected; a new contact still gets the agent.
    llm.script([Reply::text("hi there")]);
    send_text(&env, "900", "hi").await;
    wait_outbound(&env, 5).await;
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_answered_in_order_one_turn_at_a_time_and_coalesced() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::Delayed(
            Duration::from_millis(600),
            Box::new(Reply::text("answer one")),
        ),
        Reply::text("answer two and three"),
        Reply::text("must not be needed"),
    ]);
    let c = core(&env, openai_spec(&llm, json!({}))).await;
    send_text(&env, "123", "one").await;
    // The first turn has read its messages once it has asked the model; "running" alone is
    // too early (a message sent then could still join the first turn).
    common::eventually(
        "the first turn to ask the model",
        Duration::from_secs(10),
        || llm.requests().len() == 1,
    )
    .await;
    send_text(&env, "123", "two").await;
    send_text(&env, "123", "three").await;
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM jobs ORDER BY id")
        .fetch_all(&env.db.pool)
        .await
        .expect("states");
    assert_eq!(
        states,
        vec!["running", "waiting", "waiting"],
        "one active job per conversation; the rest wait in order"
    );
    wait_count(
        &env,
        "all jobs to finish",
        Duration::from_secs(20),
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
        |n| n == 3,
    )
    .await;
    assert_eq!(
        outbound_texts(&env).await,
        vec!["answer one".to_string(), "answer two and three".to_string()]
    );
    let outcomes: Vec<String> = sqlx::query_scalar("SELECT outcome FROM jobs ORDER BY id")
        .fetch_all(&env.db.pool)
        .await
        .expect("outcomes");
    assert_eq!(outcomes, vec!["answered", "answered", "coalesced"]);
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    let last_user = reqs[1]["messages"]
        .as_array()
        .expect("messages")
        .last()
        .expect("last")["content"]
        .clone();
    assert_eq!(last_user, json!("two\nthree"));
    // The second turn saw the first exchange as history.
    let history: Vec<&str> = reqs[1]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert!(
        history.contains(&"one") && history.contains(&"answer one"),
        "{history:?}"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tool_configs_are_diagnosed_and_skipped_without_stopping_the_worker() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([Reply::text("still here")]);
    let spec = openai_spec(&llm, json!({}));
    let mut spec = spec;
    spec["tools"] = json!([
        { "id": "business_hours", "config": { "openHour": 99 } },
        { "id": "teleport" },
        { "id": "set_lane", "channels": { "whatsapp": "deny" } },
        { "id": "handoff" }
    ]);
    let c = core(&env, spec).await;
    let diags: Vec<(String, String)> =
        sqlx::query_as("SELECT plugin_id, field FROM plugin_diagnostics ORDER BY plugin_id")
            .fetch_all(&env.db.pool)
            .await
            .expect("diagnostics");
    assert_eq!(
        diags,
        vec![
            ("business_hours".to_string(), "config.openHour".to_string()),
            ("teleport".to_string(), "id".to_string())
        ]
    );
    send_text(&env, "321", "hi").await;
    wait_outbound(&env, 1).await;
    let offered: Vec<String> = llm.requests()[0]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        offered,
        vec!["handoff".to_string()],
        "invalid and denied tools are not offered"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_past_its_ttl_starts_over_without_history_or_lane() {
    let (env, gw) = setup().await;
    let llm = FakeLlm::start().await.expect("llm");
    llm.script([
        Reply::text("answer one"),
        Reply::text("answer two"),
        Reply::text("answer three"),
    ]);
    let c = core(
        &env,
        openai_spec(&llm, json!({ "sessionTtlSeconds": 3600 })),
    )
    .await;
    send_text(&env, "444", "one").await;
    wait_outbound(&env, 1).await;
    // The first exchange happened two hours ago, in the "info" lane.
    sqlx::query(
        "UPDATE conversations SET lane = 'info', session_started_at = now() - interval '2 hours 1 minute'",
    )
    .execute(&env.db.pool)
    .await
    .expect("lane");
    sqlx::query("UPDATE inbound_messages SET received_at = received_at - interval '2 hours'")
        .execute(&env.db.pool)
        .await
        .expect("backdate inbound");
    sqlx::query("UPDATE outbound_messages SET created_at = created_at - interval '2 hours'")
        .execute(&env.db.pool)
        .await
        .expect("backdate outbound");
    send_text(&env, "444", "two").await;
    wait_outbound(&env, 2).await;
    // Within the session: the next turn sees the new session's exchange and its lane.
    sqlx::query("UPDATE conversations SET lane = 'info'")
        .execute(&env.db.pool)
        .await
        .expect("lane");
    send_text(&env, "444", "three").await;
    wait_outbound(&env, 3).await;
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 3);
    let contents = |i: usize| -> Vec<String> {
        reqs[i]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["content"].as_str().map(str::to_string))
            .collect()
    };
    let expired = contents(1);
    assert!(
        !expired.iter().any(|m| m == "one" || m == "answer one"),
        "an expired session's messages are not history: {expired:?}"
    );
    assert!(
        !expired.iter().any(|m| m.contains("in the info lane")),
        "an expired session's lane is dropped: {expired:?}"
    );
    assert_eq!(expired.last().map(String::as_str), Some("two"));
    let continued = contents(2);
    let pos = |text: &str| continued.iter().position(|m| m == text);
    assert!(
        pos("two").is_some() && pos("two") < pos("answer two") && pos("answer two") < pos("three"),
        "the live session's exchange is history, in order: {continued:?}"
    );
    assert!(
        !continued.iter().any(|m| m == "one"),
        "history starts at the new session: {continued:?}"
    );
    assert!(
        continued.iter().any(|m| m.contains("in the info lane")),
        "the live session keeps its lane: {continued:?}"
    );
    let (fresh_start,): (bool,) = sqlx::query_as(
        "SELECT c.session_started_at = (SELECT received_at FROM inbound_messages WHERE body = 'two')
         FROM conversations c",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("session start");
    assert!(fresh_start, "the new session starts at its first message");
    c.shutdown().await;
    gw.kill();
}
