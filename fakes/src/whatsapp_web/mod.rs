//! A WhatsApp Web server stand-in: a local WebSocket that speaks the real protocol far enough
//! for a companion device to pair and log in, built from the client crate's own primitives
//! (`wacore` Noise state, frame codec, binary nodes, ADV pairing crypto).
//!
//! - Noise: XX for a device without the server's cached certificate, IK for one that has it,
//!   then the AES-GCM transport with per-direction counters, like `g.whatsapp.net`.
//! - Pairing: a registration login gets `<pair-device>` refs; [`WebServer::link`] plays the
//!   phone scanning the QR code the client rendered (HMAC with the QR's ADV secret, account
//!   signature over the QR's identity key), checks the device signature the client sends back,
//!   registers the device and ends the stream with 515, as the real server does.
//! - Login: a registered device (its Noise static key and JID) gets `<success>`; anything else
//!   gets `<failure reason="401">`. A second login of one device while the first is open gets the
//!   first one `<conflict type="replaced">` and is counted: [`WebServer::peak_per_device`] is the
//!   number the one-socket-per-phone tests assert on.
//! - Pair code: a `companion_hello` gets its pairing ref, so the device shows a code (the
//!   phone typing it is not played).
//! - After login it answers the IQs a fresh session sends (passive, app-state sync, pings) with
//!   empty results and then the device's offline queue, so the client reaches `Connected`.
//!
//! - Several phones: [`WebServer::add_phone`] adds another number whose devices can be linked
//!   with [`WebServer::link_as`] (a contact's client, for instance). Each phone is also device 0
//!   of its number, with pre-keys, as WhatsApp lists it; it never connects.
//! - Messages ([`relay`]): pre-key uploads and bundles, device lists, `<message>` stanzas relayed
//!   device to device with their `<enc>` nodes (kept until the device's receipt, re-sent at its
//!   next login), server acks and receipts. The stand-in holds no Signal state: what it relays
//!   only the two clients can read.
//! - Groups ([`group`]): members answered to the group info query, a group message fanned out to
//!   every member's devices with its sender-key `<enc>`.
//! - Media ([`media`]): the media connection IQ and an HTTPS host for the clients' encrypted
//!   uploads and downloads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::cloud_api::{lock, now_unix};
use tokio::sync::mpsc;
use tokio_websockets::{Message, ServerBuilder};
use whatsapp_rust::buffa::{Message as _, MessageField};
use whatsapp_rust::wacore::framing::{FrameDecoder, encode_frame};
use whatsapp_rust::wacore::handshake::NoiseHandshake;
use whatsapp_rust::wacore::libsignal::protocol::{KeyPair, PublicKey};
use whatsapp_rust::wacore::noise::NoiseCipher;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::consts::{NOISE_PATTERN_IK, NOISE_PATTERN_XX, WA_CONN_HEADER};
use whatsapp_rust::wacore_binary::marshal::{marshal, unmarshal_ref};
use whatsapp_rust::wacore_binary::util::unpack;
use whatsapp_rust::wacore_binary::{Node, NodeRef};
use whatsapp_rust::waproto::whatsapp as wa;

pub mod contact;
mod group;
mod media;
mod relay;

pub use media::{MediaHost, StoredMedia};

pub use relay::{Relayed, RelayedReceipt};

type Key = [u8; 32];
/// Nodes queued for one connection.
type Outbox = mpsc::UnboundedSender<Node>;

/// The Noise pattern a connection used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Xx,
    Ik,
}

/// What a connection's client payload asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginKind {
    /// An unpaired device asking to be linked.
    Registration,
    /// A paired device logging in as this JID.
    Login(String),
    /// A login the server refused (unknown device, wrong key).
    Refused,
}

/// One completed handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// The connection's number, as [`Relayed::conn`] names it.
    pub conn: u64,
    pub pattern: Pattern,
    pub kind: LoginKind,
    /// The WhatsApp Web version the client announced (`primary.secondary.tertiary`).
    pub version: Option<(u32, u32, u32)>,
}

/// A device the "phone" linked.
#[derive(Debug, Clone)]
struct Device {
    jid: String,
    lid: String,
    noise: Key,
    /// The ADVSignedDeviceIdentity the device signed at pairing, served with its pre-key
    /// bundles so peers can check the device belongs to the account.
    signed_identity: Vec<u8>,
}

/// A phone number with an account key (the phone that links devices) and a LID.
struct Phone {
    account: KeyPair,
    lid_user: String,
    next_device: u32,
}

/// A registration waiting for the phone: who may be linked, on which connection.
struct Pending {
    refs: Vec<String>,
    identity: Key,
    conn: Outbox,
    /// Filled by `link`: the JID offered, the details and identity signed, and the phone.
    offered: Option<(String, Vec<u8>, Key, String)>,
}

