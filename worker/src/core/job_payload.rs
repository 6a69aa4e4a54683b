//! The payloads of the core workers' jobs, one typed struct per kind, versioned.
//!
//! Jobs outlive the process that queued them (a rolling upgrade, a dead job replayed days
//! later), so a payload is read with serde into its struct, never by string key, and carries a
//! version: a worker refuses (as a permanent, replayable failure) a version newer than it knows
//! instead of guessing. The ingest statement writes the same shape in SQL
//! (`gateway/ingest_message.sql`); change them together.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The version this worker writes and the newest it reads.
pub const AGENT_TURN_VERSION: u32 = 1;

/// `agent_turn`: answer what a conversation's customer wrote since its last answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTurn {
    /// Payload version; absent in jobs queued before versions existed (= 1).
    #[serde(default = "first_version")]
    pub v: u32,
    pub conversation_id: i64,
    /// The inbound message that queued the turn (ingest); none when a team member handed the
    /// conversation back to the agent with messages unanswered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_id: Option<i64>,
}

fn first_version() -> u32 {
    1
}

impl AgentTurn {
    /// The job kind.
    pub const KIND: &'static str = "agent_turn";

    pub fn resume(conversation_id: i64) -> Self {
        Self {
            v: AGENT_TURN_VERSION,
            conversation_id,
            inbound_id: None,
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Read a job's payload; an error says what is wrong with it.
    pub fn from_json(payload: &Value) -> Result<Self, String> {
        let turn: Self = serde_json::from_value(payload.clone())
            .map_err(|e| format!("agent_turn payload {payload}: {e}"))?;
        if turn.v > AGENT_TURN_VERSION {
            return Err(format!(
                "agent_turn payload version {} is newer than this worker reads ({AGENT_TURN_VERSION}); replay it after the upgrade",
                turn.v
            ));
        }
        Ok(turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_shape_ever_written_is_read_and_newer_versions_are_refused() {
        // Written by the ingest statement, before and after versions.
        for payload in [
            json!({ "conversation_id": 7, "inbound_id": 70 }),
            json!({ "v": 1, "conversation_id": 7, "inbound_id": 70 }),
        ] {
            assert_eq!(
                AgentTurn::from_json(&payload),
                Ok(AgentTurn {
                    v: 1,
                    conversation_id: 7,
                    inbound_id: Some(70)
                })
            );
        }
        // Written by the inbox's resume, before and after versions.
        for payload in [
            json!({ "conversation_id": 8 }),
            AgentTurn::resume(8).to_json(),
        ] {
            assert_eq!(AgentTurn::from_json(&payload), Ok(AgentTurn::resume(8)));
        }
        let newer = AgentTurn::from_json(&json!({ "v": 2, "conversation_id": 9 }));
        assert!(newer.is_err_and(|e| e.contains("version 2")));
        let broken = AgentTurn::from_json(&json!({ "conversation": 9 }));
        assert!(broken.is_err_and(|e| e.contains("conversation_id")));
    }
}
