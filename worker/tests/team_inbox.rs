//! The team inbox over HTTP against the real server: authentication on every route, human
//! replies through the fenced outbox, the 24-hour window, claim races, live events.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{Env, POOL, core, eventually, wait_count};
use serde_json::{Value, json};
use worker::core::inbox::auth::{SharedTokens, TeamTokens};
use worker::core::inbox::events::TeamEvents;
use worker::core::inbox::{self, InboxState};
use worker::metrics::Metrics;

const OTHER_POOL: &str = "default/other";

fn token_of(member: &str) -> String {
    format!("{member}-token-0123456789abcdef")
}

/// The team of `spec` (`[{"id": ...}]`), each with `token_of(id)`.
fn team_tokens(team: &Value) -> SharedTokens {
    let team: Vec<crds::agent_pool::TeamMember> =
        serde_json::from_value(team.clone()).expect("team");
    let pairs = team
        .iter()
        .map(|m| (m.effective_token_key(), token_of(&m.id)));
    let (tokens, problems) = TeamTokens::from_pairs(&team, pairs);
    assert!(problems.is_empty(), "{problems:?}");
    SharedTokens::new(tokens)
}

struct Inbox {
    server: fakes::Server,
    http: reqwest::Client,
    registry: prometheus_client::registry::Registry,
}

