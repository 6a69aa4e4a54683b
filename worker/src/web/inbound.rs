//! Inbound WhatsApp Web messages into the same pipeline as Cloud API webhooks: the same
//! dedupe, contacts, conversations, agent jobs and handoff (`gateway::ingest`).
//!
//! The client acknowledges a message to the server only after [`WebInbound`] has committed it
//! (the crate's inbound durability hook), so a crash between decrypting and storing makes the
//! server deliver it again instead of losing it; the dedupe key makes the replay harmless.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};
use sqlx::PgPool;
use whatsapp_rust::download::Downloadable;
use whatsapp_rust::prelude::{MessageExt, MessageInfo, wa};
use whatsapp_rust::wacore_binary::JidExt;
use whatsapp_rust::{Client, InboundDurabilityHook, Jid, async_trait};

use crate::gateway::ingest::{self, IngestTarget, Ingested};
use crate::gateway::payload::{InboundMessage, media_text};
use crate::metrics::{Metrics, Outcome};

/// Our inbound row for one decrypted message; `None` for what is not someone talking to the
/// number: our own messages (echoes from the phone), status, newsletters, and protocol messages
/// (edits, revokes, key distribution). A group message is stored in the group's conversation
/// with its participant (in the payload) and runs the agent only where the account answers
/// groups (`answerGroups`, decided at the ingest): a bot added to a group must not answer
/// everyone in it unless asked to.
pub fn interpret(info: &MessageInfo, message: &wa::Message) -> Option<InboundMessage> {
    let source = &info.source;
    let chat = &source.chat;
    let group = source.is_group || chat.is_group();
    if source.is_from_me
        || chat.is_status_broadcast()
        || chat.is_broadcast_list()
        || chat.is_newsletter()
        || info.id.is_empty()
    {
        return None;
    }
    let base = message.get_base_message();
    let file = media_file(base);
    let (message_type, body, runs_agent) = if let Some(text) = base.text_content() {
        ("text", Some(text.to_string()), true)
    } else if let Some(list) = base.list_response_message.as_option() {
        ("interactive", list.title.clone(), list.title.is_some())
    } else if base.image_message.is_set() {
        // Media run the agent with what they say, as on the Cloud API ([image: caption]); the
        // Lease holder downloads their bytes afterwards (`web::media`).
        (
            "image",
            Some(media_text("image", base.get_caption(), None, false)),
            true,
        )
    } else if base.video_message.is_set() {
        (
            "video",
            Some(media_text("video", base.get_caption(), None, false)),
            true,
        )
    } else if let Some(doc) = base.document_message.as_option() {
        let name = doc.file_name.as_deref();
        (
            "document",
            Some(media_text("document", base.get_caption(), name, false)),
            true,
        )
    } else if let Some(audio) = base.audio_message.as_option() {
        let voice = audio.ptt == Some(true);
        ("audio", Some(media_text("audio", None, None, voice)), true)
    } else if base.sticker_message.is_set() {
        (
            "sticker",
            Some(media_text("sticker", None, None, false)),
            true,
        )
    } else if base.location_message.is_set() {
        ("location", None, false)
    } else if base.contact_message.is_set() {
        ("contacts", None, false)
    } else if base.reaction_message.is_set() {
        ("reaction", None, false)
    } else {
        return None;
    };
    // Stanza ids are unique per chat, not globally: qualify with the chat (and, in a group,
    // with who wrote).
    let provider_message_id = if group {
        format!(
            "{}/{}/{}",
            chat.to_non_ad_string(),
            source.sender.to_non_ad_string(),
            info.id
        )
    } else {
        format!("{}/{}", chat.to_non_ad_string(), info.id)
    };
    let with_file = |mut raw: Value| {
        if let Some(mut file) = file.clone() {
            // What the ingest's media row and the fetcher read (the Cloud API's shape).
            file["id"] = Value::String(provider_message_id.clone());
            raw[message_type] = file;
        }
        raw
    };
    if group {
        let participant_phone = [Some(&source.sender), source.sender_alt.as_ref()]
            .into_iter()
            .flatten()
            .find(|j| j.is_pn())
            .map(|j| j.user.to_string());
        return Some(InboundMessage {
            provider_message_id: provider_message_id.clone(),
            message_type: message_type.to_string(),
            body: body.filter(|b| !b.is_empty()),
            // The conversation is the group's; whoever wrote is in the payload.
            contact_key: chat.to_non_ad_string(),
            wa_id: None,
            user_id: None,
            display_name: None,
            // Answered only where the account opts in (`answerGroups`), decided at the ingest.
            runs_agent,
            in_group: true,
            timestamp: Some(info.timestamp.timestamp()),
            raw: with_file(json!({
                "provider": "whatsappWeb",
                "group": chat.to_non_ad_string(),
                "participant": {
                    "jid": source.sender.to_non_ad_string(),
                    "phone": participant_phone,
                    "name": Some(info.push_name.clone()).filter(|n| !n.is_empty()),
                },
                "info": info,
                "message": message,
            })),
        });
    }
    // The phone number when WhatsApp tells it (the chat is a phone JID, or a LID chat carries
    // the phone JID alongside); replies go to it, and `allowedContacts` matches it.
    let phone = [Some(chat), source.sender_alt.as_ref()]
        .into_iter()
        .flatten()
        .find(|j| j.is_pn())
        .map(|j| j.user.to_string());
    let contact_key = phone.clone().unwrap_or_else(|| chat.to_non_ad_string());
    Some(InboundMessage {
        provider_message_id: provider_message_id.clone(),
        message_type: message_type.to_string(),
        body: body.filter(|b| !b.is_empty()),
        contact_key,
        wa_id: phone,
        user_id: None,
        display_name: Some(info.push_name.clone()).filter(|n| !n.is_empty()),
        runs_agent,
        in_group: false,
        timestamp: Some(info.timestamp.timestamp()),
        raw: with_file(json!({
            "provider": "whatsappWeb",
            "info": info,
            "message": message,
        })),
    })
}

