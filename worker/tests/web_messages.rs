//! WhatsApp Web messages end to end through the real client on both sides: a contact (a second
//! whatsapp-rust client with its own Signal state, linked through the stand-in) writes to the
//! gateway's number; the gateway decrypts with the Signal state it keeps in Postgres, the agent
//! answers, the reply is encrypted by the gateway and decrypted by the contact. The stand-in only
//! relays `<enc>` nodes: nothing here passes unless both ends' encryption works.

mod common;

use std::time::Duration;

use common::{Env, HolderAndStandby, WEB_PHONE, core, wait_count, wait_web_session, web_gateway};
use fakes::whatsapp_web::contact::{Contact, ContactFile};
use fakes::whatsapp_web::{Relayed, WebServer};
use serde_json::json;

const CONTACT: &str = "5511999990042";
const LONG: Duration = Duration::from_secs(30);

/// A stand-in with the gateway's number linked and connected; returns the gateway's device JID.
async fn linked_gateway(
    env: &Env,
    server: &WebServer,
    identity: &str,
) -> (worker::web::gateway::RunningWebGateway, String) {
    let gateway = web_gateway(env, identity, server.url()).await;
    let row = wait_web_session(env, "a QR code", LONG, |s| s.qr_code.is_some()).await;
    let jid = server
        .link(&row.qr_code.expect("qr"))
        .expect("the phone links the gateway");
    wait_web_session(env, "connected", LONG, |s| s.state == "connected").await;
    (gateway, jid)
}

async fn outbound_state(env: &Env) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT state, provider_message_id FROM outbound_messages ORDER BY id")
        .fetch_all(&env.db.pool)
        .await
        .expect("outbound rows")
}

#[tokio::test]
async fn a_contact_writes_first_and_reads_the_agents_reply() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let env = Env::new().await;
    let server = WebServer::start(WEB_PHONE).await.expect("stand-in");
    let (_gateway, gateway_jid) = linked_gateway(&env, &server, "web-0").await;
    let contact = Contact::link(&server, CONTACT).await.expect("contact");
    let _core = core(&env, json!({})).await;

    let asked = contact
        .send_text(WEB_PHONE, "what are your opening hours?")
        .await
        .expect("contact sends");
    // The first message of a new session carries the pre-key (pkmsg).
    common::eventually("the stand-in to relay a pkmsg", LONG, || {
        server
            .relayed()
            .iter()
            .any(|r| r.id == asked && r.to == gateway_jid && r.enc_type == "pkmsg")
    })
    .await;

    wait_count(
        &env,
        "the decrypted message stored once",
        LONG,
        "SELECT count(*) FROM inbound_messages WHERE body = 'what are your opening hours?'",
        |n| n == 1,
    )
    .await;
    let replies = contact.wait_messages(1, LONG).await.expect("the reply");
    let (body,): (String,) =
        sqlx::query_as("SELECT message->'text'->>'body' FROM outbound_messages")
            .fetch_one(&env.db.pool)
            .await
            .expect("outbound row");
    assert_eq!(
        replies[0].text, body,
        "the contact decrypted the exact text"
    );
    assert!(body.contains("open Monday to Friday"), "{body}");
    assert_eq!(replies[0].from, gateway_jid);
    assert!(contact.undecryptable().is_empty());
    // The gateway is online like a phone in use: the contact sees its message delivered.
    let receipts = server.receipts();
    assert!(
        receipts
            .iter()
            .any(|r| r.id == asked && r.from == gateway_jid && r.kind == "delivery"),
        "{receipts:?}"
    );

    // Delivery then read receipts from the contact move the row.
    wait_count(
        &env,
        "the reply delivered",
        LONG,
        "SELECT count(*) FROM outbound_messages WHERE state IN ('delivered', 'read')",
        |n| n == 1,
    )
    .await;
    contact
        .mark_read(WEB_PHONE, &[replies[0].id.as_str()])
        .await
        .expect("read");
    wait_count(
        &env,
        "the reply read",
        LONG,
        "SELECT count(*) FROM outbound_messages WHERE state = 'read'",
        |n| n == 1,
    )
    .await;
    let rows = outbound_state(&env).await;
    assert_eq!(rows.len(), 1, "one reply: {rows:?}");
    assert_eq!(rows[0].1.as_deref(), Some(replies[0].id.as_str()));
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 1);
}

