//! One agent turn: load the conversation, run the agent, and commit its replies together with
//! the job's completion.
//!
//! A turn answers every inbound message of the conversation that no turn answered yet
//! (`conversations.answered_through`), so messages that arrived while the conversation waited
//! are answered together; the jobs they created find nothing left and complete as `coalesced`.
//! A turn is one read (turn_load.sql) before the agent runs and one statement after it
//! (turn_commit.sql): it locks the conversation row, completes the job only if the claim is
//! still ours, re-checks that the agent is still enabled (a human who took over during the
//! model call wins, and no reply goes out), records the turn, queues the replies and promotes the
//! conversation's next job. A handoff wraps it in a transaction with its own statements.

use std::time::Instant;

use chrono::{DateTime, Utc};
use queue::ClaimedJob;
use queue::jobs;
use queue::notifier::{JOBS_CHANNEL, OUTBOUND_CHANNEL};
use queue::runner::Outcome;
use serde_json::json;
use sqlx::PgPool;

use super::PoolSettings;
use super::agent::{Agent, AgentError, AgentReply, HistoryItem, TurnInput};
use super::tools::{Action, ToolContext, Toolbox};
use crate::metrics::{Metrics, Outcome as MetricOutcome};

/// WhatsApp's limit for a text body.
pub const MAX_TEXT: usize = 4096;

/// What a turn reads (turn_load.sql).
#[derive(sqlx::FromRow)]
struct TurnState {
    account_id: String,
    lane: Option<String>,
    agent_enabled: bool,
    contact_key: String,
    wa_id: Option<String>,
    display_name: Option<String>,
    handoff_message: String,
    /// Turns this conversation has had (the agent sees it as its turn index).
    turn_index: i64,
    /// Set when the session expired: the new session starts at the first unanswered message.
    new_session_start: Option<DateTime<Utc>>,
    /// Inbound messages no turn answered yet, in order.
    unanswered_ids: Vec<i64>,
    unanswered_bodies: Vec<Option<String>>,
    /// The session's history, oldest first.
    history_roles: Vec<String>,
    history_texts: Vec<Option<String>>,
}

