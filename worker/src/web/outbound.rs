//! Replies over the WhatsApp Web socket: the same fenced outbox and [`Sender`] as the Cloud API
//! (claim under the epoch, pace, record), with a delivery that sends through the term's client,
//! and receipts that move the outbound row forward like status webhooks do.
//!
//! [`Sender`]: crate::gateway::sender::Sender

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use queue::outbound::{self, ClaimedOutbound, DeliveryStatus};
use serde_json::Value;
use sqlx::PgPool;
use whatsapp_rust::download::MediaType;
use whatsapp_rust::prelude::{MessageBuilderExt, wa};
use whatsapp_rust::types::events::Receipt;
use whatsapp_rust::types::presence::ReceiptType;
use whatsapp_rust::upload::UploadOptions;
use whatsapp_rust::{Client, ClientError, Jid, SendOptions};

use crate::gateway::cloud_api::SendError;
use crate::gateway::outbound_media::{named_file, stored_file};
use crate::gateway::sender::Delivery;

/// What sending asks of a connected client: whatsapp-rust's [`Client`], or a recording one in
/// the adapter tests.
pub trait WebMessenger: Send + Sync + 'static {
    fn new_message_id(&self) -> String;
    /// Show "typing..." to `to` (best effort).
    fn composing(&self, to: &Jid) -> impl Future<Output = ()> + Send;
    /// Send a text with the given message id; returns the id WhatsApp took.
    fn send_text(
        &self,
        to: Jid,
        text: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<String, SendError>> + Send;
    /// Encrypt and upload a file to WhatsApp's media servers, then send the message that
    /// carries its key, with the given message id; returns the id WhatsApp took.
    fn send_file(
        &self,
        to: Jid,
        file: OutboundFile,
        message_id: &str,
    ) -> impl Future<Output = Result<String, SendError>> + Send;
}

/// A file a team member sends (an `outbound_media` row).
#[derive(Debug, Clone)]
pub struct OutboundFile {
    /// `image`, `audio`, `video` or `document` (`inbox::store::Attachment::kind`).
    pub kind: String,
    pub bytes: Vec<u8>,
    pub mime_type: String,
    pub file_name: Option<String>,
    pub caption: Option<String>,
}

impl WebMessenger for Arc<Client> {
    fn new_message_id(&self) -> String {
        self.generate_message_id()
    }

    async fn composing(&self, to: &Jid) {
        if let Err(error) = self.chatstate().send_composing(to).await {
            tracing::debug!(%error, "typing indicator not sent");
        }
    }

    async fn send_text(&self, to: Jid, text: &str, message_id: &str) -> Result<String, SendError> {
        let options = SendOptions::default().with_message_id(message_id);
        self.send_message_with_options(to, wa::Message::text(text), options)
            .await
            .map(|sent| sent.message_id)
            .map_err(classify)
    }

    async fn send_file(
        &self,
        to: Jid,
        file: OutboundFile,
        message_id: &str,
    ) -> Result<String, SendError> {
        use whatsapp_rust::media::{
            self, AudioOptions, DocumentOptions, ImageOptions, VideoOptions,
        };
        let media_type = match file.kind.as_str() {
            "image" => MediaType::Image,
            "audio" => MediaType::Audio,
            "video" => MediaType::Video,
            _ => MediaType::Document,
        };
        // Nothing is sent if the upload fails; the next attempt uploads again.
        let upload = self
            .upload(file.bytes, media_type, UploadOptions::default())
            .await
            .map_err(|e| SendError::Transient {
                code: None,
                message: format!("uploading the file to WhatsApp: {e:#}"),
                delay_hint: None,
            })?;
        let mimetype = Some(file.mime_type);
        let message = match media_type {
            MediaType::Image => media::image_message(
                upload,
                ImageOptions {
                    caption: file.caption,
                    mimetype,
                    ..Default::default()
                },
            ),
            MediaType::Audio => media::audio_message(
                upload,
                AudioOptions {
                    mimetype,
                    ..Default::default()
                },
            ),
            MediaType::Video => media::video_message(
                upload,
                VideoOptions {
                    caption: file.caption,
                    mimetype,
                    ..Default::default()
                },
            ),
            _ => media::document_message(
                upload,
                DocumentOptions {
                    mimetype,
                    file_name: file.file_name,
                    caption: file.caption,
                    ..Default::default()
                },
            ),
        };
        let options = SendOptions::default().with_message_id(message_id);
        self.send_message_with_options(to, message, options)
            .await
            .map(|sent| sent.message_id)
            .map_err(classify)
    }
}

