//! Fetching the media customers send, after the message was stored and acknowledged.
//!
//! The ingest stores a `media` row for each media message. The Lease holder of the number (the
//! pod with its access token, or its WhatsApp Web socket) claims pending rows, fetches the bytes
//! through the number's [`MediaSource`], size-limited, checks the checksum, and stores them in
//! Postgres for the team inbox. A failure is retried with backoff, and after [`MAX_ATTEMPTS`]
//! the row is marked `failed`; the conversation never waits for it: the agent already answered
//! from the caption. Bytes older than the retention period are dropped (`expired`).
//!
//! Cloud API ([`CloudMedia`]): the webhook names only a media id; it is looked up
//! (`GET /{media_id}`: a download URL valid for about 5 minutes), then downloaded with the
//! token (an expired URL by looking the id up again). WhatsApp Web: `crate::web::media`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use lease::Leadership;
use serde_json::Value;
use service::secret::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::core::inbox::events::{self, TeamEvent};
use crate::metrics::{Metrics, Outcome};

/// Tries of one media before it is marked `failed`.
pub const MAX_ATTEMPTS: i32 = 8;
/// How often the holder looks for media to fetch when nothing woke it and no retry is due
/// sooner: new media wake it through LISTEN/NOTIFY, so this only covers a lost notification.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// The shortest wait between rounds (a retry due at once, or the claim of a dead holder).
const MIN_WAIT: Duration = Duration::from_millis(100);
/// Media fetched at once per number.
const BATCH: i64 = 4;
/// A claimed row is not claimed again for this long (a holder that died mid-download).
const CLAIM_SECONDS: f64 = 120.0;
/// A whole download at most (100 MB at well under 1 MB/s).
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How often bytes past the retention period are dropped.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

const CLAIM: &str = include_str!("media_claim.sql");

/// Limits of one number's media (`spec.media` of the WhatsAppAccount).
#[derive(Debug, Clone, Copy)]
pub struct MediaLimits {
    /// Larger media are marked `too_large` and not stored.
    pub max_bytes: u64,
    /// Stored bytes are dropped this long after they were fetched.
    pub retention: Duration,
}

/// How one fetch ended.
#[derive(Debug, PartialEq)]
pub enum Fetched {
    Stored {
        bytes: Vec<u8>,
        mime_type: String,
    },
    TooLarge {
        size: u64,
    },
    /// Worth another attempt after the delay (or the backoff).
    Retry {
        error: String,
        soon: bool,
    },
    /// Will not work (the id is unknown or past Meta's 7 days).
    Final {
        error: String,
    },
}

/// Where a number's media bytes come from.
pub trait MediaSource: Send + Sync + 'static {
    /// One attempt at one media.
    fn fetch(
        &self,
        media: &PendingMedia,
        limits: MediaLimits,
    ) -> impl std::future::Future<Output = Fetched> + Send;
}

/// Fetches one number's media while this pod holds its Lease.
pub struct MediaFetcher<S> {
    db: PgPool,
    account: String,
    /// The AgentPool's queue: the team inbox is told when media arrive.
    pool: String,
    limits: MediaLimits,
    source: S,
    metrics: Metrics,
}

/// A media row claimed for a fetch.
#[derive(sqlx::FromRow)]
pub struct PendingMedia {
    pub id: i64,
    pub conversation_id: i64,
    pub provider_media_id: String,
    /// `image`, `audio`, `video`, `document` or `sticker`.
    pub kind: String,
    pub sha256: Option<String>,
    pub attempts: i32,
    /// What the message says about fetching it (WhatsApp Web: the encrypted file's path and
    /// key), from the inbound payload.
    pub download: Option<Value>,
}

impl<S: MediaSource> MediaFetcher<S> {
    pub fn new(
        db: PgPool,
        account: &str,
        pool: &str,
        limits: MediaLimits,
        source: S,
        metrics: Metrics,
    ) -> Self {
        Self {
            db,
            account: account.to_string(),
            pool: pool.to_string(),
            limits,
            source,
            metrics,
        }
    }