const LOAD: &str = include_str!("turn_load.sql");
const COMMIT: &str = include_str!("turn_commit.sql");

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
        let conversation_id = super::job_payload::AgentTurn::from_json(&job.payload)
            .map_err(TurnError::BadJob)?
            .conversation_id;
        tracing::Span::current().record("conversation_id", conversation_id);
        let turn_started = Instant::now();
        let state: TurnState = sqlx::query_as(LOAD)
            .bind(conversation_id)
            .bind(self.settings.session_ttl_seconds as f64)
            .bind(self.settings.history_messages)
            .fetch_one(&self.pool)
            .await?;
        let Some(&through) = state.unanswered_ids.last() else {
            return self.finish_without_reply(job, "coalesced").await;
        };
        if !state.agent_enabled {
            return self.finish_without_reply(job, "agent_disabled").await;
        }
        // A session idle past its TTL starts over: lane and dialogue reset, the log is kept.
        let lane = match state.new_session_start {
            Some(_) => None,
            None => state.lane.clone(),
        };
        let history = state
            .history_roles
            .iter()
            .zip(&state.history_texts)
            .filter_map(|(role, text)| {
                text.clone().map(|t| HistoryItem {
                    role: if role == "user" { "user" } else { "assistant" },
                    text: t,
                })
            })
            .collect();
        let input = TurnInput {
            conversation_id,
            contact_name: state.display_name.clone(),
            lane,
            history,
            new_messages: state.unanswered_bodies.iter().flatten().cloned().collect(),
            system_prompt: self.settings.system_prompt.clone(),
            lanes: self.settings.lanes.clone(),
            turn_index: state.turn_index,
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
        let recipient = state
            .wa_id
            .clone()
            .unwrap_or_else(|| state.contact_key.clone());
        self.commit(
            job,
            conversation_id,
            &state,
            &recipient,
            through,
            state.new_session_start,
            reply,
            turn_started,
        )
        .await
    }

    async fn finish_without_reply(
        &self,
        job: &ClaimedJob,
        outcome: &'static str,
    ) -> Result<&'static str, TurnError> {
        let ours = jobs::complete_one(&self.pool, job.id, job.claim_token, outcome)
            .await
            .map_err(queue_err)?;
        Ok(if ours { outcome } else { "claim_lost" })
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        job: &ClaimedJob,
        conversation_id: i64,
        state: &TurnState,
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
                Action::SendTemplate(_) | Action::OfferButtons(_) => {}
            }
        }
        if handoff.is_some() {
            texts.push(state.handoff_message.clone());
        }
        let mut messages: Vec<serde_json::Value> = texts
            .iter()
            .map(|t| json!({ "type": "text", "text": { "body": t, "preview_url": false } }))
            .collect();
        // Buttons go with the last text (not after a handoff: a person answers now): a rules
        // lane's, or the model's (`reply_buttons`, the last call wins).
        let offered = reply.actions.iter().rev().find_map(|a| match a {
            Action::OfferButtons(b) => Some(b.clone()),
            _ => None,
        });
        let buttons = offered.unwrap_or_else(|| reply.buttons.clone());
        if handoff.is_none()
            && !buttons.is_empty()
            && let Some(last) = messages.last_mut()
        {
            let body = last["text"]["body"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(with_buttons) = with_buttons(&body, &buttons) {
                *last = with_buttons;
            }
        }
        // Templates the agent sent (the `send_template` tool), after its texts.
        messages.extend(reply.actions.iter().filter_map(|a| match a {
            Action::SendTemplate(message) => Some(message.clone()),
            _ => None,
        }));
        let commit = sqlx::query_as(COMMIT)
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
            .bind(recipient)
            .bind(&messages)
            // The account's spec.delivery.maxAttempts.
            .bind(None::<i32>)
            .bind(OUTBOUND_CHANNEL)
            .bind(job.claim_token)
            .bind(JOBS_CHANNEL);
        // The common turn is this one statement in its own transaction; a handoff adds its
        // statements to the same transaction.
        let (completed, enabled, replies, _promoted): (bool, bool, i64, i64) = match &handoff {
            None => commit.fetch_one(&self.pool).await?,
            Some(reason) => {
                let mut tx = self.pool.begin().await?;
                let row: (bool, bool, i64, i64) = commit.fetch_one(&mut *tx).await?;
                if row.0 && row.1 {
                    super::handoff::hand_off(
                        &mut tx,
                        &self.settings.queue,
                        &state.account_id,
                        conversation_id,
                        reason,
                    )
                    .await?;
                }
                tx.commit().await?;
                row
            }
        };
        if !completed {
            tracing::warn!(
                "claim lost during the turn (lock expired and rescued); discarding the reply"
            );
            return Ok("claim_lost");
        }
        if !enabled {
            return Ok("agent_disabled");
        }

        tracing::info!(replies, handoff = handoff.is_some(), lane = ?lane, "turn committed");
        Ok(if handoff.is_some() {
            "handoff"
        } else {
            "answered"
        })
    }
}

/// A text with reply options, as a Cloud API interactive message: up to 3 as reply buttons,
/// 4 to 10 as a list behind a "Choose" button (WhatsApp Web sends either as the text with
/// numbered options). `None` when WhatsApp would refuse it: a body over 1,024 characters, no
/// option, more than 10, or a title over 20 characters; the text then goes alone.
pub fn with_buttons(body: &str, titles: &[String]) -> Option<serde_json::Value> {
    let fits = !body.is_empty()
        && body.chars().count() <= 1024
        && (1..=10).contains(&titles.len())
        && titles
            .iter()
            .all(|t| !t.trim().is_empty() && t.chars().count() <= 20);
    if !fits {
        return None;
    }
    if titles.len() <= 3 {
        return Some(json!({ "type": "interactive", "interactive": {
            "type": "button",
            "body": { "text": body },
            "action": { "buttons": titles.iter().map(|t| json!({
                "type": "reply", "reply": { "id": t, "title": t }
            })).collect::<Vec<_>>() }
        }}));
    }
    Some(json!({ "type": "interactive", "interactive": {
        "type": "list",
        "body": { "text": body },
        "action": { "button": "Choose", "sections": [{
            "rows": titles.iter().map(|t| json!({ "id": t, "title": t })).collect::<Vec<_>>()
        }] }
    }}))
}

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