/// What a failed send means for the next attempt.
fn classify(err: whatsapp_rust::SendError) -> SendError {
    use whatsapp_rust::SendError as E;
    let message = err.to_string();
    match err {
        // The stanza may have been written before the socket failed: retry only after the
        // in-doubt grace, with the same message id.
        E::Client(ClientError::Socket(_)) => SendError::InDoubt { message },
        E::InvalidRequest(_) => SendError::Permanent {
            code: None,
            message,
        },
        // Not connected or not logged in (yet), a failed lookup, an encryption hiccup: nothing
        // left this process.
        _ => SendError::Transient {
            code: None,
            message,
            delay_hint: None,
        },
    }
}

/// The text of an outbound message (`None` for a file or a template). WhatsApp Web has no
/// templates; reply buttons (a Cloud API
/// interactive message) go as the text with numbered options, which the rules agent reads back
/// (a typed number or title).
fn outbound_text(message: &Value) -> Option<String> {
    match message["type"].as_str() {
        Some("text") => message["text"]["body"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_string),
        Some("interactive") => {
            let i = &message["interactive"];
            let mut text = i["body"]["text"]
                .as_str()
                .filter(|t| !t.is_empty())?
                .to_string();
            // Reply buttons, or the rows of a list.
            let titles = i["action"]["buttons"]
                .as_array()
                .or_else(|| i["action"]["sections"][0]["rows"].as_array())
                .into_iter()
                .flatten();
            for (n, b) in titles.enumerate() {
                let title = b["reply"]["title"]
                    .as_str()
                    .or_else(|| b["title"].as_str())
                    .unwrap_or_default();
                text.push_str(&format!(
                    "{}{}. {title}",
                    if n == 0 { "\n\n" } else { "\n" },
                    n + 1
                ));
            }
            Some(text)
        }
        _ => None,
    }
}

/// The chat to send to: a JID as stored for a contact without a known phone, or the phone
/// number (digits, with or without `+`) of a Cloud-API-style contact key.
pub fn recipient_jid(recipient: &str) -> Option<Jid> {
    if recipient.contains('@') {
        return recipient.parse().ok();
    }
    let digits = recipient.trim_start_matches('+');
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| Jid::pn(digits))
}

/// Sends claimed rows through one term's client.
pub struct WebDelivery<M> {
    db: PgPool,
    messenger: M,
    typing: Duration,
    /// The Lease epoch the client's socket belongs to.
    term_epoch: i64,
}

impl<M: WebMessenger> WebDelivery<M> {
    pub fn new(db: PgPool, messenger: M, typing: Duration, term_epoch: i64) -> Self {
        Self {
            db,
            messenger,
            typing,
            term_epoch,
        }
    }

    /// The file a team member's message names, read to send.
    async fn file(&self, message: &Value) -> Result<Option<OutboundFile>, SendError> {
        let Some((kind, row)) = named_file(message) else {
            return Ok(None);
        };
        let stored = stored_file(&self.db, row).await?;
        let text = |key: &str| message[kind][key].as_str().map(str::to_string);
        Ok(Some(OutboundFile {
            kind: kind.to_string(),
            bytes: stored.bytes,
            mime_type: stored.mime_type,
            file_name: text("filename").or(stored.filename),
            caption: text("caption"),
        }))
    }
}

/// What one outbound row sends.
enum Content {
    Text(String),
    File(OutboundFile),
}

