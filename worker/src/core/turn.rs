//! One agent turn: load the conversation, run the agent, and commit its replies together with
//! the job's completion.
//!
//! A turn answers every inbound message of the conversation that no turn answered yet
//! (`conversations.answered_through`), so messages that arrived while the conversation waited
//! are answered together; the jobs they created find nothing left and complete as `coalesced`.
//! The final transaction locks the conversation row, completes the job only if the claim is
//! still ours, and re-checks that the agent is still enabled: a human who took over during the
//! model call wins, and no reply goes out.

use std::time::Instant;

use chrono::{DateTime, Utc};
use queue::ClaimedJob;
use queue::jobs;
use queue::outbound::{self, NewOutbound};
use queue::runner::Outcome;
use serde_json::json;
use sqlx::PgPool;

use super::PoolSettings;
use super::agent::{Agent, AgentError, AgentReply, HistoryItem, TurnInput};
use super::tools::{Action, ToolContext, Toolbox};
use crate::metrics::{Metrics, Outcome as MetricOutcome};

/// WhatsApp's limit for a text body.
pub const MAX_TEXT: usize = 4096;

#[derive(sqlx::FromRow)]
struct ConversationRow {
    account_id: String,
    lane: Option<String>,
    agent_enabled: bool,
    session_started_at: DateTime<Utc>,
    answered_through: i64,
    contact_key: String,
    wa_id: Option<String>,
    display_name: Option<String>,
    handoff_message: String,
    /// Turns this conversation has had (the agent sees it as its turn index).
    turn_index: i64,
    /// Last message either way up to what was answered: the session clock.
    previous_activity: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct NewMessage {
    id: i64,
    body: Option<String>,
    received_at: DateTime<Utc>,
}

/// Everything a turn needs, shared by all turns of a worker.
pub struct TurnRunner {
    pub pool: PgPool,
    pub settings: PoolSettings,
    pub agent: Agent,
    pub tools: Toolbox,
    pub metrics: Metrics,
}

impl TurnRunner {
    pub async fn run(&self, job: ClaimedJob) -> Outcome {
        let started = Instant::now();
        let outcome = match self.turn(&job).await {
            Ok(label) => {
                self.metrics
                    .turns
                    .get_or_create(&MetricOutcome::of(label))
                    .inc();
                Outcome::Finished
            }
            Err(TurnError::Agent(AgentError::Permanent(e))) => {
                self.metrics
                    .turns
                    .get_or_create(&MetricOutcome::of("failed"))
                    .inc();
                Outcome::Fail {
                    error: e,
                    permanent: true,
                }
            }
            Err(TurnError::Agent(AgentError::Transient(e))) => {
                self.metrics
                    .turns
                    .get_or_create(&MetricOutcome::of("retry"))
                    .inc();
                Outcome::Fail {
                    error: e,
                    permanent: false,
                }
            }
            Err(TurnError::Db(e)) => {
                self.metrics
                    .turns
                    .get_or_create(&MetricOutcome::of("retry"))
                    .inc();
                Outcome::Fail {
                    error: format!("database: {e}"),
                    permanent: false,
                }
            }
            Err(TurnError::BadJob(e)) => Outcome::Fail {
                error: e,
                permanent: true,
            },
        };
        self.metrics
            .turn_seconds
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    #[tracing::instrument(skip_all, fields(job_id = job.id, attempt = job.attempts, conversation_id))]
    async fn turn(&self, job: &ClaimedJob) -> Result<&'static str, TurnError> {
        let conversation_id = job.payload["conversation_id"]
            .as_i64()
            .ok_or_else(|| TurnError::BadJob("payload has no conversation_id".into()))?;
        tracing::Span::current().record("conversation_id", conversation_id);
        let turn_started = Instant::now();
        // One round trip for everything the turn reads about the conversation itself.
        let conv: ConversationRow = sqlx::query_as(
            "SELECT c.account_id, c.lane, c.agent_enabled, c.session_started_at, c.answered_through,
                    ct.contact_key, ct.wa_id, ct.display_name, a.handoff_message,
                    (SELECT count(*) FROM agent_turns t WHERE t.conversation_id = c.id) AS turn_index,
                    (SELECT max(at) FROM (
                         SELECT max(i.received_at) AS at FROM inbound_messages i
                         WHERE i.conversation_id = c.id AND i.id <= c.answered_through
                         UNION ALL
                         SELECT max(o.created_at) FROM outbound_messages o WHERE o.conversation_id = c.id
                     ) s) AS previous_activity
             FROM conversations c JOIN contacts ct ON ct.id = c.contact_id JOIN accounts a ON a.id = c.account_id
             WHERE c.id = $1",
        )
        .bind(conversation_id)
        .fetch_one(&self.pool)
        .await?;
        let new: Vec<NewMessage> = sqlx::query_as(
            "SELECT id, body, received_at FROM inbound_messages
             WHERE conversation_id = $1 AND id > $2 AND runs_agent ORDER BY id",
        )
        .bind(conversation_id)
        .bind(conv.answered_through)
        .fetch_all(&self.pool)
        .await?;
        let Some(last) = new.last() else {
            return self.finish_without_reply(job, "coalesced").await;
        };
        let through = last.id;
        if !conv.agent_enabled {
            return self.finish_without_reply(job, "agent_disabled").await;
        }
        // A session idle past its TTL starts over: lane and dialogue reset, the log is kept.
        let ttl = chrono::Duration::seconds(self.settings.session_ttl_seconds);
        let previous_activity = conv.previous_activity;
        let first_new_at = new.first().map(|m| m.received_at).unwrap_or_else(Utc::now);
        let expired = previous_activity.is_some_and(|t| first_new_at - t > ttl);
        let (session_start, lane) = if expired {
            (first_new_at, None)
        } else {
            (conv.session_started_at, conv.lane.clone())
        };
        let history = self
            .history(conversation_id, session_start, conv.answered_through)
            .await?;
        let turn_index = conv.turn_index;
        let input = TurnInput {
            conversation_id,
            contact_name: conv.display_name.clone(),
            lane,
            history,
            new_messages: new.iter().filter_map(|m| m.body.clone()).collect(),
            system_prompt: self.settings.system_prompt.clone(),
            lanes: self.settings.lanes.clone(),
            turn_index,
        };
        let ctx = ToolContext {
            lanes: self.settings.lanes.iter().map(|l| l.name.clone()).collect(),
            now: Utc::now(),
        };
        let reply = self
            .agent
            .respond(&input, &self.tools, &ctx)
            .await
            .map_err(TurnError::Agent)?;
        let recipient = conv
            .wa_id
            .clone()
            .unwrap_or_else(|| conv.contact_key.clone());
        self.commit(
            job,
            conversation_id,
            &conv,
            &recipient,
            through,
            expired.then_some(session_start),
            reply,
            turn_started,
        )
        .await
    }