impl Inbox {
    async fn start(env: &Env, tokens: SharedTokens) -> Self {
        let (metrics, registry) = Metrics::new();
        let server = fakes::Server::start(inbox::router(InboxState {
            db: env.db.pool.clone(),
            pool: POOL.into(),
            tokens,
            events: TeamEvents::start(env.db.pool.clone()),
            metrics: metrics.clone(),
        }))
        .await
        .expect("inbox server");
        Self {
            server,
            http: reqwest::Client::new(),
            registry,
        }
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("metrics");
        out
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = match method {
            "GET" => self.http.get(self.url(path)),
            _ => self.http.post(self.url(path)),
        };
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// The conversation with its transcript, as `member` sees it.
    async fn transcript(&self, member: &str, conversation: i64) -> Value {
        let (status, t) = self
            .as_member(member, "GET", &format!("/api/conversations/{conversation}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{t}");
        t
    }

    /// Send a file as `member` (raw body, its type in `Content-Type`).
    async fn send_file(
        &self,
        member: &str,
        conversation: i64,
        query: &str,
        mime: &str,
        bytes: Vec<u8>,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url(&format!("/api/conversations/{conversation}/files?{query}")))
            .header("authorization", format!("Bearer {}", token_of(member)))
            .header("content-type", mime)
            .body(bytes)
            .send()
            .await
            .expect("request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A GET whose body is not JSON (media): status, content type, disposition, bytes.
    async fn download(
        &self,
        member: Option<&str>,
        path: &str,
    ) -> (StatusCode, String, String, Vec<u8>) {
        let mut req = self.http.get(self.url(path));
        if let Some(m) = member {
            req = req.header("authorization", format!("Bearer {}", token_of(m)));
        }
        let resp = req.send().await.expect("request");
        let header = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (status, kind, disposition) = (
            resp.status(),
            header("content-type"),
            header("content-disposition"),
        );
        (
            status,
            kind,
            disposition,
            resp.bytes().await.expect("body").to_vec(),
        )
    }

    async fn as_member(&self, member: &str, method: &str, path: &str) -> (StatusCode, Value) {
        self.call(
            method,
            path,
            Some(&format!("Bearer {}", token_of(member))),
            None,
        )
        .await
    }

    async fn template(&self, member: &str, conversation: i64, body: Value) -> (StatusCode, Value) {
        self.call(
            "POST",
            &format!("/api/conversations/{conversation}/template"),
            Some(&format!("Bearer {}", token_of(member))),
            Some(body),
        )
        .await
    }

    async fn reply(&self, member: &str, conversation: i64, text: &str) -> (StatusCode, Value) {
        self.call(
            "POST",
            &format!("/api/conversations/{conversation}/messages"),
            Some(&format!("Bearer {}", token_of(member))),
            Some(json!({ "text": text })),
        )
        .await
    }
}

async fn customer_says(env: &Env, from: &str, text: &str) {
    let (_, payload) = env.cloud.inbound_text(from, "Customer", text);
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        StatusCode::OK
    );
}

/// A customer asks for a human and the rules agent hands the conversation off.
async fn handed_off(env: &Env, from: &str) -> i64 {
    let before = env
        .count("SELECT count(*) FROM handoff_tasks WHERE state = 'open'")
        .await;
    customer_says(env, from, "I want a human").await;
    wait_count(
        env,
        "the handoff",
        Duration::from_secs(20),
        "SELECT count(*) FROM handoff_tasks WHERE state = 'open'",
        |n| n > before,
    )
    .await;
    sqlx::query_scalar(
        "SELECT c.id FROM conversations c JOIN contacts ct ON ct.id = c.contact_id WHERE ct.wa_id = $1",
    )
    .bind(from)
    .fetch_one(&env.db.pool)
    .await
    .expect("conversation")
}

/// A number `account` (`phone_number_id`) of `pool` with one handed-off conversation, whose
/// customer `contact` wrote `body` `age` ago (a Postgres interval); returns the conversation.
async fn seeded_conversation(
    env: &Env,
    account: &str,
    phone_number_id: &str,
    pool: &str,
    contact: &str,
    body: &str,
    age: &str,
) -> i64 {
    let db = &env.db.pool;
    sqlx::query("INSERT INTO accounts (id, phone_number_id, pool) VALUES ($1, $2, $3)")
        .bind(account)
        .bind(phone_number_id)
        .bind(pool)
        .execute(db)
        .await
        .expect("account");
    let contact: i64 = sqlx::query_scalar(
        "INSERT INTO contacts (account_id, contact_key, wa_id) VALUES ($1, $2, $2) RETURNING id",
    )
    .bind(account)
    .bind(contact)
    .fetch_one(db)
    .await
    .expect("contact");
    let conversation: i64 = sqlx::query_scalar("INSERT INTO conversations (account_id, contact_id, pool, agent_enabled, state) VALUES ($1, $2, $3, false, 'handed_off') RETURNING id")
        .bind(account)
        .bind(contact)
        .bind(pool)
        .fetch_one(db)
        .await
        .expect("conversation");
    sqlx::query("INSERT INTO inbound_messages (account_id, conversation_id, provider_message_id, message_type, body, payload, runs_agent, received_at) VALUES ($1, $2, $1 || '/first', 'text', $3, '{}', true, now() - $4::interval)")
        .bind(account)
        .bind(conversation)
        .bind(body)
        .bind(age)
        .execute(db)
        .await
        .expect("inbound");
    conversation
}

/// A conversation of another pool, with an open handoff.
async fn foreign_conversation(env: &Env) -> i64 {
    let conversation = seeded_conversation(
        env,
        "default/other-line",
        "other-phone",
        OTHER_POOL,
        "777",
        "private",
        "0 seconds",
    )
    .await;
    sqlx::query("INSERT INTO handoff_tasks (account_id, conversation_id, pool) VALUES ('default/other-line', $1, $2)")
        .bind(conversation)
        .bind(OTHER_POOL)
        .execute(&env.db.pool)
        .await
        .expect("task");
    conversation
}

fn routes(conversation: i64) -> Vec<(&'static str, String)> {
    vec![
        ("GET", "/api/me".into()),
        ("GET", "/api/inbox?view=all".into()),
        ("GET", "/api/events".into()),
        ("GET", format!("/api/conversations/{conversation}")),
        ("POST", format!("/api/conversations/{conversation}/claim")),
        ("POST", format!("/api/conversations/{conversation}/assign")),
        (
            "POST",
            format!("/api/conversations/{conversation}/messages"),
        ),
        ("POST", format!("/api/conversations/{conversation}/resume")),
        ("POST", format!("/api/conversations/{conversation}/close")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_team_route_refuses_missing_wrong_and_other_pools_tokens() {
    let env = Env::new().await;
    let gw = env.gateway("ingress", true).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let team = json!([{ "id": "alice@example.com" }, { "id": "bob" }]);
    let c = core(&env, json!({ "team": team })).await;
    let ours = handed_off(&env, "801").await;
    let theirs = foreign_conversation(&env).await;
    let inbox = Inbox::start(&env, team_tokens(&team)).await;

    for (method, path) in routes(ours) {
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789abcdef".to_string()),
            Some(format!("Basic {}", token_of("bob"))),
            Some(format!("Bearer {}x", token_of("bob"))),
        ] {
            let resp = {
                let mut req = match method {
                    "GET" => inbox.http.get(inbox.url(&path)),
                    _ => inbox
                        .http
                        .post(inbox.url(&path))
                        .json(&json!({ "text": "x", "member": "bob" })),
                };
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send().await.expect("request")
            };
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {auth:?}"
            );
            assert!(
                resp.headers().contains_key("www-authenticate"),
                "{method} {path}"
            );
        }
    }
    // Another pool's conversation: 403 for every conversation route, and nothing changes.
    for (method, path) in routes(theirs).into_iter().skip(3) {
        let (status, body) = inbox
            .call(
                method,
                &path,
                Some(&format!("Bearer {}", token_of("bob"))),
                Some(json!({ "text": "leak?", "member": "bob" })),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        assert_eq!(body["error"], "forbidden");
    }
    let untouched: (bool, String, Option<String>, i64) = sqlx::query_as(
        "SELECT c.agent_enabled, t.state, t.assignee, (SELECT count(*) FROM outbound_messages o WHERE o.conversation_id = c.id)
         FROM conversations c JOIN handoff_tasks t ON t.conversation_id = c.id WHERE c.id = $1",
    )
    .bind(theirs)
    .fetch_one(&env.db.pool)
    .await
    .expect("foreign conversation");
    assert_eq!(untouched, (false, "open".into(), None, 0));
    // The list shows this pool's handoffs only; a missing conversation is 404.
    let (status, list) = inbox.as_member("bob", "GET", "/api/inbox").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<i64> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|i| i["conversation_id"].as_i64())
        .collect();
    assert_eq!(ids, vec![ours]);
    let (status, _) = inbox
        .as_member("bob", "GET", "/api/conversations/999999")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, me) = inbox.as_member("alice@example.com", "GET", "/api/me").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        me,
        json!({ "id": "alice@example.com", "name": null, "pool": POOL })
    );
    // Audit: only the refused attempts on our side are absent; no action was recorded.
    assert_eq!(env.count("SELECT count(*) FROM team_audit").await, 0);
    // The page itself needs no token and carries no data.
    let page = inbox
        .http
        .get(inbox.url("/inbox"))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.expect("html").contains("Team inbox"));