/// The reply texts the contact decrypted from the gateway, and the `<enc>` types the gateway
/// sent it, in order.
fn gateway_to_contact(server: &WebServer, gateway: &str, contact: &str) -> Vec<Relayed> {
    server
        .relayed()
        .into_iter()
        .filter(|r| r.from == gateway && r.to == contact)
        .collect()
}

/// Wait until every reply is recorded as sent (or beyond): a holder stopped between writing a
/// reply to its socket and recording it leaves the row in doubt, and the next holder sends it
/// again with the same id after the in-doubt grace (`web_pipeline.rs` tests that path).
async fn replies_recorded(env: &Env) {
    wait_count(
        env,
        "every reply recorded as sent",
        LONG,
        "SELECT count(*) FROM outbound_messages WHERE state NOT IN ('sent', 'delivered', 'read')",
        |n| n == 0,
    )
    .await;
}

/// The contact read every message once, and nobody (contact or gateway) asked for a resend.
fn read_once_without_a_resend(server: &WebServer, contact: &Contact) {
    assert!(
        server.receipts().iter().all(|r| r.kind != "retry"),
        "nobody asked for a resend: {:?}",
        server.receipts()
    );
    assert!(
        contact.undecryptable().is_empty(),
        "{:?}",
        contact.undecryptable()
    );
    assert!(
        contact.duplicates().is_empty(),
        "{:?}",
        contact.duplicates()
    );
}

/// What the process tests start from: the stand-in, `web-a` holding and `web-b` standing by
/// (real processes), a linked contact, a core worker.
struct ProcessScene {
    env: Env,
    server: WebServer,
    gateways: HolderAndStandby,
    contact: Contact,
    core: worker::core::RunningCore,
}

impl ProcessScene {
    /// `configure` sets the stand-in up before any device connects.
    async fn start(configure: impl FnOnce(&WebServer)) -> Self {
        Self::start_with(configure, &[]).await
    }

    /// [`start`](Self::start) with more environment for the gateways.
    async fn start_with(configure: impl FnOnce(&WebServer), extra: &[(&str, &str)]) -> Self {
        let env = Env::new().await;
        let server = WebServer::start(WEB_PHONE).await.expect("stand-in");
        configure(&server);
        let gateways = HolderAndStandby::start_with(&env, &server, extra).await;
        let contact = Contact::link(&server, CONTACT).await.expect("contact");
        let core = core(&env, json!({})).await;
        Self {
            env,
            server,
            gateways,
            contact,
            core,
        }
    }
}

#[tokio::test]
async fn the_conversation_survives_a_sigkilled_holder_without_a_new_session() {
    let ProcessScene {
        env,
        server,
        mut gateways,
        contact,
        core: _core,
    } = ProcessScene::start(|_| {}).await;
    let gateway_jid = gateways.gateway_jid.clone();

    // Two rounds under the first holder: the session is set up (pkmsg) and in use (msg).
    for round in 1..=2 {
        contact
            .send_text(WEB_PHONE, "what are your opening hours?")
            .await
            .expect("send");
        contact.wait_messages(round, LONG).await.expect("reply");
    }
    let before = server.relayed().len();
    common::eventually("web-a to ack what it stored", LONG, || {
        server.unacked(&gateway_jid) == 0
    })
    .await;
    replies_recorded(&env).await;

    gateways.kill_holder(&server, 1).await;
    // The contact writes while nobody holds the number: the server keeps it for the device.
    let asked = contact
        .send_text(WEB_PHONE, "what are your opening hours?")
        .await
        .expect("send during the takeover");
    gateways.standby_connected(&env).await;
    let replies = contact
        .wait_messages(3, LONG)
        .await
        .expect("the third reply");
    assert!(
        server.redelivered() >= 1,
        "the message waited on the server for the new holder"
    );

    // Answered once, by the new holder, in the same session.
    wait_count(
        &env,
        "three inbound messages",
        LONG,
        "SELECT count(*) FROM inbound_messages",
        |n| n == 3,
    )
    .await;
    let sent = gateway_to_contact(&server, &gateway_jid, &contact.jid);
    assert_eq!(sent.len(), 3, "one reply per message, none twice: {sent:?}");
    let ids: std::collections::BTreeSet<&str> = sent.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{sent:?}");
    assert!(
        sent.iter().all(|r| r.enc_type == "msg"),
        "the gateway never started a new session: {sent:?}"
    );
    let after_kill: Vec<Relayed> = server.relayed()[before..].to_vec();
    assert!(
        after_kill
            .iter()
            .any(|r| r.id == asked && r.enc_type == "msg" && r.to == gateway_jid),
        "the contact kept its session: {after_kill:?}"
    );
    read_once_without_a_resend(&server, &contact);
    assert_eq!(
        server.unacked(&gateway_jid),
        0,
        "web-b acked what it stored"
    );
    assert_eq!(replies.len(), 3);
    assert_eq!(
        server.pair_requests(),
        2,
        "the gateway and the contact paired once each"
    );
    assert!(
        server
            .receipts()
            .iter()
            .all(|r| !(r.from == gateway_jid && r.kind == "read")),
        "no blue ticks unless readReceipts is set"
    );
    assert_eq!(server.peak_per_device(), 1);
}

