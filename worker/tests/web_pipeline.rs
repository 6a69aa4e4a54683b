//! WhatsApp Web messages through the same pipeline as Cloud API ones, on real Postgres: a
//! decrypted message event becomes one inbound row and one agent turn (and a redelivery changes
//! nothing); the reply becomes one send call on the socket's client, under the fencing epoch;
//! receipts move the outbound row forward.
//!
//! The client is reached through `WebMessenger`, here a recording one: what is tested is the
//! adapter between the socket and our tables (the socket's protocol belongs to whatsapp-rust).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Env, POOL, core, routing, wait_count};
use lease::{Elector, Fence, Leadership};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use whatsapp_rust::Jid;
use whatsapp_rust::prelude::{InboundMessage, MessageBuilderExt, MessageInfo, wa};
use whatsapp_rust::types::events::Receipt;
use whatsapp_rust::types::presence::ReceiptType;
use worker::gateway::cloud_api::SendError;
use worker::gateway::ingest::Ingested;
use worker::gateway::sender::{Pacing, Sender, SenderConfig};
use worker::metrics::Metrics;
use worker::web::inbound::{WebInbound, interpret};
use worker::web::outbound::{WebDelivery, WebMessenger, apply_receipt, recipient_jid};

const WEB_ACCOUNT: &str = "default/sales-line";

fn message(chat: &str, id: &str, body: wa::Message) -> InboundMessage {
    let jid: Jid = chat.parse().expect("jid");
    let mut info = MessageInfo::default();
    info.source.chat = jid.clone();
    info.source.sender = jid;
    info.id = id.into();
    info.push_name = "Marta".into();
    info.timestamp = chrono::Utc::now();
    InboundMessage::builder()
        .message(Arc::new(body))
        .info(Arc::new(info))
        .build()
}

fn text(chat: &str, id: &str, body: &str) -> InboundMessage {
    message(chat, id, wa::Message::text(body))
}

/// One call the sender made on the client.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    to: Jid,
    text: String,
    message_id: String,
}

/// A client that records sends; the first `fail_first` sends end in doubt (the socket broke
/// after writing).
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    fail_first: Arc<Mutex<usize>>,
    ids: Arc<Mutex<u64>>,
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }
}

impl WebMessenger for Recorder {
    fn new_message_id(&self) -> String {
        let mut n = self.ids.lock().expect("ids");
        *n += 1;
        format!("3EB0TEST{:014X}", *n)
    }

    async fn composing(&self, _to: &Jid) {}

    async fn send_text(&self, to: Jid, text: &str, message_id: &str) -> Result<String, SendError> {
        self.calls.lock().expect("calls").push(Call {
            to,
            text: text.into(),
            message_id: message_id.into(),
        });
        let mut fail = self.fail_first.lock().expect("fail");
        if *fail > 0 {
            *fail -= 1;
            return Err(SendError::InDoubt {
                message: "socket closed after write".into(),
            });
        }
        Ok(message_id.into())
    }

    async fn send_file(
        &self,
        to: Jid,
        file: worker::web::outbound::OutboundFile,
        message_id: &str,
    ) -> Result<String, SendError> {
        let text = format!("[{}: {} bytes]", file.kind, file.bytes.len());
        self.send_text(to, &text, message_id).await
    }
}

async fn setup() -> (Env, WebInbound) {
    let env = Env::new().await;
    queue::fence::upsert_account(
        &env.db.pool,
        WEB_ACCOUNT,
        "web:+5511987650001",
        POOL,
        "A human will reply soon.",
        &[],
    )
    .await
    .expect("account row");
    let (metrics, _) = Metrics::new();
    let inbound = WebInbound::new(
        env.db.pool.clone(),
        routing().ingest_target(WEB_ACCOUNT),
        metrics,
    );
    (env, inbound)
}

/// A held Lease for the web account (real election against the fake API server).
async fn hold_lease(env: &Env) -> (Arc<Leadership>, CancellationToken, i64) {
    let mut settings = env.lease("web-gw-a", 15, 10, 1);
    settings.duty = lease::Duty::Connect;
    settings.name = "whatsapp-sales-line".into();
    let leadership = Arc::new(Leadership::new(settings.renew_deadline));
    let (metrics, _) = Metrics::new();
    let elector = Arc::new(Elector::new(
        env.kube_client(),
        settings,
        Fence::Postgres {
            pool: env.db.pool.clone(),
            account: WEB_ACCOUNT.into(),
        },
        leadership.clone(),
        metrics.lease_gauges(),
    ));
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move { elector.run(c).await });
    let l = leadership.clone();
    common::eventually("the Lease", Duration::from_secs(10), || {
        l.may_act().is_some()
    })
    .await;
    let epoch = leadership.may_act().expect("epoch");
    (leadership, cancel, epoch)
}

