//! Webhook ingress on a real Postgres, driven by the fake Cloud API over HTTP.

mod common;

use axum::http::StatusCode;
use common::Env;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_are_stored_once_and_bad_ones_rejected_with_nothing_stored() {
    let env = Env::new().await;
    let gw = env.ingress().await;

    // A valid signature over Meta's escaped-unicode bytes: stored, one job.
    let (wamid, payload) = env
        .cloud
        .inbound_text("16505551234", "Zoë", "café ☕ مرحبا 👋");
    let raw = fakes::cloud_api::meta_json_bytes(&payload);
    assert!(
        String::from_utf8_lossy(&raw).contains("caf\\u00e9"),
        "the fake escapes non-ASCII like Meta"
    );
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        StatusCode::OK
    );
    let body: String =
        sqlx::query_scalar("SELECT body FROM inbound_messages WHERE provider_message_id = $1")
            .bind(&wamid)
            .fetch_one(&env.db.pool)
            .await
            .expect("stored");
    assert_eq!(body, "café ☕ مرحبا 👋");
    let name: String = sqlx::query_scalar("SELECT display_name FROM contacts")
        .fetch_one(&env.db.pool)
        .await
        .expect("contact");
    assert_eq!(name, "Zoë");

    // Meta redelivers: still one inbound row and one job.
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("redeliver"),
        StatusCode::OK
    );
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);

    // Bad or missing signatures: 401, nothing stored.
    let (_, other) = env.cloud.inbound_text("16505550000", "Eve", "hello");
    let bytes = fakes::cloud_api::meta_json_bytes(&other);
    let wrong = fakes::cloud_api::sign("not-the-app-secret", &bytes);
    assert_eq!(
        env.cloud
            .deliver_raw(bytes.clone(), Some(wrong))
            .await
            .expect("post"),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        env.cloud
            .deliver_raw(bytes.clone(), None)
            .await
            .expect("post"),
        StatusCode::UNAUTHORIZED
    );
    // A body altered after signing fails too (signature is over the exact bytes).
    let good = fakes::cloud_api::sign(env.cloud.app_secret(), &bytes);
    let mut tampered = bytes.clone();
    tampered.push(b' ');
    assert_eq!(
        env.cloud
            .deliver_raw(tampered, Some(good))
            .await
            .expect("post"),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM contacts").await, 1);

    // Malformed JSON with a valid signature: 400.
    let junk = b"{\"object\": \"whatsapp_business_account\", \"entry\": [".to_vec();
    let sig = fakes::cloud_api::sign(env.cloud.app_secret(), &junk);
    assert_eq!(
        env.cloud.deliver_raw(junk, Some(sig)).await.expect("post"),
        StatusCode::BAD_REQUEST
    );

    // Over 3 MB: 413.
    let big = vec![b' '; 3 * 1024 * 1024 + 10];
    let sig = fakes::cloud_api::sign(env.cloud.app_secret(), &big);
    assert_eq!(
        env.cloud.deliver_raw(big, Some(sig)).await.expect("post"),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_types_batches_and_statuses() {
    let env = Env::new().await;
    let gw = env.ingress().await;

    // A batch: two entries, several messages, a button reply, an image (from 2025: too old to
    // answer) and a location (stored only).
    let (_, a) = env.cloud.inbound_text("111", "A", "first");
    let (_, b) = env
        .cloud
        .inbound_button_reply("111", "A", "change-button", "Change");
    let image = json!({"from": "222", "id": env.cloud.next_wamid(), "timestamp": "1749416383", "type": "image",
        "image": {"id": "media1", "mime_type": "image/jpeg", "sha256": "x"}});
    let location = json!({"from": "222", "id": env.cloud.next_wamid(), "type": "location", "location": {"latitude": 1.5, "longitude": 2.5}});
    let media = env.cloud.inbound_message("222", "B", json!(null));
    let mut batch = a.clone();
    batch["entry"][0]["changes"][0]["value"]["messages"]
        .as_array_mut()
        .expect("messages")
        .push(b["entry"][0]["changes"][0]["value"]["messages"][0].clone());
    let mut second = media["entry"][0].clone();
    second["changes"][0]["value"]["messages"] = json!([image, location]);
    batch["entry"].as_array_mut().expect("entries").push(second);
    assert_eq!(
        env.cloud.deliver(&batch).await.expect("deliver"),
        StatusCode::OK
    );
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 4);
    assert_eq!(
        env.count("SELECT count(*) FROM inbound_messages WHERE runs_agent")
            .await,
        2
    );
    // Both runnable messages of contact 111 are jobs of one conversation: one pending, one waiting.
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'pending'")
            .await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'waiting'")
            .await,
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM conversations").await, 2);
    // The image's bytes are not fetched in the webhook's path: its media row waits for the
    // number's Lease holder (this ingress holds none).
    assert_eq!(
        env.count(
            "SELECT count(*) FROM media WHERE provider_media_id = 'media1' AND kind = 'image'
             AND mime_type = 'image/jpeg' AND state = 'pending' AND content IS NULL"
        )
        .await,
        1
    );

    // A status for an unknown message and a non-messages field are acknowledged with 200.
    let status = env.cloud.status("wamid.unknown", "delivered", "111", None);
    assert_eq!(
        env.cloud.deliver(&status).await.expect("deliver"),
        StatusCode::OK
    );
    let other_field = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "account_update", "value": {}}]}]});
    assert_eq!(
        env.cloud.deliver(&other_field).await.expect("deliver"),
        StatusCode::OK
    );

    // An old backlog message is stored but not run.
    let old = json!({"from": "333", "id": env.cloud.next_wamid(), "timestamp": "1000", "type": "text", "text": {"body": "from 1970"}});
    assert_eq!(
        env.cloud
            .deliver(&env.cloud.inbound_message("333", "C", old))
            .await
            .expect("deliver"),
        StatusCode::OK
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM inbound_messages WHERE NOT runs_agent AND message_type = 'text'"
        )
        .await,
        1
    );
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_handshake_echoes_the_challenge_only_for_the_right_token() {
    let env = Env::new().await;
    let gw = env.gateway("ingress", true).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/webhook", gw.addr);
    let ok = http
        .get(format!(
            "{url}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=verify-me"
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.text().await.expect("body"), "1158201444");
    let bad = http
        .get(format!(
            "{url}?hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong"
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status().as_u16(), 403);
    let no_mode = http
        .get(format!("{url}?hub.challenge=1&hub.verify_token=verify-me"))
        .send()
        .await
        .expect("get");
    assert_eq!(no_mode.status().as_u16(), 403);
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_nul_characters_is_stored_with_them_replaced_not_refused_forever() {
    // Postgres text and jsonb cannot hold U+0000. Refusing the webhook would have Meta deliver
    // it again for days; the message is stored with U+FFFD in their place instead.
    let env = Env::new().await;
    let gw = env.ingress().await;
    let (wamid, payload) = env
        .cloud
        .inbound_text("16505550000", "Nul\u{0}Name", "hi\u{0}there");
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        StatusCode::OK
    );
    let (body, raw, name): (String, String, String) = sqlx::query_as(
        "SELECT i.body, i.payload->'text'->>'body', ct.display_name FROM inbound_messages i
         JOIN conversations c ON c.id = i.conversation_id JOIN contacts ct ON ct.id = c.contact_id
         WHERE i.provider_message_id = $1",
    )
    .bind(&wamid)
    .fetch_one(&env.db.pool)
    .await
    .expect("stored");
    assert_eq!(body, "hi\u{FFFD}there");
    assert_eq!(raw, "hi\u{FFFD}there");
    assert_eq!(name, "Nul\u{FFFD}Name");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.db.pool)
        .await
        .expect("jobs");
    assert_eq!(jobs, 1, "the agent answers it like any other message");
    gw.kill();
}