#[tokio::test]
async fn retry_receipts_both_ways_end_in_one_message_and_one_reply() {
    let env = Env::new().await;
    let server = WebServer::start(WEB_PHONE).await.expect("stand-in");
    let (_gateway, gateway_jid) = linked_gateway(&env, &server, "web-0").await;
    let contact = Contact::link(&server, CONTACT).await.expect("contact");
    let _core = core(&env, json!({})).await;
    let ask = || contact.send_text(WEB_PHONE, "what are your opening hours?");
    ask().await.expect("send");
    contact.wait_messages(1, LONG).await.expect("first reply");

    // Theirs: the gateway cannot decrypt the contact's next message and asks for it again.
    server.corrupt_next(&contact.jid, &gateway_jid);
    let theirs = ask().await.expect("send");
    contact.wait_messages(2, LONG).await.expect("second reply");
    assert!(
        server
            .receipts()
            .iter()
            .any(|r| r.id == theirs && r.kind == "retry" && r.from == gateway_jid),
        "the gateway asked for a resend: {:?}",
        server.receipts()
    );
    assert!(
        server
            .relayed()
            .iter()
            .any(|r| r.id == theirs && r.retry_count >= 1),
        "the contact resent it"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM inbound_messages").await,
        2,
        "stored once"
    );

    // Ours: the contact cannot decrypt the gateway's next reply and asks for it again.
    server.corrupt_next(&gateway_jid, &contact.jid);
    ask().await.expect("send");
    let replies = contact.wait_messages(3, LONG).await.expect("third reply");
    let ours = replies[2].id.clone();
    assert_eq!(
        contact.undecryptable(),
        vec![ours.clone()],
        "the damaged reply was not readable"
    );
    assert!(
        server
            .receipts()
            .iter()
            .any(|r| r.id == ours && r.kind == "retry" && r.from == contact.jid),
        "the contact asked for a resend"
    );
    let sends: Vec<Relayed> = gateway_to_contact(&server, &gateway_jid, &contact.jid)
        .into_iter()
        .filter(|r| r.id == ours)
        .collect();
    assert_eq!(sends.len(), 2, "sent, then resent once: {sends:?}");
    assert!(sends[1].retry_count >= 1);

    // One row and one readable message per reply.
    wait_count(
        &env,
        "three replies",
        LONG,
        "SELECT count(*) FROM outbound_messages",
        |n| n == 3,
    )
    .await;
    let ids: std::collections::BTreeSet<String> =
        contact.messages().into_iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 3, "{:?}", contact.messages());
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 3);
}