    // With no tokens configured nobody gets in, and the error says why.
    let locked = Inbox::start(&env, SharedTokens::default()).await;
    let (status, body) = locked.as_member("bob", "GET", "/api/inbox").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("tokensSecretRef"),
        "{body}"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_human_reply_is_delivered_once_by_the_lease_holder_and_resume_brings_the_agent_back() {
    let env = Env::new().await;
    let a = env.gateway("gw-a", false).await;
    let b = env.gateway("gw-b", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", a.addr));
    eventually("a Lease holder", Duration::from_secs(10), || {
        env.lease_holder().is_some()
    })
    .await;
    let team = json!([{ "id": "alice" }, { "id": "bob" }]);
    let c = core(&env, json!({ "team": team })).await;
    let inbox = Inbox::start(&env, team_tokens(&team)).await;
    // Live events: subscribe before the handoff.
    let events = inbox
        .http
        .get(inbox.url("/api/events"))
        .header("authorization", format!("Bearer {}", token_of("bob")))
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), StatusCode::OK);
    let mut events = events;

    let conversation = handed_off(&env, "555").await;
    let (status, mine) = inbox
        .as_member("alice", "GET", "/api/inbox?view=mine")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        mine[0]["conversation_id"], conversation,
        "round-robin gave it to alice: {mine}"
    );
    assert_eq!(mine[0]["awaiting_reply"], true);
    let (_, bobs) = inbox.as_member("bob", "GET", "/api/inbox?view=mine").await;
    assert_eq!(bobs, json!([]));
    wait_for_event(&mut events, conversation, "handoff").await;

    let (status, queued) = inbox.reply("alice", conversation, "Hi, Alice here.").await;
    assert_eq!(status, StatusCode::CREATED, "{queued}");
    let outbound_id = queued["outbound_id"].as_i64().expect("outbound id");
    eventually(
        "the human reply to reach WhatsApp",
        Duration::from_secs(20),
        || {
            env.cloud
                .sends()
                .iter()
                .any(|s| s.text() == Some("Hi, Alice here."))
        },
    )
    .await;
    // Let both senders go around a few more times: still exactly one send.
    let standby = if env.lease_holder().as_deref() == Some("gw-a") {
        &b
    } else {
        &a
    };
    let rounds = standby.metrics.standby_rounds.get();
    eventually(
        "three standby sender rounds",
        Duration::from_secs(10),
        || standby.metrics.standby_rounds.get() >= rounds + 3,
    )
    .await;
    let sends: Vec<_> = env
        .cloud
        .sends()
        .into_iter()
        .filter(|s| s.text() == Some("Hi, Alice here."))
        .collect();
    assert_eq!(sends.len(), 1, "delivered once");
    assert_eq!(sends[0].to, "555");
    let row: (bool, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT sent_by_agent, sent_by_member, claimed_by FROM outbound_messages WHERE id = $1",
    )
    .bind(outbound_id)
    .fetch_one(&env.db.pool)
    .await
    .expect("outbound row");
    assert!(!row.0, "a human reply is not the agent's");
    assert_eq!(row.1.as_deref(), Some("alice"));
    assert_eq!(row.2, env.lease_holder(), "sent by the Lease holder");
    assert_eq!(
        env.count("SELECT count(*) FROM handoff_tasks WHERE first_reply_at IS NOT NULL")
            .await,
        1
    );
    assert!(
        inbox
            .metrics_text()
            .contains("whatsapp_worker_handoff_first_reply_seconds_count 1"),
        "time to first human reply observed once"
    );
    wait_for_event(&mut events, conversation, "reply").await;

    // The customer answers; the agent stays quiet, the team sees it live.
    customer_says(&env, "555", "thanks, one more question").await;
    wait_for_event(&mut events, conversation, "message").await;
    let (_, t) = inbox
        .as_member("bob", "GET", &format!("/api/conversations/{conversation}"))
        .await;
    let authors: Vec<(&str, &str)> = t["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["author"].as_str().unwrap_or_default(),
                m["text"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        authors,
        vec![
            ("customer", "I want a human"),
            ("agent", "A human will reply soon."),
            ("human", "Hi, Alice here."),
            ("customer", "thanks, one more question"),
        ]
    );
    assert_eq!(t["conversation"]["agent_enabled"], false);
    assert_eq!(t["conversation"]["in_window"], true);
    assert_eq!(t["task"]["assignee"], "alice");

    // Resume: the question asked after the human's reply goes to the agent.
    let (status, resumed) = inbox
        .as_member(
            "alice",
            "POST",
            &format!("/api/conversations/{conversation}/resume"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resumed["agent_answers_pending"], true);
    wait_count(
        &env,
        "the agent to answer the pending question",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages WHERE sent_by_agent AND created_at > (SELECT max(created_at) FROM outbound_messages WHERE NOT sent_by_agent)",
        |n| n >= 1,
    )
    .await;
    let (_, list) = inbox.as_member("alice", "GET", "/api/inbox").await;
    assert_eq!(list, json!([]), "the handoff closed");
    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT member_id, action FROM team_audit ORDER BY id")
            .fetch_all(&env.db.pool)
            .await
            .expect("audit");
    assert_eq!(
        actions,
        vec![
            ("alice".to_string(), "reply".to_string()),
            ("alice".to_string(), "resume".to_string())
        ]
    );
    c.shutdown().await;
    a.kill();
    b.kill();
}

/// Read the SSE stream until the event arrives (10 s at most).
async fn wait_for_event(events: &mut reqwest::Response, conversation: i64, kind: &str) {
    let want = json!({ "conversation_id": conversation, "kind": kind }).to_string();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = String::new();
        while let Some(chunk) = events.chunk().await.expect("event stream") {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if buf.contains(&want) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "no {kind} event for conversation {conversation}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_outside_the_24_hour_window_is_refused_and_nothing_is_enqueued() {
    let env = Env::new().await;
    let gw = env.gateway("ingress", true).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let team = json!([{ "id": "alice" }]);
    let c = core(&env, json!({ "team": team })).await;
    let conversation = handed_off(&env, "321").await;
    let inbox = Inbox::start(&env, team_tokens(&team)).await;
    let outbound_before = env.count("SELECT count(*) FROM outbound_messages").await;
    // The customer last wrote 25 hours ago; a sender clock claiming "just now" does not count.
    for age in [
        "UPDATE inbound_messages SET received_at = now() - interval '25 hours', provider_timestamp = now() - interval '25 hours'",
        "UPDATE inbound_messages SET received_at = now() - interval '25 hours', provider_timestamp = now() + interval '1 day'",
    ] {
        sqlx::query(age)
            .execute(&env.db.pool)
            .await
            .expect("age the messages");
        let (status, body) = inbox
            .reply("alice", conversation, "Are you still there?")
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"], "outside_service_window");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("template"),
            "{body}"
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM outbound_messages").await,
        outbound_before,
        "nothing was enqueued"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM team_audit WHERE action = 'refused_reply'")
            .await,
        2
    );
    let t = inbox.transcript("alice", conversation).await;
    assert_eq!(t["conversation"]["in_window"], false);
    // Bad bodies are the caller's fault, not a crash.
    let (status, _) = inbox.reply("alice", conversation, "   ").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = inbox
        .call(
            "POST",
            &format!("/api/conversations/{conversation}/messages"),
            Some(&format!("Bearer {}", token_of("alice"))),
            Some(json!({ "txt": 1 })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A WhatsApp Web number is a person's app: no window, a reply days later goes out.
    let web = seeded_conversation(
        &env,
        "default/web-line",
        "web:+5511987650001",
        common::POOL,
        "5511999990042",
        "hello?",
        "3 days",
    )
    .await;
    let t = inbox.transcript("alice", web).await;
    assert_eq!(t["conversation"]["in_window"], true, "{t}");
    assert_eq!(t["conversation"]["window_closes_at"], Value::Null, "{t}");
    let (status, body) = inbox.reply("alice", web, "Sorry for the wait!").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        env.count("SELECT count(*) FROM outbound_messages WHERE account_id = 'default/web-line'")
            .await,
        1
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_handoff_one_wins_then_close_starts_fresh() {
    let env = Env::new().await;
    let gw = env.gateway("ingress", true).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    // Nobody online: handoffs arrive unassigned and people claim them.
    let members: Vec<String> = (0..6).map(|i| format!("member{i}")).collect();
    let team = Value::Array(
        members
            .iter()
            .map(|m| json!({ "id": m, "online": false }))
            .collect(),
    );
    let c = core(&env, json!({ "team": team })).await;
    let inbox = std::sync::Arc::new(Inbox::start(&env, team_tokens(&team)).await);
    for round in 0..3 {
        let conversation = handed_off(&env, &format!("90{round}")).await;
        let (_, unassigned) = inbox
            .as_member("member0", "GET", "/api/inbox?view=unassigned")
            .await;
        assert_eq!(unassigned[0]["conversation_id"], conversation);
        let claims = members.iter().map(|m| {
            let inbox = inbox.clone();
            let m = m.clone();
            async move {
                let path = format!("/api/conversations/{conversation}/claim");
                (m.clone(), inbox.as_member(&m, "POST", &path).await.0)
            }
        });
        let results = futures::future::join_all(claims).await;
        let winners: Vec<&String> = results
            .iter()
            .filter(|(_, s)| *s == StatusCode::NO_CONTENT)
            .map(|(m, _)| m)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .all(|(_, s)| *s == StatusCode::NO_CONTENT || *s == StatusCode::CONFLICT),
            "{results:?}"
        );
        let assignee: Option<String> = sqlx::query_scalar(
            "SELECT assignee FROM handoff_tasks WHERE conversation_id = $1 AND state = 'open'",
        )
        .bind(conversation)
        .fetch_one(&env.db.pool)
        .await
        .expect("task");
        assert_eq!(assignee.as_ref(), Some(winners[0]));
        // The winner's claim is idempotent; a colleague takes it over only by assigning.
        let winner = winners[0].clone();
        let other = members.iter().find(|m| **m != winner).expect("colleague");
        let claim = format!("/api/conversations/{conversation}/claim");
        assert_eq!(
            inbox.as_member(&winner, "POST", &claim).await.0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            inbox.as_member(other, "POST", &claim).await.0,
            StatusCode::CONFLICT
        );
        let (status, _) = inbox
            .call(
                "POST",
                &format!("/api/conversations/{conversation}/assign"),
                Some(&format!("Bearer {}", token_of(other))),
                Some(json!({ "member": other })),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, mine) = inbox.as_member(other, "GET", "/api/inbox?view=mine").await;
        assert_eq!(mine[0]["conversation_id"], conversation);
        let (status, _) = inbox
            .call(
                "POST",
                &format!("/api/conversations/{conversation}/assign"),
                Some(&format!("Bearer {}", token_of(other))),
                Some(json!({ "member": "stranger" })),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "only team members");
        // Close: resolved. The next customer message is answered by the agent again.
        let (status, _) = inbox
            .as_member(
                other,
                "POST",
                &format!("/api/conversations/{conversation}/close"),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let state: (bool, String) =
            sqlx::query_as("SELECT agent_enabled, state FROM conversations WHERE id = $1")
                .bind(conversation)
                .fetch_one(&env.db.pool)
                .await
                .expect("conversation");
        assert_eq!(state, (true, "closed".to_string()));
    }
    let before = env.count("SELECT count(*) FROM outbound_messages").await;
    customer_says(&env, "900", "what are your prices?").await;
    wait_count(
        &env,
        "the agent to answer after close",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages",
        |n| n > before,
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM conversations WHERE state = 'closed'")
            .await,
        2,
        "the conversation that wrote again is open"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_offered_and_goes_out_once_when_the_window_is_closed_and_refusals_end_failed()
{
    let env = Env::new().await;
    env.cloud
        .add_template("order_update", "en_US", 2, "APPROVED");
    env.cloud.add_template("spring_promo", "en_US", 0, "PAUSED");
    // A sending gateway: it holds the number's Lease and lists the WABA's templates.
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let team = json!([{ "id": "alice" }]);
    let c = core(&env, json!({ "team": team })).await;
    let conversation = handed_off(&env, "654").await;
    let inbox = Inbox::start(&env, team_tokens(&team)).await;
    sqlx::query("UPDATE inbound_messages SET received_at = now() - interval '25 hours', provider_timestamp = now() - interval '25 hours'")
        .execute(&env.db.pool)
        .await
        .expect("age the messages");
    let (status, _) = inbox.reply("alice", conversation, "Still there?").await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "free text is refused"
    );
    // The inbox offers the WABA's templates: approved first, with the body and its parameters.
    let path = format!("/api/conversations/{conversation}/templates");
    let offered = common::eventually_async("templates listed", Duration::from_secs(20), || async {
        inbox.as_member("alice", "GET", &path).await.1["synced_at"].is_string()
    });
    offered.await;
    let (status, list) = inbox.as_member("alice", "GET", &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["in_window"], false, "{list}");
    let names: Vec<(&str, &str, i64)> = list["templates"]
        .as_array()
        .expect("templates")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or_default(),
                t["status"].as_str().unwrap_or_default(),
                t["parameters"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("order_update", "APPROVED", 2),
            ("spring_promo", "PAUSED", 0)
        ]
    );
    assert_eq!(list["templates"][0]["body"], "order_update: {{1}} {{2}}");

    let template = |name: &str, parameters: Value| json!({ "name": name, "language": "en_US", "parameters": parameters });
    let sends_before = env.cloud.sends().len();
    let (status, body) = inbox
        .template(
            "alice",
            conversation,
            template("order_update", json!(["Ana", "#1234"])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sent = body["outbound_id"].as_i64().expect("outbound id");
    wait_count(
        &env,
        "the template sent",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages
         WHERE message->>'type' = 'template' AND state IN ('sent', 'delivered', 'read')",
        |n| n == 1,
    )
    .await;
    let templates: Vec<Value> = env
        .cloud
        .sends()
        .into_iter()
        .skip(sends_before)
        .filter(|s| s.body["type"] == "template")
        .map(|s| s.body["template"].clone())
        .collect();
    assert_eq!(templates.len(), 1, "sent once: {templates:?}");
    assert_eq!(templates[0]["name"], "order_update");
    assert_eq!(templates[0]["language"]["code"], "en_US");
    assert_eq!(
        templates[0]["components"][0]["parameters"][1]["text"],
        "#1234"
    );
    let t = inbox.transcript("alice", conversation).await;
    let shown = t["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["id"] == sent)
        .cloned()
        .unwrap_or_default();
    assert_eq!(shown["author"], "human", "{t}");
    assert_eq!(shown["text"], "template order_update: Ana, #1234", "{t}");

    // What the list already says would fail is refused at once, with the reason.
    for (bad, why) in [
        (
            template("order_update", json!(["Ana"])),
            "takes 2 parameters; 1 given",
        ),
        (template("spring_promo", json!([])), "is PAUSED"),
    ] {
        let (status, body) = inbox.template("alice", conversation, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(why),
            "{body}"
        );
    }
    // What Meta refuses on a list not yet refreshed (templates made or paused since) ends
    // failed, with Meta's code and reason, and is not retried.
    env.cloud.add_template("late_count", "en_US", 1, "APPROVED");
    env.cloud.add_template("late_pause", "en_US", 0, "PAUSED");
    for (name, parameters, code) in [
        ("late_count", json!([]), 132000),
        ("late_pause", json!([]), 132015),
        ("no_such_template", json!([]), 132001),
    ] {
        let (status, body) = inbox
            .template("alice", conversation, template(name, parameters))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["outbound_id"].as_i64().expect("outbound id");
        let failed = common::eventually_async("failed", Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, Option<i32>>(
                "SELECT error_code FROM outbound_messages WHERE id = $1 AND state = 'failed'",
            )
            .bind(id)
            .fetch_optional(&env.db.pool)
            .await
            .ok()
            .flatten()
            .flatten()
                == Some(code)
        });
        failed.await;
    }
    assert_eq!(
        env.cloud
            .sends()
            .iter()
            .filter(|s| s.body["type"] == "template")
            .count(),
        1,
        "only the valid template was accepted"
    );
    // The team sees why each failed, with Meta's code.
    let t = inbox.transcript("alice", conversation).await;
    let errors: Vec<&str> = t["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["error"].as_str())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with("132015: ")) && errors.len() == 3,
        "{errors:?}"
    );
    // What is not a template at all is the caller's mistake.
    for bad in [
        template("Order Update!", json!([])),
        json!({ "name": "order_update" }),
        template("order_update", json!(["  "])),
    ] {
        let (status, _) = inbox.template("alice", conversation, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        env.count("SELECT count(*) FROM outbound_messages WHERE state = 'failed' AND attempts = 1")
            .await,
        3,
        "a refusal is final: tried once"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM team_audit WHERE action = 'template'")
            .await,
        4
    );
    // A WhatsApp Web number has no templates.
    sqlx::query("UPDATE accounts SET phone_number_id = 'web:+15550001111'")
        .execute(&env.db.pool)
        .await
        .expect("make it a WhatsApp Web number");
    let (status, body) = inbox
        .template(
            "alice",
            conversation,
            template("order_update", json!(["Ana", "#1"])),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Cloud API"),
        "{body}"
    );
    c.shutdown().await;
    gw.shutdown().await;
}

/// What a media row says: `(state, attempts, size, last_error)`.
async fn media_row(
    env: &Env,
    provider_media_id: &str,
) -> Option<(String, i32, Option<i64>, Option<String>)> {
    sqlx::query_as(
        "SELECT state, attempts, size_bytes, last_error FROM media WHERE provider_media_id = $1",
    )
    .bind(provider_media_id)
    .fetch_optional(&env.db.pool)
    .await
    .expect("media row")
}

async fn media_settled(
    env: &Env,
    provider_media_id: &str,
) -> (String, i32, Option<i64>, Option<String>) {
    let pool = env.db.pool.clone();
    let id = provider_media_id.to_string();
    common::eventually_async("the media settles", Duration::from_secs(30), || {
        let (pool, id) = (pool.clone(), id.clone());
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM media WHERE provider_media_id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s != "pending")
        }
    })
    .await;
    media_row(env, provider_media_id).await.expect("media row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_are_fetched_after_the_webhook_retried_limited_and_served_only_to_the_team() {
    let env = Env::new().await;
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let team = json!([{ "id": "alice" }]);
    let c = core(&env, json!({ "team": team })).await;
    let inbox = Inbox::start(&env, team_tokens(&team)).await;

    // A photo whose first download fails (a CDN 500): the webhook is answered, the download is
    // retried by the Lease holder, and the bytes are stored as sent.
    let photo: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let photo_id = env.cloud.add_media(photo.clone(), "image/jpeg");
    env.cloud.fail_media_downloads([500]);
    let (_, hook) = env.cloud.inbound_media(
        "16505550101",
        "Ana",
        "image",
        &photo_id,
        json!({ "caption": "the box arrived like this" }),
    );
    assert_eq!(
        env.cloud.deliver(&hook).await.expect("deliver"),
        StatusCode::OK
    );
    let (state, attempts, size, error) = media_settled(&env, &photo_id).await;
    assert_eq!(
        (state.as_str(), attempts, size, error),
        ("stored", 2, Some(photo.len() as i64), None),
        "stored on the second attempt"
    );
    // The agent answered from the caption: the rules router sends media to the support lane.
    wait_count(
        &env,
        "the agent's answer to the photo",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages WHERE message->'text'->>'body' LIKE 'Sorry to hear that%'",
        |n| n == 1,
    )
    .await;

    // The team sees it in the transcript and downloads it with a token, never without.
    let conversation: i64 =
        sqlx::query_scalar("SELECT conversation_id FROM media WHERE provider_media_id = $1")
            .bind(&photo_id)
            .fetch_one(&env.db.pool)
            .await
            .expect("conversation");
    let t = inbox.transcript("alice", conversation).await;
    let shown = t["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["author"] == "customer")
        .cloned()
        .unwrap_or_default();
    assert_eq!(shown["text"], "[image: the box arrived like this]", "{t}");
    assert_eq!(shown["media"]["state"], "stored", "{t}");
    assert_eq!(shown["media"]["kind"], "image", "{t}");
    let path = format!("/api/media/{}", shown["media"]["id"]);
    let (status, kind, disposition, bytes) = inbox.download(Some("alice"), &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kind, "image/jpeg");
    assert!(disposition.starts_with("inline"), "{disposition}");
    assert!(bytes == photo, "the bytes the customer sent");
    let (status, _, _, bytes) = inbox.download(None, &path).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(bytes.len() < 200, "nothing of the media without a token");

    // A download URL that expired (Meta answers 404) is looked up again at once; a document
    // whose type a browser could run is served as an opaque download.
    let page = b"<html><script>alert(1)</script></html>".to_vec();
    let page_id = env.cloud.add_media(page.clone(), "text/html");
    let (lookups, _) = env.cloud.media_requests();
    env.cloud.fail_media_downloads([404]);
    let (_, hook) = env.cloud.inbound_media(
        "16505550101",
        "Ana",
        "document",
        &page_id,
        json!({ "filename": "order \"1\".html" }),
    );
    env.cloud.deliver(&hook).await.expect("deliver");
    let (state, attempts, _, _) = media_settled(&env, &page_id).await;
    assert_eq!((state.as_str(), attempts), ("stored", 2));
    assert_eq!(env.cloud.media_requests().0 - lookups, 2, "looked up again");
    let id: i64 = sqlx::query_scalar("SELECT id FROM media WHERE provider_media_id = $1")
        .bind(&page_id)
        .fetch_one(&env.db.pool)
        .await
        .expect("id");
    let (status, kind, disposition, bytes) = inbox
        .download(Some("alice"), &format!("/api/media/{id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kind, "application/octet-stream");
    assert_eq!(disposition, "attachment; filename=\"order 1.html\"");
    assert_eq!(bytes, page);

    // Over the number's limit (16 MiB by default): marked, never downloaded, nothing stored.
    let big_id = env
        .cloud
        .add_media(vec![0u8; 20 * 1000 * 1000], "application/pdf");
    let (_, downloads) = env.cloud.media_requests();
    let (_, hook) = env.cloud.inbound_media(
        "16505550101",
        "Ana",
        "document",
        &big_id,
        json!({ "filename": "scan.pdf" }),
    );
    env.cloud.deliver(&hook).await.expect("deliver");
    let (state, attempts, size, error) = media_settled(&env, &big_id).await;
    assert_eq!(
        (state.as_str(), attempts, size),
        ("too_large", 1, Some(20_000_000))
    );
    assert!(error.unwrap_or_default().contains("spec.media.maxBytes"));
    assert_eq!(env.cloud.media_requests().1, downloads, "not downloaded");
    assert_eq!(
        env.count("SELECT count(*) FROM media WHERE state = 'too_large' AND content IS NULL")
            .await,
        1
    );

    // A media id Meta no longer has (past its 7 days) fails at once, for good.
    let (_, hook) = env.cloud.inbound_media(
        "16505550101",
        "Ana",
        "audio",
        "1234567890",
        json!({ "voice": true }),
    );
    env.cloud.deliver(&hook).await.expect("deliver");
    let (state, attempts, _, error) = media_settled(&env, "1234567890").await;
    assert_eq!((state.as_str(), attempts), ("failed", 1));
    assert!(error.unwrap_or_default().contains("7 days"));
    let (status, _, _, _) = inbox
        .download(Some("alice"), &format!("/api/media/{}", id + 2))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "not stored: nothing to serve"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_from_the_team_is_uploaded_once_by_the_holder_and_sent_as_its_kind() {
    let env = Env::new().await;
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let team = json!([{ "id": "alice" }]);
    let c = core(&env, json!({ "team": team })).await;
    let conversation = handed_off(&env, "777").await;
    let inbox = Inbox::start(&env, team_tokens(&team)).await;

    // A PDF goes as a document with its name and caption, uploaded by the Lease holder.
    let pdf = b"%PDF-1.4 invoice 42".to_vec();
    let (status, body) = inbox
        .send_file(
            "alice",
            conversation,
            "filename=invoice.pdf&caption=Your%20invoice",
            "application/pdf",
            pdf.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    wait_count(
        &env,
        "the document sent",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbound_messages WHERE message->>'type' = 'document'
         AND state IN ('sent', 'delivered', 'read')",
        |n| n == 1,
    )
    .await;
    // A PNG goes as an image; its first send fails (Meta 500) and is retried with the same
    // upload.
    env.cloud.inject([fakes::cloud_api::Fault::code(131000)]);
    let png = vec![0x89, b'P', b'N', b'G', 1, 2, 3];
    let (status, body) = inbox
        .send_file(
            "alice",
            conversation,
            "caption=the%20label",
            "image/png",
            png.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    wait_count(
        &env,
        "both files sent",
        Duration::from_secs(30),
        "SELECT count(*) FROM outbound_messages WHERE message->>'type' IN ('document', 'image')
         AND state IN ('sent', 'delivered', 'read')",
        |n| n == 2,
    )
    .await;
    let uploads = env.cloud.uploads();
    assert_eq!(
        uploads.len(),
        2,
        "each file uploaded once, the retry included"
    );
    assert_eq!(uploads[0].1, "application/pdf");
    assert!(uploads[0].2 == pdf && uploads[1].2 == png, "the bytes sent");
    let sends: Vec<Value> = env
        .cloud
        .sends()
        .into_iter()
        .map(|s| s.body)
        .filter(|b| b["type"] == "document" || b["type"] == "image")
        .collect();
    assert_eq!(sends.len(), 2, "{sends:?}");
    assert_eq!(sends[0]["document"]["id"], uploads[0].0.as_str());
    assert_eq!(sends[0]["document"]["filename"], "invoice.pdf");
    assert_eq!(sends[0]["document"]["caption"], "Your invoice");
    assert_eq!(sends[1]["image"]["id"], uploads[1].0.as_str());
    assert_eq!(sends[1]["image"]["caption"], "the label");
    assert!(sends[1]["image"]["filename"].is_null());
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts FROM outbound_messages WHERE message->>'type' = 'image'",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("attempts");
    assert_eq!(attempts, 2, "the image was retried");
    let t = inbox.transcript("alice", conversation).await;
    assert!(
        t["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .any(|m| m["author"] == "human" && m["text"] == "[document: invoice.pdf]"),
        "{t}"
    );

    // Outside the 24-hour window a file is refused like any free-form message, nothing kept.
    sqlx::query("UPDATE inbound_messages SET received_at = now() - interval '25 hours', provider_timestamp = now() - interval '25 hours'")
        .execute(&env.db.pool)
        .await
        .expect("age the messages");
    let (status, _) = inbox
        .send_file(
            "alice",
            conversation,
            "filename=late.pdf",
            "application/pdf",
            pdf.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(env.count("SELECT count(*) FROM outbound_media").await, 2);
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_past_the_retention_period_are_dropped_and_the_message_stays() {
    let env = Env::new().await;
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let photo_id = env.cloud.add_media(vec![7u8; 1000], "image/jpeg");
    let (_, hook) = env
        .cloud
        .inbound_media("16505550102", "Bo", "image", &photo_id, json!({}));
    env.cloud.deliver(&hook).await.expect("deliver");
    let (state, ..) = media_settled(&env, &photo_id).await;
    assert_eq!(state, "stored");
    // 31 days later (the default retention is 30), a new holder drops the bytes on its first
    // round; a photo fetched yesterday stays.
    sqlx::query("UPDATE media SET fetched_at = now() - interval '31 days'")
        .execute(&env.db.pool)
        .await
        .expect("age");
    let recent_id = env.cloud.add_media(vec![8u8; 1000], "image/jpeg");
    let (_, hook) = env
        .cloud
        .inbound_media("16505550102", "Bo", "image", &recent_id, json!({}));
    env.cloud.deliver(&hook).await.expect("deliver");
    assert_eq!(media_settled(&env, &recent_id).await.0, "stored");
    gw.kill();
    let gw = env.gateway("gw-b", false).await;
    let pool = env.db.pool.clone();
    let id = photo_id.clone();
    common::eventually_async("the old photo expires", Duration::from_secs(30), || {
        let (pool, id) = (pool.clone(), id.clone());
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT state = 'expired' AND content IS NULL FROM media WHERE provider_media_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    assert_eq!(
        media_row(&env, &recent_id).await.map(|r| r.0),
        Some("stored".into())
    );
    assert_eq!(
        env.count("SELECT count(*) FROM inbound_messages WHERE message_type = 'image'")
            .await,
        2,
        "the messages stay"
    );
    gw.kill();
}