impl<M: WebMessenger> Delivery for WebDelivery<M> {
    async fn deliver(&self, msg: &ClaimedOutbound, epoch: i64) -> Result<String, SendError> {
        if epoch != self.term_epoch {
            // A later term claimed this row; its own client sends it.
            return Err(SendError::Transient {
                code: None,
                message: "not sent: the socket belongs to an earlier term".into(),
                delay_hint: None,
            });
        }
        let permanent = |message: String| SendError::Permanent {
            code: None,
            message,
        };
        let content = match outbound_text(&msg.message) {
            Some(text) => Content::Text(text),
            None => Content::File(self.file(&msg.message).await?.ok_or_else(|| {
                permanent(format!(
                    "a {} message cannot be sent over WhatsApp Web (text, files and \
                     numbered options only)",
                    msg.message["type"].as_str().unwrap_or("malformed")
                ))
            })?),
        };
        let to = recipient_jid(&msg.recipient).ok_or_else(|| {
            permanent(format!(
                "recipient {:?} is not a WhatsApp id",
                msg.recipient
            ))
        })?;
        // The id is stored before anything leaves, and reused by every later attempt.
        let candidate = self.messenger.new_message_id();
        let message_id =
            match outbound::reserve_message_id_fenced(&self.db, msg.id, epoch, &candidate).await {
                Ok(Some(id)) => id,
                Ok(None) => {
                    return Err(SendError::Transient {
                        code: None,
                        message: "not sent: the fence moved on".into(),
                        delay_hint: None,
                    });
                }
                Err(error) => {
                    return Err(SendError::Transient {
                        code: None,
                        message: format!("not sent: {}", queue::rescuer::error_chain(&error)),
                        delay_hint: None,
                    });
                }
            };
        if !self.typing.is_zero() {
            self.messenger.composing(&to).await;
            tokio::time::sleep(self.typing).await;
        }
        match content {
            Content::Text(text) => self.messenger.send_text(to, &text, &message_id).await,
            Content::File(file) => self.messenger.send_file(to, file, &message_id).await,
        }
    }
}

/// A receipt's meaning for our outbound rows; `None` for receipts that say nothing about
/// delivery to the customer (our own devices, retries, server echoes).
pub fn receipt_status(kind: &ReceiptType) -> Option<DeliveryStatus> {
    match kind {
        ReceiptType::Delivered => Some(DeliveryStatus::Delivered),
        ReceiptType::Read | ReceiptType::Played => Some(DeliveryStatus::Read),
        _ => None,
    }
}

/// Move the outbound rows a receipt names forward. Returns how many moved.
pub async fn apply_receipt(db: &PgPool, receipt: &Receipt) -> queue::Result<usize> {
    let Some(status) = receipt_status(&receipt.r#type) else {
        return Ok(0);
    };
    let mut moved = 0;
    for id in &receipt.message_ids {
        if outbound::apply_status(db, None, id, status, None, None).await? {
            moved += 1;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::turn::with_buttons;

    #[test]
    fn reply_buttons_go_as_numbered_options_and_templates_not_at_all() {
        let titles = ["Prices".to_string(), "Talk to us".to_string()];
        let message = with_buttons("What do you need?", &titles).expect("fits");
        assert_eq!(
            outbound_text(&message).as_deref(),
            Some("What do you need?\n\n1. Prices\n2. Talk to us")
        );
        let text = serde_json::json!({ "type": "text", "text": { "body": "hi" } });
        assert_eq!(outbound_text(&text).as_deref(), Some("hi"));
        let template = serde_json::json!({ "type": "template", "template": { "name": "x" } });
        assert_eq!(outbound_text(&template), None);
        // What WhatsApp would refuse as buttons goes as plain text instead.
        assert!(with_buttons("x", &["a".repeat(21)]).is_none());
        assert!(with_buttons(&"x".repeat(1025), &titles).is_none());
        assert!(with_buttons("x", &[]).is_none());
        // Four to ten options go as a list, shown the same way.
        let four: Vec<String> = ["A", "B", "C", "D"].map(String::from).to_vec();
        let list = with_buttons("Pick", &four).expect("a list");
        assert_eq!(list["interactive"]["type"], "list");
        assert_eq!(
            outbound_text(&list).as_deref(),
            Some("Pick\n\n1. A\n2. B\n3. C\n4. D")
        );
        assert!(with_buttons("x", &vec!["a".to_string(); 11]).is_none());
    }
}
