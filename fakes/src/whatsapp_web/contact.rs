//! A customer's WhatsApp: a second whatsapp-rust client on the library's in-memory store,
//! linked through the stand-in by the phone of another number. It encrypts what it sends and
//! decrypts what it gets with its own Signal state, so a test that reads a reply here has seen
//! the gateway's encryption work end to end. Media go through the stand-in's media host like a
//! phone's: encrypted and uploaded by the sender, downloaded and decrypted by the receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::sync::Notify;
use whatsapp_rust::bot::{Bot, BotHandle};
use whatsapp_rust::download::MediaType;
use whatsapp_rust::http::{HttpClient, HttpRequest, HttpResponse};
use whatsapp_rust::media::{self, AudioOptions, DocumentOptions, ImageOptions};
use whatsapp_rust::prelude::{MessageBuilderExt, MessageExt, wa};
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::types::events::Event;
use whatsapp_rust::upload::UploadOptions;
use whatsapp_rust::wacore::store::in_memory::InMemoryBackend;
use whatsapp_rust::{Client, Jid, async_trait};

use super::WebServer;
use crate::cloud_api::lock;

/// A message the contact decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactMessage {
    /// The sender's device JID.
    pub from: String,
    /// The chat: the sender's JID, or the group's.
    pub chat: String,
    pub id: String,
    /// `text`, or the media kind (`image`, `document`, `audio`, `video`, `sticker`).
    pub kind: String,
    /// The text, or a media message's caption (a document's file name when it has none).
    pub text: String,
}

#[derive(Default)]
struct Seen {
    qr: Option<String>,
    connected: bool,
    messages: Vec<ContactMessage>,
    /// The media messages by id, to download.
    media: HashMap<String, wa::Message>,
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

/// The contact's HTTP: media only (its version is pinned), to the stand-in's media host, whose
/// certificate is the only one it trusts.
struct MediaHttp(reqwest::Client);

impl MediaHttp {
    fn new(server: &WebServer) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let ca = reqwest::Certificate::from_pem(server.media().ca_pem().as_bytes())?;
        Ok(Self(
            reqwest::Client::builder()
                .tls_certs_only([ca])
                .timeout(Duration::from_secs(30))
                .build()?,
        ))
    }
}

#[async_trait]
impl HttpClient for MediaHttp {
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())?;
        let mut req = self.0.request(method, &request.url);
        for (k, v) in &request.headers {
            req = req.header(k, v);
        }
        if let Some(body) = request.body {
            req = req.body(body.to_vec());
        }
        let response = req.send().await?;
        let status_code = response.status().as_u16();
        let body = response.bytes().await?.to_vec();
        Ok(HttpResponse { status_code, body })
    }
}

/// A file the contact sends.
pub enum ContactFile<'a> {
    Image {
        bytes: Vec<u8>,
        mime_type: &'a str,
        caption: Option<&'a str>,
    },
    Document {
        bytes: Vec<u8>,
        mime_type: &'a str,
        file_name: &'a str,
    },
    VoiceNote {
        bytes: Vec<u8>,
    },
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
            .with_http_client(MediaHttp::new(server)?)
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

    /// Send a text to a group (its JID, `...@g.us`); returns the message id.
    pub async fn send_group_text(&self, group: &str, text: &str) -> anyhow::Result<String> {
        let to: Jid = group
            .parse()
            .map_err(|e| anyhow!("group JID {group}: {e:?}"))?;
        let sent = self
            .client
            .send_message(to, wa::Message::text(text))
            .await
            .map_err(|e| anyhow!("contact group send: {e}"))?;
        Ok(sent.message_id)
    }

    /// Send a file to a phone number: encrypted, uploaded to the media host, then the message
    /// with its key. Returns the message id.
    pub async fn send_file(&self, to_phone: &str, file: ContactFile<'_>) -> anyhow::Result<String> {
        let upload = |bytes: Vec<u8>, kind: MediaType| async move {
            self.client
                .upload(bytes, kind, UploadOptions::default())
                .await
                .context("contact upload")
        };
        let message = match file {
            ContactFile::Image {
                bytes,
                mime_type,
                caption,
            } => media::image_message(
                upload(bytes, MediaType::Image).await?,
                ImageOptions {
                    caption: caption.map(str::to_string),
                    mimetype: Some(mime_type.to_string()),
                    ..Default::default()
                },
            ),
            ContactFile::Document {
                bytes,
                mime_type,
                file_name,
            } => media::document_message(
                upload(bytes, MediaType::Document).await?,
                DocumentOptions {
                    mimetype: Some(mime_type.to_string()),
                    file_name: Some(file_name.to_string()),
                    ..Default::default()
                },
            ),
            ContactFile::VoiceNote { bytes } => media::audio_message(
                upload(bytes, MediaType::Audio).await?,
                AudioOptions {
                    ptt: Some(true),
                    ..Default::default()
                },
            ),
        };
        let to = Jid::pn(to_phone.trim_start_matches('+'));
        let sent = self
            .client
            .send_message(to, message)
            .await
            .map_err(|e| anyhow!("contact send: {e}"))?;
        Ok(sent.message_id)
    }

    /// Download and decrypt the file of a media message the contact got.
    pub async fn download(&self, id: &str) -> anyhow::Result<Vec<u8>> {
        let message = lock(&self.seen)
            .media
            .get(id)
            .cloned()
            .with_context(|| format!("no media message {id}"))?;
        let m = message.get_base_message();
        let downloadable: &dyn whatsapp_rust::download::Downloadable =
            if let Some(i) = m.image_message.as_option() {
                i
            } else if let Some(d) = m.document_message.as_option() {
                d
            } else if let Some(a) = m.audio_message.as_option() {
                a
            } else if let Some(v) = m.video_message.as_option() {
                v
            } else if let Some(s) = m.sticker_message.as_option() {
                s
            } else {
                bail!("message {id} carries no file")
            };
        self.client.download(downloadable).await
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
                let (kind, text) = kind_and_text(&m.message);
                let message = ContactMessage {
                    from: m.info.source.sender.to_string(),
                    chat: m.info.source.chat.to_string(),
                    id: m.info.id.to_string(),
                    kind: kind.to_string(),
                    text,
                };
                if s.messages.iter().any(|seen| seen.id == message.id) {
                    s.duplicates.push(message.id);
                } else {
                    if kind != "text" {
                        s.media.insert(message.id.clone(), (*m.message).clone());
                    }
                    s.messages.push(message);
                }
            }
        }
        Event::UndecryptableMessage(u) => s.undecryptable.push(u.info.id.to_string()),
        _ => {}
    }
}

/// What a phone shows of a message: its kind, and its text or caption.
fn kind_and_text(message: &wa::Message) -> (&'static str, String) {
    let m = message.get_base_message();
    let caption = m.get_caption().map(str::to_string).unwrap_or_default();
    if let Some(text) = m.text_content() {
        ("text", text.to_string())
    } else if m.image_message.is_set() {
        ("image", caption)
    } else if let Some(d) = m.document_message.as_option() {
        let name = d.file_name.clone().unwrap_or_default();
        ("document", if caption.is_empty() { name } else { caption })
    } else if m.audio_message.is_set() {
        ("audio", String::new())
    } else if m.video_message.is_set() {
        ("video", caption)
    } else if m.sticker_message.is_set() {
        ("sticker", String::new())
    } else {
        ("text", String::new())
    }
}

impl Drop for Contact {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
