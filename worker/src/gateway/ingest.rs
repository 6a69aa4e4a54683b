//! Storing one inbound message: one statement that dedupes on the provider message id, creates
//! the contact and conversation on first contact (race-safe upserts), stores the message and
//! enqueues the agent job, committed on its own (a webhook) or in the caller's batch (WhatsApp
//! Web).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use queue::notifier::Publisher;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use super::payload::InboundMessage;
use crate::core::inbox::events::TeamEvent;

/// The whole ingest of one message in one statement (`ingest_message.sql`): a webhook is one
/// round trip and one commit.
const INGEST_MESSAGE: &str = include_str!("ingest_message.sql");

/// What happened to an inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored and an agent job enqueued.
    Queued,
    /// Stored only (media, location, an old backlog message, a contact not allowed, ...).
    Stored,
    /// Seen before (Meta redelivers): nothing changed.
    Duplicate,
}

impl Ingested {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Stored => "stored",
            Self::Duplicate => "duplicate",
        }
    }
}

/// Account facts the ingest needs.
#[derive(Debug, Clone)]
pub struct IngestTarget {
    pub account: String,
    pub pool: String,
    pub allowed_contacts: Vec<String>,
    pub max_message_age_seconds: i64,
    /// Whether group messages run the agent (`answerGroups`).
    pub answer_groups: bool,
}

/// Store one message in its own implicit transaction; workers and inboxes are woken after the
/// commit through `publisher` (see `queue::notifier::Publisher`), keeping the statement off
/// Postgres' notify lock.
pub async fn ingest(
    db: &PgPool,
    target: &IngestTarget,
    m: &InboundMessage,
    publisher: &Publisher,
) -> Result<Ingested, sqlx::Error> {
    let mut conn = db.acquire().await?;
    let stored = store(&mut conn, target, m).await?;
    stored.publish(publisher, &target.pool, &target.account);
    Ok(stored.outcome)
}

/// Store a batch all-or-nothing, in order: WhatsApp Web acknowledges a batch to the server only
/// after this commits. A duplicate, inside the batch or not, changes nothing: the statement
/// checks the message id before it touches the contact or conversation.
pub async fn ingest_batch(
    db: &PgPool,
    target: &IngestTarget,
    messages: &[InboundMessage],
) -> Result<Vec<Ingested>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let mut outcomes = Vec::with_capacity(messages.len());
    let mut queued = false;
    for m in messages {
        let stored = store(&mut tx, target, m).await?;
        if let Some(event) = &stored.team_event {
            crate::core::inbox::events::notify(&mut tx, event).await?;
        }
        queued |= stored.outcome == Ingested::Queued;
        outcomes.push(stored.outcome);
    }
    if queued {
        queue::jobs::notify(&mut *tx, &target.pool)
            .await
            .map_err(|e| match e {
                queue::Error::Query { source, .. } => source,
                other => sqlx::Error::Protocol(other.to_string()),
            })?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// What [`store`] did, and whom to wake after commit.
struct Stored {
    outcome: Ingested,
    team_event: Option<TeamEvent>,
    /// A media row was stored: the number's Lease holder fetches it.
    media: bool,
}

impl Stored {
    fn publish(&self, p: &Publisher, pool: &str, account: &str) {
        if self.media {
            p.media(account);
        }
        if let Some(event) = &self.team_event {
            p.publish(crate::core::inbox::events::CHANNEL, event.payload());
        }
        if self.outcome == Ingested::Queued {
            p.jobs(pool);
        }
    }
}

/// The one statement of an ingest, on `conn` (its own implicit transaction, or the caller's).
async fn store(
    conn: &mut PgConnection,
    target: &IngestTarget,
    m: &InboundMessage,
) -> Result<Stored, sqlx::Error> {
    let provider_time: Option<DateTime<Utc>> =
        m.timestamp.and_then(|t| DateTime::from_timestamp(t, 0));
    let too_old = provider_time
        .is_some_and(|t| (Utc::now() - t).num_seconds() > target.max_message_age_seconds);
    let allowed = target.allowed_contacts.is_empty()
        || target
            .allowed_contacts
            .iter()
            .any(|c| Some(c) == m.wa_id.as_ref() || c == &m.contact_key);
    let group_ok = !m.in_group || target.answer_groups;
    let runs_agent = m.runs_agent && !too_old && allowed && group_ok;
    let (conversation_id, agent_enabled, inserted, job, media): (
        Option<i64>,
        Option<bool>,
        Option<i64>,
        Option<i64>,
        bool,
    ) = sqlx::query_as(INGEST_MESSAGE)
        .bind(&target.account)
        .bind(storable(&m.contact_key).as_ref())
        .bind(m.wa_id.as_deref().map(storable).as_deref())
        .bind(m.user_id.as_deref().map(storable).as_deref())
        .bind(m.display_name.as_deref().map(storable).as_deref())
        .bind(&target.pool)
        .bind(storable(&m.provider_message_id).as_ref())
        .bind(storable(&m.message_type).as_ref())
        .bind(m.body.as_deref().map(storable).as_deref())
        .bind(storable_json(&m.raw).as_ref())
        .bind(runs_agent)
        .bind(provider_time)
        .bind(crate::core::job_payload::AgentTurn::KIND)
        .bind(queue::jobs::MAX_ATTEMPTS_DEFAULT)
        .fetch_one(&mut *conn)
        .await?;
    let (Some(conversation_id), Some(_)) = (conversation_id, inserted) else {
        return Ok(Stored {
            outcome: Ingested::Duplicate,
            team_event: None,
            media: false,
        });
    };
    // A human has this conversation: their inbox shows the message live.
    let team_event = (agent_enabled == Some(false))
        .then(|| TeamEvent::new(&target.pool, conversation_id, "message"));
    Ok(Stored {
        outcome: if job.is_some() {
            Ingested::Queued
        } else {
            Ingested::Stored
        },
        team_event,
        media,
    })
}

/// Postgres text and jsonb cannot hold U+0000: a message carrying one is stored with U+FFFD in
/// its place, where refusing it would have Meta deliver it again for days.
fn storable(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`storable`] for every string and key of a JSON value; borrowed when there is none.
fn storable_json(v: &Value) -> Cow<'_, Value> {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn scrub(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(storable(s).into_owned()),
            Value::Array(items) => Value::Array(items.iter().map(scrub).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (storable(k).into_owned(), scrub(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    if has_nul(v) {
        Cow::Owned(scrub(v))
    } else {
        Cow::Borrowed(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_are_replaced_everywhere_and_clean_input_is_borrowed() {
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
        assert_eq!(storable("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        let clean = json!({ "text": { "body": "hi" }, "n": [1, "x"] });
        assert!(matches!(storable_json(&clean), Cow::Borrowed(_)));
        let dirty = json!({ "k\0": ["ok", { "body": "a\0" }], "n": 1 });
        assert_eq!(
            storable_json(&dirty).into_owned(),
            json!({ "k\u{FFFD}": ["ok", { "body": "a\u{FFFD}" }], "n": 1 })
        );
    }
}
