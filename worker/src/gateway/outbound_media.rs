//! Files team members send over the Cloud API. The outbound message names an `outbound_media`
//! row; the Lease holder uploads its bytes (`POST /{phone_number_id}/media`) on the first send
//! attempt and keeps the media id Meta gives (valid 30 days), so a retry sends the same id
//! without uploading again.

use std::borrow::Cow;

use queue::outbound::ClaimedOutbound;
use serde_json::Value;
use sqlx::PgPool;

use super::cloud_api::{CloudApi, SendError};
use super::payload::MEDIA_KINDS;
use super::sender::Delivery;
use super::webhook::callback_data;

/// A media id from an upload is reused for this long (Meta keeps uploads 30 days).
const REUSE_DAYS: f64 = 29.0;

/// The kind and `outbound_media` row of a team member's file message
/// (`{type, <type>: {outbound_media_id, ..}}`); `None` for any other message.
pub fn named_file(message: &Value) -> Option<(&str, i64)> {
    let kind = message["type"].as_str()?;
    let row = MEDIA_KINDS
        .contains(&kind)
        .then(|| message[kind]["outbound_media_id"].as_i64())
        .flatten()?;
    Some((kind, row))
}

/// A stored file to send: bytes, content type, file name.
pub struct StoredFile {
    pub bytes: Vec<u8>,
    pub mime_type: String,
    pub filename: Option<String>,
}

/// Read the file of `outbound_media` row `row` (a database error is worth a retry; a row gone
/// is final).
pub async fn stored_file(db: &PgPool, row: i64) -> Result<StoredFile, SendError> {
    let stored: Option<(Vec<u8>, String, Option<String>)> =
        sqlx::query_as("SELECT content, mime_type, filename FROM outbound_media WHERE id = $1")
            .bind(row)
            .fetch_optional(db)
            .await
            .map_err(|e| SendError::Transient {
                code: None,
                message: format!("reading the file to send: {e}"),
                delay_hint: None,
            })?;
    let (bytes, mime_type, filename) = stored.ok_or_else(|| SendError::Permanent {
        code: None,
        message: format!("the file of this message (outbound_media {row}) is gone"),
    })?;
    Ok(StoredFile {
        bytes,
        mime_type,
        filename,
    })
}

/// The Cloud API, with team members' files uploaded before their message is sent.
pub struct CloudDelivery {
    api: CloudApi,
    db: PgPool,
}

impl CloudDelivery {
    pub fn new(api: CloudApi, db: PgPool) -> Self {
        Self { api, db }
    }

    /// The message as Meta takes it: an `outbound_media_id` replaced by an uploaded media id.
    async fn resolve<'a>(&self, msg: &'a ClaimedOutbound) -> Result<Cow<'a, Value>, SendError> {
        let Some((kind, row)) = named_file(&msg.message) else {
            return Ok(Cow::Borrowed(&msg.message));
        };
        let transient = |e: sqlx::Error| SendError::Transient {
            code: None,
            message: format!("reading the file to send: {e}"),
            delay_hint: None,
        };
        let reusable: Option<String> = sqlx::query_scalar(
            "SELECT provider_media_id FROM outbound_media WHERE id = $1
               AND uploaded_at > now() - make_interval(days => $2::int)",
        )
        .bind(row)
        .bind(REUSE_DAYS as i32)
        .fetch_optional(&self.db)
        .await
        .map_err(transient)?
        .flatten();
        let media_id = match reusable {
            Some(id) => id,
            None => {
                let file = stored_file(&self.db, row).await?;
                let name = file.filename.unwrap_or_else(|| format!("{kind}-{row}"));
                let id = self
                    .api
                    .upload_media(file.bytes, &file.mime_type, &name, msg.attempts)
                    .await?;
                sqlx::query(
                    "UPDATE outbound_media SET provider_media_id = $2, uploaded_at = now() WHERE id = $1",
                )
                .bind(row)
                .bind(&id)
                .execute(&self.db)
                .await
                .map_err(transient)?;
                id
            }
        };
        let mut message = msg.message.clone();
        if let Some(media) = message[kind].as_object_mut() {
            media.remove("outbound_media_id");
            media.insert("id".into(), Value::String(media_id));
        }
        Ok(Cow::Owned(message))
    }
}

impl Delivery for CloudDelivery {
    async fn deliver(&self, msg: &ClaimedOutbound, _epoch: i64) -> Result<String, SendError> {
        let message = self.resolve(msg).await?;
        self.api
            .send(
                &msg.recipient,
                &message,
                &callback_data(msg.id),
                msg.attempts,
            )
            .await
    }
}
