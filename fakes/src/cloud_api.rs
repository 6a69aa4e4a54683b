//! A fake WhatsApp Cloud API.
//!
//! It plays Meta's two roles: it POSTs signed webhooks to the gateway (inbound messages and
//! status updates) and it accepts `POST /{version}/{phone-number-id}/messages` sends. Webhook
//! bodies are serialized once, with non-ASCII escaped as `\uXXXX` and `/` as `\/` like Meta
//! does, and the signature is computed over exactly the bytes sent. Sends are validated against
//! the documented limits, recorded, answered with a `wamid`, and followed by `sent`, `delivered`
//! and `read` status webhooks that echo `biz_opaque_callback_data`. Errors can be injected by
//! Graph error code. A small web chat page lets a person play the WhatsApp user.
//!
//! For the exactly-once tests it can hold sends in flight (as a slow Meta would) and then accept
//! or refuse them, counts sends in flight, records the Graph version segment of each send's path
//! (tests give each gateway its own, to tell senders apart) and calls a hook at the moment a send
//! arrives, so an invariant (only the Lease holder sends) is checked as it could break.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::Server;

/// A send the fake accepted.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedSend {
    pub wamid: String,
    pub phone_number_id: String,
    pub to: String,
    pub body: Value,
    pub biz_opaque_callback_data: Option<String>,
    /// The version segment of the request path (`v23.0`, or a test's per-sender tag).
    pub version: String,
    /// When the fake accepted it (reply latency in benchmarks).
    pub received_at: std::time::SystemTime,
}

impl RecordedSend {
    /// The text of a text message, or the body text of an interactive one.
    pub fn text(&self) -> Option<&str> {
        self.body["text"]["body"]
            .as_str()
            .or_else(|| self.body["interactive"]["body"]["text"].as_str())
    }
}

/// An error to return instead of accepting a send.
#[derive(Debug, Clone)]
pub struct Fault {
    pub http_status: u16,
    pub code: i64,
    pub message: String,
}

impl Fault {
    /// A Graph error with the HTTP status Meta usually pairs with the code.
    pub fn code(code: i64) -> Self {
        let (http_status, message) = match code {
            190 => (401, "Error validating access token: Session has expired"),
            130429 => (429, "Rate limit hit"),
            131056 => (
                400,
                "(Business Account, Consumer Account) pair rate limit hit",
            ),
            131047 => (400, "Re-engagement message"),
            131026 => (400, "Message undeliverable"),
            131000 => (500, "Something went wrong"),
            131016 => (503, "Service unavailable"),
            100 => (400, "Invalid parameter"),
            _ => (400, "Error"),
        };
        Self {
            http_status,
            code,
            message: message.to_string(),
        }
    }
}

/// A line of the chat page.
#[derive(Debug, Clone, Serialize)]
pub struct ChatLine {
    pub seq: u64,
    pub from_user: bool,
    pub user: String,
    pub text: String,
}

/// Whether sends are let through, held in flight, or refused once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gate {
    held: bool,
    /// Bumped on every hold: a held send knows which release applies to it.
    generation: u64,
    /// The generation whose held sends were refused (never reached WhatsApp).
    refused: Option<u64>,
}

/// `(version segment, message body)` of a send as it arrives.
type SendHook = Arc<dyn Fn(&str, &Value) + Send + Sync>;

struct Inner {
    phone_number_id: String,
    waba_id: String,
    display_phone_number: String,
    access_token: String,
    app_secret: String,
    webhook_url: Mutex<Option<String>>,
    sends: Mutex<Vec<RecordedSend>>,
    read_receipts: Mutex<Vec<String>>,
    faults: Mutex<VecDeque<Fault>>,
    emit_statuses: AtomicBool,
    /// Per status webhook: milliseconds from its first delivery attempt to a 200 (None: gave up).
    status_acks: Mutex<Vec<Option<f64>>>,
    counter: AtomicU64,
    chat: Mutex<Vec<ChatLine>>,
    http: reqwest::Client,
    gate: tokio::sync::watch::Sender<Gate>,
    /// While true, status webhooks wait (a slow or backed-up Meta).
    statuses_held: tokio::sync::watch::Sender<bool>,
    in_flight: AtomicU64,
    on_send: Mutex<Option<SendHook>>,
    /// How many sends were accepted, for waiting on the next one.
    accepted: tokio::sync::watch::Sender<usize>,
    /// The WhatsApp Business Account's message templates: `(name, language)` -> template.
    templates: Mutex<HashMap<(String, String), FakeTemplate>>,
    /// Pages of the template list served.
    template_lists: AtomicU64,
    /// Media customers sent, by media id.
    media: Mutex<HashMap<String, FakeMedia>>,
    /// Download URLs handed out: token -> (media id, valid until).
    media_urls: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// HTTP statuses to answer the next downloads with, in order (a flaky CDN).
    media_faults: Mutex<VecDeque<u16>>,
    /// Media ids of files uploaded to send, in order.
    uploads: Mutex<Vec<String>>,
    /// Media id lookups (`GET /{media_id}`) and downloads answered with the bytes.
    media_lookups: AtomicU64,
    media_downloads: AtomicU64,
}

/// A media object as Meta keeps it for a few days after the customer sent it.
#[derive(Debug, Clone)]
struct FakeMedia {
    bytes: Vec<u8>,
    mime_type: String,
}

