//! The session owner: holds a WhatsApp Web account's one socket while this process holds the
//! account's Lease, and never otherwise.
//!
//! Per term (a Lease epoch): build a client on the Postgres store fenced at that epoch, with
//! sockets from [`GatedSockets`]; report state and pairing codes to `wa_web_sessions`; and
//! close every socket as soon as the term ends: the Lease is lost, the renew deadline passes
//! without a renewal (checked every [`WATCH_INTERVAL`], independent of the elector), or the
//! process shuts down (then the client is flushed first, and the caller releases the Lease
//! after [`SessionOwner::run`] returns).
//!
//! While the client is connected, a [`Sender`] of the term sends the account's outbox through
//! it; inbound messages are committed before the client acknowledges them ([`WebInbound`]), and
//! receipts move outbound rows forward.
//!
//! Logged out from the phone: the device's whole identity is dropped (`PgStore::forget_identity`:
//! keys, sessions, pre-keys, sender keys, app-state keys), the state becomes `logged_out`
//! and the owner does not reconnect in this term (no reconnect storm). The next term (a pod
//! restart, or a Lease handover) shows a new pairing code.

use std::sync::Arc;
use std::time::Duration;

use lease::Leadership;
use queue::notifier::Notifier;
use queue::web_session::{self, SessionState};
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use whatsapp_rust::Client;
use whatsapp_rust::bot::Bot;
use whatsapp_rust::types::events::Event;

use super::http_client::ReqwestHttpClient;
use super::inbound::WebInbound;
use super::media::WebMedia;
use super::outbound::{WebDelivery, apply_receipt};
use super::socket::{GatedFactory, GatedSockets};
use super::store::PgStore;
use crate::gateway::media::{MediaFetcher, MediaLimits};
use crate::gateway::sender::{Pacing, Sender, SenderConfig};
use crate::metrics::Metrics;

/// How often the owner re-checks its trust window on its own.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How long a graceful client shutdown may take before the sockets are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the check of the current WhatsApp Web version may take before the last known one
/// is used.
const VERSION_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// WhatsApp Web's service worker, which names the current client revision.
pub const VERSION_CHECK_URL: &str = "https://web.whatsapp.com/sw.js";
/// How long a fetched version is used before it is checked again (the library's own rule).
const VERSION_MAX_AGE_MS: i64 = 24 * 60 * 60 * 1000;

/// How the number is linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    QrCode,
    PairCode,
}

impl Pairing {
    pub fn as_str(self) -> &'static str {
        match self {
            Pairing::QrCode => "QrCode",
            Pairing::PairCode => "PairCode",
        }
    }
}

/// Settings of one WhatsApp Web account.
#[derive(Debug, Clone)]
pub struct WebSettings {
    pub account: String,
    /// E.164, for the pair code.
    pub phone_number: String,
    pub pairing: Pairing,
    pub push_name: Option<String>,
    /// WebSocket URL override (a stand-in server in tests).
    pub server_url: Option<String>,
    /// Client version to announce instead of fetching the current one (no egress, tests).
    pub client_version: Option<(u32, u32, u32)>,
    /// Where the current version is read when it is not pinned: WhatsApp's service worker
    /// ([`VERSION_CHECK_URL`]; a fake in tests).
    pub version_check_url: String,
    /// The pod's name, written as the session row's holder.
    pub identity: String,
    /// Send pacing per number and per recipient.
    pub pacing: Pacing,
    /// "typing..." shown before each reply.
    pub typing: Duration,
    /// Customers' messages are marked read once stored (blue ticks).
    pub read_receipts: bool,
    /// First retry delay of a failed send (`spec.delivery.backoffSeconds`).
    pub backoff: Duration,
    /// How long a send whose outcome is unknown waits before it is sent again, with the same
    /// message id, which the recipient's devices drop if the first one arrived
    /// (`spec.delivery.inDoubtGraceSeconds`).
    pub in_doubt_grace: Duration,
    /// Attempts of each outbound message (`spec.delivery.maxAttempts`, on the account row).
    pub max_attempts: i32,
    /// The AgentPool's queue (the team inbox is told when media arrive).
    pub pool: String,
    /// The media customers send (`spec.media`).
    pub media: MediaLimits,
}

/// Why a term ended.
#[derive(Debug, PartialEq, Eq)]
enum TermEnd {
    LeaseLost,
    Shutdown,
    LoggedOut,
}