#[tokio::test]
async fn a_reply_the_contact_could_not_read_is_resent_by_the_next_holder() {
    let ProcessScene {
        env,
        server,
        mut gateways,
        contact,
        core: _core,
    } = ProcessScene::start(|_| {}).await;
    let gateway_jid = gateways.gateway_jid.clone();
    let ask = || contact.send_text(WEB_PHONE, "what are your opening hours?");
    ask().await.expect("send");
    contact.wait_messages(1, LONG).await.expect("first reply");

    // The contact's phone is out of coverage; web-a's next reply reaches the server damaged.
    server.hold(&contact.jid);
    server.corrupt_next(&gateway_jid, &contact.jid);
    ask().await.expect("send");
    common::eventually("web-a's second reply at the server", LONG, || {
        gateway_to_contact(&server, &gateway_jid, &contact.jid).len() == 2
    })
    .await;
    let reply = gateway_to_contact(&server, &gateway_jid, &contact.jid)[1]
        .id
        .clone();
    replies_recorded(&env).await;
    gateways.kill_holder(&server, 1).await;

    // Back in coverage: the contact cannot read it and asks for it again; nobody holds the
    // number, so the request waits for web-b, which must resend it from Postgres.
    server.release(&contact.jid);
    common::eventually("the contact's retry receipt", LONG, || {
        server
            .receipts()
            .iter()
            .any(|r| r.id == reply && r.kind == "retry" && r.from == contact.jid)
    })
    .await;
    gateways.standby_connected(&env).await;
    let replies = contact
        .wait_messages(2, LONG)
        .await
        .expect("the resent reply");
    assert_eq!(replies[1].id, reply, "the same message, not a new reply");
    assert_eq!(contact.undecryptable(), vec![reply.clone()]);
    let sends = gateway_to_contact(&server, &gateway_jid, &contact.jid);
    assert_eq!(sends.len(), 3, "two replies, one resent: {sends:?}");
    assert_eq!(sends[2].id, reply);
    assert!(sends[2].retry_count >= 1);
    assert_eq!(env.count("SELECT count(*) FROM outbound_messages").await, 2);
    let (body,): (String,) = sqlx::query_as(
        "SELECT message->'text'->>'body' FROM outbound_messages WHERE provider_message_id = $1",
    )
    .bind(&reply)
    .fetch_one(&env.db.pool)
    .await
    .expect("the reply's row");
    assert_eq!(replies[1].text, body);
}

fn signal(process: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &process.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal}");
}

#[tokio::test]
async fn a_paused_holder_woken_after_its_lease_closes_its_socket_and_sends_nothing() {
    // The server does not kick the paused session: the woken holder must let go by itself.
    let ProcessScene {
        env,
        server,
        gateways,
        contact,
        core: _core,
    } = ProcessScene::start(WebServer::keep_replaced_sessions).await;
    let gateway_jid = gateways.gateway_jid.clone();
    let ask = || contact.send_text(WEB_PHONE, "what are your opening hours?");
    ask().await.expect("send");
    contact.wait_messages(1, LONG).await.expect("first reply");
    let logins_before = server.handshakes().len();
    replies_recorded(&env).await;

    // The holder freezes with its socket open (a stop-the-world pause, a stuck node).
    signal(&gateways.first.child, "-STOP");
    gateways.standby_connected(&env).await;
    assert_eq!(
        server.peak_per_device(),
        2,
        "the paused holder's session was still open when the standby logged in"
    );
    let takeover = server.handshakes();
    assert_eq!(takeover.len(), logins_before + 1, "{takeover:?}");
    let standby_conn = takeover[logins_before].conn;
    ask().await.expect("send");
    contact.wait_messages(2, LONG).await.expect("second reply");

    // It wakes up long after its Lease ran out, its socket still open and logged in: it must
    // close it, not send, not log in again.
    signal(&gateways.first.child, "-CONT");
    common::eventually("web-a to close its socket", LONG, || {
        server.online() == 2 // web-b and the contact
    })
    .await;
    ask().await.expect("send");
    let replies = contact.wait_messages(3, LONG).await.expect("third reply");

    assert_eq!(
        server.handshakes().len(),
        logins_before + 1,
        "the woken holder logged in again: {:?}",
        server.handshakes()
    );
    let after: Vec<Relayed> = gateway_to_contact(&server, &gateway_jid, &contact.jid)
        .into_iter()
        .skip(1)
        .collect();
    assert_eq!(after.len(), 2, "one reply per message: {after:?}");
    assert!(
        after
            .iter()
            .all(|r| r.conn == standby_conn && r.enc_type == "msg"),
        "only the standby sent, in the same session: {after:?}"
    );
    let ids: std::collections::BTreeSet<&str> = replies.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        3,
        "three replies: {replies:?}\nrelayed {:?}\nreceipts {:?}",
        server.relayed(),
        server.receipts()
    );
    read_once_without_a_resend(&server, &contact);
    assert_eq!(env.count("SELECT count(*) FROM outbound_messages").await, 3);
}