/// How long a media download URL works (Meta: about 5 minutes).
const MEDIA_URL_TTL: Duration = Duration::from_secs(300);

/// A message template as Meta keeps it: its id, how many body parameters it takes, and its
/// status (`APPROVED`, `PAUSED`, `REJECTED`, ...).
#[derive(Debug, Clone)]
pub struct FakeTemplate {
    pub id: String,
    pub body_parameters: usize,
    pub status: String,
    pub category: String,
}

impl FakeTemplate {
    /// The BODY text: the name, then one `{{n}}` placeholder per parameter.
    fn body(&self, name: &str) -> String {
        let mut body = format!("{name}:");
        for i in 1..=self.body_parameters {
            body.push_str(&format!(" {{{{{i}}}}}"));
        }
        body
    }
}

/// Counts a send in flight until the handler returns (or is dropped with its connection).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The running fake.
#[derive(Clone)]
pub struct FakeCloudApi {
    inner: Arc<Inner>,
    server: Arc<Server>,
}

/// Settings of the fake.
#[derive(Debug, Clone)]
pub struct CloudApiConfig {
    pub phone_number_id: String,
    /// The WhatsApp Business Account the number belongs to (webhooks' `entry[].id`).
    pub waba_id: String,
    pub display_phone_number: String,
    pub access_token: String,
    pub app_secret: String,
}

impl Default for CloudApiConfig {
    fn default() -> Self {
        Self {
            phone_number_id: "106540352242922".into(),
            waba_id: "102290129340398".into(),
            display_phone_number: "15550783881".into(),
            access_token: "test-access-token".into(),
            app_secret: "test-app-secret".into(),
        }
    }
}

