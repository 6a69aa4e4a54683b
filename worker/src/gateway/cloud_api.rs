//! The WhatsApp Cloud API client (Graph API over reqwest) and its error classification.
//!
//! Errors are classified by the Graph `error.code`, with the HTTP status only as a fallback,
//! because Meta returns throttling codes with HTTP 400 as often as with 429.

use std::time::Duration;

use serde_json::{Value, json};
use service::secret::{ExposeSecret, SecretString};

/// What a failed send means for the next attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// Worth retrying after `delay_hint` (or the default backoff).
    Transient {
        code: Option<i64>,
        message: String,
        delay_hint: Option<Duration>,
    },
    /// Will fail again: keep the code, fail the message, alert if needed.
    Permanent { code: Option<i64>, message: String },
    /// The request may have reached WhatsApp (timeout after sending): retry only after the
    /// in-doubt grace, so a status webhook for the first attempt can settle it.
    InDoubt { message: String },
}

impl SendError {
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Transient { code, .. } | Self::Permanent { code, .. } => *code,
            Self::InDoubt { .. } => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Permanent { .. } => "permanent",
            Self::InDoubt { .. } => "in_doubt",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Transient { message, .. }
            | Self::Permanent { message, .. }
            | Self::InDoubt { message } => message,
        }
    }
}

/// Classify a Graph error code (and the HTTP status when the body had none).
/// `attempt` is 1-based; the pair rate limit (131056) backs off 4^(attempt-1) seconds as Meta
/// suggests.
pub fn classify(http_status: u16, code: Option<i64>, message: String, attempt: i32) -> SendError {
    match code {
        Some(131056) => SendError::Transient {
            code,
            message,
            delay_hint: Some(Duration::from_secs(
                4u64.saturating_pow((attempt - 1).clamp(0, 6) as u32),
            )),
        },
        // Throughput, app and WABA rate limits, temporary errors, maintenance.
        Some(4 | 80007 | 130429 | 131000 | 131016 | 131057 | 2 | 1) => SendError::Transient {
            code,
            message,
            delay_hint: None,
        },
        // Spam rate limit: slow down a lot rather than hammer.
        Some(131048) => SendError::Transient {
            code,
            message,
            delay_hint: Some(Duration::from_secs(60)),
        },
        Some(_) => SendError::Permanent { code, message },
        None if http_status == 429 || http_status >= 500 => SendError::Transient {
            code,
            message,
            delay_hint: None,
        },
        None => SendError::Permanent { code, message },
    }
}

/// A Cloud API client for one phone number.
#[derive(Clone)]
pub struct CloudApi {
    http: reqwest::Client,
    messages_url: String,
    media_url: String,
    access_token: SecretString,
}

impl CloudApi {
    pub fn new(
        api_base_url: &str,
        phone_number_id: &str,
        access_token: &SecretString,
        timeout: Duration,
    ) -> reqwest::Result<Self> {
        Ok(Self::with_client(
            Self::http_client(timeout)?,
            api_base_url,
            phone_number_id,
            access_token,
        ))
    }