#[derive(Default)]
struct Counts {
    sockets_open: AtomicUsize,
    sockets_peak: AtomicUsize,
    sockets_total: AtomicUsize,
    pair_requests: AtomicUsize,
    logins: AtomicUsize,
}

struct State {
    server: KeyPair,
    cert_chain: Vec<u8>,
    /// The number [`WebServer::link`] links devices of.
    phone: String,
    phones: Mutex<HashMap<String, Phone>>,
    relay: relay::Relay,
    media: media::MediaHost,
    counts: Counts,
    devices: Mutex<Vec<Device>>,
    pending: Mutex<HashMap<Key, Pending>>,
    /// Open logins per device Noise key, with a way to reach each connection.
    online: Mutex<HashMap<Key, Vec<(u64, Outbox)>>>,
    device_peak: AtomicUsize,
    /// Leave an older login of a device open when a newer one comes (see `keep_replaced`).
    keep_replaced: std::sync::atomic::AtomicBool,
    handshakes: Mutex<Vec<Handshake>>,
    next_conn: AtomicUsize,
    /// Phone JIDs that devices asked a pair code for (`companion_hello`).
    pair_code_requests: Mutex<Vec<String>>,
    /// The DeviceProps of every pairing request, as the phone would show them.
    pairing_props: Mutex<Vec<PairingProps>>,
}

/// What a pairing request said about the device (WhatsApp shows it under "Linked devices" and
/// uses the history-sync settings to decide what to send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingProps {
    pub os: Option<String>,
    pub has_version: bool,
    pub platform_type: Option<i32>,
    pub has_history_sync_config: bool,
}

/// The running stand-in.
#[derive(Clone)]
pub struct WebServer {
    url: String,
    state: Arc<State>,
}

fn key32(bytes: &[u8]) -> anyhow::Result<Key> {
    bytes
        .try_into()
        .map_err(|_| anyhow!("expected a 32-byte key, got {} bytes", bytes.len()))
}

fn new_keypair() -> KeyPair {
    KeyPair::generate(&mut rand010::rng())
}

/// A certificate chain whose leaf is the server's static key. The client checks the leaf key
/// against the handshake and caches the chain for IK; like the crate's own fixture, signatures
/// are not checked by the client today.
fn cert_chain(server_static: &[u8]) -> Vec<u8> {
    use wa::cert_chain::{NoiseCertificate, noise_certificate::Details};
    let details = |serial, issuer, key: Vec<u8>| {
        Details {
            serial: Some(serial),
            issuer_serial: Some(issuer),
            key: Some(key),
            not_before: Some(1_700_000_000),
            not_after: Some(1_900_000_000),
        }
        .encode_to_vec()
    };
    wa::CertChain {
        leaf: MessageField::some(NoiseCertificate {
            details: Some(details(2, 1, server_static.to_vec())),
            signature: Some(vec![0u8; 64]),
        }),
        intermediate: MessageField::some(NoiseCertificate {
            details: Some(details(1, 0, vec![0xCC; 32])),
            signature: Some(vec![0u8; 64]),
        }),
    }
    .encode_to_vec()
}

impl WebServer {
    /// Listen on a free local port. `phone` is the number (digits) whose phone links devices.
    pub async fn start(phone: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/ws/chat", listener.local_addr()?);
        let server = new_keypair();
        let state = Arc::new(State {
            cert_chain: cert_chain(server.public_key.public_key_bytes()),
            server,
            phone: phone.trim_start_matches('+').to_string(),
            phones: Mutex::new(HashMap::new()),
            relay: relay::Relay::default(),
            media: media::MediaHost::start().await?,
            counts: Counts::default(),
            devices: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            online: Mutex::new(HashMap::new()),
            device_peak: AtomicUsize::new(0),
            keep_replaced: std::sync::atomic::AtomicBool::new(false),
            handshakes: Mutex::new(Vec::new()),
            next_conn: AtomicUsize::new(1),
            pair_code_requests: Mutex::new(Vec::new()),
            pairing_props: Mutex::new(Vec::new()),
        });
        let server = Self { url, state };
        server.add_phone(phone);
        let s = server.state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let open = s.counts.sockets_open.fetch_add(1, Ordering::SeqCst) + 1;
                    s.counts.sockets_peak.fetch_max(open, Ordering::SeqCst);
                    s.counts.sockets_total.fetch_add(1, Ordering::SeqCst);
                    if let Err(error) = serve(&s, tcp).await {
                        tracing::debug!(error = %format!("{error:#}"), "whatsapp web stand-in: connection ended");
                    }
                    s.counts.sockets_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(server)
    }

    /// A group of these numbers (digits; the first is its creator, an admin); returns its JID.
    /// Every linked device of a member gets the group's messages.
    pub fn create_group(&self, subject: &str, members: &[&str]) -> String {
        self.state.relay.groups.create(subject, members)
    }

    /// The media host (uploads, downloads, its certificate).
    pub fn media(&self) -> &MediaHost {
        &self.state.media
    }