    async fn history(
        &self,
        conversation_id: i64,
        since: DateTime<Utc>,
        through: i64,
    ) -> Result<Vec<HistoryItem>, TurnError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT role, text FROM (
                 SELECT 'user' AS role, body AS text, received_at AS at, id FROM inbound_messages
                 WHERE conversation_id = $1 AND id <= $3 AND received_at >= $2 AND body IS NOT NULL
                 UNION ALL
                 SELECT 'assistant', message->'text'->>'body', created_at, id FROM outbound_messages
                 WHERE conversation_id = $1 AND created_at >= $2 AND message->>'type' = 'text'
             ) h ORDER BY at DESC, id DESC LIMIT $4",
        )
        .bind(conversation_id)
        .bind(since)
        .bind(through)
        .bind(self.settings.history_messages)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .rev()
            .filter_map(|(role, text)| {
                text.map(|t| HistoryItem {
                    role: if role == "user" { "user" } else { "assistant" },
                    text: t,
                })
            })
            .collect())
    }

    async fn finish_without_reply(
        &self,
        job: &ClaimedJob,
        outcome: &'static str,
    ) -> Result<&'static str, TurnError> {
        let mut tx = self.pool.begin().await?;
        let ours = jobs::complete_if_claimed(&mut tx, job.id, job.claim_token, outcome)
            .await
            .map_err(queue_err)?;
        tx.commit().await?;
        Ok(if ours { outcome } else { "claim_lost" })
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        job: &ClaimedJob,
        conversation_id: i64,
        conv: &ConversationRow,
        recipient: &str,
        through: i64,
        new_session: Option<DateTime<Utc>>,
        reply: AgentReply,
        started: Instant,
    ) -> Result<&'static str, TurnError> {
        let mut texts: Vec<String> = reply.texts.iter().flat_map(|t| split_text(t)).collect();
        let mut lane: Option<String> = None;
        let mut handoff: Option<String> = None;
        for action in &reply.actions {
            match action {
                Action::SetLane(l) => lane = Some(l.clone()),
                Action::Handoff { reason } => handoff = Some(reason.clone()),
            }
        }
        if handoff.is_some() {
            texts.push(conv.handoff_message.clone());
        }
        let mut tx = self.pool.begin().await?;
        // The update locks the conversation first: a human toggling the agent waits for us, or
        // we see their change (and only record that the messages were seen).
        let enabled: bool = sqlx::query_scalar(RECORD_TURN)
            .bind(conversation_id)
            .bind(through)
            .bind(new_session)
            .bind(&lane)
            .bind(job.id)
            .bind(self.agent.name())
            .bind(if handoff.is_some() {
                "handoff"
            } else {
                "answered"
            })
            .bind(reply.steps)
            .bind(reply.usage.prompt_tokens as i32)
            .bind(reply.usage.completion_tokens as i32)
            .bind(started.elapsed().as_millis() as i32)
            .fetch_one(&mut *tx)
            .await?;
        let outcome = if enabled {
            "answered"
        } else {
            "agent_disabled"
        };
        let messages: Vec<NewOutbound> = if enabled {
            texts
                .iter()
                .map(|t| NewOutbound {
                    account_id: conv.account_id.clone(),
                    conversation_id: Some(conversation_id),
                    job_id: Some(job.id),
                    recipient: recipient.to_string(),
                    message: json!({ "type": "text", "text": { "body": t, "preview_url": false } }),
                    sent_by_agent: true,
                    sent_by_member: None,
                    max_attempts: outbound::MAX_ATTEMPTS_DEFAULT,
                })
                .collect()
        } else {
            Vec::new()
        };
        outbound::enqueue(&mut tx, &messages)
            .await
            .map_err(queue_err)?;
        if let (true, Some(reason)) = (enabled, &handoff) {
            super::handoff::hand_off(
                &mut tx,
                &self.settings.queue,
                &conv.account_id,
                conversation_id,
                reason,
            )
            .await?;
        }
        if !jobs::complete_if_claimed(&mut tx, job.id, job.claim_token, outcome)
            .await
            .map_err(queue_err)?
        {
            tx.rollback().await?;
            tracing::warn!(
                "claim lost during the turn (lock expired and rescued); discarding the reply"
            );
            return Ok("claim_lost");
        }
        if !enabled {
            tx.commit().await?;
            return Ok(outcome);
        }
        tx.commit().await?;
        tracing::info!(replies = messages.len(), handoff = handoff.is_some(), lane = ?lane, "turn committed");
        Ok(if handoff.is_some() {
            "handoff"
        } else {
            outcome
        })
    }
}