    /// The HTTP client of [`Self::new`]; a fleet pod shares one between its numbers (one
    /// connection pool to the Graph API, whatever the number of numbers).
    pub fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            .build()
    }

    /// A client for one number over a shared HTTP client.
    pub fn with_client(
        http: reqwest::Client,
        api_base_url: &str,
        phone_number_id: &str,
        access_token: &SecretString,
    ) -> Self {
        Self {
            http,
            messages_url: format!(
                "{}/{}/messages",
                api_base_url.trim_end_matches('/'),
                phone_number_id
            ),
            media_url: format!(
                "{}/{}/media",
                api_base_url.trim_end_matches('/'),
                phone_number_id
            ),
            access_token: access_token.clone(),
        }
    }

    /// Upload a file to send (`POST /{phone_number_id}/media`, multipart); returns its media id.
    pub async fn upload_media(
        &self,
        bytes: Vec<u8>,
        mime_type: &str,
        filename: &str,
        attempt: i32,
    ) -> Result<String, SendError> {
        let part = reqwest::multipart::Part::bytes(bytes)
            .file_name(filename.to_string())
            .mime_str(mime_type)
            .map_err(|e| SendError::Permanent {
                code: None,
                message: format!("media type {mime_type:?}: {e}"),
            })?;
        let form = reqwest::multipart::Form::new()
            .text("messaging_product", "whatsapp")
            .text("type", mime_type.to_string())
            .part("file", part);
        let resp = self
            .http
            .post(&self.media_url)
            .bearer_auth(self.access_token.expose_secret())
            .multipart(form)
            .timeout(Duration::from_secs(300))
            .send()
            .await
            .map_err(|e| SendError::Transient {
                code: None,
                message: format!("uploading media: {}", e.without_url()),
                delay_hint: None,
            })?;
        let status = resp.status().as_u16();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status)
            && let Some(id) = value["id"].as_str()
        {
            return Ok(id.to_string());
        }
        let message = service::secret::redact(
            value["error"]["message"]
                .as_str()
                .unwrap_or("media upload failed"),
            [&self.access_token],
        );
        Err(classify(
            status,
            value["error"]["code"].as_i64(),
            message,
            attempt,
        ))
    }

    /// Send one message; returns WhatsApp's message id (`wamid...`). `callback` is echoed in the
    /// status webhooks of this message.
    pub async fn send(
        &self,
        to: &str,
        message: &Value,
        callback: &str,
        attempt: i32,
    ) -> Result<String, SendError> {
        let mut body = message.clone();
        if !body.is_object() {
            return Err(SendError::Permanent {
                code: None,
                message: "outbound message is not a JSON object".into(),
            });
        }
        body["messaging_product"] = json!("whatsapp");
        body["recipient_type"] = json!("individual");
        body["to"] = json!(to);
        body["biz_opaque_callback_data"] = json!(callback);
        let resp = match self
            .http
            .post(&self.messages_url)
            .bearer_auth(self.access_token.expose_secret())
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Err(SendError::Transient {
                    code: None,
                    message: format!("connecting to the Cloud API: {e}"),
                    delay_hint: None,
                });
            }
            Err(e) => {
                return Err(SendError::InDoubt {
                    message: format!("sending to the Cloud API: {e}"),
                });
            }
        };
        let status = resp.status().as_u16();
        let value: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) if status < 300 => {
                return Err(SendError::InDoubt {
                    message: format!("reading the Cloud API response: {e}"),
                });
            }
            Err(_) => Value::Null,
        };
        if (200..300).contains(&status) {
            return value["messages"][0]["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| SendError::InDoubt {
                    message: "accepted without a message id".into(),
                });
        }
        let code = value["error"]["code"].as_i64();
        // Stored in the row and logged: never with the token in it, whatever Meta echoes.
        let message = service::secret::redact(
            value["error"]["message"]
                .as_str()
                .unwrap_or("Cloud API error"),
            [&self.access_token],
        );
        Err(classify(status, code, message, attempt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_code_before_http_status() {
        let c = |status, code| classify(status, code, "m".into(), 1);
        assert!(matches!(c(400, Some(130429)), SendError::Transient { .. }));
        assert!(matches!(c(400, Some(131000)), SendError::Transient { .. }));
        assert!(matches!(c(503, Some(131016)), SendError::Transient { .. }));
        assert!(matches!(c(400, Some(131047)), SendError::Permanent { .. }));
        assert!(matches!(c(400, Some(131026)), SendError::Permanent { .. }));
        assert!(matches!(c(401, Some(190)), SendError::Permanent { .. }));
        assert!(matches!(c(400, Some(100)), SendError::Permanent { .. }));
        assert!(matches!(c(502, None), SendError::Transient { .. }));
        assert!(matches!(c(429, None), SendError::Transient { .. }));
        assert!(matches!(c(400, None), SendError::Permanent { .. }));
    }

    #[test]
    fn pair_rate_limit_backs_off_by_powers_of_four() {
        let hint = |attempt| match classify(400, Some(131056), String::new(), attempt) {
            SendError::Transient { delay_hint, .. } => delay_hint,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(hint(1), Some(Duration::from_secs(1)));
        assert_eq!(hint(2), Some(Duration::from_secs(4)));
        assert_eq!(hint(3), Some(Duration::from_secs(16)));
    }
}
