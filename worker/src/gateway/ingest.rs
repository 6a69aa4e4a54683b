//! Storing one inbound message: one transaction that dedupes on the provider message id, creates
//! the contact and conversation on first contact (race-safe upserts), and enqueues the agent job.

use chrono::{DateTime, Utc};
use queue::jobs::{self, NewJob};
use queue::notifier::Publisher;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};

use super::payload::InboundMessage;
use crate::core::inbox::events::TeamEvent;

/// Kind of the job that runs an agent turn.
pub const AGENT_TURN: &str = "agent_turn";

/// Upsert the contact, upsert the conversation (a closed one opens again when the customer
/// writes), insert the message unless its provider id was seen: returns the conversation, whether
/// its agent is on, and the new message's id (null for a duplicate).
const STORE_MESSAGE: &str = "
WITH contact AS (
    INSERT INTO contacts (account_id, contact_key, wa_id, user_id, display_name)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (account_id, contact_key) DO UPDATE SET
        wa_id = coalesce(EXCLUDED.wa_id, contacts.wa_id),
        user_id = coalesce(EXCLUDED.user_id, contacts.user_id),
        display_name = coalesce(EXCLUDED.display_name, contacts.display_name)
    RETURNING id
), conversation AS (
    INSERT INTO conversations (account_id, contact_id, pool, last_inbound_at, last_activity_at)
    SELECT $1, contact.id, $6, now(), now() FROM contact
    ON CONFLICT (account_id, contact_id) DO UPDATE SET last_inbound_at = now(), last_activity_at = now(),
        state = CASE WHEN conversations.state = 'closed' THEN 'open' ELSE conversations.state END
    RETURNING id, agent_enabled
), message AS (
    INSERT INTO inbound_messages
        (account_id, conversation_id, provider_message_id, message_type, body, payload, runs_agent, provider_timestamp)
    SELECT $1, conversation.id, $7, $8, $9, $10, $11, $12 FROM conversation
    ON CONFLICT (account_id, provider_message_id) DO NOTHING
    RETURNING id
)
SELECT conversation.id, conversation.agent_enabled, (SELECT id FROM message) FROM conversation";

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
}

/// Store one message. With a publisher, workers are woken after commit instead of by a NOTIFY
/// inside the transaction (see `queue::notifier::Publisher`).
pub async fn ingest(
    db: &PgPool,
    target: &IngestTarget,
    m: &InboundMessage,
    publisher: Option<&Publisher>,
) -> Result<Ingested, sqlx::Error> {
    let mut tx = db.begin().await?;
    let stored = store(&mut tx, target, m, publisher.is_none()).await?;
    if stored.outcome == Ingested::Duplicate {
        tx.rollback().await?;
        return Ok(Ingested::Duplicate);
    }
    tx.commit().await?;
    if let Some(p) = publisher {
        stored.publish(p, &target.pool);
    }
    Ok(stored.outcome)
}

/// Store a batch all-or-nothing, in order: WhatsApp Web acknowledges a batch to the server only
/// after this commits. A duplicate inside the batch is rolled back to its savepoint, so it
/// leaves no trace (it does not reopen a conversation), as a lone duplicate does not.
pub async fn ingest_batch(
    db: &PgPool,
    target: &IngestTarget,
    messages: &[InboundMessage],
) -> Result<Vec<Ingested>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let mut outcomes = Vec::with_capacity(messages.len());
    for m in messages {
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        let stored = store(&mut savepoint, target, m, true).await?;
        if stored.outcome == Ingested::Duplicate {
            savepoint.rollback().await?;
        } else {
            savepoint.commit().await?;
        }
        outcomes.push(stored.outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// What [`store`] did, and whom to wake after commit.
struct Stored {
    outcome: Ingested,
    team_event: Option<TeamEvent>,
}

impl Stored {
    fn publish(&self, p: &Publisher, pool: &str) {
        if let Some(event) = &self.team_event {
            p.publish(crate::core::inbox::events::CHANNEL, event.payload());
        }
        if self.outcome == Ingested::Queued {
            p.jobs(pool);
        }
    }
}

/// The statements of one ingest, in the caller's transaction. `notify_in_tx`: wake workers
/// and inboxes with NOTIFY inside the transaction (no publisher to do it after commit).
async fn store(
    tx: &mut Transaction<'_, Postgres>,
    target: &IngestTarget,
    m: &InboundMessage,
    notify_in_tx: bool,
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
    let runs_agent = m.runs_agent && !too_old && allowed;
    // Contact, conversation and message in one statement: one round trip on the webhook's path
    // instead of three. A duplicate leaves the message out (and the caller rolls back the
    // conversation's bump).
    let (conversation_id, agent_enabled, inserted): (i64, bool, Option<i64>) =
        sqlx::query_as(STORE_MESSAGE)
            .bind(&target.account)
            .bind(&m.contact_key)
            .bind(&m.wa_id)
            .bind(&m.user_id)
            .bind(&m.display_name)
            .bind(&target.pool)
            .bind(&m.provider_message_id)
            .bind(&m.message_type)
            .bind(&m.body)
            .bind(&m.raw)
            .bind(runs_agent)
            .bind(provider_time)
            .fetch_one(&mut **tx)
            .await?;
    let Some(inbound_id) = inserted else {
        return Ok(Stored {
            outcome: Ingested::Duplicate,
            team_event: None,
        });
    };
    // A human has this conversation: their inbox shows the message live.
    let team_event =
        (!agent_enabled).then(|| TeamEvent::new(&target.pool, conversation_id, "message"));
    if let (Some(event), true) = (&team_event, notify_in_tx) {
        crate::core::inbox::events::notify(tx, event).await?;
    }
    if !runs_agent {
        return Ok(Stored {
            outcome: Ingested::Stored,
            team_event,
        });
    }
    let job = NewJob::new(
        &target.pool,
        AGENT_TURN,
        json!({ "conversation_id": conversation_id, "inbound_id": inbound_id }),
    )
    .keyed(format!("conversation:{conversation_id}"));
    let queued = if notify_in_tx {
        jobs::enqueue(tx, &job).await
    } else {
        jobs::enqueue_unnotified(tx, &job).await
    };
    queued.map_err(|e| match e {
        queue::Error::Query { source, .. } => source,
        other => sqlx::Error::Protocol(other.to_string()),
    })?;
    Ok(Stored {
        outcome: Ingested::Queued,
        team_event,
    })
}
