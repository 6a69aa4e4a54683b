//! The agent: who writes the reply. Providers behind one type:
//! - [`rules::RulesAgent`]: no LLM; keyword lanes and canned replies (the default).
//! - [`openai::OpenAiAgent`]: any OpenAI-compatible Chat Completions endpoint, with tools.

pub mod openai;
pub mod rules;

use crds::agent_pool::LaneSpec;

use super::tools::{Action, ToolContext, Toolbox};

/// A message of the conversation so far.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryItem {
    /// `user` or `assistant`.
    pub role: &'static str,
    pub text: String,
}

/// What the agent sees in one turn.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub conversation_id: i64,
    pub contact_name: Option<String>,
    pub lane: Option<String>,
    /// Earlier messages of this session, oldest first.
    pub history: Vec<HistoryItem>,
    /// The customer's messages this turn answers (several when they arrived while waiting).
    pub new_messages: Vec<String>,
    pub system_prompt: Option<String>,
    pub lanes: Vec<LaneSpec>,
    /// Agent turns already taken in this conversation (rotates canned replies).
    pub turn_index: i64,
}

/// Tokens used in a turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// What the agent decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReply {
    /// Texts to send, in order.
    pub texts: Vec<String>,
    /// Reply buttons (titles) offered with the last text.
    pub buttons: Vec<String>,
    pub actions: Vec<Action>,
    pub usage: Usage,
    /// Model calls made.
    pub steps: i32,
}

/// Why a turn failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentError {
    /// Worth another attempt later (rate limits, timeouts, 5xx after retries).
    #[error("{0}")]
    Transient(String),
    /// Will fail again (bad key, exhausted quota, malformed request): the job dies, kept for replay.
    #[error("{0}")]
    Permanent(String),
}

/// The configured provider.
pub enum Agent {
    Rules(rules::RulesAgent),
    OpenAi(openai::OpenAiAgent),
}

impl Agent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Rules(_) => "rules",
            Self::OpenAi(_) => "openai",
        }
    }

    pub async fn respond(
        &self,
        input: &TurnInput,
        tools: &Toolbox,
        ctx: &ToolContext,
    ) -> Result<AgentReply, AgentError> {
        match self {
            Self::Rules(a) => Ok(a.respond(input)),
            Self::OpenAi(a) => a.respond(input, tools, ctx).await,
        }
    }
}