/// A media row of the test's account: state, attempts, size, type, bytes, error.
type MediaRow = (
    String,
    i32,
    Option<i64>,
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
);

async fn media_rows(env: &Env) -> Vec<MediaRow> {
    sqlx::query_as(
        "SELECT state, attempts, size_bytes, mime_type, content, last_error FROM media ORDER BY id",
    )
    .fetch_all(&env.db.pool)
    .await
    .expect("media rows")
}

#[tokio::test]
async fn files_go_both_ways_through_whatsapps_media_servers_encrypted() {
    // A 150 kB limit: the photo fits, the scan does not. Blue ticks on.
    let ProcessScene {
        env,
        server,
        gateways,
        contact,
        core: _core,
    } = ProcessScene::start_with(
        |_| {},
        &[
            ("WA_MEDIA_MAX_BYTES", "150000"),
            ("WA_WEB_READ_RECEIPTS", "true"),
        ],
    )
    .await;
    let photo: Vec<u8> = (0..90_000u32).map(|i| (i * 31 % 253) as u8).collect();

    // The media host hiccups on the gateway's first download: the fetch is retried.
    server.media().fail_downloads(1);
    let sent_photo = contact
        .send_file(
            WEB_PHONE,
            ContactFile::Image {
                bytes: photo.clone(),
                mime_type: "image/png",
                caption: Some("the hinge broke"),
            },
        )
        .await
        .expect("the contact sends a photo");
    wait_count(
        &env,
        "the photo stored",
        LONG,
        "SELECT count(*) FROM media WHERE state = 'stored'",
        |n| n == 1,
    )
    .await;
    let rows = media_rows(&env).await;
    let (state, attempts, size, mime, content, _) = &rows[0];
    assert_eq!(state, "stored");
    assert_eq!(
        *attempts, 2,
        "the first download got the 500, the second the file"
    );
    assert_eq!(server.media().downloads(), 1);
    assert_eq!(
        content.as_deref(),
        Some(photo.as_slice()),
        "decrypted byte for byte"
    );
    assert_eq!(*size, Some(photo.len() as i64));
    assert_eq!(mime.as_deref(), Some("image/png"));
    // The agent read what the photo said, and answered.
    let (body,): (Option<String>,) =
        sqlx::query_as("SELECT body FROM inbound_messages WHERE message_type = 'image'")
            .fetch_one(&env.db.pool)
            .await
            .expect("inbound photo");
    assert_eq!(body.as_deref(), Some("[image: the hinge broke]"));
    contact
        .wait_messages(1, LONG)
        .await
        .expect("the agent's reply");
    // `readReceipts`: the customer sees the photo read.
    common::eventually("the gateway's read receipt", LONG, || {
        server
            .receipts()
            .iter()
            .any(|r| r.id == sent_photo && r.kind == "read" && r.from == gateways.gateway_jid)
    })
    .await;

    // A file over the number's limit is marked, not downloaded.
    contact
        .send_file(
            WEB_PHONE,
            ContactFile::Document {
                bytes: vec![7u8; 200_000],
                mime_type: "application/pdf",
                file_name: "scan.pdf",
            },
        )
        .await
        .expect("the contact sends a scan");
    wait_count(
        &env,
        "the scan marked too large",
        LONG,
        "SELECT count(*) FROM media WHERE state = 'too_large' AND content IS NULL",
        |n| n == 1,
    )
    .await;
    assert_eq!(server.media().downloads(), 1, "the scan was not fetched");

    // A team member answers with a file: encrypted and uploaded by the holder, then sent; the
    // contact downloads and decrypts it.
    let conversation: i64 = sqlx::query_scalar("SELECT id FROM conversations")
        .fetch_one(&env.db.pool)
        .await
        .expect("conversation");
    let invoice = b"%PDF-1.4 invoice 2026-0042".repeat(500);
    let alice = worker::core::inbox::auth::Member {
        id: "alice".into(),
        name: None,
    };
    worker::core::inbox::store::send_file(
        &env.db.pool,
        common::POOL,
        &alice,
        conversation,
        worker::core::inbox::store::Attachment {
            bytes: invoice.clone(),
            mime_type: "application/pdf".into(),
            filename: Some("invoice.pdf".into()),
            caption: None,
        },
    )
    .await
    .expect("the file is queued");
    // Two agent replies (the photo, the scan) and the file.
    let got = contact.wait_messages(3, LONG).await.expect("the file");
    let file = got
        .iter()
        .find(|m| m.kind == "document")
        .unwrap_or_else(|| panic!("no document among {got:?}"));
    assert_eq!(file.text, "invoice.pdf");
    assert_eq!(contact.download(&file.id).await.expect("download"), invoice);
    let uploads = server.media().uploads();
    assert!(
        uploads
            .iter()
            .any(|u| u.kind == "document" && u.size > invoice.len()),
        "the holder uploaded it encrypted: {uploads:?}"
    );
    wait_count(
        &env,
        "the file recorded as sent",
        LONG,
        "SELECT count(*) FROM outbound_messages WHERE message->>'type' = 'document'
           AND state IN ('sent', 'delivered', 'read') AND provider_message_id IS NOT NULL",
        |n| n == 1,
    )
    .await;
    read_once_without_a_resend(&server, &contact);
}