fn sender(
    env: &Env,
    leadership: Arc<Leadership>,
    recorder: Recorder,
    epoch: i64,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let (metrics, _) = Metrics::new();
    let sender = Sender::new(
        env.db.pool.clone(),
        SenderConfig {
            account: WEB_ACCOUNT.into(),
            identity: "web-gw-a".into(),
            pacing: Pacing::whatsapp_web(600, 600),
            backoff: Duration::from_secs(1),
            in_doubt_grace: Duration::from_secs(1),
            concurrency: 4,
            poll_interval: Duration::from_millis(100),
        },
        WebDelivery::new(env.db.pool.clone(), recorder, Duration::ZERO, epoch),
        leadership,
        Arc::new(tokio::sync::Notify::new()),
        metrics,
    );
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    (tokio::spawn(async move { sender.run(c).await }), cancel)
}

/// The core answers the one message stored, and the Lease holder's sender sends the reply
/// through `recorder`.
struct Answered {
    core: worker::core::RunningCore,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    elector_stop: CancellationToken,
}

impl Answered {
    async fn start(env: &Env, recorder: &Recorder) -> Self {
        let core = core(env, json!({})).await;
        wait_count(
            env,
            "the agent's reply",
            Duration::from_secs(20),
            "SELECT count(*) FROM outbound_messages",
            |n| n == 1,
        )
        .await;
        let (leadership, elector_stop, epoch) = hold_lease(env).await;
        let (task, stop) = sender(env, leadership, recorder.clone(), epoch);
        wait_count(
            env,
            "the reply to be sent",
            Duration::from_secs(10),
            "SELECT count(*) FROM outbound_messages WHERE state = 'sent'",
            |n| n == 1,
        )
        .await;
        Self {
            core,
            task,
            stop,
            elector_stop,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the sender task ended without a panic");
        self.elector_stop.cancel();
        self.core.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_message_is_one_inbound_row_one_turn_one_send_and_receipts_settle_it() {
    let (env, inbound) = setup().await;
    let hi = text(
        "5511999990001@s.whatsapp.net",
        "3EB0C0FFEE01",
        "hello, what are your hours?",
    );
    assert_eq!(
        inbound
            .commit(std::slice::from_ref(&hi))
            .await
            .expect("commit"),
        vec![Ingested::Queued]
    );
    // The server redelivers what it has not seen acknowledged: nothing changes.
    assert_eq!(
        inbound
            .commit(std::slice::from_ref(&hi))
            .await
            .expect("commit again"),
        vec![Ingested::Duplicate]
    );
    assert_eq!(env.count("SELECT count(*) FROM inbound_messages").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);
    let (key, phone, name): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT contact_key, wa_id, display_name FROM contacts WHERE account_id = 'default/sales-line'",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("contact");
    assert_eq!(
        (key.as_str(), phone.as_deref(), name.as_deref()),
        ("5511999990001", Some("5511999990001"), Some("Marta"))
    );

    // The same core worker answers it (rules agent, no model).
    let recorder = Recorder::default();
    let answered = Answered::start(&env, &recorder).await;
    let calls = recorder.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (body, provider_id): (String, Option<String>) = sqlx::query_as(
        "SELECT message->'text'->>'body', provider_message_id FROM outbound_messages",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("row");
    assert_eq!(calls[0].to, Jid::pn("5511999990001"));
    assert_eq!(calls[0].text, body);
    assert!(body.contains("open Monday to Friday"), "{body}");
    assert_eq!(provider_id.as_deref(), Some(calls[0].message_id.as_str()));

    // Receipts from the customer's phone move the row forward, never back.
    let receipt = |kind: ReceiptType| {
        let mut source = hi.info.source.clone();
        source.is_from_me = false;
        Receipt::builder()
            .source(source)
            .message_ids(vec![calls[0].message_id.clone()])
            .timestamp(chrono::Utc::now())
            .r#type(kind)
            .offline(false)
            .build()
    };
    let db = &env.db.pool;
    assert_eq!(
        apply_receipt(db, &receipt(ReceiptType::Delivered))
            .await
            .expect("delivered"),
        1
    );
    assert_eq!(
        apply_receipt(db, &receipt(ReceiptType::Read))
            .await
            .expect("read"),
        1
    );
    assert_eq!(
        apply_receipt(db, &receipt(ReceiptType::Delivered))
            .await
            .expect("late"),
        0
    );
    assert_eq!(
        apply_receipt(db, &receipt(ReceiptType::Retry))
            .await
            .expect("retry"),
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbound_messages WHERE state = 'read'")
            .await,
        1
    );
    assert_eq!(recorder.calls().len(), 1, "one send call in all");
    answered.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_in_order_and_a_duplicate_inside_leaves_no_trace() {
    let (env, inbound) = setup().await;
    let first = text("5511999990002@s.whatsapp.net", "3EB0A1", "one");
    inbound
        .commit(std::slice::from_ref(&first))
        .await
        .expect("first");
    // Close the conversation: a duplicate must not reopen it.
    sqlx::query("UPDATE conversations SET state = 'closed'")
        .execute(&env.db.pool)
        .await
        .expect("close");
    let batch = [
        first.clone(),
        text("5511999990003@s.whatsapp.net", "3EB0B1", "two"),
        text("5511999990003@s.whatsapp.net", "3EB0B2", "three"),
    ];
    let outcomes = inbound.commit(&batch).await.expect("batch");
    assert_eq!(
        outcomes,
        vec![Ingested::Duplicate, Ingested::Queued, Ingested::Queued]
    );
    assert_eq!(
        env.count("SELECT count(*) FROM conversations WHERE state = 'closed'")
            .await,
        1,
        "the duplicate reopened its conversation"
    );
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM inbound_messages ORDER BY id")
        .fetch_all(&env.db.pool)
        .await
        .expect("bodies");
    assert_eq!(bodies, ["one", "two", "three"]);
    // Same stanza id in another chat is another message.
    let other_chat = text("5511999990004@s.whatsapp.net", "3EB0B1", "four");
    assert_eq!(
        inbound.commit(&[other_chat]).await.expect("other chat"),
        vec![Ingested::Queued]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_is_stored_with_its_participant_and_never_answered() {
    let (env, inbound) = setup().await;
    let c = core(&env, json!({})).await;
    let mut group = text("120363000000000001@g.us", "3EB0G1", "hello bot");
    {
        let info = Arc::make_mut(&mut group.info);
        info.source.is_group = true;
        info.source.sender = Jid::pn("5511999990009");
    }
    // The same words from a customer directly are answered: the control.
    let direct = text("5511999990010@s.whatsapp.net", "3EB0D1", "hello bot");
    let outcomes = inbound.commit(&[group, direct]).await.expect("commit");
    assert_eq!(outcomes, vec![Ingested::Stored, Ingested::Queued]);
    wait_count(
        &env,
        "the direct message answered",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages",
        |n| n >= 1,
    )
    .await;
    let group_rows: Vec<(bool, serde_json::Value)> = sqlx::query_as(
        "SELECT m.runs_agent, m.payload->'participant' FROM inbound_messages m
         JOIN conversations c ON c.id = m.conversation_id
         JOIN contacts ct ON ct.id = c.contact_id
         WHERE ct.wa_id IS NULL",
    )
    .fetch_all(&env.db.pool)
    .await
    .expect("group rows");
    assert_eq!(group_rows.len(), 1, "{group_rows:?}");
    assert!(!group_rows[0].0);
    assert_eq!(group_rows[0].1["phone"], "5511999990009");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs").await,
        1,
        "one agent turn: the direct message's"
    );
    let recipients: Vec<String> = sqlx::query_scalar("SELECT recipient FROM outbound_messages")
        .fetch_all(&env.db.pool)
        .await
        .expect("recipients");
    assert!(
        recipients.iter().all(|r| !r.contains("g.us")),
        "nothing was sent to the group: {recipients:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_answered_in_the_group_when_the_account_answers_groups() {
    let (env, _) = setup().await;
    let mut target = routing().ingest_target(WEB_ACCOUNT);
    target.answer_groups = true;
    let (metrics, _) = Metrics::new();
    let inbound = WebInbound::new(env.db.pool.clone(), target, metrics);
    let mut group = text(
        "120363000000000001@g.us",
        "3EB0G2",
        "what are your opening hours?",
    );
    {
        let info = Arc::make_mut(&mut group.info);
        info.source.is_group = true;
        info.source.sender = Jid::pn("5511999990009");
    }
    assert_eq!(
        inbound.commit(&[group]).await.expect("commit"),
        vec![Ingested::Queued]
    );
    let recorder = Recorder::default();
    let answered = Answered::start(&env, &recorder).await;
    let calls = recorder.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].to.to_string(), "120363000000000001@g.us");
    assert!(calls[0].text.contains("open Monday to Friday"), "{calls:?}");
    answered.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_in_doubt_is_sent_again_with_the_same_message_id_and_a_stale_term_sends_nothing() {
    let (env, inbound) = setup().await;
    inbound
        .commit(&[text("5511999990005@s.whatsapp.net", "3EB0D1", "hours?")])
        .await
        .expect("commit");
    let c = core(&env, json!({})).await;
    wait_count(
        &env,
        "the agent's reply",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages",
        |n| n == 1,
    )
    .await;
    let (leadership, elector_stop, epoch) = hold_lease(&env).await;

    // A client of an earlier term never sends a row claimed under the current epoch.
    let stale = Recorder::default();
    let (task, stop) = sender(&env, leadership.clone(), stale.clone(), epoch - 1);
    wait_count(
        &env,
        "the stale term's attempt to be refused",
        Duration::from_secs(10),
        "SELECT count(*) FROM outbound_messages WHERE attempts >= 1 AND state = 'queued'",
        |n| n == 1,
    )
    .await;
    stop.cancel();
    task.await.expect("the sender task ended without a panic");
    assert!(stale.calls().is_empty(), "{:?}", stale.calls());

    let recorder = Recorder::default();
    *recorder.fail_first.lock().expect("fail") = 1;
    let (task, stop) = sender(&env, leadership, recorder.clone(), epoch);
    wait_count(
        &env,
        "the retried send",
        Duration::from_secs(20),
        "SELECT count(*) FROM outbound_messages WHERE state = 'sent'",
        |n| n == 1,
    )
    .await;
    let calls = recorder.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].message_id, calls[1].message_id);
    stop.cancel();
    task.await.expect("the sender task ended without a panic");
    elector_stop.cancel();
    c.shutdown().await;
}

#[test]
fn only_customers_writing_to_the_number_become_inbound_rows() {
    let customer = "5511999990006@s.whatsapp.net";
    let row = |m: &InboundMessage| interpret(&m.info, &m.message);

    let mut mine = text(customer, "1", "sent from the phone");
    Arc::make_mut(&mut mine.info).source.is_from_me = true;
    assert!(row(&mine).is_none(), "our own echo");
    // A group message: stored in the group's conversation with who wrote it, marked as a
    // group's (the ingest answers it only where the account answers groups).
    let mut group = text("120363000000000001@g.us", "2", "hi all");
    {
        let info = Arc::make_mut(&mut group.info);
        info.source.is_group = true;
        info.source.sender = Jid::pn("5511999990009");
    }
    let g = row(&group).expect("a group message is stored");
    assert!(g.in_group, "marked as a group's message");
    assert_eq!(g.contact_key, "120363000000000001@g.us");
    assert_eq!(g.wa_id, None);
    assert_eq!(g.raw["group"], "120363000000000001@g.us");
    assert_eq!(g.raw["participant"]["phone"], "5511999990009");
    assert_eq!(g.raw["participant"]["name"], "Marta");
    let status = text("status@broadcast", "3", "my story");
    assert!(row(&status).is_none(), "a status post");
    let protocol = message(customer, "4", wa::Message::default());
    assert!(row(&protocol).is_none(), "a protocol message");

    let image = message(
        customer,
        "5",
        wa::Message {
            image_message: wa::message::ImageMessage {
                caption: Some("the receipt".into()),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        },
    );
    let image = row(&image).expect("an image is stored");
    assert_eq!(
        (
            image.message_type.as_str(),
            image.body.as_deref(),
            image.runs_agent
        ),
        ("image", Some("[image: the receipt]"), true)
    );

    // A LID chat: the phone comes from the alternate JID when WhatsApp sends it.
    let mut lid = text("98765432101234@lid", "6", "hi");
    Arc::make_mut(&mut lid.info).source.sender_alt = Some(Jid::pn("5511999990007"));
    let lid_row = row(&lid).expect("lid");
    assert_eq!(lid_row.contact_key, "5511999990007");
    assert_eq!(lid_row.wa_id.as_deref(), Some("5511999990007"));
    let hidden = row(&text("98765432101234@lid", "7", "hi")).expect("lid only");
    assert_eq!(hidden.contact_key, "98765432101234@lid");
    assert_eq!(hidden.wa_id, None);
    assert_eq!(
        hidden.provider_message_id, "98765432101234@lid/7",
        "stanza ids are qualified by their chat"
    );

    assert_eq!(
        recipient_jid("+5511999990007"),
        Some(Jid::pn("5511999990007"))
    );
    assert_eq!(
        recipient_jid("98765432101234@lid"),
        Some(Jid::lid("98765432101234"))
    );
    assert_eq!(recipient_jid("not a number"), None);
}