impl FakeCloudApi {
    pub async fn start(cfg: CloudApiConfig) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", cfg).await
    }

    pub async fn start_on(addr: &str, cfg: CloudApiConfig) -> std::io::Result<Self> {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        let inner = Arc::new(Inner {
            phone_number_id: cfg.phone_number_id,
            waba_id: cfg.waba_id,
            display_phone_number: cfg.display_phone_number,
            access_token: cfg.access_token,
            app_secret: cfg.app_secret,
            webhook_url: Mutex::new(None),
            sends: Mutex::default(),
            read_receipts: Mutex::default(),
            faults: Mutex::default(),
            emit_statuses: AtomicBool::new(true),
            status_acks: Mutex::default(),
            counter: AtomicU64::new(1),
            chat: Mutex::default(),
            http,
            gate: tokio::sync::watch::channel(Gate {
                held: false,
                generation: 0,
                refused: None,
            })
            .0,
            statuses_held: tokio::sync::watch::channel(false).0,
            in_flight: AtomicU64::new(0),
            on_send: Mutex::new(None),
            accepted: tokio::sync::watch::channel(0).0,
            templates: Mutex::new(HashMap::new()),
            template_lists: AtomicU64::new(0),
            media: Mutex::default(),
            media_urls: Mutex::default(),
            media_faults: Mutex::default(),
            uploads: Mutex::default(),
            media_lookups: AtomicU64::new(0),
            media_downloads: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/{version}/{phone_number_id}/messages", post(send))
            .route(
                "/{version}/{waba_id}/message_templates",
                get(list_templates),
            )
            .route("/{version}/{media_id}", get(media_url))
            .route("/{version}/{phone_number_id}/media", post(upload_media))
            .route("/media-download/{token}", get(media_download))
            .route("/", get(chat_page))
            .route("/chat/messages", get(chat_messages))
            .route("/chat/send", post(chat_send))
            .with_state(inner.clone());
        let server = Server::start_on(addr, router).await?;
        Ok(Self {
            inner,
            server: Arc::new(server),
        })
    }

    /// Base URL to put in `apiBaseUrl` (a Graph version segment included).
    pub fn api_base_url(&self) -> String {
        format!("{}/v23.0", self.server.url())
    }

    /// A base URL whose version segment is `tag`: the sends of whoever uses it are recorded with
    /// [`RecordedSend::version`] = `tag`.
    pub fn api_base_url_tagged(&self, tag: &str) -> String {
        format!("{}/{tag}", self.server.url())
    }

    /// Hold every send that arrives from now on in flight, unanswered and not yet accepted,
    /// until [`Self::release_held`].
    pub fn hold_sends(&self) {
        self.inner.gate.send_modify(|g| {
            g.held = true;
            g.generation += 1;
        });
    }

    /// Let held sends go on: accepted (WhatsApp got them late), or refused unrecorded, as if
    /// their connection died before they reached WhatsApp (`accept = false`). Later sends pass.
    pub fn release_held(&self, accept: bool) {
        self.inner.gate.send_modify(|g| {
            g.held = false;
            g.refused = (!accept).then_some(g.generation);
        });
    }

    /// Hold the status webhooks of sends accepted from now on until [`Self::release_statuses`].
    pub fn hold_statuses(&self) {
        self.inner.statuses_held.send_replace(true);
    }

    /// Deliver held status webhooks, and later ones at once.
    pub fn release_statuses(&self) {
        self.inner.statuses_held.send_replace(false);
    }

    /// The number of sends accepted so far, updated as each is accepted.
    pub fn accepted_sends(&self) -> tokio::sync::watch::Receiver<usize> {
        self.inner.accepted.subscribe()
    }

    /// Sends received and not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Call `hook` with the version segment and body of each valid send the moment it arrives
    /// (before it is held, accepted or answered).
    pub fn on_send(&self, hook: impl Fn(&str, &Value) + Send + Sync + 'static) {
        *lock(&self.inner.on_send) = Some(Arc::new(hook));
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn phone_number_id(&self) -> &str {
        &self.inner.phone_number_id
    }

    pub fn app_secret(&self) -> &str {
        &self.inner.app_secret
    }

    pub fn access_token(&self) -> &str {
        &self.inner.access_token
    }

    /// Where webhooks (inbound messages, statuses) go.
    pub fn set_webhook_url(&self, url: impl Into<String>) {
        *lock(&self.inner.webhook_url) = Some(url.into());
    }

    /// Turn status webhooks after sends on or off.
    pub fn emit_statuses(&self, on: bool) {
        self.inner.emit_statuses.store(on, Ordering::SeqCst);
    }

    /// Status webhooks delivered so far: milliseconds from the first attempt to the 200, or None
    /// where every retry failed.
    pub fn status_acks(&self) -> Vec<Option<f64>> {
        lock(&self.inner.status_acks).clone()
    }

    /// Fail the next sends with these errors, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.inner.faults).extend(faults);
    }

    /// Add a message template to the account (what Meta would have approved, or paused).
    pub fn add_template(&self, name: &str, language: &str, body_parameters: usize, status: &str) {
        let id = (7_000_000_000_000_000u64 + self.inner.counter.fetch_add(1, Ordering::SeqCst))
            .to_string();
        lock(&self.inner.templates).insert(
            (name.to_string(), language.to_string()),
            FakeTemplate {
                id,
                body_parameters,
                status: status.to_string(),
                category: "UTILITY".into(),
            },
        );
    }

    /// Delete a template (as in WhatsApp Manager): it is no longer listed or sendable.
    pub fn remove_template(&self, name: &str, language: &str) {
        lock(&self.inner.templates).remove(&(name.to_string(), language.to_string()));
    }

    /// Meta decides on a template: its status changes and the `message_template_status_update`
    /// webhook is delivered (retried like any webhook). Returns the webhook's final HTTP status.
    pub async fn set_template_status(
        &self,
        name: &str,
        language: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Option<StatusCode> {
        let id = {
            let mut templates = lock(&self.inner.templates);
            let t = templates.get_mut(&(name.to_string(), language.to_string()))?;
            t.status = status.to_string();
            t.id.clone()
        };
        let payload = self.template_status_webhook(&id, name, language, status, reason);
        self.inner.deliver(&payload).await.ok()
    }

    /// The webhook Meta sends when a template's status changes (`entry[].id` is the WABA).
    pub fn template_status_webhook(
        &self,
        template_id: &str,
        name: &str,
        language: &str,
        event: &str,
        reason: Option<&str>,
    ) -> Value {
        json!({
            "object": "whatsapp_business_account",
            "entry": [{ "id": self.inner.waba_id, "time": now_unix(), "changes": [{
                "field": "message_template_status_update",
                "value": {
                    "event": event,
                    "message_template_id": template_id.parse::<u64>().unwrap_or_default(),
                    "message_template_name": name,
                    "message_template_language": language,
                    "reason": reason.unwrap_or("NONE")
                }
            }]}]
        })
    }

    /// Template list requests answered so far (`GET /{waba}/message_templates`, every page).
    pub fn template_list_requests(&self) -> usize {
        self.inner.template_lists.load(Ordering::SeqCst) as usize
    }

    pub fn waba_id(&self) -> &str {
        &self.inner.waba_id
    }

    /// Every accepted send so far.
    pub fn sends(&self) -> Vec<RecordedSend> {
        lock(&self.inner.sends).clone()
    }

    /// Message ids marked read.
    pub fn read_receipts(&self) -> Vec<String> {
        lock(&self.inner.read_receipts).clone()
    }

    /// Sign and POST a webhook body once; returns the HTTP status the gateway answered.
    pub async fn deliver(&self, payload: &Value) -> reqwest::Result<StatusCode> {
        self.inner.deliver(payload).await
    }

    /// POST exact bytes with a chosen signature header (None: no header), for negative tests.
    pub async fn deliver_raw(
        &self,
        body: Vec<u8>,
        signature: Option<String>,
    ) -> reqwest::Result<StatusCode> {
        self.inner.deliver_raw(body, signature).await
    }

    /// A new unique inbound message id.
    pub fn next_wamid(&self) -> String {
        self.inner.next_wamid()
    }

    /// The webhook for an inbound text message from `from` (digits, no `+`).
    pub fn inbound_text(&self, from: &str, name: &str, text: &str) -> (String, Value) {
        let id = self.next_wamid();
        let msg = json!({
            "from": from, "id": id, "timestamp": now_unix().to_string(), "type": "text",
            "text": { "body": text }
        });
        (id, self.inner.envelope(from, name, msg))
    }

    /// The webhook for a reply-button tap.
    pub fn inbound_button_reply(
        &self,
        from: &str,
        name: &str,
        button_id: &str,
        title: &str,
    ) -> (String, Value) {
        let id = self.next_wamid();
        let msg = json!({
            "context": { "from": self.inner.display_phone_number, "id": "wamid.PREVIOUS" },
            "from": from, "id": id, "timestamp": now_unix().to_string(), "type": "interactive",
            "interactive": { "type": "button_reply", "button_reply": { "id": button_id, "title": title } }
        });
        (id, self.inner.envelope(from, name, msg))
    }

    /// Keep media a customer sends; returns its media id.
    pub fn add_media(&self, bytes: Vec<u8>, mime_type: &str) -> String {
        let id = (9_000_000_000_000_000u64 + self.inner.counter.fetch_add(1, Ordering::SeqCst))
            .to_string();
        lock(&self.inner.media).insert(
            id.clone(),
            FakeMedia {
                bytes,
                mime_type: mime_type.to_string(),
            },
        );
        id
    }

    /// The webhook of a media message (`kind` image, audio, video, document, sticker) for media
    /// added with [`Self::add_media`]: id, mime type and the base64 SHA-256 as Meta sends them,
    /// plus `extra` fields (`caption`, `filename`, `voice`).
    pub fn inbound_media(
        &self,
        from: &str,
        name: &str,
        kind: &str,
        media_id: &str,
        extra: Value,
    ) -> (String, Value) {
        let id = self.next_wamid();
        let (mime, sha) = lock(&self.inner.media)
            .get(media_id)
            .map(|m| {
                let digest = <Sha256 as sha2::Digest>::digest(&m.bytes);
                (
                    m.mime_type.clone(),
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest),
                )
            })
            .unwrap_or_default();
        let mut media = json!({ "id": media_id, "mime_type": mime, "sha256": sha });
        if let (Some(m), Some(e)) = (media.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        let msg = json!({
            "from": from, "id": id, "timestamp": now_unix().to_string(), "type": kind, kind: media
        });
        (id, self.inner.envelope(from, name, msg))
    }

    /// Answer the next media downloads with these HTTP statuses, in order.
    pub fn fail_media_downloads(&self, statuses: impl IntoIterator<Item = u16>) {
        lock(&self.inner.media_faults).extend(statuses);
    }

    /// Every download URL handed out so far stops working (as Meta's do after ~5 minutes).
    pub fn expire_media_urls(&self) {
        let past = std::time::Instant::now();
        for (_, until) in lock(&self.inner.media_urls).values_mut() {
            *until = past;
        }
    }

    /// Files uploaded to send so far: `(media id, type, bytes)`, in order.
    pub fn uploads(&self) -> Vec<(String, String, Vec<u8>)> {
        let media = lock(&self.inner.media);
        lock(&self.inner.uploads)
            .iter()
            .filter_map(|id| {
                media
                    .get(id)
                    .map(|m| (id.clone(), m.mime_type.clone(), m.bytes.clone()))
            })
            .collect()
    }

    /// `(media id lookups, downloads answered with the bytes)` so far.
    pub fn media_requests(&self) -> (u64, u64) {
        (
            self.inner.media_lookups.load(Ordering::SeqCst),
            self.inner.media_downloads.load(Ordering::SeqCst),
        )
    }

    /// The webhook for any message object (media, location, ...).
    pub fn inbound_message(&self, from: &str, name: &str, message: Value) -> Value {
        self.inner.envelope(from, name, message)
    }

    /// The webhook for a status update of a sent message.
    pub fn status(
        &self,
        wamid: &str,
        status: &str,
        recipient: &str,
        callback: Option<&str>,
    ) -> Value {
        self.inner
            .status_envelope(wamid, status, recipient, callback, None)
    }
}

impl Inner {
    /// A template send as the customer's phone shows it: the body with its parameters filled.
    fn render_template(&self, template: &Value) -> Option<String> {
        let name = template["name"].as_str()?;
        let language = template["language"]["code"].as_str()?;
        let known = lock(&self.templates)
            .get(&(name.to_string(), language.to_string()))?
            .clone();
        let mut text = known.body(name);
        let parameters = template["components"][0]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (i, p) in parameters.iter().enumerate() {
            text = text.replace(
                &format!("{{{{{}}}}}", i + 1),
                p["text"].as_str().unwrap_or_default(),
            );
        }
        Some(text)
    }

    fn next_wamid(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        format!("wamid.FAKE{:016X}{}", n, uuid::Uuid::new_v4().simple())
    }

    fn envelope(&self, from: &str, name: &str, message: Value) -> Value {
        json!({
            "object": "whatsapp_business_account",
            "entry": [{
                "id": self.waba_id,
                "changes": [{
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": { "display_phone_number": self.display_phone_number, "phone_number_id": self.phone_number_id },
                        "contacts": [{ "profile": { "name": name }, "wa_id": from }],
                        "messages": [message]
                    }
                }]
            }]
        })
    }

    fn status_envelope(
        &self,
        wamid: &str,
        status: &str,
        recipient: &str,
        callback: Option<&str>,
        error: Option<&Fault>,
    ) -> Value {
        let mut st = json!({
            "id": wamid, "status": status, "timestamp": now_unix().to_string(), "recipient_id": recipient,
        });
        if status != "failed" {
            st["pricing"] = json!({ "billable": false, "pricing_model": "PMP", "type": "free_customer_service", "category": "service" });
        }
        if let Some(cb) = callback {
            st["biz_opaque_callback_data"] = json!(cb);
        }
        if let Some(f) = error {
            st["errors"] = json!([{ "code": f.code, "title": f.message, "message": f.message,
                "error_data": { "details": f.message }, "href": "/documentation/business-messaging/whatsapp/support/error-codes" }]);
        }
        json!({
            "object": "whatsapp_business_account",
            "entry": [{ "id": self.waba_id, "changes": [{ "field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": { "display_phone_number": self.display_phone_number, "phone_number_id": self.phone_number_id },
                "statuses": [st]
            }}]}]
        })
    }

    async fn deliver(&self, payload: &Value) -> reqwest::Result<StatusCode> {
        let body = meta_json_bytes(payload);
        let signature = sign(&self.app_secret, &body);
        self.deliver_raw(body, Some(signature)).await
    }

    async fn deliver_raw(
        &self,
        body: Vec<u8>,
        signature: Option<String>,
    ) -> reqwest::Result<StatusCode> {
        let Some(url) = lock(&self.webhook_url).clone() else {
            return Ok(StatusCode::SERVICE_UNAVAILABLE);
        };
        let mut req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(sig) = signature {
            req = req.header("x-hub-signature-256", sig);
        }
        let resp = req.send().await?;
        Ok(StatusCode::from_u16(resp.status().as_u16())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
    }

    /// Deliver like Meta: retry on non-200 with growing delays (bounded here).
    async fn deliver_with_retries(&self, payload: Value) -> Option<f64> {
        let first = std::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        for _ in 0..8 {
            match self.deliver(&payload).await {
                Ok(s) if s == StatusCode::OK => {
                    return Some(first.elapsed().as_secs_f64() * 1000.0);
                }
                _ => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        None
    }
}

/// A poisoned lock still guards consistent test state: take it anyway.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serialize like Meta: non-ASCII as `\uXXXX` (UTF-16, lowercase hex) and `/` as `\/`.
pub fn meta_json_bytes(payload: &Value) -> Vec<u8> {
    let plain = payload.to_string();
    let mut out = String::with_capacity(plain.len() + 16);
    for ch in plain.chars() {
        if ch == '/' {
            out.push_str("\\/");
        } else if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut buf = [0u16; 2];
            for unit in ch.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.into_bytes()
}

/// `sha256=<hex HMAC-SHA256(app secret, body)>`, as in `X-Hub-Signature-256`.
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn graph_error(status: u16, code: i64, message: &str) -> Response {
    let body = json!({ "error": {
        "message": format!("({code}) {message}"), "type": "OAuthException", "code": code,
        "error_data": { "messaging_product": "whatsapp", "details": message },
        "fbtrace_id": format!("A{}", uuid::Uuid::new_v4().simple())
    }});
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(body),
    )
        .into_response()
}

/// What Meta answers a POST to a phone number id with a bad token (401) or to an id that is
/// not this number (400); `None` when the request may proceed.
fn refuse_post(inner: &Inner, headers: &HeaderMap, phone_number_id: &str) -> Option<Response> {
    if !bearer_ok(inner, headers) {
        return Some(invalid_token());
    }
    (phone_number_id != inner.phone_number_id).then(|| {
        graph_error(
            400,
            100,
            "Unsupported post request. Object with ID does not exist",
        )
    })
}

async fn send(
    State(inner): State<Arc<Inner>>,
    Path((version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = refuse_post(&inner, &headers, &phone_number_id) {
        return refused;
    }
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return graph_error(400, 100, "Invalid JSON");
    };
    if msg["messaging_product"] != "whatsapp" {
        return graph_error(400, 100, "The parameter messaging_product is required");
    }
    // Mark-as-read (optionally with a typing indicator).
    if msg["status"] == "read" {
        let Some(id) = msg["message_id"].as_str() else {
            return graph_error(400, 100, "The parameter message_id is required");
        };
        lock(&inner.read_receipts).push(id.to_string());
        return Json(json!({ "success": true })).into_response();
    }
    if let Err(problem) = validate_send(&msg) {
        return graph_error(400, 100, &problem);
    }
    if msg["type"] == "template"
        && let Err((code, problem)) = check_template(&inner, &msg["template"])
    {
        return graph_error(400, code, problem);
    }
    let kind = msg["type"].as_str().unwrap_or_default();
    if let Some(id) = msg[kind]["id"].as_str()
        && !lock(&inner.media).contains_key(id)
    {
        return graph_error(400, 131053, "Media upload error: unknown media id");
    }
    let hook = lock(&inner.on_send).clone();
    if let Some(hook) = hook {
        hook(&version, &msg);
    }
    // WhatsApp has the request now: whether it is accepted no longer depends on the sender's
    // connection staying open (a sender killed mid-send leaves a message that may have gone out).
    let accepting = tokio::spawn(accept(inner, version, phone_number_id, msg));
    accepting
        .await
        .unwrap_or_else(|_| graph_error(500, 131000, "Something went wrong"))
}

/// Accept a valid send: wait while sends are held, then record it, answer with its `wamid` and
/// follow with status webhooks.
async fn accept(
    inner: Arc<Inner>,
    version: String,
    phone_number_id: String,
    msg: Value,
) -> Response {
    let _in_flight = InFlight::enter(&inner.in_flight);
    let mut gate = inner.gate.subscribe();
    let arrived = *gate.borrow_and_update();
    if arrived.held {
        let released = match gate.wait_for(|g| !g.held).await {
            Ok(g) => *g,
            Err(_) => arrived,
        };
        if released.refused == Some(arrived.generation) {
            return graph_error(503, 131016, "Service unavailable");
        }
    }
    if let Some(fault) = lock(&inner.faults).pop_front() {
        return graph_error(fault.http_status, fault.code, &fault.message);
    }
    let to = msg["to"].as_str().unwrap_or_default().to_string();
    let wamid = inner.next_wamid();
    let callback = msg["biz_opaque_callback_data"].as_str().map(str::to_string);
    let record = RecordedSend {
        wamid: wamid.clone(),
        phone_number_id,
        to: to.clone(),
        body: msg.clone(),
        biz_opaque_callback_data: callback.clone(),
        version,
        received_at: std::time::SystemTime::now(),
    };

    let buttons: Vec<&str> = msg["interactive"]["action"]["buttons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["reply"]["title"].as_str())
        .collect();
    // Reply buttons show under the text, as on a phone.
    let file = ["image", "document", "audio", "video"]
        .into_iter()
        .find(|k| msg["type"] == *k)
        .map(|k| {
            let name = msg[k]["filename"].as_str().or(msg[k]["caption"].as_str());
            format!(
                "[{k}{}]",
                name.map(|n| format!(": {n}")).unwrap_or_default()
            )
        });
    let shown = record
        .text()
        .map(|t| match buttons.is_empty() {
            true => t.to_string(),
            false => format!("{t}\n[{}]", buttons.join("] [")),
        })
        .or_else(|| inner.render_template(&msg["template"]))
        .or(file);
    if let Some(text) = shown {
        let mut chat = lock(&inner.chat);
        let seq = chat.len() as u64 + 1;
        chat.push(ChatLine {
            seq,
            from_user: false,
            user: to.clone(),
            text: text.to_string(),
        });
    }
    let accepted = {
        let mut sends = lock(&inner.sends);
        sends.push(record);
        sends.len()
    };
    inner.accepted.send_replace(accepted);
    if inner.emit_statuses.load(Ordering::SeqCst) {
        let inner = inner.clone();
        let wamid = wamid.clone();
        let mut held = inner.statuses_held.subscribe();
        tokio::spawn(async move {
            let _ = held.wait_for(|h| !h).await;
            for status in ["sent", "delivered", "read"] {
                let payload = inner.status_envelope(&wamid, status, &to, callback.as_deref(), None);
                let acked = inner.deliver_with_retries(payload).await;
                lock(&inner.status_acks).push(acked);
            }
        });
    }
    Json(json!({
        "messaging_product": "whatsapp",
        "contacts": [{ "input": msg["to"], "wa_id": msg["to"] }],
        "messages": [{ "id": wamid }]
    }))
    .into_response()
}

/// Meta's answer to a missing or wrong access token.
fn invalid_token() -> Response {
    graph_error(
        401,
        190,
        "Invalid OAuth access token - Cannot parse access token",
    )
}

/// Whether the request carries the account's access token as a Bearer token.
fn bearer_ok(inner: &Inner, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a == format!("Bearer {}", inner.access_token))
}

/// `POST /{version}/{phone_number_id}/media` (multipart: `messaging_product`, `type`, `file`):
/// keeps the file and answers its media id, as Meta does for files to send.
async fn upload_media(
    State(inner): State<Arc<Inner>>,
    Path((_version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    mut form: axum::extract::Multipart,
) -> Response {
    if let Some(refused) = refuse_post(&inner, &headers, &phone_number_id) {
        return refused;
    }
    let (mut product, mut kind, mut file) = (None, None, None);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name().unwrap_or_default() {
            "messaging_product" => product = field.text().await.ok(),
            "type" => kind = field.text().await.ok(),
            "file" => {
                let mime = field.content_type().map(str::to_string);
                file = field.bytes().await.ok().map(|b| (b.to_vec(), mime));
            }
            _ => {}
        }
    }
    if product.as_deref() != Some("whatsapp") {
        return graph_error(400, 100, "The parameter messaging_product is required");
    }
    let (Some((bytes, mime)), Some(kind)) = (file, kind) else {
        return graph_error(400, 100, "The parameters file and type are required");
    };
    if bytes.is_empty() {
        return graph_error(400, 131053, "Media upload error: the file is empty");
    }
    let id = (9_000_000_000_000_000u64 + inner.counter.fetch_add(1, Ordering::SeqCst)).to_string();
    lock(&inner.media).insert(
        id.clone(),
        FakeMedia {
            bytes,
            mime_type: mime.unwrap_or(kind),
        },
    );
    lock(&inner.uploads).push(id.clone());
    Json(json!({ "id": id })).into_response()
}

/// `GET /{version}/{media_id}`: the media's short-lived download URL, type, hex SHA-256 and size.
async fn media_url(
    State(inner): State<Arc<Inner>>,
    Path((_version, media_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !bearer_ok(&inner, &headers) {
        return invalid_token();
    }
    inner.media_lookups.fetch_add(1, Ordering::SeqCst);
    let Some(media) = lock(&inner.media).get(&media_id).cloned() else {
        return graph_error(
            400,
            100,
            "Unsupported get request. Object with ID does not exist, cannot be loaded due to missing permissions, or does not support this operation",
        );
    };
    let token = uuid::Uuid::new_v4().simple().to_string();
    lock(&inner.media_urls).insert(
        token.clone(),
        (media_id.clone(), std::time::Instant::now() + MEDIA_URL_TTL),
    );
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Json(json!({
        "messaging_product": "whatsapp",
        "url": format!("http://{host}/media-download/{token}?ext=1&hash=x"),
        "mime_type": media.mime_type,
        "sha256": hex::encode(<Sha256 as sha2::Digest>::digest(&media.bytes)),
        "file_size": media.bytes.len(),
        "id": media_id,
    }))
    .into_response()
}

/// `GET /media-download/{token}`: the bytes, with the access token; 404 once the URL expired.
async fn media_download(
    State(inner): State<Arc<Inner>>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !bearer_ok(&inner, &headers) {
        return (StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    if let Some(status) = lock(&inner.media_faults).pop_front() {
        return (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "injected",
        )
            .into_response();
    }
    let valid = lock(&inner.media_urls)
        .get(&token)
        .filter(|(_, until)| std::time::Instant::now() < *until)
        .map(|(id, _)| id.clone());
    let Some(media) = valid.and_then(|id| lock(&inner.media).get(&id).cloned()) else {
        return (StatusCode::NOT_FOUND, "URL expired").into_response();
    };
    inner.media_downloads.fetch_add(1, Ordering::SeqCst);
    ([("content-type", media.mime_type)], media.bytes).into_response()
}

#[derive(Deserialize)]
struct TemplatePage {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    fields: Option<String>,
}

/// `GET /{version}/{waba_id}/message_templates`: the WABA's templates, sorted by name and
/// language, paged by an opaque `after` cursor (`paging.next` only while more remain), as the
/// Graph API pages. 25 per page unless `limit` says otherwise (at most 100 here).
async fn list_templates(
    State(inner): State<Arc<Inner>>,
    Path((version, waba_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(page): Query<TemplatePage>,
) -> Response {
    if !bearer_ok(&inner, &headers) {
        return invalid_token();
    }
    if waba_id != inner.waba_id {
        return graph_error(
            400,
            100,
            "Unsupported get request. Object with ID does not exist",
        );
    }
    if let Some(fault) = lock(&inner.faults).pop_front() {
        return graph_error(fault.http_status, fault.code, &fault.message);
    }
    inner.template_lists.fetch_add(1, Ordering::SeqCst);
    let limit = page.limit.unwrap_or(25).clamp(1, 100);
    let start = match page.after.as_deref().map(|a| {
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, a)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<usize>().ok())
    }) {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return graph_error(400, 100, "Invalid parameter: after"),
    };
    let mut all: Vec<((String, String), FakeTemplate)> = lock(&inner.templates)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let with_components = page
        .fields
        .as_deref()
        .is_none_or(|f| f.split(',').any(|f| f.trim() == "components"));
    let data: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|((name, language), t)| {
            let mut item = json!({
                "name": name, "language": language, "status": t.status,
                "category": t.category, "id": t.id, "parameter_format": "POSITIONAL",
            });
            if with_components {
                item["components"] = json!([{ "type": "BODY", "text": t.body(name) }]);
            }
            item
        })
        .collect();
    let cursor = |n: usize| {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, n.to_string())
    };
    let end = start + data.len();
    let mut paging = json!({ "cursors": { "before": cursor(start), "after": cursor(end) } });
    if end < all.len() {
        paging["next"] = json!(format!(
            "http://{}/{version}/{waba_id}/message_templates?limit={limit}&after={}",
            headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1"),
            cursor(end)
        ));
    }
    Json(json!({ "data": data, "paging": paging })).into_response()
}

/// A template send against the account's templates, with the errors Meta answers.
fn check_template(inner: &Inner, template: &Value) -> Result<(), (i64, &'static str)> {
    let name = template["name"].as_str().unwrap_or_default().to_string();
    let language = template["language"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let templates = lock(&inner.templates);
    let Some(known) = templates.get(&(name, language)) else {
        return Err((132001, "Template name does not exist in the translation"));
    };
    match known.status.as_str() {
        "APPROVED" => {}
        "PAUSED" => return Err((132015, "Template is paused")),
        _ => return Err((132016, "Template is disabled")),
    }
    let given = template["components"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"] == "body")
        .map(|c| c["parameters"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    if given != known.body_parameters {
        return Err((
            132000,
            "Number of parameters does not match the expected number of params",
        ));
    }
    Ok(())
}

fn validate_send(msg: &Value) -> Result<(), String> {
    if msg["to"].as_str().is_none_or(str::is_empty) {
        return Err("The parameter to is required".into());
    }
    match msg["type"].as_str().unwrap_or("text") {
        "text" => {
            let body = msg["text"]["body"]
                .as_str()
                .ok_or("text.body is required")?;
            if body.is_empty() || body.chars().count() > 4096 {
                return Err("text.body must be 1 to 4096 characters".into());
            }
        }
        "interactive" => {
            let i = &msg["interactive"];
            let body = i["body"]["text"]
                .as_str()
                .ok_or("interactive.body.text is required")?;
            if body.chars().count() > 1024 {
                return Err("interactive.body.text must be at most 1024 characters".into());
            }
            if i["type"] == "button" {
                let buttons = i["action"]["buttons"]
                    .as_array()
                    .ok_or("interactive.action.buttons is required")?;
                if buttons.is_empty() || buttons.len() > 3 {
                    return Err("interactive buttons: 1 to 3".into());
                }
                for b in buttons {
                    let title = b["reply"]["title"]
                        .as_str()
                        .ok_or("button title is required")?;
                    let id = b["reply"]["id"].as_str().ok_or("button id is required")?;
                    if title.chars().count() > 20 || id.chars().count() > 256 {
                        return Err("button title at most 20 characters, id at most 256".into());
                    }
                }
            }
            if i["type"] == "list" {
                let label = i["action"]["button"]
                    .as_str()
                    .ok_or("interactive.action.button is required")?;
                if label.is_empty() || label.chars().count() > 20 {
                    return Err("list button: 1 to 20 characters".into());
                }
                let sections = i["action"]["sections"]
                    .as_array()
                    .ok_or("interactive.action.sections is required")?;
                let rows: Vec<&Value> = sections
                    .iter()
                    .flat_map(|s| s["rows"].as_array().into_iter().flatten())
                    .collect();
                if rows.is_empty() || rows.len() > 10 || sections.len() > 10 {
                    return Err("list rows: 1 to 10 in all".into());
                }
                for r in rows {
                    let title = r["title"].as_str().ok_or("row title is required")?;
                    let id = r["id"].as_str().ok_or("row id is required")?;
                    if title.chars().count() > 24 || id.chars().count() > 200 {
                        return Err("row title at most 24 characters, id at most 200".into());
                    }
                }
            }
        }
        "template" => {
            if msg["template"]["name"].as_str().is_none() {
                return Err("template.name is required".into());
            }
        }
        kind @ ("image" | "document" | "audio" | "video" | "sticker") => {
            let media = &msg[kind];
            if media["id"].as_str().is_none() && media["link"].as_str().is_none() {
                return Err(format!("{kind}.id or {kind}.link is required"));
            }
            if kind == "audio" && !media["caption"].is_null() {
                return Err("audio messages take no caption".into());
            }
        }
        "location" | "reaction" | "contacts" => {}
        other => return Err(format!("unsupported message type {other}")),
    }
    Ok(())
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

async fn chat_messages(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<After>,
) -> Json<Vec<ChatLine>> {
    Json(
        lock(&inner.chat)
            .iter()
            .filter(|l| l.seq > q.after)
            .cloned()
            .collect(),
    )
}

#[derive(Deserialize)]
struct ChatSend {
    from: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    text: String,
    /// A photo (base64) sent as an image message, `text` its caption.
    #[serde(default)]
    photo: Option<String>,
    #[serde(default)]
    mime_type: Option<String>,
}

async fn chat_send(State(inner): State<Arc<Inner>>, Json(req): Json<ChatSend>) -> Response {
    let from: String = req.from.chars().filter(|c| c.is_ascii_digit()).collect();
    let photo = match req
        .photo
        .as_deref()
        .map(|p| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, p))
    {
        None => None,
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(_)) => return (StatusCode::BAD_REQUEST, "photo: base64").into_response(),
    };
    if from.is_empty() || (req.text.trim().is_empty() && photo.is_none()) {
        return (
            StatusCode::BAD_REQUEST,
            "from (digits) and text (or a photo) are required",
        )
            .into_response();
    }
    let id = inner.next_wamid();
    let msg = match photo {
        None => {
            json!({ "from": from, "id": id, "timestamp": now_unix().to_string(), "type": "text", "text": { "body": req.text } })
        }
        Some(bytes) => {
            let mime_type = req.mime_type.clone().unwrap_or_else(|| "image/jpeg".into());
            let digest = <Sha256 as sha2::Digest>::digest(&bytes);
            let media_id = (9_000_000_000_000_000u64
                + inner.counter.fetch_add(1, Ordering::SeqCst))
            .to_string();
            lock(&inner.media).insert(
                media_id.clone(),
                FakeMedia {
                    bytes,
                    mime_type: mime_type.clone(),
                },
            );
            let mut image = json!({ "id": media_id, "mime_type": mime_type,
                "sha256": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest) });
            if !req.text.trim().is_empty() {
                image["caption"] = json!(req.text);
            }
            json!({ "from": from, "id": id, "timestamp": now_unix().to_string(), "type": "image", "image": image })
        }
    };
    let is_photo = msg["type"] == "image";
    let payload = inner.envelope(&from, req.name.as_deref().unwrap_or("Sandbox user"), msg);
    {
        let mut chat = lock(&inner.chat);
        let seq = chat.len() as u64 + 1;
        chat.push(ChatLine {
            seq,
            from_user: true,
            user: from.clone(),
            text: if is_photo {
                format!("[photo] {}", req.text)
            } else {
                req.text.clone()
            },
        });
    }
    match inner.deliver(&payload).await {
        Ok(status) => (
            StatusCode::OK,
            Json(json!({ "webhook_status": status.as_u16(), "id": id })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("webhook delivery failed: {e}"),
        )
            .into_response(),
    }
}

async fn chat_page() -> Html<&'static str> {
    Html(include_str!("chat.html"))
}