#[tokio::test]
async fn a_group_conversation_survives_a_sigkilled_holder_on_the_sender_keys_in_postgres() {
    let ProcessScene {
        env,
        server,
        mut gateways,
        contact,
        core: _core,
    } = ProcessScene::start_with(|_| {}, &[("WA_ANSWER_GROUPS", "true")]).await;
    let gateway_jid = gateways.gateway_jid.clone();
    let group = server.create_group("Hinge repairs", &[CONTACT, WEB_PHONE]);
    let ask = || contact.send_group_text(&group, "what are your opening hours?");

    // Two rounds under the first holder: each side's sender key goes to the other once.
    for round in 1..=2 {
        ask().await.expect("send");
        let replies = contact.wait_messages(round, LONG).await.expect("reply");
        let reply = &replies[round - 1];
        assert_eq!(
            (reply.chat.as_str(), reply.from.as_str()),
            (group.as_str(), gateway_jid.as_str())
        );
        assert!(reply.text.contains("open Monday to Friday"), "{reply:?}");
    }
    common::eventually("web-a to ack what it stored", LONG, || {
        server.unacked(&gateway_jid) == 0
    })
    .await;
    replies_recorded(&env).await;
    gateways.kill_holder(&server, 1).await;

    // The contact's third message comes under its sender key alone (the gateway's device has
    // had it since the first): only the sender key web-a stored in Postgres decrypts it.
    let third = ask().await.expect("send during the takeover");
    gateways.standby_connected(&env).await;
    let replies = contact
        .wait_messages(3, LONG)
        .await
        .expect("the third reply");
    let to_gateway: Vec<String> = server
        .relayed()
        .into_iter()
        .filter(|r| r.id == third && r.to == gateway_jid)
        .map(|r| r.enc_type)
        .collect();
    assert_eq!(
        to_gateway,
        ["skmsg"],
        "the dangerous moment: no sender key came along"
    );
    assert_eq!(replies[2].chat, group);

    wait_count(
        &env,
        "three group messages stored once each",
        LONG,
        "SELECT count(*) FROM inbound_messages WHERE payload->>'group' IS NOT NULL",
        |n| n == 3,
    )
    .await;
    let (participant,): (Option<String>,) = sqlx::query_as(
        "SELECT payload->'participant'->>'phone' FROM inbound_messages ORDER BY id LIMIT 1",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("participant");
    assert_eq!(participant.as_deref(), Some(CONTACT));
    read_once_without_a_resend(&server, &contact);
    let rows = outbound_state(&env).await;
    assert_eq!(rows.len(), 3, "one reply per message: {rows:?}");
}