/// A turn's writes to its conversation, in one statement: advance what was answered and, if the
/// agent is on, the lane and session clock, and record the turn. Returns whether the agent is on
/// (read under the row lock the update takes).
/// $1 conversation, $2 answered through, $3 new session start, $4 lane, $5 job, $6 provider,
/// $7 outcome, $8 steps, $9 prompt tokens, $10 completion tokens, $11 latency ms
const RECORD_TURN: &str = "
WITH conversation AS (
    UPDATE conversations SET
        answered_through = greatest(answered_through, $2),
        lane = CASE WHEN NOT agent_enabled THEN lane
                    WHEN $3::timestamptz IS NOT NULL THEN $4
                    ELSE coalesce($4, lane) END,
        session_started_at = CASE WHEN agent_enabled THEN coalesce($3, session_started_at)
                                  ELSE session_started_at END,
        last_activity_at = CASE WHEN agent_enabled THEN now() ELSE last_activity_at END
    WHERE id = $1
    RETURNING agent_enabled
), turn AS (
    INSERT INTO agent_turns (job_id, conversation_id, provider, outcome, steps, prompt_tokens, completion_tokens, latency_ms)
    SELECT $5, $1, $6, $7, $8, $9, $10, $11 FROM conversation WHERE agent_enabled
)
SELECT agent_enabled FROM conversation";

/// Split a long reply into WhatsApp-sized texts, on character boundaries.
pub fn split_text(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![];
    }
    chars.chunks(MAX_TEXT).map(|c| c.iter().collect()).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Agent(AgentError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("bad job: {0}")]
    BadJob(String),
}

fn queue_err(e: queue::Error) -> TurnError {
    match e {
        queue::Error::Query { source, .. } => TurnError::Db(source),
        other => TurnError::Db(sqlx::Error::Protocol(other.to_string())),
    }
}