    /// Fetch while this pod may act for the number, until cancelled.
    /// `wake` is notified when media arrive for this number (`queue::notifier::Notifier::media`).
    pub async fn run(
        self,
        leadership: Arc<Leadership>,
        wake: Arc<tokio::sync::Notify>,
        cancel: CancellationToken,
    ) {
        let mut last_retention: Option<Instant> = None;
        loop {
            let mut busy = false;
            let mut wait = IDLE_POLL;
            if leadership.may_act().is_some() {
                match self.fetch_due().await {
                    Ok(n) => busy = n as i64 == BATCH,
                    Err(error) => {
                        tracing::warn!(account = %self.account, %error, "media fetch round failed; retrying")
                    }
                }
                if last_retention.is_none_or(|t| t.elapsed() > RETENTION_EVERY) {
                    last_retention = Some(Instant::now());
                    if let Err(error) = self.expire().await {
                        tracing::warn!(account = %self.account, %error, "dropping expired media failed");
                    }
                }
            }
            if busy {
                continue;
            }
            if leadership.may_act().is_some() {
                // A retry (or a claim of a holder that died) is due before the idle poll.
                match self.next_due().await {
                    Ok(Some(due)) => wait = due.clamp(MIN_WAIT, IDLE_POLL),
                    Ok(None) => {}
                    Err(_) => wait = Duration::from_secs(1),
                }
            } else {
                wait = Duration::from_secs(1);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How long until the number's next pending media is due, if any is pending.
    async fn next_due(&self) -> Result<Option<Duration>, sqlx::Error> {
        let seconds: Option<f64> = sqlx::query_scalar(
            "SELECT greatest(extract(epoch FROM min(next_attempt_at) - now()), 0)::float8
             FROM media WHERE account_id = $1 AND state = 'pending'",
        )
        .bind(&self.account)
        .fetch_one(&self.db)
        .await?;
        Ok(seconds.map(Duration::from_secs_f64))
    }

    /// Claim and fetch the media that are due; returns how many were claimed.
    pub async fn fetch_due(&self) -> Result<usize, sqlx::Error> {
        let claimed: Vec<PendingMedia> = sqlx::query_as(CLAIM)
            .bind(&self.account)
            .bind(BATCH)
            .bind(CLAIM_SECONDS)
            .fetch_all(&self.db)
            .await?;
        let n = claimed.len();
        let results =
            futures::future::join_all(claimed.iter().map(|c| self.source.fetch(c, self.limits)))
                .await;
        for (c, fetched) in claimed.iter().zip(results) {
            self.record(c, fetched).await?;
        }
        Ok(n)
    }

    async fn record(&self, c: &PendingMedia, fetched: Fetched) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let state = match fetched {
            Fetched::Stored { bytes, mime_type } => {
                sqlx::query(
                    "UPDATE media SET state = 'stored', content = $2, size_bytes = $3,
                         mime_type = coalesce(nullif($4, ''), mime_type), fetched_at = now(),
                         last_error = NULL
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(c.id)
                .bind(&bytes)
                .bind(bytes.len() as i64)
                .bind(&mime_type)
                .execute(&mut *tx)
                .await?;
                "stored"
            }
            Fetched::TooLarge { size } => {
                sqlx::query(
                    "UPDATE media SET state = 'too_large', size_bytes = $2, last_error = $3
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(c.id)
                .bind(size as i64)
                .bind(format!(
                    "{size} bytes, over the number's limit of {} (spec.media.maxBytes)",
                    self.limits.max_bytes
                ))
                .execute(&mut *tx)
                .await?;
                "too_large"
            }
            Fetched::Retry { error, soon } if c.attempts < MAX_ATTEMPTS => {
                let delay = if soon {
                    Duration::from_millis(200)
                } else {
                    queue::backoff::retry_delay(
                        c.attempts,
                        Duration::from_secs(1),
                        Duration::from_secs(300),
                    )
                };
                sqlx::query(
                    "UPDATE media SET next_attempt_at = now() + make_interval(secs => $2),
                         last_error = $3
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(c.id)
                .bind(delay.as_secs_f64())
                .bind(&error)
                .execute(&mut *tx)
                .await?;
                tracing::info!(account = %self.account, media = c.id, attempt = c.attempts, %error, "media fetch failed; retrying");
                "retry"
            }
            Fetched::Retry { error, .. } | Fetched::Final { error } => {
                sqlx::query(
                    "UPDATE media SET state = 'failed', last_error = $2
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(c.id)
                .bind(&error)
                .execute(&mut *tx)
                .await?;
                tracing::warn!(account = %self.account, media = c.id, attempts = c.attempts, %error, "media fetch gave up");
                "failed"
            }
        };
        self.metrics
            .media_fetches
            .get_or_create(&Outcome::of(state))
            .inc();
        if state != "retry" {
            // The team inbox shows the media (or why it is missing) without a reload.
            events::notify(
                &mut tx,
                &TeamEvent::new(&self.pool, c.conversation_id, "media"),
            )
            .await?;
        }
        tx.commit().await
    }

    /// Drop the bytes of media fetched longer ago than the retention period.
    async fn expire(&self) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE media SET state = 'expired', content = NULL
             WHERE account_id = $1 AND state = 'stored'
               AND fetched_at < now() - make_interval(secs => $2)",
        )
        .bind(&self.account)
        .bind(self.limits.retention.as_secs_f64())
        .execute(&self.db)
        .await?
        .rows_affected())
    }
}

/// Media of a Cloud API number: looked up by id, downloaded with the access token.
pub struct CloudMedia {
    http: reqwest::Client,
    api_base_url: String,
    access_token: SecretString,
}

impl CloudMedia {
    pub fn new(http: reqwest::Client, api_base_url: &str, access_token: &SecretString) -> Self {
        Self {
            http,
            api_base_url: api_base_url.trim_end_matches('/').to_string(),
            access_token: access_token.clone(),
        }
    }
}

impl MediaSource for CloudMedia {
    /// One attempt: look the id up, download within the limit, check the checksum.
    async fn fetch(&self, c: &PendingMedia, limits: MediaLimits) -> Fetched {
        let token = self.access_token.expose_secret();
        let lookup = match self
            .http
            .get(format!("{}/{}", self.api_base_url, c.provider_media_id))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return retry(format!("looking the media up: {}", e.without_url())),
        };
        let status = lookup.status().as_u16();
        let info: Value = lookup.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let message = service::secret::redact(
                info["error"]["message"]
                    .as_str()
                    .unwrap_or("Graph API error"),
                [&self.access_token],
            );
            return match (status, info["error"]["code"].as_i64()) {
                (400 | 404, Some(100)) | (404, _) => Fetched::Final {
                    error: format!(
                        "Meta no longer has this media (ids expire after 7 days): {message}"
                    ),
                },
                _ => retry(format!("looking the media up (HTTP {status}): {message}")),
            };
        }
        if let Some(size) = info["file_size"].as_u64()
            && size > limits.max_bytes
        {
            return Fetched::TooLarge { size };
        }
        let Some(url) = info["url"].as_str() else {
            return retry("the media lookup gave no URL".into());
        };
        // The client's timeout is a send's; a large document needs longer.
        let download = self
            .http
            .get(url)
            .bearer_auth(token)
            .timeout(DOWNLOAD_TIMEOUT);
        let mut resp = match download.send().await {
            Ok(r) => r,
            Err(e) => return retry(format!("downloading the media: {}", e.without_url())),
        };
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            // A URL past its ~5 minutes answers 404 (or 403): look the id up again, now.
            let soon = matches!(status, 401 | 403 | 404 | 410);
            return Fetched::Retry {
                error: format!("downloading the media: HTTP {status}"),
                soon,
            };
        }
        let header_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if (bytes.len() + chunk.len()) as u64 > limits.max_bytes {
                        return Fetched::TooLarge {
                            size: (bytes.len() + chunk.len()) as u64,
                        };
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return retry(format!("downloading the media: {}", e.without_url())),
            }
        }
        let digest = Sha256::digest(&bytes);
        let stated = [c.sha256.as_deref(), info["sha256"].as_str()];
        if let Some(expected) = stated.into_iter().flatten().find(|s| !s.is_empty())
            && !checksum_matches(expected, &digest)
        {
            return retry(format!(
                "the download's SHA-256 does not match Meta's ({expected})"
            ));
        }
        let mime_type = info["mime_type"]
            .as_str()
            .map(str::to_string)
            .or(header_type)
            .unwrap_or_default();
        Fetched::Stored { bytes, mime_type }
    }
}

pub fn retry(error: String) -> Fetched {
    Fetched::Retry { error, soon: false }
}

/// Meta states media checksums as hex (the media lookup) or base64 (webhooks).
pub fn checksum_matches(stated: &str, digest: &[u8]) -> bool {
    stated.eq_ignore_ascii_case(&hex::encode(digest))
        || base64::engine::general_purpose::STANDARD
            .decode(stated)
            .is_ok_and(|d| d == digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checksum_is_accepted_in_hex_or_base64_and_nothing_else() {
        let digest = Sha256::digest(b"photo");
        let hex = hex::encode(digest);
        let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
        assert!(checksum_matches(&hex, &digest));
        assert!(checksum_matches(&hex.to_uppercase(), &digest));
        assert!(checksum_matches(&b64, &digest));
        assert!(!checksum_matches("x", &digest));
        assert!(!checksum_matches(
            &hex::encode(Sha256::digest(b"other")),
            &digest
        ));
    }
}
