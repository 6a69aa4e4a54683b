//! Payloads crafted to break the webhook path. Property tests run a fixed number of cases over
//! the signature check and the parser (no panics, only the right HMAC passes, only messages
//! with an id and a sender are read); an HTTP test sends hostile bodies to a real gateway on
//! real Postgres: each gets 400 or 413 (or 200 when only a message inside is unreadable, since
//! Meta would otherwise retry it for days), nothing is stored, and the gateway keeps serving.

mod common;

use axum::http::StatusCode;
use common::Env;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};
use worker::gateway::payload::{self, Webhook};
use worker::gateway::signature;

/// Cases per property: enough to find shallow bugs on every CI run, fast on 2 cores.
const CASES: u32 = 2_000;

fn config() -> Config {
    Config {
        cases: CASES,
        // Keep CI from writing regression files into the checkout.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Object keys biased towards the fields the parser reads, so its branches get exercised.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "id", "from", "from_user_id", "type", "text", "body", "interactive", "button_reply",
            "list_reply", "title", "button", "payload", "image", "caption", "timestamp",
            "wa_id", "user_id", "profile", "name", "object", "entry", "changes", "field",
            "value", "metadata", "phone_number_id", "contacts", "messages", "statuses",
        ])
        .prop_map(str::to_string),
        1 => ".{0,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
        prop::sample::select(vec![
            "text",
            "interactive",
            "button",
            "image",
            "messages",
            ""
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A real inbound payload's bytes, as Meta sends them.
fn real_payload() -> Vec<u8> {
    fakes::cloud_api::meta_json_bytes(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550001", "phone_number_id": "1000" },
            "contacts": [{ "profile": { "name": "Zoë" }, "wa_id": "16505551234" }],
            "messages": [{ "from": "16505551234", "id": "wamid.X", "timestamp": "1749416383",
                           "type": "text", "text": { "body": "café ☕" } }]
        }}]}]
    }))
}

/// A message object in the shape Meta sends, with each field present, missing, empty or of the
/// wrong type, so both "read" and "skipped" happen often.
fn message_like() -> impl Strategy<Value = Value> {
    let field = || {
        prop_oneof![
            2 => "[0-9a-zA-Z.]{1,12}".prop_map(Value::String),
            1 => Just(Value::String(String::new())),
            1 => Just(Value::Null),
            1 => any::<i64>().prop_map(|n| json!(n)),
        ]
    };
    (
        prop::option::of(field()),
        prop::option::of(field()),
        prop::option::of(field()),
        prop::sample::select(vec![
            "text",
            "interactive",
            "button",
            "image",
            "sticker",
            "",
        ]),
        prop::option::of(field()),
        json_value(),
    )
        .prop_map(|(id, from, from_user_id, kind, body, extra)| {
            let mut m = json!({ "type": kind, "text": { "body": body }, "extra": extra });
            for (k, v) in [("id", id), ("from", from), ("from_user_id", from_user_id)] {
                if let Some(v) = v {
                    m[k] = v;
                }
            }
            m
        })
}