    /// Another phone number whose devices can be linked ([`WebServer::link_as`]).
    pub fn add_phone(&self, phone: &str) {
        let digits = phone.trim_start_matches('+').to_string();
        let mut phones = lock(&self.state.phones);
        let n = phones.len() as u64;
        if phones.contains_key(&digits) {
            return;
        }
        let phone = Phone {
            account: new_keypair(),
            // The first phone keeps the LID earlier tests saw.
            lid_user: (99_887_766_554_433 + n).to_string(),
            next_device: 2,
        };
        if let Err(error) = self.state.relay.add_primary(&digits, &phone.account) {
            tracing::warn!(%error, "whatsapp web stand-in: the phone has no pre-keys");
        }
        phones.insert(digits, phone);
    }

    /// Every `<enc>` relayed so far, in order.
    pub fn relayed(&self) -> Vec<Relayed> {
        lock(&self.state.relay.relayed).clone()
    }

    /// Every receipt relayed so far, in order.
    pub fn receipts(&self) -> Vec<RelayedReceipt> {
        lock(&self.state.relay.receipts).clone()
    }

    /// Pre-key bundles handed out so far (each fetch of a device's keys counts one).
    pub fn bundles_served(&self) -> usize {
        self.state.relay.bundles_served.load(Ordering::SeqCst)
    }

    /// Messages relayed to a device that it has not acked yet (acked: stored, not redelivered).
    pub fn unacked(&self, device: &str) -> usize {
        self.state.relay.unacked(device)
    }

    /// Messages handed to a device at its login because it had not acked them yet.
    pub fn redelivered(&self) -> usize {
        self.state.relay.redelivered.load(Ordering::SeqCst)
    }

    /// One-time pre-keys the device has left on the server.
    pub fn one_time_pre_keys(&self, device: &str) -> usize {
        self.state.relay.one_time_left(device)
    }

    /// A new login of a device no longer ends its older session (a server slow to notice, a
    /// half-open TCP connection): whether the older holder lets go is then up to it.
    pub fn keep_replaced_sessions(&self) {
        self.state.keep_replaced.store(true, Ordering::SeqCst);
    }

    /// Messages to `device` are kept on the server, not sent, until [`WebServer::release`]
    /// (a phone out of coverage).
    pub fn hold(&self, device: &str) {
        lock(&self.state.relay.held).push(device.to_string());
    }

    /// Send a held device everything it has not acked.
    pub fn release(&self, device: &str) {
        self.state.relay.release(&self.state, device);
    }

    /// The next message from device `from` to device `to` arrives damaged: `to` cannot
    /// decrypt it and sends a retry receipt, as after a lost session update.
    pub fn corrupt_next(&self, from: &str, to: &str) {
        lock(&self.state.relay.corrupt_next).push((from.to_string(), to.to_string()));
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// WebSockets open right now.
    pub fn open_sockets(&self) -> usize {
        self.state.counts.sockets_open.load(Ordering::SeqCst)
    }

    /// The most WebSockets ever open at once.
    pub fn peak_sockets(&self) -> usize {
        self.state.counts.sockets_peak.load(Ordering::SeqCst)
    }

    /// WebSockets ever accepted.
    pub fn total_sockets(&self) -> usize {
        self.state.counts.sockets_total.load(Ordering::SeqCst)
    }

    /// The most logged-in sessions one device ever had at once (must stay 1).
    pub fn peak_per_device(&self) -> usize {
        self.state.device_peak.load(Ordering::SeqCst)
    }

    /// Logged-in sessions right now, over all devices.
    pub fn online(&self) -> usize {
        lock(&self.state.online).values().map(Vec::len).sum()
    }

    /// Logins of a linked device so far (each a new socket's session).
    pub fn logins(&self) -> usize {
        self.state.counts.logins.load(Ordering::SeqCst)
    }

    /// How many times a device was asked to pair (registration logins).
    pub fn pair_requests(&self) -> usize {
        self.state.counts.pair_requests.load(Ordering::SeqCst)
    }

    /// The DeviceProps of every pairing request, in order.
    pub fn pairing_props(&self) -> Vec<PairingProps> {
        lock(&self.state.pairing_props).clone()
    }

    /// Every completed handshake, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        lock(&self.state.handshakes).clone()
    }

    /// The phone JIDs devices asked a pair code for, in order.
    pub fn pair_code_requests(&self) -> Vec<String> {
        lock(&self.state.pair_code_requests).clone()
    }

    /// JIDs of the linked devices.
    pub fn linked(&self) -> Vec<String> {
        lock(&self.state.devices)
            .iter()
            .map(|d| d.jid.clone())
            .collect()
    }

    /// The phone scans `qr` (the string the client rendered as a QR code): the stand-in sends
    /// the device on that connection a signed `pair-success`. Returns the JID it will have.
    pub fn link(&self, qr: &str) -> anyhow::Result<String> {
        let phone = self.state.phone.clone();
        self.link_as(&phone, qr)
    }