pub struct SessionOwner {
    db: PgPool,
    /// Wake-ups for new outbound rows, shared by every account of the process (one LISTEN).
    notifier: Notifier,
    settings: WebSettings,
    leadership: Arc<Leadership>,
    inbound: WebInbound,
    metrics: Metrics,
}

/// The term's sender and media fetcher, running while the client is connected.
type RunningSender = (JoinHandle<()>, CancellationToken);

/// Media files (the number's limit) and a margin for encryption: the largest answer the
/// client's HTTP reads.
fn max_http_body(limits: &MediaLimits) -> u64 {
    limits.max_bytes + 64 * 1024
}

impl SessionOwner {
    pub fn new(
        db: PgPool,
        notifier: Notifier,
        settings: WebSettings,
        leadership: Arc<Leadership>,
        inbound: WebInbound,
        metrics: Metrics,
    ) -> Self {
        Self {
            db,
            notifier,
            settings,
            leadership,
            inbound,
            metrics,
        }
    }

    /// Serve terms until `cancel`; returns with every socket closed.
    pub async fn run(&self, cancel: CancellationToken) {
        // New outbound rows wake the sender at once (LISTEN), whichever term is running.
        let wake = self.notifier.outbound(&self.settings.account);
        let mut changes = self.leadership.subscribe();
        loop {
            let epoch = loop {
                if let Some(epoch) = self.leadership.may_act() {
                    break epoch;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                }
            };
            // Held for the whole term: a planned handover releases the Lease only after the
            // term's socket is closed.
            let work = self.leadership.working().await;
            if self.leadership.may_act() != Some(epoch) {
                continue;
            }
            let end = self.term(epoch, &cancel, &wake).await;
            drop(work);
            tracing::info!(account = %self.settings.account, fence_epoch = epoch, reason = ?end, "WhatsApp Web term ended; socket closed");
            match end {
                TermEnd::Shutdown => return,
                TermEnd::LeaseLost => {}
                TermEnd::LoggedOut => {
                    // Stay off until this term ends: no reconnect storm against a logged-out device.
                    while self.leadership.may_act() == Some(epoch) {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = changes.changed() => {}
                            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                        }
                    }
                }
            }
        }
    }

    async fn report(&self, epoch: i64, state: SessionState, device: Option<&str>, detail: &str) {
        match web_session::set_state(
            &self.db,
            &self.settings.account,
            epoch,
            &self.settings.identity,
            state,
            device,
            detail,
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(account = %self.settings.account, "fenced off: not reporting session state")
            }
            Err(error) => {
                tracing::warn!(error = %queue::rescuer::error_chain(&error), "could not report session state")
            }
        }
    }

    /// Say why WhatsApp could not be reached (the account's status shows it until the server
    /// answers again).
    async fn report_connect_error(&self, epoch: i64, error: &str) {
        if let Err(e) = web_session::set_connect_error(
            &self.db,
            &self.settings.account,
            epoch,
            &self.settings.identity,
            error,
        )
        .await
        {
            tracing::warn!(error = %queue::rescuer::error_chain(&e), "could not report the connect error");
        }
    }

    /// The version to announce when `clientVersion` is not pinned. The library fetches the
    /// current one from web.whatsapp.com once its cached one is a day old, and fails the whole
    /// connect when that fetch fails (pods without egress to that site). So fetch it here:
    /// None (the library's cache) while that is fresh; the fetched one; or, when the fetch
    /// fails, the last known one (the library's built-in for a new device), with the reason in
    /// the status.
    async fn resolve_version(
        &self,
        epoch: i64,
        device: Option<&whatsapp_rust::wacore::store::Device>,
    ) -> Option<(u32, u32, u32)> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if device.is_some_and(|d| {
            d.app_version_last_fetched_ms > 0
                && now_ms - d.app_version_last_fetched_ms < VERSION_MAX_AGE_MS
        }) {
            return None;
        }
        let fetch = async {
            let body = reqwest::Client::new()
                .get(&self.settings.version_check_url)
                .header(
                    "user-agent",
                    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
                )
                .timeout(VERSION_FETCH_TIMEOUT)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("{e:#}"))?
                .text()
                .await
                .map_err(|e| format!("{e:#}"))?;
            whatsapp_rust::version::parse_sw_js(&body)
                .ok_or_else(|| "no client_revision in the answer".to_string())
        };
        let error = match tokio::time::timeout(VERSION_FETCH_TIMEOUT, fetch).await {
            Ok(Ok(version)) => return Some(version),
            Ok(Err(e)) => format!("{} ({e})", self.settings.version_check_url),
            Err(_) => format!(
                "{}: no answer in {} s",
                self.settings.version_check_url,
                VERSION_FETCH_TIMEOUT.as_secs()
            ),
        };
        let known = match device {
            Some(d) => (
                d.app_version_primary,
                d.app_version_secondary,
                d.app_version_tertiary,
            ),
            None => {
                let d = whatsapp_rust::wacore::store::Device::new();
                (
                    d.app_version_primary,
                    d.app_version_secondary,
                    d.app_version_tertiary,
                )
            }
        };
        let (p, s, t) = known;
        tracing::warn!(account = %self.settings.account, %error, version = %format!("{p}.{s}.{t}"), "could not fetch the current WhatsApp Web version; using the last known one");
        self.report_connect_error(
            epoch,
            &format!(
                "could not fetch the current WhatsApp Web version from {error}; connecting as \
                 {p}.{s}.{t}, the last known version"
            ),
        )
        .await;
        Some(known)
    }

    /// The term's work while connected: the outbox, and the media customers sent.
    fn start_sender(&self, epoch: i64, client: Arc<Client>, wake: &Arc<Notify>) -> RunningSender {
        let media = MediaFetcher::new(
            self.db.clone(),
            &self.settings.account,
            &self.settings.pool,
            self.settings.media,
            WebMedia::new(client.clone()),
            self.metrics.clone(),
        );
        let sender = Sender::new(
            self.db.clone(),
            SenderConfig {
                account: self.settings.account.clone(),
                identity: self.settings.identity.clone(),
                pacing: self.settings.pacing,
                backoff: self.settings.backoff,
                in_doubt_grace: self.settings.in_doubt_grace,
                concurrency: 4,
                poll_interval: Duration::from_secs(1),
            },
            WebDelivery::new(self.db.clone(), client, self.settings.typing, epoch),
            self.leadership.clone(),
            wake.clone(),
            self.metrics.clone(),
        );
        let cancel = CancellationToken::new();
        let (c, m) = (cancel.clone(), cancel.clone());
        let (leadership, media_wake) = (
            self.leadership.clone(),
            self.notifier.media(&self.settings.account),
        );
        let work = async move {
            tokio::join!(sender.run(c), media.run(leadership, media_wake, m));
        };
        (tokio::spawn(work), cancel)
    }

    /// Stop the term's sender; it finishes the batch in flight.
    async fn stop_sender(sender: &mut Option<RunningSender>) {
        if let Some((task, cancel)) = sender.take() {
            cancel.cancel();
            let _ = task.await;
        }
    }

    async fn term(&self, epoch: i64, cancel: &CancellationToken, wake: &Arc<Notify>) -> TermEnd {
        let store = PgStore::new(self.db.clone(), &self.settings.account, epoch);
        let device = whatsapp_rust::wacore::store::traits::DeviceStore::load(&store)
            .await
            .ok()
            .flatten();
        let paired = device.as_ref().is_some_and(|d| d.pn.is_some());
        self.report(
            epoch,
            if paired {
                SessionState::Connecting
            } else {
                SessionState::Unpaired
            },
            None,
            "opening the socket",
        )
        .await;
        let sockets = Arc::new(GatedSockets::new(
            self.settings.server_url.as_deref(),
            self.leadership.clone(),
            epoch,
        ));
        let (logged_out_tx, mut logged_out_rx) = tokio::sync::mpsc::channel::<String>(1);
        let (connected_tx, mut connected_rx) = watch::channel(false);
        let events = EventSink {
            inbound: self.inbound.clone(),
            connected: Arc::new(connected_tx),
            db: self.db.clone(),
            account: self.settings.account.clone(),
            identity: self.settings.identity.clone(),
            epoch,
            pairing: self.settings.pairing,
            logged_out: logged_out_tx,
            replaced: Default::default(),
        };
        let mut builder = Bot::builder()
            .with_backend(store.clone())
            .with_transport_factory(GatedFactory(sockets.clone()))
            .with_http_client(ReqwestHttpClient::new(max_http_body(&self.settings.media)))
            .with_inbound_durability_hook(self.inbound.clone())
            .on_event(move |event, client| {
                let events = events.clone();
                async move {
                    // Online, like a phone in use: customers' messages then get real delivery
                    // ticks (an unavailable client's receipts are `inactive`, not shown).
                    if matches!(*event, Event::Connected(_))
                        && let Err(error) = client.presence().set_available().await
                    {
                        tracing::debug!(%error, "presence not sent");
                    }
                    events.handle(&event).await
                }
            });
        if let Some(name) = &self.settings.push_name {
            builder = builder.with_push_name(name.clone());
        }
        let version = match self.settings.client_version {
            Some(pinned) => Some(pinned),
            None => self.resolve_version(epoch, device.as_ref()).await,
        };
        if let Some(version) = version {
            builder = builder.with_version(version);
        }
        if self.settings.pairing == Pairing::PairCode && !paired {
            builder = builder.with_pair_code(whatsapp_rust::pair_code::PairCodeOptions {
                phone_number: self
                    .settings
                    .phone_number
                    .trim_start_matches('+')
                    .to_string(),
                ..Default::default()
            });
        }
        let bot = match builder.build().await {
            Ok(bot) => bot,
            Err(error) => {
                tracing::error!(account = %self.settings.account, %error, "could not build the WhatsApp Web client");
                self.report(
                    epoch,
                    SessionState::Disconnected,
                    None,
                    &format!("client setup failed: {error}"),
                )
                .await;
                // Try again next watch tick unless the term ends.
                return self.wait_term_end(epoch, cancel).await;
            }
        };
        let handle = bot.spawn();
        let mut watch = tokio::time::interval(WATCH_INTERVAL);
        let mut changes = self.leadership.subscribe();
        let mut sender: Option<RunningSender> = None;
        let end = loop {
            tokio::select! {
                _ = cancel.cancelled() => break TermEnd::Shutdown,
                Ok(()) = connected_rx.changed() => {
                    let connected = *connected_rx.borrow_and_update();
                    if connected && sender.is_none() {
                        sender = Some(self.start_sender(epoch, handle.client(), wake));
                    } else if !connected {
                        Self::stop_sender(&mut sender).await;
                    }
                }
                reason = logged_out_rx.recv() => {
                    let reason = reason.unwrap_or_default();
                    tracing::warn!(account = %self.settings.account, %reason, "logged out from the phone; not reconnecting");
                    break TermEnd::LoggedOut;
                }
                error = sockets.next_failure() => {
                    tracing::warn!(account = %self.settings.account, %error, "could not open the WhatsApp Web socket; the client retries");
                    self.report_connect_error(epoch, &format!("the socket did not open: {error}")).await;
                }
                _ = changes.changed() => {
                    if !sockets.permitted() { break TermEnd::LeaseLost; }
                }
                _ = watch.tick() => {
                    if !sockets.permitted() { break TermEnd::LeaseLost; }
                }
            }
        };
        match end {
            TermEnd::LeaseLost => {
                // Cut first: a standby may take over any moment now. A send in flight fails on
                // the closed socket, or leaves its row in doubt for the next holder.
                sockets.close_all().await;
                handle.abort();
                sockets.close_all().await;
                if let Some((task, _)) = sender.take() {
                    task.abort();
                }
            }
            TermEnd::Shutdown | TermEnd::LoggedOut => {
                // Finish the send in flight, then flush the session (device snapshot, receipts) while still fenced, then cut.
                Self::stop_sender(&mut sender).await;
                let client = handle.client();
                if tokio::time::timeout(SHUTDOWN_GRACE, handle.shutdown())
                    .await
                    .is_err()
                {
                    tracing::warn!(account = %self.settings.account, "client shutdown timed out; closing the socket");
                }
                client.disconnect().await;
                sockets.close_all().await;
            }
        }
        match end {
            TermEnd::LoggedOut => {
                // The identity is void; keep the session row (for the operator) and forget
                // everything of the identity so the next term pairs afresh from empty state.
                match PgStore::new(self.db.clone(), &self.settings.account, epoch)
                    .forget_identity()
                    .await
                {
                    Ok(rows) => {
                        tracing::info!(account = %self.settings.account, rows, "forgot the removed device's identity")
                    }
                    Err(error) => {
                        tracing::warn!(account = %self.settings.account, %error, "could not forget the removed device's identity")
                    }
                }
                self.report(
                    epoch,
                    SessionState::LoggedOut,
                    None,
                    "the phone removed this linked device; restart the gateway (kubectl rollout restart) to show a new code",
                )
                .await;
            }
            TermEnd::Shutdown => {
                self.report(
                    epoch,
                    SessionState::Disconnected,
                    None,
                    "gateway shutting down; a standby takes over",
                )
                .await;
            }
            TermEnd::LeaseLost => {}
        }
        end
    }

    async fn wait_term_end(&self, epoch: i64, cancel: &CancellationToken) -> TermEnd {
        let mut changes = self.leadership.subscribe();
        loop {
            if self.leadership.may_act() != Some(epoch) {
                return TermEnd::LeaseLost;
            }
            tokio::select! {
                _ = cancel.cancelled() => return TermEnd::Shutdown,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => return TermEnd::LeaseLost,
            }
        }
    }
}

