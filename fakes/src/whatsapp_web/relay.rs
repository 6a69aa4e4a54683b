//! What WhatsApp's server does for end-to-end encrypted messages, without any Signal
//! code of its own: it keeps each device's pre-key upload and hands out bundles (one one-time
//! pre-key per fetch), answers device lists (`usync`), relays `<message>` stanzas with their
//! `<enc>` nodes to the target devices (holding them until the device sends a receipt for them,
//! re-sent on its next login like the offline queue), acks the sender, and relays receipts
//! (delivery, read, retry). A group message goes to every member's devices ([`super::group`]).
//!
//! Built from the client crate's own node types (`wacore::iq::prekeys`), so the bytes are the
//! ones the client parses.

use std::collections::{HashMap, VecDeque};

use anyhow::{Context, anyhow};
use whatsapp_rust::Jid;
use whatsapp_rust::wacore::iq::prekeys::{
    OneTimePreKeyNode, PreKeyBundleUserNode, SignedPreKeyNode,
};
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore::prekeys::compute_key_bundle_digest;
use whatsapp_rust::wacore::protocol::ProtocolNode;
use whatsapp_rust::wacore_binary::JidExt;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::{Node, NodeContent, NodeRef};

use super::{State, attr};
use crate::cloud_api::{lock, now_unix};

/// A device's public key material as its last upload left it.
struct DeviceKeys {
    registration: u32,
    identity: Vec<u8>,
    signed: SignedPreKeyNode,
    one_time: VecDeque<OneTimePreKeyNode>,
}

/// One `<enc>` the stand-in relayed, as the tests look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Sender device JID (`user:device@s.whatsapp.net`).
    pub from: String,
    /// The sender's connection ([`super::Handshake::conn`]).
    pub conn: u64,
    /// Target device JID.
    pub to: String,
    pub id: String,
    /// `pkmsg` (starts a session) or `msg`.
    pub enc_type: String,
    /// `count` on the `<enc>`: 0 for a first send, 1.. for a resend after a retry receipt.
    pub retry_count: u32,
}

/// A receipt the stand-in relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedReceipt {
    pub from: String,
    /// The sender's connection ([`super::Handshake::conn`]).
    pub conn: u64,
    pub to: String,
    pub id: String,
    /// `delivery` when the stanza has no type.
    pub kind: String,
}

#[derive(Default)]
pub(super) struct Relay {
    keys: std::sync::Mutex<HashMap<String, DeviceKeys>>,
    /// Per target device: stanzas not yet acked by it (message id, stanza).
    unacked: std::sync::Mutex<HashMap<String, Vec<(String, Node)>>>,
    /// Per target device: receipts waiting for it to come online.
    offline_receipts: std::sync::Mutex<HashMap<String, Vec<Node>>>,
    pub(super) relayed: std::sync::Mutex<Vec<Relayed>>,
    pub(super) receipts: std::sync::Mutex<Vec<RelayedReceipt>>,
    /// Messages sent to a device at its login because it had not acked them (it was offline
    /// when they came, or went away before acking).
    pub(super) redelivered: std::sync::atomic::AtomicUsize,
    /// Pre-key bundles handed out (each took one one-time pre-key if any was left).
    pub(super) bundles_served: std::sync::atomic::AtomicUsize,
    /// (sender device, target device) paths whose next `<enc>` arrives damaged (its MAC no
    /// longer matches), so the target cannot decrypt it and asks for a resend.
    pub(super) corrupt_next: std::sync::Mutex<Vec<(String, String)>>,
    /// Devices whose messages are kept, not sent, until released (a phone out of coverage).
    pub(super) held: std::sync::Mutex<Vec<String>>,
    pub(super) groups: super::group::Groups,
}

impl Relay {
    pub(super) fn forget(&self, device: &str) {
        lock(&self.keys).remove(device);
        lock(&self.unacked).remove(device);
        lock(&self.offline_receipts).remove(device);
    }