    /// [`WebServer::link`] by the phone of another number (added with [`WebServer::add_phone`]).
    pub fn link_as(&self, phone: &str, qr: &str) -> anyhow::Result<String> {
        use base64::Engine as _;
        let phone = phone.trim_start_matches('+');
        let b64 = base64::engine::general_purpose::STANDARD;
        let parts: Vec<&str> = qr.split(',').collect();
        if parts.len() < 4 {
            bail!("not a WhatsApp Web QR payload: {qr:?}");
        }
        let noise = key32(&b64.decode(parts[1]).context("noise key")?)?;
        let identity = key32(&b64.decode(parts[2]).context("identity key")?)?;
        let adv_secret = b64.decode(parts[3]).context("adv secret")?;
        let mut pending = lock(&self.state.pending);
        let p = pending
            .get_mut(&noise)
            .ok_or_else(|| anyhow!("no connection of this device is waiting to pair"))?;
        if !p.refs.iter().any(|r| r == parts[0]) {
            bail!("the QR ref was not issued to this connection");
        }
        if p.identity != identity {
            bail!("the QR identity key is not the one the device registered");
        }
        let (device_id, lid_user, account) = {
            let mut phones = lock(&self.state.phones);
            let p = phones
                .get_mut(phone)
                .ok_or_else(|| anyhow!("the stand-in has no phone {phone} (add_phone)"))?;
            p.next_device += 1;
            (p.next_device - 1, p.lid_user.clone(), p.account.clone())
        };
        let jid = format!("{phone}:{device_id}@s.whatsapp.net");
        let lid = format!("{lid_user}:{device_id}@lid");
        let details = wa::ADVDeviceIdentity {
            raw_id: Some(device_id),
            timestamp: Some(now_unix()),
            key_index: Some(device_id),
            account_type: Some(wa::ADVEncryptionType::E2EE),
            device_type: Some(wa::ADVEncryptionType::E2EE),
        }
        .encode_to_vec();
        let account_pub = account.public_key.public_key_bytes().to_vec();
        let mut to_sign = vec![6u8, 0];
        to_sign.extend_from_slice(&details);
        to_sign.extend_from_slice(&identity);
        let signature = account
            .private_key
            .calculate_signature(&to_sign, &mut rand010::rng())
            .map_err(|e| anyhow!("account signature: {e}"))?;
        let signed = wa::ADVSignedDeviceIdentity {
            details: Some(details.clone()),
            account_signature_key: Some(account_pub),
            account_signature: Some(signature.to_vec()),
            device_signature: None,
        }
        .encode_to_vec();
        let mut mac = Hmac::<Sha256>::new_from_slice(&adv_secret).context("hmac key")?;
        mac.update(&signed);
        let container = wa::ADVSignedDeviceIdentityHMAC {
            details: Some(signed),
            hmac: Some(mac.finalize().into_bytes().to_vec()),
            account_type: Some(wa::ADVEncryptionType::E2EE),
        }
        .encode_to_vec();
        let jid_value: whatsapp_rust::Jid = jid.parse().map_err(|e| anyhow!("jid: {e:?}"))?;
        let lid_value: whatsapp_rust::Jid = lid.parse().map_err(|e| anyhow!("lid: {e:?}"))?;
        let node = NodeBuilder::new("iq")
            .attr("from", "s.whatsapp.net")
            .attr("type", "set")
            .attr("id", format!("pair-{device_id}"))
            .children([NodeBuilder::new("pair-success")
                .children([
                    NodeBuilder::new("device-identity")
                        .attr("key-index", device_id.to_string())
                        .bytes(container)
                        .build(),
                    NodeBuilder::new("platform").attr("name", "smba").build(),
                    NodeBuilder::new("device")
                        .attr("jid", jid_value)
                        .attr("lid", lid_value)
                        .build(),
                    NodeBuilder::new("biz")
                        .attr("name", "Stand-in Phone")
                        .build(),
                ])
                .build()])
            .build();
        p.offered = Some((jid.clone(), details, identity, phone.to_string()));
        p.conn
            .send(node)
            .map_err(|_| anyhow!("the pairing connection closed"))?;
        Ok(jid)
    }

    /// The phone removes the linked device: its open session is ended and it can no longer log in.
    pub fn unlink(&self, jid: &str) {
        let removed: Vec<Device> = {
            let mut devices = lock(&self.state.devices);
            let (gone, kept) = devices.drain(..).partition(|d| d.jid == jid);
            *devices = kept;
            gone
        };
        for d in removed {
            self.state.relay.forget(&d.jid);
            self.end_sessions(&d.noise, "device_removed");
        }
    }

