//! The message templates of a WhatsApp Business Account (WABA), kept in Postgres for the team
//! inbox (`message_templates`).
//!
//! The core workers that serve the inbox hold no access token, so the Lease holder of a Cloud
//! API number whose spec names its `wabaId` lists the WABA's templates from the Graph API
//! (`GET /{waba}/message_templates`, every page) and replaces the stored list with it. Numbers of
//! one WABA share the list: `template_syncs` says when it was last taken on, so one holder lists
//! it per refresh period, whichever number it serves. Meta's template status webhook moves a
//! template's status at once and asks for a listing (a new or edited template).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lease::Leadership;

use super::payload::ChangeValue;
use serde_json::Value;
use service::secret::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often a WABA's templates are listed again.
pub const REFRESH: Duration = Duration::from_secs(600);
/// How often a holder looks whether a listing is due. A status webhook that asks for one wakes
/// the holders of the WABA at once (NOTIFY on `queue_templates`); this covers a lost one.
const POLL: Duration = Duration::from_secs(30);
/// A failed listing is tried again after this, not a whole refresh later.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Pages of 100 followed at most (Meta allows a WABA a few thousand templates).
const MAX_PAGES: usize = 100;

const CLAIM: &str = include_str!("template_sync_claim.sql");
const REPLACE: &str = include_str!("template_sync_replace.sql");

/// Why a listing failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("listing templates: {0}")]
    Http(String),
    #[error("the Graph API refused the template list (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the template list has more than {MAX_PAGES} pages; stopped")]
    TooManyPages,
    #[error("storing templates: {0}")]
    Db(#[from] sqlx::Error),
}

/// One template as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Template {
    pub name: String,
    pub language: String,
    pub template_id: String,
    pub category: Option<String>,
    pub status: String,
    pub body: Option<String>,
    pub body_parameters: i32,
    pub components: Value,
}

impl Template {
    /// A template of the Graph API's list; `None` without a name, language or status.
    pub fn from_graph(item: &Value) -> Option<Self> {
        let text = |k: &str| {
            item[k]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let body = item["components"].as_array().and_then(|c| {
            c.iter()
                .find(|c| {
                    c["type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case("body"))
                })
                .and_then(|c| c["text"].as_str())
                .map(str::to_string)
        });
        Some(Self {
            body_parameters: body.as_deref().map_or(0, placeholders) as i32,
            name: text("name")?,
            language: text("language")?,
            status: text("status")?,
            template_id: match &item["id"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            },
            category: text("category"),
            body,
            components: item["components"].clone(),
        })
    }
}

/// Distinct `{{...}}` placeholders of a template text (positional `{{1}}` or named
/// `{{first_name}}`): how many parameters a send must give.
pub fn placeholders(text: &str) -> usize {
    let mut seen = BTreeSet::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else { break };
        let name = after[..close].trim();
        if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            seen.insert(name.to_string());
        }
        rest = &after[close + 2..];
    }
    seen.len()
}

/// Lists one WABA's templates for the holder of one of its numbers.
pub struct TemplateSync {
    db: PgPool,
    http: reqwest::Client,
    list_url: String,
    waba_id: String,
    access_token: SecretString,
}

impl TemplateSync {
    pub fn new(
        db: PgPool,
        http: reqwest::Client,
        api_base_url: &str,
        waba_id: &str,
        access_token: &SecretString,
    ) -> Self {
        Self {
            db,
            http,
            list_url: format!(
                "{}/{waba_id}/message_templates",
                api_base_url.trim_end_matches('/')
            ),
            waba_id: waba_id.to_string(),
            access_token: access_token.clone(),
        }
    }