/// Turns client events into session-state rows, receipts into outbound states, and tells the
/// owner when the client is connected.
#[derive(Clone)]
struct EventSink {
    inbound: WebInbound,
    connected: Arc<watch::Sender<bool>>,
    db: PgPool,
    account: String,
    identity: String,
    epoch: i64,
    pairing: Pairing,
    logged_out: tokio::sync::mpsc::Sender<String>,
    /// WhatsApp ended this term's session for a newer login of the device.
    replaced: Arc<std::sync::atomic::AtomicBool>,
}

impl EventSink {
    async fn code(
        &self,
        qr: Option<&str>,
        pair: Option<&str>,
        valid_for: Duration,
    ) -> queue::Result<bool> {
        let expires =
            chrono::Utc::now() + chrono::Duration::from_std(valid_for).unwrap_or_default();
        web_session::set_pairing_code(
            &self.db,
            &self.account,
            self.epoch,
            &self.identity,
            self.pairing.as_str(),
            qr,
            pair,
            expires,
        )
        .await
    }

    async fn state(
        &self,
        state: SessionState,
        jid: Option<&str>,
        detail: &str,
    ) -> queue::Result<bool> {
        web_session::set_state(
            &self.db,
            &self.account,
            self.epoch,
            &self.identity,
            state,
            jid,
            detail,
        )
        .await
    }

