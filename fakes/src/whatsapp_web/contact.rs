//! A customer's WhatsApp: a second whatsapp-rust client on the library's in-memory store,
//! linked through the stand-in by the phone of another number. It encrypts what it sends and
//! decrypts what it gets with its own Signal state, so a test that reads a reply here has seen
//! the gateway's encryption work end to end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::sync::Notify;
use whatsapp_rust::bot::{Bot, BotHandle};
use whatsapp_rust::http::{HttpClient, HttpRequest, HttpResponse};
use whatsapp_rust::prelude::{MessageBuilderExt, MessageExt, wa};
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::types::events::Event;
use whatsapp_rust::wacore::store::in_memory::InMemoryBackend;
use whatsapp_rust::{Client, Jid, async_trait};

use super::WebServer;
use crate::cloud_api::lock;

/// A message the contact decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactMessage {
    /// The sender's device JID.
    pub from: String,
    pub id: String,
    pub text: String,
}

#[derive(Default)]
struct Seen {
    qr: Option<String>,
    connected: bool,
    messages: Vec<ContactMessage>,
    /// Ids of messages that came again (a sender's resend with the same id): a phone shows
    /// them once.
    duplicates: Vec<String>,
    undecryptable: Vec<String>,
}

/// The contact's phone. Dropping it stops the client.
pub struct Contact {
    handle: Option<BotHandle>,
    client: Arc<Client>,
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
    /// The contact's device JID.
    pub jid: String,
}

/// The contact needs no HTTP (its version is pinned, it sends no media).
struct NoHttp;

#[async_trait]
impl HttpClient for NoHttp {
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        bail!(
            "the stand-in contact makes no HTTP requests ({})",
            request.url
        )
    }
}

impl Contact {
    /// A client for `phone` (added to the stand-in), linked and connected.
    pub async fn link(server: &WebServer, phone: &str) -> anyhow::Result<Self> {
        server.add_phone(phone);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let changed = Arc::new(Notify::new());
        let (s, c) = (seen.clone(), changed.clone());
        let bot = Bot::builder()
            .with_backend(InMemoryBackend::new())
            .with_transport_factory(TokioWebSocketTransportFactory::new().with_url(server.url()))
            .with_http_client(NoHttp)
            .with_version((2, 3000, 1_027_934_701))
            .with_push_name("Marta")
            .on_event(move |event, _client| {
                let (seen, changed) = (s.clone(), c.clone());
                async move {
                    record(&seen, &event);
                    changed.notify_waiters();
                }
            })
            .build()
            .await
            .context("contact client")?;
        let handle = bot.spawn();
        let client = handle.client();
        let mut contact = Self {
            handle: Some(handle),
            client,
            seen,
            changed,
            jid: String::new(),
        };
        let qr = contact
            .until(Duration::from_secs(20), "a QR code", |s| s.qr.clone())
            .await?;
        contact.jid = server.link_as(phone, &qr)?;
        contact
            .until(Duration::from_secs(20), "connected", |s| {
                s.connected.then_some(())
            })
            .await?;
        // A phone in use: its delivery receipts are ticks, not `inactive` ones.
        contact
            .client
            .presence()
            .set_available()
            .await
            .map_err(|e| anyhow!("contact presence: {e}"))?;
        Ok(contact)
    }

    pub fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    /// Send a text to a phone number (digits, `+` allowed); returns the message id.
    pub async fn send_text(&self, to_phone: &str, text: &str) -> anyhow::Result<String> {
        let to = Jid::pn(to_phone.trim_start_matches('+'));
        let sent = self
            .client
            .send_message(to, wa::Message::text(text))
            .await
            .map_err(|e| anyhow!("contact send: {e}"))?;
        Ok(sent.message_id)
    }

    /// Mark messages of `from_phone` as read (blue ticks).
    pub async fn mark_read(&self, from_phone: &str, ids: &[&str]) -> anyhow::Result<()> {
        let chat = Jid::pn(from_phone.trim_start_matches('+'));
        self.client.mark_as_read(&chat, None, ids).await
    }

    /// Ids of messages that arrived again after being shown (a resend with the same id).
    pub fn duplicates(&self) -> Vec<String> {
        lock(&self.seen).duplicates.clone()
    }

    /// Everything decrypted so far, in order, each message once (by id, as a phone shows it).
    pub fn messages(&self) -> Vec<ContactMessage> {
        lock(&self.seen).messages.clone()
    }

    /// Ids of messages the client could not decrypt.
    pub fn undecryptable(&self) -> Vec<String> {
        lock(&self.seen).undecryptable.clone()
    }

    /// Wait until `n` messages were decrypted; returns them.
    pub async fn wait_messages(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ContactMessage>> {
        self.until(timeout, &format!("{n} decrypted messages"), |s| {
            (s.messages.len() >= n).then(|| s.messages.clone())
        })
        .await
    }

    async fn until<T>(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Seen) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if let Some(v) = check(&lock(&self.seen)) {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let s = lock(&self.seen);
                bail!(
                    "the contact saw no {what} within {timeout:?} (messages {:?}, undecryptable {:?})",
                    s.messages,
                    s.undecryptable
                );
            }
        }
    }
}

fn record(seen: &Mutex<Seen>, event: &Event) {
    let mut s = lock(seen);
    match event {
        Event::PairingQrCode(qr) => s.qr = Some(qr.code.clone()),
        Event::Connected(_) => s.connected = true,
        Event::Disconnected(_) => s.connected = false,
        Event::Messages(batch) => {
            for m in batch.iter() {
                let text = m
                    .message
                    .text_content()
                    .map(str::to_string)
                    .unwrap_or_default();
                let message = ContactMessage {
                    from: m.info.source.sender.to_string(),
                    id: m.info.id.to_string(),
                    text,
                };
                if s.messages.iter().any(|seen| seen.id == message.id) {
                    s.duplicates.push(message.id);
                } else {
                    s.messages.push(message);
                }
            }
        }
        Event::UndecryptableMessage(u) => s.undecryptable.push(u.info.id.to_string()),
        _ => {}
    }
}

impl Drop for Contact {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
