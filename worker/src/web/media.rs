//! The media customers send over WhatsApp Web. The message carries where the encrypted file is
//! on WhatsApp's media servers, its key and its hashes; [`reference`] keeps them in the inbound
//! payload (`<kind>.download`) and the ingest stores a `media` row, as for a Cloud API webhook.
//! [`WebMedia`] fetches it through the term's client (media connection auth over the socket,
//! download, MAC and hash checks, decryption), so it runs only while the session owner's socket
//! is connected, under the Lease.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use whatsapp_rust::Client;
use whatsapp_rust::download::{DownloadParams, Downloadable, MediaType};
use whatsapp_rust::error::ErrorChainExt;

use super::http_client::BodyTooLarge;
use crate::gateway::media::{
    Fetched, MediaLimits, MediaSource, PendingMedia, checksum_matches, retry,
};

/// What fetching a message's file takes: its path, key, hashes and length (base64 bytes).
pub fn reference(file: &dyn Downloadable) -> Option<Value> {
    Some(json!({
        "direct_path": file.direct_path()?,
        "media_key": STANDARD.encode(file.media_key()?),
        "file_sha256": STANDARD.encode(file.file_sha256()?),
        "file_enc_sha256": STANDARD.encode(file.file_enc_sha256()?),
        "file_length": file.file_length().unwrap_or(0),
    }))
}

/// [`reference`] read back, for a media row of `kind`.
fn download_params(reference: &Value, kind: &str) -> Option<DownloadParams> {
    let bytes = |key: &str| STANDARD.decode(reference[key].as_str()?).ok();
    let media_type = match kind {
        "image" => MediaType::Image,
        "video" => MediaType::Video,
        "audio" => MediaType::Audio,
        "document" => MediaType::Document,
        "sticker" => MediaType::Sticker,
        _ => return None,
    };
    Some(DownloadParams::encrypted(
        reference["direct_path"].as_str()?,
        &bytes("media_key")?,
        &bytes("file_sha256")?,
        &bytes("file_enc_sha256")?,
        reference["file_length"].as_u64().unwrap_or(0),
        media_type,
    ))
}

/// Media of a WhatsApp Web number, downloaded by the connected client of the term.
pub struct WebMedia {
    client: Arc<Client>,
}

impl WebMedia {
    pub fn new(client: Arc<Client>) -> Self {
        Self { client }
    }
}

impl MediaSource for WebMedia {
    async fn fetch(&self, media: &PendingMedia, limits: MediaLimits) -> Fetched {
        let Some(params) = media
            .download
            .as_ref()
            .and_then(|r| download_params(r, &media.kind))
        else {
            return Fetched::Final {
                error: "the message names no file to download".into(),
            };
        };
        // As the sender stated it; the download stops at the limit whatever it said.
        if params.file_length > limits.max_bytes {
            return Fetched::TooLarge {
                size: params.file_length,
            };
        }
        let bytes = match self.client.download_from_params(&params).await {
            Ok(bytes) => bytes,
            Err(error) if error.chain().any(|e| e.is::<BodyTooLarge>()) => {
                return Fetched::TooLarge {
                    size: params.file_length.max(limits.max_bytes + 1),
                };
            }
            Err(error) => {
                let source: &(dyn std::error::Error + Send + Sync + 'static) = error.as_ref();
                return match source.http_status() {
                    Some(404 | 410) => Fetched::Final {
                        error: format!(
                            "WhatsApp's media servers no longer have this file: {error:#}"
                        ),
                    },
                    _ => retry(format!("downloading the media: {error:#}")),
                };
            }
        };
        if bytes.len() as u64 > limits.max_bytes {
            return Fetched::TooLarge {
                size: bytes.len() as u64,
            };
        }
        // The client checked the file's MAC and hash; the row's hash is the message's too, so
        // a mismatch here means the payload and the row disagree.
        if let Some(expected) = media.sha256.as_deref().filter(|s| !s.is_empty())
            && !checksum_matches(expected, &Sha256::digest(&bytes))
        {
            return retry(format!(
                "the download's SHA-256 does not match the message's ({expected})"
            ));
        }
        Fetched::Stored {
            bytes,
            // The row has the message's type.
            mime_type: String::new(),
        }
    }
}