    /// Another connection logged in as this device elsewhere: WhatsApp ends the open session
    /// with `<conflict type="replaced">` (the device stays linked).
    pub fn replace(&self, jid: &str) {
        let noise = lock(&self.state.devices)
            .iter()
            .find(|d| d.jid == jid)
            .map(|d| d.noise);
        if let Some(noise) = noise {
            self.end_sessions(&noise, "replaced");
        }
    }

    fn end_sessions(&self, noise: &Key, conflict: &str) {
        if let Some(conns) = lock(&self.state.online).get(noise) {
            for (_, tx) in conns {
                let _ = tx.send(stream_error_conflict(conflict));
            }
        }
    }
}

fn stream_error_conflict(kind: &str) -> Node {
    NodeBuilder::new("stream:error")
        .children([NodeBuilder::new("conflict").attr("type", kind).build()])
        .build()
}

/// Marker a connection task sends itself to end the stream after the node before it.
const CLOSE_TAG: &str = "x-stand-in-close";

fn close_marker() -> Node {
    NodeBuilder::new(CLOSE_TAG).build()
}

/// Frames in, frames out, on one WebSocket.
struct Wire<S> {
    ws: S,
    decoder: FrameDecoder,
    first: bool,
}

impl<S> Wire<S>
where
    S: futures::Stream<Item = Result<Message, tokio_websockets::Error>>
        + futures::Sink<Message, Error = tokio_websockets::Error>
        + Unpin,
{
    /// The next length-prefixed frame, or None when the socket closed.
    async fn frame(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            if let Some(f) = self.decoder.decode_frame() {
                return Ok(Some(f.to_vec()));
            }
            let Some(msg) = self.ws.next().await else {
                return Ok(None);
            };
            let msg = msg?;
            if msg.is_close() {
                return Ok(None);
            }
            if !msg.is_binary() {
                continue;
            }
            let data: &[u8] = msg.as_payload();
            let data = if self.first {
                self.first = false;
                // The connection header is sent once, before the first frame.
                data.strip_prefix(&WA_CONN_HEADER[..]).unwrap_or(data)
            } else {
                data
            };
            self.decoder.feed(data);
        }
    }

    async fn send_frame(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let framed = encode_frame(payload, None)?;
        self.ws.send(Message::binary(framed)).await?;
        Ok(())
    }
}

/// The transport after the handshake: AES-GCM with one counter per direction.
struct Session {
    write: NoiseCipher,
    read: NoiseCipher,
    sent: u32,
    received: u32,
}

impl Session {
    fn seal(&mut self, node: &Node) -> anyhow::Result<Vec<u8>> {
        let plain = marshal(node)?;
        let out = self.write.encrypt_with_counter(self.sent, &plain)?;
        self.sent += 1;
        Ok(out)
    }

    fn open(&mut self, frame: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let mut buf = frame;
        self.read
            .decrypt_in_place_with_counter(self.received, &mut buf)?;
        self.received += 1;
        Ok(unpack(&buf)?.into_owned())
    }
}