/// A media message's file as the ingest stores it: type, checksum (hex), name, and the
/// reference the Lease holder downloads it with. `None` for a message without a file.
fn media_file(m: &wa::Message) -> Option<Value> {
    let (file, mime_type, name): (&dyn Downloadable, _, _) =
        if let Some(i) = m.image_message.as_option() {
            (i, i.mimetype.as_deref(), None)
        } else if let Some(v) = m.video_message.as_option() {
            (v, v.mimetype.as_deref(), None)
        } else if let Some(d) = m.document_message.as_option() {
            (d, d.mimetype.as_deref(), d.file_name.as_deref())
        } else if let Some(a) = m.audio_message.as_option() {
            (a, a.mimetype.as_deref(), None)
        } else if let Some(s) = m.sticker_message.as_option() {
            (s, s.mimetype.as_deref(), None)
        } else {
            return None;
        };
    Some(json!({
        "mime_type": mime_type,
        "sha256": file.file_sha256().map(hex::encode),
        "filename": name,
        "download": super::media::reference(file),
    }))
}

/// Commits inbound batches before the client acknowledges them.
#[derive(Clone)]
pub struct WebInbound {
    db: PgPool,
    target: Arc<IngestTarget>,
    metrics: Metrics,
    read_receipts: bool,
}

impl WebInbound {
    pub fn new(db: PgPool, target: IngestTarget, metrics: Metrics) -> Self {
        Self {
            db,
            target: Arc::new(target),
            metrics,
            read_receipts: false,
        }
    }

    /// Mark customers' messages read once they are stored (`readReceipts`).
    pub fn with_read_receipts(mut self, on: bool) -> Self {
        self.read_receipts = on;
        self
    }

    /// Blue ticks for the customers' messages of a stored batch, per chat (and, in a group,
    /// per participant), after the hook returns: best effort, like a person reading.
    fn mark_read(&self, client: Arc<Client>, batch: &[whatsapp_rust::prelude::InboundMessage]) {
        let mut chats: Vec<(Jid, Option<Jid>, Vec<String>)> = Vec::new();
        for m in batch
            .iter()
            .filter(|m| interpret(&m.info, &m.message).is_some())
        {
            let source = &m.info.source;
            let sender = source.is_group.then(|| source.sender.clone());
            let id = m.info.id.to_string();
            match chats
                .iter_mut()
                .find(|(c, s, _)| *c == source.chat && *s == sender)
            {
                Some((_, _, ids)) => ids.push(id),
                None => chats.push((source.chat.clone(), sender, vec![id])),
            }
        }
        if chats.is_empty() {
            return;
        }
        let account = self.target.account.clone();
        tokio::spawn(async move {
            for (chat, sender, ids) in chats {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                if let Err(error) = client.mark_as_read(&chat, sender.as_ref(), &ids).await {
                    tracing::debug!(%account, %error, "read receipt not sent");
                }
            }
        });
    }

    /// Store a batch all-or-nothing. An error leaves every message unacknowledged, so the
    /// server delivers the batch again.
    pub async fn commit(
        &self,
        batch: &[whatsapp_rust::prelude::InboundMessage],
    ) -> Result<Vec<Ingested>, sqlx::Error> {
        let ours: Vec<InboundMessage> = batch
            .iter()
            .filter_map(|m| interpret(&m.info, &m.message))
            .collect();
        if ours.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes = ingest::ingest_batch(&self.db, &self.target, &ours).await?;
        for outcome in &outcomes {
            self.metrics
                .inbound_messages
                .get_or_create(&Outcome::of(outcome.as_str()))
                .inc();
        }
        Ok(outcomes)
    }

    /// [`commit`](Self::commit), retried with backoff for about half a minute (a database
    /// blip, a failover). A batch given up stays unacknowledged, and WhatsApp delivers it again
    /// only after the socket reconnects, so a short outage must not get that far. Each retry
    /// counts as `inbound_messages_total{outcome="commit_retried"}`.
    pub async fn commit_with_retry(
        &self,
        batch: &[whatsapp_rust::prelude::InboundMessage],
    ) -> Result<Vec<Ingested>, sqlx::Error> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(10)
            .with_jitter();
        (|| self.commit(batch))
            .retry(backoff)
            .notify(|error: &sqlx::Error, wait: Duration| {
                self.metrics
                    .inbound_messages
                    .get_or_create(&Outcome::of("commit_retried"))
                    .inc();
                tracing::warn!(account = %self.target.account, messages = batch.len(), %error, retry_in_ms = wait.as_millis() as u64, "could not store inbound WhatsApp Web messages; retrying");
            })
            .await
    }
}

#[async_trait]
impl InboundDurabilityHook for WebInbound {
    async fn on_messages(
        &self,
        client: Arc<Client>,
        batch: &[whatsapp_rust::prelude::InboundMessage],
    ) -> anyhow::Result<()> {
        match self.commit_with_retry(batch).await {
            Ok(_) => {
                if self.read_receipts {
                    self.mark_read(client, batch);
                }
                Ok(())
            }
            Err(error) => {
                tracing::error!(account = %self.target.account, messages = batch.len(), error = %error, "could not store inbound WhatsApp Web messages after retrying; unacknowledged, WhatsApp delivers them again after a reconnect");
                Err(error.into())
            }
        }
    }
}