    /// Stop holding a device's messages: send it everything it has not acked.
    pub(super) fn release(&self, state: &State, device: &str) {
        lock(&self.held).retain(|d| d != device);
        let pending: Vec<Node> = lock(&self.unacked)
            .get(device)
            .map(|v| v.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default();
        if let Some(conn) = state.connection_of(device) {
            for n in pending {
                let _ = conn.send(n);
            }
        }
    }

    pub(super) fn unacked(&self, device: &str) -> usize {
        lock(&self.unacked).get(device).map_or(0, Vec::len)
    }

    /// The phone itself (device 0 of its number): WhatsApp lists it first among a user's
    /// devices, and clients count a companion as holding a group's sender key only once the
    /// primary does too. Its identity is the account key the phone signs devices with; its
    /// pre-keys are made here. Messages to it are kept like any device's (it never connects).
    pub(super) fn add_primary(&self, phone: &str, account: &KeyPair) -> anyhow::Result<()> {
        let mut rng = rand010::rng();
        let signed = KeyPair::generate(&mut rng);
        let signature = account
            .private_key
            .calculate_signature(&signed.public_key.serialize(), &mut rng)
            .map_err(|e| anyhow!("signed pre-key signature: {e}"))?;
        let one_time = (1..=20u32)
            .map(|id| {
                OneTimePreKeyNode::new(
                    id,
                    KeyPair::generate(&mut rng)
                        .public_key
                        .public_key_bytes()
                        .to_vec(),
                )
            })
            .collect();
        lock(&self.keys).insert(
            primary(phone),
            DeviceKeys {
                registration: 4242,
                identity: account.public_key.public_key_bytes().to_vec(),
                signed: SignedPreKeyNode::new(
                    1,
                    signed.public_key.public_key_bytes().to_vec(),
                    signature.to_vec(),
                ),
                one_time,
            },
        );
        Ok(())
    }

    pub(super) fn has_keys(&self, device: &str) -> bool {
        lock(&self.keys).contains_key(device)
    }

    pub(super) fn one_time_left(&self, device: &str) -> usize {
        lock(&self.keys).get(device).map_or(0, |k| k.one_time.len())
    }

    /// What a device that just went active gets before the offline marker: every message it
    /// has not acked (marked offline) and the receipts that waited for it.
    pub(super) fn backlog(&self, device: &str) -> Vec<Node> {
        let mut out: Vec<Node> = lock(&self.unacked)
            .get(device)
            .map(|v| {
                self.redelivered
                    .fetch_add(v.len(), std::sync::atomic::Ordering::SeqCst);
                v.iter()
                    .map(|(_, n)| {
                        let mut n = n.clone();
                        n.attrs.insert("offline", "1");
                        n
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.extend(
            lock(&self.offline_receipts)
                .remove(device)
                .unwrap_or_default(),
        );
        out
    }
}

fn user_of(jid: &str) -> &str {
    jid.split(['@', ':']).next().unwrap_or_default()
}

fn bytes_of<'a>(node: &'a NodeRef<'_>, child: &str) -> Option<&'a [u8]> {
    node.get_optional_child(child)
        .and_then(|c| c.content_bytes())
}

fn parse_jid(jid: &str) -> anyhow::Result<Jid> {
    jid.parse().map_err(|e| anyhow!("jid {jid}: {e:?}"))
}

fn iq_result(id: &str, children: Vec<Node>) -> Node {
    NodeBuilder::new("iq")
        .attr("from", "s.whatsapp.net")
        .attr("type", "result")
        .attr("id", id.to_string())
        .children(children)
        .build()
}

fn iq_error(id: &str, code: u16, text: &str) -> Node {
    NodeBuilder::new("iq")
        .attr("from", "s.whatsapp.net")
        .attr("type", "error")
        .attr("id", id.to_string())
        .children([NodeBuilder::new("error")
            .attr("code", code.to_string())
            .attr("text", text)
            .build()])
        .build()
}

/// `xmlns="encrypt"`: pre-key upload, count, digest, signed pre-key rotation, bundle fetch.
pub(super) fn encrypt_iq(
    state: &State,
    node: &NodeRef<'_>,
    device: Option<&str>,
) -> anyhow::Result<Vec<Node>> {
    let id = attr(node, "id");
    let relay = &state.relay;
    let Some(device) = device else {
        return Ok(vec![iq_error(&id, 401, "not-authorized")]);
    };
    if attr(node, "type") == "set" {
        if let Some(rotate) = node.get_optional_child("rotate") {
            let skey = SignedPreKeyNode::try_from_node_ref(
                rotate
                    .get_optional_child("skey")
                    .context("rotate without skey")?,
            )?;
            if let Some(keys) = lock(&relay.keys).get_mut(device) {
                keys.signed = skey;
            }
            return Ok(vec![iq_result(&id, Vec::new())]);
        }
        let registration = bytes_of(node, "registration")
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .context("pre-key upload without a 4-byte registration id")?;
        let identity = bytes_of(node, "identity")
            .filter(|b| b.len() == 32)
            .context("pre-key upload without a 32-byte identity")?
            .to_vec();
        let signed = SignedPreKeyNode::try_from_node_ref(
            node.get_optional_child("skey")
                .context("pre-key upload without skey")?,
        )?;
        let uploaded = node
            .get_optional_child("list")
            .and_then(|l| l.children())
            .unwrap_or_default()
            .iter()
            .map(OneTimePreKeyNode::try_from_node_ref)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut keys = lock(&relay.keys);
        let entry = keys.entry(device.to_string()).or_insert(DeviceKeys {
            registration,
            identity: identity.clone(),
            signed: signed.clone(),
            one_time: VecDeque::new(),
        });
        if entry.identity != identity {
            // A new identity (a new pairing of this device id): the old keys are worthless.
            entry.one_time.clear();
        }
        entry.registration = registration;
        entry.identity = identity;
        entry.signed = signed;
        entry.one_time.extend(uploaded);
        return Ok(vec![iq_result(&id, Vec::new())]);
    }
    let children = node.children().unwrap_or_default();
    if children.iter().any(|c| c.tag.as_ref() == "count") {
        let n = relay.one_time_left(device);
        return Ok(vec![iq_result(
            &id,
            vec![
                NodeBuilder::new("count")
                    .attr("value", n.to_string())
                    .build(),
            ],
        )]);
    }
    if children.iter().any(|c| c.tag.as_ref() == "digest") {
        let keys = lock(&relay.keys);
        let Some(k) = keys.get(device) else {
            return Ok(vec![iq_error(&id, 404, "item-not-found")]);
        };
        let publics: Vec<&[u8]> = k
            .one_time
            .iter()
            .map(|p| p.public_bytes.as_slice())
            .collect();
        let hash = compute_key_bundle_digest(
            &k.identity,
            &k.signed.public_bytes,
            &k.signed.signature,
            &publics,
        );
        let ids = k.one_time.iter().map(|p| {
            NodeBuilder::new("id")
                .bytes(p.id.to_be_bytes()[1..].to_vec())
                .build()
        });
        let digest = NodeBuilder::new("digest")
            .children([
                NodeBuilder::new("registration")
                    .bytes(k.registration.to_be_bytes().to_vec())
                    .build(),
                NodeBuilder::new("type").bytes(vec![5]).build(),
                NodeBuilder::new("identity")
                    .bytes(k.identity.clone())
                    .build(),
                k.signed.clone().into_node(),
                NodeBuilder::new("list").children(ids).build(),
                NodeBuilder::new("hash").bytes(hash).build(),
            ])
            .build();
        return Ok(vec![iq_result(&id, vec![digest])]);
    }
    if let Some(key) = children.iter().find(|c| c.tag.as_ref() == "key") {
        let identities: HashMap<String, Vec<u8>> = lock(&state.devices)
            .iter()
            .map(|d| (d.jid.clone(), d.signed_identity.clone()))
            .collect();
        let mut keys = lock(&relay.keys);
        let mut users = Vec::new();
        for user in key.children().unwrap_or_default() {
            let raw = attr(user, "jid");
            let jid = parse_jid(&raw)?;
            let wanted = device_key(&jid);
            match keys.get_mut(&wanted) {
                Some(k) => {
                    relay
                        .bundles_served
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let node = PreKeyBundleUserNode {
                        jid,
                        registration_id: k.registration,
                        identity_key: k.identity.clone(),
                        signed_pre_key: k.signed.clone(),
                        one_time_pre_key: k.one_time.pop_front(),
                        device_identity: identities.get(&wanted).filter(|d| !d.is_empty()).cloned(),
                    };
                    users.push(node.into_node());
                }
                None => users.push(
                    NodeBuilder::new("user")
                        .attr("jid", jid)
                        .children([NodeBuilder::new("error")
                            .attr("code", "404")
                            .attr("text", "item-not-found")
                            .build()])
                        .build(),
                ),
            }
        }
        return Ok(vec![iq_result(
            &id,
            vec![NodeBuilder::new("list").children(users).build()],
        )]);
    }
    Ok(vec![iq_result(&id, Vec::new())])
}

/// The key the relay files a device under: `user:device@s.whatsapp.net` (device 0 without the
/// `:0`, as the stand-in's linked-device JIDs are written).
fn device_key(jid: &Jid) -> String {
    format!("{}:{}@s.whatsapp.net", jid.user, jid.device)
}

/// `xmlns="usync"`: the device list of each user asked about (its phone and the devices that
/// uploaded keys).
/// No LID is answered, so clients keep addressing phone numbers.
pub(super) fn usync_iq(state: &State, node: &NodeRef<'_>) -> anyhow::Result<Vec<Node>> {
    let id = attr(node, "id");
    let usync = node
        .get_optional_child("usync")
        .context("usync iq without <usync>")?;
    let asks_devices = usync
        .get_optional_child("query")
        .and_then(|q| q.get_optional_child("devices"))
        .is_some();
    let devices = lock(&state.devices).clone();
    let mut users = Vec::new();
    for user in usync
        .get_optional_child("list")
        .and_then(|l| l.children())
        .unwrap_or_default()
    {
        let raw = attr(user, "jid");
        let Ok(jid) = parse_jid(&raw) else { continue };
        let mut children = Vec::new();
        if asks_devices {
            // The phone first (key index 0), then the companions it signed.
            let ids: Vec<u32> = devices
                .iter()
                .filter(|d| user_of(&d.jid) == jid.user.as_str() && state.relay.has_keys(&d.jid))
                .filter_map(|d| d.jid.split(':').nth(1)?.split('@').next()?.parse().ok())
                .collect();
            let phone = state
                .relay
                .has_keys(&primary(jid.user.as_str()))
                .then_some(0u32);
            let listed = phone.iter().chain(ids.iter()).map(|n| {
                NodeBuilder::new("device")
                    .attr("id", n.to_string())
                    .attr("key-index", n.to_string())
                    .build()
            });
            children.push(
                NodeBuilder::new("devices")
                    .children([
                        NodeBuilder::new("device-list").children(listed).build(),
                        key_index_list(state, jid.user.as_str(), &ids)?,
                    ])
                    .build(),
            );
        }
        users.push(
            NodeBuilder::new("user")
                .attr("jid", jid.to_non_ad())
                .children(children)
                .build(),
        );
    }
    let mut echo = NodeBuilder::new("usync");
    for key in ["sid", "mode", "context", "index", "last"] {
        let v = attr(usync, key);
        if !v.is_empty() {
            echo = echo.attr(key, v);
        }
    }
    Ok(vec![iq_result(
        &id,
        vec![
            echo.children([
                NodeBuilder::new("result").build(),
                NodeBuilder::new("list").children(users).build(),
            ])
            .build(),
        ],
    )])
}

/// The phone's signed list of its valid device key indexes, which clients require before they
/// believe in companion devices.
fn key_index_list(state: &State, user: &str, ids: &[u32]) -> anyhow::Result<Node> {
    use whatsapp_rust::buffa::Message as _;
    use whatsapp_rust::waproto::whatsapp as wa;
    let now = now_unix();
    let details = wa::ADVKeyIndexList {
        raw_id: Some(1),
        timestamp: Some(now),
        current_index: ids.iter().copied().max(),
        valid_indexes: ids.to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    let signature = match lock(&state.phones).get(user) {
        Some(phone) => {
            let mut to_sign = vec![6u8, 2];
            to_sign.extend_from_slice(&details);
            phone
                .account
                .private_key
                .calculate_signature(&to_sign, &mut rand010::rng())
                .map_err(|e| anyhow!("key index signature: {e}"))?
                .to_vec()
        }
        None => Vec::new(),
    };
    let signed = wa::ADVSignedKeyIndexList {
        details: Some(details),
        account_signature: Some(signature),
        ..Default::default()
    }
    .encode_to_vec();
    Ok(NodeBuilder::new("key-index-list")
        .attr("ts", now.to_string())
        .bytes(signed)
        .build())
}

/// The relay's key for the phone (device 0) of `user` (digits).
fn primary(user: &str) -> String {
    format!("{user}:0@s.whatsapp.net")
}

/// Every device of `user` (digits): its phone, then its linked devices.
fn devices_of(state: &State, user: &str) -> Vec<String> {
    let phone = primary(user);
    let mut devices: Vec<String> = state
        .relay
        .has_keys(&phone)
        .then_some(phone)
        .into_iter()
        .collect();
    devices.extend(
        lock(&state.devices)
            .iter()
            .filter(|d| user_of(&d.jid) == user)
            .map(|d| d.jid.clone()),
    );
    devices
}

/// Targets of a stanza addressed `to`: one device, or every device of a user.
fn targets(state: &State, to: &Jid) -> Vec<String> {
    if to.device != 0 {
        vec![device_key(to)]
    } else {
        devices_of(state, to.user.as_str())
    }
}

/// What a client's `<message>` or `<receipt>` says about itself.
struct Addressed {
    id: String,
    to: Jid,
    /// `type`, empty when absent.
    kind: String,
}

impl Addressed {
    fn of(node: &NodeRef<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            id: attr(node, "id"),
            to: parse_jid(&attr(node, "to"))?,
            kind: attr(node, "type"),
        })
    }
}

/// A `<message>` from `sender` (a device JID): each `<enc>` goes to its device, the sender
/// gets the server's ack.
pub(super) fn message(
    state: &State,
    node: &NodeRef<'_>,
    sender: &str,
    conn: u64,
) -> anyhow::Result<Vec<Node>> {
    let Addressed { id, to, kind } = Addressed::of(node)?;
    let device_identity = node
        .get_optional_child("device-identity")
        .map(|n| n.to_owned());
    let sender_jid = parse_jid(sender)?;
    let mut deliveries: Vec<(String, Vec<Node>)> = Vec::new();
    let own: Vec<Node> = node
        .get_children_by_tag("enc")
        .map(|e| e.to_owned())
        .collect();
    let mut per_device: HashMap<String, Vec<Node>> = HashMap::new();
    if let Some(participants) = node.get_optional_child("participants") {
        for p in participants.get_children_by_tag("to") {
            let target = parse_jid(&attr(p, "jid"))?;
            let encs: Vec<Node> = p.get_children_by_tag("enc").map(|e| e.to_owned()).collect();
            per_device.insert(device_key(&target), encs);
        }
    }
    let group = to.is_group();
    if group {
        // Every member's devices but the sender's: its own sender-key `<enc>` if it needed
        // one, and the message under the sender key.
        for member in state.relay.groups.members(to.user.as_str()) {
            for device in devices_of(state, &member) {
                if device == sender {
                    continue;
                }
                let mut encs = per_device.remove(&device).unwrap_or_default();
                encs.extend(own.iter().cloned());
                deliveries.push((device, encs));
            }
        }
    } else if !per_device.is_empty() {
        deliveries.extend(per_device);
    } else {
        for target in targets(state, &to) {
            deliveries.push((target, own.clone()));
        }
    }
    let now = now_unix().to_string();
    for (target, encs) in deliveries {
        if encs.is_empty() {
            continue;
        }
        for e in &encs {
            lock(&state.relay.relayed).push(Relayed {
                from: sender.to_string(),
                conn,
                to: target.clone(),
                id: id.clone(),
                enc_type: e
                    .attrs
                    .get("type")
                    .map(|v| v.as_str().into_owned())
                    .unwrap_or_default(),
                retry_count: e
                    .attrs
                    .get("count")
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(0),
            });
        }
        let mut stanza = NodeBuilder::new("message")
            .attr("id", id.clone())
            .attr("t", now.clone())
            .attr("type", kind.clone());
        stanza = if group {
            stanza
                .attr("from", to.clone())
                .attr("participant", sender_jid.clone())
                .attr("addressing_mode", "pn")
        } else {
            stanza.attr("from", sender_jid.clone())
        };
        // A copy for the sender's own other devices names the chat it was sent to.
        if !group && user_of(&target) == sender_jid.user.as_str() {
            stanza = stanza.attr("recipient", to.to_non_ad());
        }
        let mut children = encs;
        let damage = (sender.to_string(), target.clone());
        let mut paths = lock(&state.relay.corrupt_next);
        if let Some(at) = paths.iter().position(|p| *p == damage) {
            paths.remove(at);
            for enc in &mut children {
                if let Some(NodeContent::Bytes(b)) = &mut enc.content
                    && let Some(last) = b.last_mut()
                {
                    *last ^= 0xff;
                }
            }
        }
        drop(paths);
        children.extend(device_identity.clone());
        deliver_message(state, &target, &id, stanza.children(children).build());
    }
    Ok(vec![
        NodeBuilder::new("ack")
            .attr("class", "message")
            .attr("id", id)
            .attr("from", to)
            .attr("t", now)
            .build(),
    ])
}

/// Send to the device if it is online, and keep it until the device acks it.
fn deliver_message(state: &State, device: &str, id: &str, stanza: Node) {
    lock(&state.relay.unacked)
        .entry(device.to_string())
        .or_default()
        .push((id.to_string(), stanza.clone()));
    if lock(&state.relay.held).iter().any(|d| d == device) {
        return;
    }
    if let Some(conn) = state.connection_of(device) {
        let _ = conn.send(stanza);
    }
}

/// A device acked a stanza: a message acked is no longer re-sent on its next login.
pub(super) fn ack(state: &State, node: &NodeRef<'_>, device: &str) {
    if attr(node, "class") == "message" {
        acked(state, device, &[attr(node, "id")]);
    }
}

fn acked(state: &State, device: &str, ids: &[String]) {
    if let Some(pending) = lock(&state.relay.unacked).get_mut(device) {
        pending.retain(|(i, _)| !ids.contains(i));
    }
}

/// A receipt from `sender` (a device JID) goes to the devices it is addressed to, from the
/// sender's device (a retry receipt must name the device that could not decrypt).
pub(super) fn receipt(
    state: &State,
    node: &NodeRef<'_>,
    sender: &str,
    conn: u64,
) -> anyhow::Result<Vec<Node>> {
    let Addressed { id, to, kind } = Addressed::of(node)?;
    let sender_jid = parse_jid(sender)?;
    // A device's receipt (delivered, inactive, read, or retry: it got the stanza) is what
    // takes a message off its offline queue; clients do not ack messages otherwise.
    let mut ids = vec![id.clone()];
    if let Some(list) = node.get_optional_child("list") {
        ids.extend(list.get_children_by_tag("item").map(|i| attr(i, "id")));
    }
    acked(state, sender, &ids);
    // A receipt for a group message names the group and goes to the participant who wrote it.
    let participant = attr(node, "participant");
    let group = to.is_group() && !participant.is_empty();
    let mut stanza = NodeBuilder::new("receipt")
        .attr("id", id.clone())
        .attr("t", now_unix().to_string());
    stanza = if group {
        stanza
            .attr("from", to.clone())
            .attr("participant", sender_jid)
    } else {
        stanza.attr("from", sender_jid)
    };
    if !kind.is_empty() {
        stanza = stanza.attr("type", kind.clone());
    }
    let recipient = attr(node, "recipient");
    if !recipient.is_empty() {
        stanza = stanza.attr("recipient", parse_jid(&recipient)?);
    }
    let children: Vec<Node> = node
        .children()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_owned())
        .collect();
    let stanza = stanza.children(children).build();
    let to_whom = if group {
        targets(state, &parse_jid(&participant)?)
    } else {
        targets(state, &to)
    };
    for target in to_whom {
        if target == sender {
            continue;
        }
        lock(&state.relay.receipts).push(RelayedReceipt {
            from: sender.to_string(),
            conn,
            to: target.clone(),
            id: id.clone(),
            kind: if kind.is_empty() {
                "delivery".to_string()
            } else {
                kind.clone()
            },
        });
        match state.connection_of(&target) {
            Some(conn) => {
                let _ = conn.send(stanza.clone());
            }
            None => lock(&state.relay.offline_receipts)
                .entry(target)
                .or_default()
                .push(stanza.clone()),
        }
    }
    // The server acks every receipt.
    let mut ack = NodeBuilder::new("ack")
        .attr("class", "receipt")
        .attr("id", id)
        .attr("from", to);
    if !kind.is_empty() {
        ack = ack.attr("type", kind);
    }
    Ok(vec![ack.build()])
}