/// Server side of XX or IK; returns the transport, the client's static key and its payload.
async fn handshake<S>(
    state: &State,
    wire: &mut Wire<S>,
) -> anyhow::Result<(Session, Key, Vec<u8>, Pattern)>
where
    S: futures::Stream<Item = Result<Message, tokio_websockets::Error>>
        + futures::Sink<Message, Error = tokio_websockets::Error>
        + Unpin,
{
    let hello = wire
        .frame()
        .await?
        .context("closed before the client hello")?;
    let hello = wa::HandshakeMessage::decode_from_slice(&hello)
        .context("client hello")?
        .client_hello
        .into_option()
        .context("no client hello")?;
    let client_eph = key32(hello.ephemeral.as_deref().unwrap_or_default())?;
    let server_static = state.server.public_key.public_key_bytes().to_vec();
    let server_priv = state.server.private_key.serialize();
    let eph = new_keypair();
    let eph_pub = eph.public_key.public_key_bytes().to_vec();
    let eph_priv = eph.private_key.serialize();

    let (noise, client_static, payload, pattern) = if let (Some(enc_static), Some(enc_payload)) =
        (hello.r#static.as_deref(), hello.payload.as_deref())
    {
        // IK: the client already knows our static key (cached certificate chain).
        let mut noise = NoiseHandshake::new(NOISE_PATTERN_IK, &WA_CONN_HEADER)?;
        noise.authenticate(&server_static);
        noise.authenticate(&client_eph);
        noise.mix_shared_secret(server_priv.as_slice(), &client_eph)?;
        let client_static = key32(&noise.decrypt(enc_static)?)?;
        noise.mix_shared_secret(server_priv.as_slice(), &client_static)?;
        let payload = noise.decrypt(enc_payload)?;
        noise.authenticate(&eph_pub);
        noise.mix_shared_secret(eph_priv.as_slice(), &client_eph)?;
        noise.mix_shared_secret(eph_priv.as_slice(), &client_static)?;
        let cert = noise.encrypt(&state.cert_chain)?;
        let reply = wa::HandshakeMessage {
            server_hello: MessageField::some(wa::handshake_message::ServerHello {
                ephemeral: Some(eph_pub.clone()),
                r#static: None,
                payload: Some(cert),
                ..Default::default()
            }),
            ..Default::default()
        };
        wire.send_frame(&reply.encode_to_vec()).await?;
        (noise, client_static, payload, Pattern::Ik)
    } else {
        // XX: -> e, <- e ee s es (static + certificate chain), -> s se (static + payload).
        let mut noise = NoiseHandshake::new(NOISE_PATTERN_XX, &WA_CONN_HEADER)?;
        noise.authenticate(&client_eph);
        noise.authenticate(&eph_pub);
        noise.mix_shared_secret(eph_priv.as_slice(), &client_eph)?;
        let enc_static = noise.encrypt(&server_static)?;
        noise.mix_shared_secret(server_priv.as_slice(), &client_eph)?;
        let cert = noise.encrypt(&state.cert_chain)?;
        let reply = wa::HandshakeMessage {
            server_hello: MessageField::some(wa::handshake_message::ServerHello {
                ephemeral: Some(eph_pub.clone()),
                r#static: Some(enc_static),
                payload: Some(cert),
                ..Default::default()
            }),
            ..Default::default()
        };
        wire.send_frame(&reply.encode_to_vec()).await?;
        let finish = wire.frame().await?.context("closed before client finish")?;
        let finish = wa::HandshakeMessage::decode_from_slice(&finish)
            .context("client finish")?
            .client_finish
            .into_option()
            .context("no client finish")?;
        let client_static = key32(&noise.decrypt(finish.r#static.as_deref().unwrap_or_default())?)?;
        noise.mix_shared_secret(eph_priv.as_slice(), &client_static)?;
        let payload = noise.decrypt(finish.payload.as_deref().unwrap_or_default())?;
        (noise, client_static, payload, Pattern::Xx)
    };
    // The split is the initiator's (write, read); the responder uses them the other way round.
    let (initiator_write, initiator_read) = noise.finish()?;
    Ok((
        Session {
            write: initiator_read,
            read: initiator_write,
            sent: 0,
            received: 0,
        },
        client_static,
        payload,
        pattern,
    ))
}

async fn serve(state: &Arc<State>, tcp: tokio::net::TcpStream) -> anyhow::Result<()> {
    let (_request, ws) = ServerBuilder::new().accept(tcp).await?;
    let mut wire = Wire {
        ws,
        decoder: FrameDecoder::new(),
        first: true,
    };
    let (mut session, client_static, payload, pattern) = handshake(state, &mut wire).await?;
    let payload = wa::ClientPayload::decode_from_slice(&payload).context("client payload")?;
    let announced = payload
        .user_agent
        .as_option()
        .and_then(|ua| ua.app_version.as_option())
        .map(|v| {
            (
                v.primary.unwrap_or_default(),
                v.secondary.unwrap_or_default(),
                v.tertiary.unwrap_or_default(),
            )
        });
    let (tx, mut rx) = mpsc::unbounded_channel::<Node>();
    let conn_id = state.next_conn.fetch_add(1, Ordering::SeqCst) as u64;

    let kind = if let Some(reg) = payload.device_pairing_data.as_option() {
        let identity = key32(reg.e_ident.as_deref().unwrap_or_default())?;
        state.counts.pair_requests.fetch_add(1, Ordering::SeqCst);
        let props =
            wa::DeviceProps::decode_from_slice(reg.device_props.as_deref().unwrap_or_default())
                .context("device props")?;
        lock(&state.pairing_props).push(PairingProps {
            os: props.os.clone(),
            has_version: props.version.as_option().is_some(),
            platform_type: props.platform_type.map(|p| p as i32),
            has_history_sync_config: props.history_sync_config.as_option().is_some(),
        });
        let refs: Vec<String> = (0..6).map(|i| format!("ref-{conn_id}-{i}")).collect();
        lock(&state.pending).insert(
            client_static,
            Pending {
                refs: refs.clone(),
                identity,
                conn: tx.clone(),
                offered: None,
            },
        );
        let node = NodeBuilder::new("iq")
            .attr("from", "s.whatsapp.net")
            .attr("type", "set")
            .attr("id", format!("pd-{conn_id}"))
            .attr("xmlns", "md")
            .children([NodeBuilder::new("pair-device")
                .children(
                    refs.into_iter()
                        .map(|r| NodeBuilder::new("ref").bytes(r.into_bytes()).build()),
                )
                .build()])
            .build();
        let _ = tx.send(node);
        LoginKind::Registration
    } else {
        let user = payload.username.unwrap_or_default().to_string();
        let device = payload.device.unwrap_or_default();
        let jid = format!("{user}:{device}@s.whatsapp.net");
        let known = lock(&state.devices)
            .iter()
            .find(|d| d.jid == jid && d.noise == client_static)
            .cloned();
        match known {
            Some(d) => {
                let mut online = lock(&state.online);
                let conns = online.entry(client_static).or_default();
                // The real server keeps the newest login and kicks the older one (unless a
                // test asked it to be slow about it).
                if !state.keep_replaced.load(Ordering::SeqCst) {
                    for (_, old) in conns.iter() {
                        let _ = old.send(stream_error_conflict("replaced"));
                    }
                }
                conns.push((conn_id, tx.clone()));
                state.device_peak.fetch_max(conns.len(), Ordering::SeqCst);
                state.counts.logins.fetch_add(1, Ordering::SeqCst);
                let lid: whatsapp_rust::Jid = d
                    .lid
                    .split(':')
                    .next()
                    .map(|u| format!("{u}@lid"))
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| anyhow!("lid: {e:?}"))?;
                let _ = tx.send(
                    NodeBuilder::new("success")
                        .attr("t", now_unix().to_string())
                        .attr("props", "1")
                        .attr("abprops", "1")
                        .attr("location", "stand-in")
                        .attr("creation", now_unix().to_string())
                        .attr("lid", lid)
                        .build(),
                );
                LoginKind::Login(jid)
            }
            None => {
                let _ = tx.send(
                    NodeBuilder::new("failure")
                        .attr("reason", "401")
                        .attr("location", "stand-in")
                        .build(),
                );
                let _ = tx.send(close_marker());
                LoginKind::Refused
            }
        }
    };
    lock(&state.handshakes).push(Handshake {
        conn: conn_id,
        pattern,
        kind: kind.clone(),
        version: announced,
    });

    let result = run_session(
        state,
        &mut wire,
        &mut session,
        &tx,
        &mut rx,
        (client_static, conn_id),
    )
    .await;
    // Gone: no longer online, no longer pairable on this connection.
    if let Some(conns) = lock(&state.online).get_mut(&client_static) {
        conns.retain(|(id, _)| *id != conn_id);
    }
    if kind == LoginKind::Registration {
        lock(&state.pending).remove(&client_static);
    }
    let _ = wire.ws.close().await;
    result
}

async fn run_session<S>(
    state: &Arc<State>,
    wire: &mut Wire<S>,
    session: &mut Session,
    tx: &Outbox,
    rx: &mut mpsc::UnboundedReceiver<Node>,
    (client_static, conn_id): (Key, u64),
) -> anyhow::Result<()>
where
    S: futures::Stream<Item = Result<Message, tokio_websockets::Error>>
        + futures::Sink<Message, Error = tokio_websockets::Error>
        + Unpin,
{
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(node) = out else { return Ok(()) };
                if node.tag == CLOSE_TAG {
                    return Ok(());
                }
                let closing = node.tag == "stream:error";
                let sealed = session.seal(&node)?;
                wire.send_frame(&sealed).await?;
                if closing {
                    return Ok(());
                }
            }
            frame = wire.frame() => {
                let Some(frame) = frame? else { return Ok(()) };
                let plain = session.open(frame)?;
                let node = unmarshal_ref(&plain)?;
                for reply in answer(state, &node, client_static, conn_id)? {
                    let _ = tx.send(reply);
                }
            }
        }
    }
}