    async fn handle(&self, event: &Event) {
        let result = match event {
            Event::PairingQrCode(qr) => self.code(Some(&qr.code), None, qr.timeout).await,
            Event::PairingCode(pc) => self.code(None, Some(&pc.code), pc.timeout).await,
            Event::Connected(_) => {
                let store = PgStore::new(self.db.clone(), &self.account, self.epoch);
                let jid = whatsapp_rust::wacore::store::traits::DeviceStore::load(&store)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|d| d.pn.map(|j| j.to_string()));
                tracing::info!(account = %self.account, fence_epoch = self.epoch, "WhatsApp Web connected");
                self.connected.send_replace(true);
                self.state(SessionState::Connected, jid.as_deref(), "connected")
                    .await
            }
            // After a replacement the row keeps saying why, whatever order the events came in.
            Event::Disconnected(_) if self.replaced.load(std::sync::atomic::Ordering::SeqCst) => {
                self.connected.send_replace(false);
                Ok(true)
            }
            Event::Disconnected(d) => {
                self.connected.send_replace(false);
                let detail = format!("socket closed: {:?}", d.reason);
                self.state(SessionState::Disconnected, None, &detail).await
            }
            Event::Receipt(receipt) => apply_receipt(&self.db, receipt).await.map(|_| true),
            // Messages that bypass the durability hook (recovered placeholders) are stored here;
            // the hook already committed the rest.
            Event::Messages(batch) if !batch.hook_committed => {
                match self.inbound.commit(&batch.messages).await {
                    Ok(_) => Ok(true),
                    Err(error) => {
                        tracing::warn!(account = %self.account, %error, "could not store recovered WhatsApp Web messages");
                        Ok(false)
                    }
                }
            }
            // WhatsApp kept a newer login of this device (another program, a copied session):
            // reconnecting would kick it back and the two would fight over the number.
            Event::StreamReplaced(_) => {
                self.replaced
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.connected.send_replace(false);
                tracing::error!(account = %self.account, fence_epoch = self.epoch, "another connection logged in as this device (StreamReplaced); not reconnecting in this term");
                self.state(
                    SessionState::Disconnected,
                    None,
                    "replaced: another connection logged in as this device (StreamReplaced); not reconnecting until the gateway restarts; see the \"two sockets\" playbook",
                )
                .await
            }
            Event::LoggedOut(l) => {
                let _ = self.logged_out.try_send(format!("{:?}", l.reason));
                Ok(true)
            }
            _ => Ok(true),
        };
        if let Err(error) = result {
            tracing::warn!(account = %self.account, error = %queue::rescuer::error_chain(&error), "could not record a WhatsApp Web event");
        }
    }
}