    /// List whenever due while this pod holds the number's Lease, until cancelled.
    /// `wake` is notified when a listing is asked for (`queue::notifier::Notifier::templates`).
    pub async fn run(
        self,
        leadership: Arc<Leadership>,
        wake: Arc<tokio::sync::Notify>,
        cancel: CancellationToken,
    ) {
        loop {
            let result = if leadership.may_act().is_some() {
                self.sync_if_due().await
            } else {
                Ok(None)
            };
            match result {
                Ok(Some(n)) => {
                    tracing::info!(waba_id = %self.waba_id, templates = n, "listed the message templates")
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(waba_id = %self.waba_id, %error, "could not list the message templates; trying again shortly");
                    let _ = sqlx::query(
                        "UPDATE template_syncs SET last_error = $2,
                             started_at = now() - make_interval(secs => $3) WHERE waba_id = $1",
                    )
                    .bind(&self.waba_id)
                    .bind(error.to_string())
                    .bind((REFRESH - RETRY_AFTER).as_secs_f64())
                    .execute(&self.db)
                    .await;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Take the listing on if it is due (one holder per refresh period), then list and store.
    /// `Ok(None)`: not due.
    pub async fn sync_if_due(&self) -> Result<Option<usize>, SyncError> {
        let claimed: Option<i32> = sqlx::query_scalar(CLAIM)
            .bind(&self.waba_id)
            .bind(REFRESH.as_secs_f64())
            .fetch_optional(&self.db)
            .await?;
        if claimed.is_none() {
            return Ok(None);
        }
        let templates = self.list().await?;
        let n = templates.len();
        let rows: Vec<Value> = templates
            .into_iter()
            .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
            .collect();
        sqlx::query(REPLACE)
            .bind(&self.waba_id)
            .bind(Value::Array(rows))
            .execute(&self.db)
            .await?;
        Ok(Some(n))
    }

    /// Every page of the list. The next page is asked of our own base URL with Meta's `after`
    /// cursor, never of the `paging.next` URL as given: the token goes to the Graph API only.
    async fn list(&self) -> Result<Vec<Template>, SyncError> {
        let mut templates = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![
                (
                    "fields",
                    "id,name,language,status,category,components".to_string(),
                ),
                ("limit", "100".to_string()),
            ];
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let url = reqwest::Url::parse_with_params(&self.list_url, &query)
                .map_err(|e| SyncError::Http(format!("the API base URL: {e}")))?;
            let resp = self
                .http
                .get(url)
                .bearer_auth(self.access_token.expose_secret())
                .send()
                .await
                .map_err(|e| SyncError::Http(e.without_url().to_string()))?;
            let status = resp.status().as_u16();
            let page: Value = resp
                .json()
                .await
                .map_err(|e| SyncError::Http(e.without_url().to_string()))?;
            if !(200..300).contains(&status) {
                let message = service::secret::redact(
                    page["error"]["message"]
                        .as_str()
                        .unwrap_or("Graph API error"),
                    [&self.access_token],
                );
                return Err(SyncError::Refused { status, message });
            }
            let items = page["data"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            templates.extend(items.iter().filter_map(Template::from_graph));
            match (
                page["paging"]["next"].as_str(),
                page["paging"]["cursors"]["after"].as_str(),
            ) {
                (Some(_), Some(cursor)) if !items.is_empty() => after = Some(cursor.to_string()),
                _ => return Ok(templates),
            }
        }
        Err(SyncError::TooManyPages)
    }
}

/// Meta's `message_template_status_update` webhook: move the template's status now, and ask
/// for a listing (a template we have not listed yet, or new components). Returns whether a
/// stored template moved.
pub async fn apply_status_update(
    db: &PgPool,
    waba_id: &str,
    value: &ChangeValue,
) -> Result<bool, sqlx::Error> {
    let template_id = match &value.message_template_id {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let Some(event) = value.event.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(false);
    };
    let reason = value
        .reason
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "NONE");
    let moved = sqlx::query(
        "WITH asked AS (
             INSERT INTO template_syncs (waba_id, started_at, requested_at)
             VALUES ($1, now() - interval '1 day', now())
             ON CONFLICT (waba_id) DO UPDATE SET requested_at = now()
         )
         UPDATE message_templates SET status = $3, status_reason = $4, updated_at = now()
         WHERE waba_id = $1 AND (template_id = $2 OR (name = $5 AND language = $6))",
    )
    .bind(waba_id)
    .bind(&template_id)
    .bind(event)
    .bind(reason)
    .bind(value.message_template_name.as_deref().unwrap_or_default())
    .bind(
        value
            .message_template_language
            .as_deref()
            .unwrap_or_default(),
    )
    .execute(db)
    .await?
    .rows_affected();
    Ok(moved > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_distinct_positional_and_named_placeholders() {
        assert_eq!(placeholders("Hi {{1}}, order {{2}} ships {{3}}. {{1}}!"), 3);
        assert_eq!(placeholders("Hello {{first_name}}, code {{ code }}"), 2);
        assert_eq!(placeholders("No parameters {{}} or {{ unclosed"), 0);
    }

    #[test]
    fn reads_a_graph_list_item() {
        let t = Template::from_graph(&json!({
            "name": "order_update", "language": "en_US", "status": "APPROVED",
            "category": "UTILITY", "id": 1234567,
            "components": [{"type": "HEADER", "format": "TEXT", "text": "Order"},
                           {"type": "BODY", "text": "Hi {{1}}, order {{2}} is on its way"}]
        }))
        .expect("a template");
        assert_eq!(t.template_id, "1234567");
        assert_eq!(t.body_parameters, 2);
        assert_eq!(
            t.body.as_deref(),
            Some("Hi {{1}}, order {{2}} is on its way")
        );
        assert!(Template::from_graph(&json!({"name": "x", "language": "en"})).is_none());
    }
}