impl State {
    /// The linked device a connection's Noise key belongs to.
    fn device_of(&self, noise: &Key) -> Option<String> {
        lock(&self.devices)
            .iter()
            .find(|d| d.noise == *noise)
            .map(|d| d.jid.clone())
    }

    /// The newest logged-in connection of a device.
    fn connection_of(&self, device: &str) -> Option<Outbox> {
        let noise = lock(&self.devices)
            .iter()
            .find(|d| d.jid == device)
            .map(|d| d.noise)?;
        lock(&self.online)
            .get(&noise)
            .and_then(|c| c.last())
            .map(|(_, tx)| tx.clone())
    }
}

fn attr(node: &NodeRef<'_>, key: &str) -> String {
    node.get_attr(key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

/// What the server says back to one client node.
fn answer(
    state: &State,
    node: &NodeRef<'_>,
    client_static: Key,
    conn: u64,
) -> anyhow::Result<Vec<Node>> {
    let device = state.device_of(&client_static);
    match (node.tag.as_ref(), device.as_deref()) {
        ("message", Some(d)) => return relay::message(state, node, d, conn),
        ("receipt", Some(d)) => return relay::receipt(state, node, d, conn),
        ("ack", Some(d)) => {
            relay::ack(state, node, d);
            return Ok(Vec::new());
        }
        ("iq", _) => {}
        _ => return Ok(Vec::new()), // presence, chat states: nothing to say
    }
    let id = attr(node, "id");
    let kind = attr(node, "type");
    let children = node.children().unwrap_or_default();
    if kind == "result" {
        if let Some(sign) = children
            .iter()
            .find(|c| c.tag.as_ref() == "pair-device-sign")
        {
            return finish_pairing(state, sign, client_static);
        }
        return Ok(Vec::new());
    }
    if kind == "error" {
        return Ok(Vec::new());
    }
    let result = |children: Vec<Node>| {
        NodeBuilder::new("iq")
            .attr("from", "s.whatsapp.net")
            .attr("type", "result")
            .attr("id", id.clone())
            .children(children)
            .build()
    };
    // A pair code asked for (stage 1 of "link with phone number"): the server answers with the
    // pairing ref; the device then shows its code. (The phone's side, typing the code, is not
    // played here.)
    if let Some(reg) = children
        .iter()
        .find(|c| c.tag.as_ref() == "link_code_companion_reg")
        && attr(reg, "stage") == "companion_hello"
    {
        lock(&state.pair_code_requests).push(attr(reg, "jid"));
        return Ok(vec![result(vec![
            NodeBuilder::new("link_code_companion_reg")
                .children([NodeBuilder::new("link_code_pairing_ref")
                    .bytes(format!("code-ref-{id}").into_bytes())
                    .build()])
                .build(),
        ])]);
    }
    match attr(node, "xmlns").as_str() {
        // Going active: the server sends what waited for the device (messages it never acked,
        // receipts), then the end of the offline queue.
        "passive" => {
            let backlog = device
                .as_deref()
                .map(|d| state.relay.backlog(d))
                .unwrap_or_default();
            let count = backlog.len();
            let mut out = vec![result(Vec::new())];
            out.extend(backlog);
            out.push(
                NodeBuilder::new("ib")
                    .attr("from", "s.whatsapp.net")
                    .children([NodeBuilder::new("offline")
                        .attr("count", count.to_string())
                        .build()])
                    .build(),
            );
            Ok(out)
        }
        "encrypt" => relay::encrypt_iq(state, node, device.as_deref()),
        // Media: where to upload and download, and the auth for it.
        "w:m" => Ok(vec![result(vec![state.media.media_conn()])]),
        "usync" => relay::usync_iq(state, node),
        "w:g2" => Ok(group::group_iq(state, node)),
        // App-state sync: every requested collection is clean and up to date.
        "w:sync:app:state" => {
            let names: Vec<String> = children
                .iter()
                .filter(|c| c.tag.as_ref() == "sync")
                .flat_map(|s| s.children().unwrap_or_default().iter())
                .filter(|c| c.tag.as_ref() == "collection")
                .map(|c| attr(c, "name"))
                .collect();
            Ok(vec![result(vec![
                NodeBuilder::new("sync")
                    .children(
                        names
                            .into_iter()
                            .map(|n| NodeBuilder::new("collection").attr("name", n).build()),
                    )
                    .build(),
            ])])
        }
        _ => Ok(vec![result(Vec::new())]),
    }
}

/// The device's reply to `pair-success`: check its signature, register it, end the stream
/// with 515 so it reconnects and logs in.
fn finish_pairing(
    state: &State,
    sign: &NodeRef<'_>,
    client_static: Key,
) -> anyhow::Result<Vec<Node>> {
    let (jid, details, identity, phone) = lock(&state.pending)
        .get(&client_static)
        .and_then(|p| p.offered.clone())
        .context("pair-device-sign without a pair-success")?;
    let bytes = sign
        .children()
        .unwrap_or_default()
        .iter()
        .find(|c| c.tag.as_ref() == "device-identity")
        .and_then(|c| c.content_bytes())
        .context("pair-device-sign without device-identity")?;
    let signed =
        wa::ADVSignedDeviceIdentity::decode_from_slice(bytes).context("device identity")?;
    if signed.details.as_deref() != Some(details.as_slice()) {
        bail!("the device signed other details than the phone sent");
    }
    let mut msg = vec![6u8, 1];
    msg.extend_from_slice(&details);
    msg.extend_from_slice(&identity);
    let account = lock(&state.phones)
        .get(&phone)
        .map(|p| p.account.public_key)
        .context("the pairing phone is gone")?;
    msg.extend_from_slice(account.public_key_bytes());
    let identity_key = PublicKey::from_djb_public_key_bytes(&identity)?;
    if !identity_key.verify_signature(&msg, signed.device_signature.as_deref().unwrap_or_default())
    {
        bail!("device signature does not verify");
    }
    let device_id = jid
        .split(':')
        .nth(1)
        .and_then(|s| s.split('@').next())
        .unwrap_or("0")
        .to_string();
    let lid_user = lock(&state.phones)
        .get(&phone)
        .map(|p| p.lid_user.clone())
        .unwrap_or_default();
    lock(&state.devices).push(Device {
        jid,
        lid: format!("{lid_user}:{device_id}@lid"),
        noise: client_static,
        signed_identity: bytes.to_vec(),
    });
    lock(&state.pending).remove(&client_static);
    Ok(vec![
        NodeBuilder::new("stream:error").attr("code", "515").build(),
    ])
}