fn non_empty_str(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

/// The parser against an oracle written from Meta's documentation, not from the parser: with no
/// contacts to fall back on, a message is read exactly when it has an id and a sender, and what
/// is read is what the message says.
fn check_read_or_skipped(raw: &Value) -> Result<(), TestCaseError> {
    let read = payload::interpret(raw, &[]);
    let id = non_empty_str(&raw["id"]);
    let sender = non_empty_str(&raw["from_user_id"]).or(non_empty_str(&raw["from"]));
    match (id, sender, read) {
        (Some(id), Some(sender), Some(m)) => {
            prop_assert_eq!(m.provider_message_id.as_str(), id);
            prop_assert_eq!(m.contact_key.as_str(), sender);
            let kind = raw["type"].as_str().unwrap_or("unknown");
            prop_assert_eq!(m.message_type.as_str(), kind);
            if kind == "text" {
                prop_assert_eq!(m.body.as_deref(), non_empty_str(&raw["text"]["body"]));
                prop_assert!(m.runs_agent, "a text message runs the agent");
            }
            prop_assert!(m.runs_agent <= (kind != "unknown"));
        }
        (Some(_), Some(_), None) => {
            prop_assert!(
                false,
                "a message with an id and a sender was skipped: {}",
                raw
            )
        }
        (_, _, Some(m)) => prop_assert!(false, "read a message without id or sender: {:?}", m),
        (_, _, None) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn only_the_hmac_of_the_exact_body_verifies(
        secret in ".{1,40}",
        body in prop::collection::vec(any::<u8>(), 0..512),
        header in ".{0,80}",
        flip in any::<prop::sample::Index>(),
    ) {
        // The reference signer is the fake's; `hmac_known_answer` pins both to RFC 4231.
        let good = fakes::cloud_api::sign(&secret, &body);
        prop_assert!(signature::verify(&secret, &body, Some(&good)));
        prop_assert!(!signature::verify(&secret, &body, None));
        prop_assert_eq!(signature::verify(&secret, &body, Some(&header)), header.trim() == good);
        if !body.is_empty() {
            let mut altered = body.clone();
            altered[flip.index(body.len())] ^= 0x01;
            prop_assert!(!signature::verify(&secret, &altered, Some(&good)));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        // Random bytes almost never parse: this shows only that parsing does not panic.
        let _ = serde_json::from_slice::<Webhook>(&body);
    }

    #[test]
    fn mutated_real_payloads_never_panic_the_parser(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut body = real_payload();
        for (at, byte, op) in edits {
            let i = at.index(body.len().max(1));
            match op {
                0 if i < body.len() => body[i] = byte,
                1 => body.insert(i.min(body.len()), byte),
                _ if i < body.len() => { body.remove(i); }
                _ => {}
            }
        }
        // Whatever survives the edits: every message in it is read or skipped as the oracle says.
        if let Ok(hook) = serde_json::from_slice::<Webhook>(&body) {
            for change in hook.entry.iter().flat_map(|e| &e.changes) {
                for raw in &change.value.messages {
                    check_read_or_skipped(raw)?;
                }
            }
        }
    }

    #[test]
    fn any_message_is_read_or_skipped_and_never_fails_the_envelope(
        message in prop_oneof![message_like(), json_value()],
    ) {
        let envelope = json!({
            "object": "whatsapp_business_account",
            "entry": [{ "changes": [{ "field": "messages", "value": {
                "metadata": { "phone_number_id": "1000" },
                "messages": [message.clone()],
                "contacts": [],
            }}]}]
        });
        let hook = serde_json::from_value::<Webhook>(envelope);
        prop_assert!(hook.is_ok(), "a message failed the envelope: {:?}", hook.err());
        check_read_or_skipped(&message)?;
    }

    #[test]
    fn arbitrary_contacts_never_panic_the_reader(
        message in message_like(),
        contacts in json_value(),
    ) {
        let envelope = json!({
            "object": "whatsapp_business_account",
            "entry": [{ "changes": [{ "field": "messages", "value": {
                "metadata": { "phone_number_id": "1000" },
                "messages": [message],
                "contacts": contacts,
            }}]}]
        });
        // Contacts of the wrong shape fail the envelope (400); any that parse give every read
        // message an id and someone to answer.
        if let Ok(hook) = serde_json::from_value::<Webhook>(envelope) {
            for change in hook.entry.iter().flat_map(|e| &e.changes) {
                for raw in &change.value.messages {
                    if let Some(m) = payload::interpret(raw, &change.value.contacts) {
                        prop_assert!(!m.provider_message_id.is_empty());
                        prop_assert!(!m.contact_key.is_empty());
                    }
                }
            }
        }
    }
}

/// RFC 4231 test case 2 (HMAC-SHA256, key "Jefe"): an answer neither our verifier nor the fake's
/// signer computed.
#[test]
fn hmac_known_answer() {
    let body = b"what do ya want for nothing?";
    let expected = "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
    assert!(signature::verify("Jefe", body, Some(expected)));
    assert!(!signature::verify(
        "Jefe",
        body,
        Some(&expected.replace("5bdc", "5bdd"))
    ));
    assert!(!signature::verify("jefe", body, Some(expected)));
    assert_eq!(fakes::cloud_api::sign("Jefe", body), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_4xx_store_nothing_and_the_gateway_keeps_serving() {
    let env = Env::new().await;
    let gw = env.gateway("ingress", true).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let post = |body: Vec<u8>| {
        let sig = fakes::cloud_api::sign(env.cloud.app_secret(), &body);
        let cloud = &env.cloud;
        async move { cloud.deliver_raw(body, Some(sig)).await.expect("post") }
    };
    let envelope = |messages: &str| {
        format!(
            r#"{{"object":"whatsapp_business_account","entry":[{{"changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"{}"}},"messages":{messages}}}}}]}}]}}"#,
            env.cloud.phone_number_id()
        )
        .into_bytes()
    };

    // Nesting far past the parser's depth limit, inside a message: 400, no stack overflow.
    let deep = format!("[{}{}]", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(post(envelope(&deep)).await, StatusCode::BAD_REQUEST);
    // Not UTF-8.
    let mut invalid =
        envelope(r#"[{"id":"wamid.A","from":"1","type":"text","text":{"body":"x"}}]"#);
    let at = invalid.len() - 20;
    invalid[at] = 0xff;
    assert_eq!(post(invalid).await, StatusCode::BAD_REQUEST);
    // Duplicate keys in the envelope.
    assert_eq!(
        post(br#"{"object":"whatsapp_business_account","object":"page","entry":[]}"#.to_vec())
            .await,
        StatusCode::BAD_REQUEST
    );
    // Numbers where strings belong, in the envelope.
    assert_eq!(
        post(br#"{"object":5,"entry":[]}"#.to_vec()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(br#"{"object":"whatsapp_business_account","entry":"x"}"#.to_vec()).await,
        StatusCode::BAD_REQUEST
    );
    // Over the size limit, even when well-formed.
    let huge = format!("[{}{{}}]", "{},".repeat(1_200_000));
    assert_eq!(post(envelope(&huge)).await, StatusCode::PAYLOAD_TOO_LARGE);
    // Within the limit: a huge array of unreadable messages is acknowledged and ignored.
    let many = format!("[{}{{}}]", "{},".repeat(900_000));
    assert_eq!(post(envelope(&many)).await, StatusCode::OK);
    // Numbers where strings belong, inside a message: unreadable, ignored.
    assert_eq!(
        post(envelope(
            r#"[{"id":5,"from":16505551234,"type":"text","text":{"body":7}}]"#
        ))
        .await,
        StatusCode::OK
    );
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM contacts").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 0);

    // Still serving: a real message is stored once.
    let (_, payload) = env.cloud.inbound_text("16505551234", "Zoë", "still there?");
    assert_eq!(
        env.cloud.deliver(&payload).await.expect("deliver"),
        StatusCode::OK
    );
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 1);
    gw.kill();
}
