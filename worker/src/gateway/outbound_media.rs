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
        let kind = msg.message["type"].as_str().unwrap_or_default();
        let Some(row) = MEDIA_KINDS
            .contains(&kind)
            .then(|| msg.message[kind]["outbound_media_id"].as_i64())
            .flatten()
        else {
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
                let file: Option<(Vec<u8>, String, Option<String>)> = sqlx::query_as(
                    "SELECT content, mime_type, filename FROM outbound_media WHERE id = $1",
                )
                .bind(row)
                .fetch_optional(&self.db)
                .await
                .map_err(transient)?;
                let Some((bytes, mime_type, filename)) = file else {
                    return Err(SendError::Permanent {
                        code: None,
                        message: format!("the file of this message (outbound_media {row}) is gone"),
                    });
                };
                let name = filename.unwrap_or_else(|| format!("{kind}-{row}"));
                let id = self
                    .api
                    .upload_media(bytes, &mime_type, &name, msg.attempts)
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
