//! Built-in plugins: `handoff`, `set_lane` and the read-only `business_hours`.

use std::sync::Arc;

use chrono::{Datelike, Timelike};
use serde_json::{Value, json};

use super::{Action, Manifest, Plugin, Risk, ToolContext, ToolOutput};

pub fn builtins() -> Vec<Arc<dyn Plugin>> {
    vec![
        Arc::new(Handoff),
        Arc::new(SetLane),
        Arc::new(BusinessHours),
        Arc::new(SendTemplate),
        Arc::new(ReplyButtons),
    ]
}

/// Offer up to 3 reply buttons under the reply (a WhatsApp interactive message; numbered
/// options on WhatsApp Web). The customer's tap comes back as the button's title.
pub struct ReplyButtons;

impl Plugin for ReplyButtons {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "reply_buttons".into(),
            description: "Show short reply options under your next reply, for choices the customer can tap: up to 3 as buttons, 4 to 10 as a list. Their choice comes back as the option title.".into(),
            config_schema: json!({ "type": "object", "additionalProperties": false, "properties": {} }),
            parameters: json!({
                "type": "object",
                "properties": {
                    "buttons": {
                        "type": "array", "minItems": 1, "maxItems": 10,
                        "items": { "type": "string", "minLength": 1, "maxLength": 20 },
                        "description": "Button titles, at most 20 characters each"
                    }
                },
                "required": ["buttons"],
                "additionalProperties": false
            }),
            risk: Risk::Low,
            channels: vec!["whatsapp".into()],
        }
    }

    fn call(
        &self,
        _config: &Value,
        args: &Value,
        _ctx: &ToolContext,
    ) -> Result<ToolOutput, String> {
        let titles: Vec<String> = args["buttons"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter_map(|t| t.as_str())
                    .map(|t| t.trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let ok = (1..=10).contains(&titles.len())
            && titles
                .iter()
                .all(|t| !t.is_empty() && t.chars().count() <= 20);
        if !ok {
            return Err("give 1 to 10 option titles of at most 20 characters".into());
        }
        Ok(ToolOutput {
            content: format!(
                "The buttons {} will show under your reply; now write the reply.",
                titles.join(", ")
            ),
            action: Some(Action::OfferButtons(titles)),
        })
    }
}

/// Send an approved WhatsApp template (Cloud API numbers): what reaches a customer after 24
/// hours of silence, or a structured confirmation. Off unless the pool lists it; `allowed`
/// narrows it to some templates.
pub struct SendTemplate;

impl Plugin for SendTemplate {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "send_template".into(),
            description: "Send an approved WhatsApp message template by name and language, with the values of its body parameters in order. Use only templates you were told exist.".into(),
            config_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "allowed": {
                        "type": "array", "maxItems": 100,
                        "items": { "type": "string", "pattern": "^[a-z0-9_]{1,512}$" }
                    }
                }
            }),
            parameters: json!({
                "type": "object",
                "properties": {
                    "name": { "type": "string", "description": "Template name, e.g. order_update" },
                    "language": { "type": "string", "description": "Language code, e.g. en_US" },
                    "parameters": { "type": "array", "items": { "type": "string" }, "description": "Body parameter values, in order" }
                },
                "required": ["name", "language"],
                "additionalProperties": false
            }),
            risk: Risk::Medium,
            channels: vec!["whatsapp".into()],
        }
    }

    fn call(&self, config: &Value, args: &Value, _ctx: &ToolContext) -> Result<ToolOutput, String> {
        let name = args["name"].as_str().unwrap_or_default();
        let language = args["language"].as_str().unwrap_or_default();
        if let Some(allowed) = config["allowed"].as_array()
            && !allowed.iter().any(|a| a.as_str() == Some(name))
        {
            return Err(format!(
                "template {name:?} is not allowed here; allowed: {}",
                allowed
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let parameters: Vec<String> = match &args["parameters"] {
            Value::Null => vec![],
            Value::Array(items) => items
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(str::to_string)
                        .ok_or("parameters must be strings")
                })
                .collect::<Result<_, _>>()?,
            _ => return Err("parameters must be an array of strings".into()),
        };
        let message = crate::template::message(name, language, &parameters)?;
        Ok(ToolOutput {
            content: format!(
                "Template {name} ({language}) queued. Do not repeat its content as text."
            ),
            action: Some(Action::SendTemplate(message)),
        })
    }
}

/// Hand the conversation to a human: sends the account's handoff message, turns the agent off
/// for this conversation and opens a task for the least recently assigned online team member.
pub struct Handoff;

impl Plugin for Handoff {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "handoff".into(),
            description: "Hand the conversation to a human team member. Use when the customer asks for a person or you cannot help.".into(),
            config_schema: json!({ "type": "object", "additionalProperties": false, "properties": {} }),
            parameters: json!({
                "type": "object",
                "properties": { "reason": { "type": "string", "description": "Why a human is needed" } },
                "required": ["reason"],
                "additionalProperties": false
            }),
            risk: Risk::Medium,
            channels: vec!["whatsapp".into()],
        }
    }

    fn call(
        &self,
        _config: &Value,
        args: &Value,
        _ctx: &ToolContext,
    ) -> Result<ToolOutput, String> {
        let reason = args["reason"]
            .as_str()
            .unwrap_or("customer asked for a human")
            .to_string();
        Ok(ToolOutput {
            content:
                "Handed off: a human will continue this conversation. Do not send anything else."
                    .into(),
            action: Some(Action::Handoff { reason }),
        })
    }
}

/// Move the conversation to another lane (info, commerce, support, ...).
pub struct SetLane;

impl Plugin for SetLane {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "set_lane".into(),
            description: "Move the conversation to a lane (topic) so the right instructions apply."
                .into(),
            config_schema: json!({ "type": "object", "additionalProperties": false, "properties": {} }),
            parameters: json!({
                "type": "object",
                "properties": { "lane": { "type": "string", "description": "Lane name" } },
                "required": ["lane"],
                "additionalProperties": false
            }),
            risk: Risk::Low,
            channels: vec!["whatsapp".into()],
        }
    }

    fn call(&self, _config: &Value, args: &Value, ctx: &ToolContext) -> Result<ToolOutput, String> {
        let lane = args["lane"].as_str().unwrap_or_default();
        if !ctx.lanes.iter().any(|l| l == lane) {
            return Err(format!(
                "unknown lane {lane:?}; lanes: {}",
                ctx.lanes.join(", ")
            ));
        }
        Ok(ToolOutput {
            content: format!("Conversation moved to lane {lane}."),
            action: Some(Action::SetLane(lane.to_string())),
        })
    }
}

/// Read-only: whether the business is open now, from configured opening hours.
pub struct BusinessHours;

impl Plugin for BusinessHours {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "business_hours".into(),
            description: "Tell whether the business is open right now and its opening hours."
                .into(),
            config_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "utcOffsetHours": { "type": "integer", "minimum": -12, "maximum": 14 },
                    "openHour": { "type": "integer", "minimum": 0, "maximum": 23 },
                    "closeHour": { "type": "integer", "minimum": 1, "maximum": 24 },
                    "days": { "type": "array", "items": { "type": "string", "enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"] } }
                }
            }),
            parameters: json!({ "type": "object", "properties": {}, "additionalProperties": false }),
            risk: Risk::Low,
            channels: vec!["whatsapp".into()],
        }
    }

    fn call(&self, config: &Value, _args: &Value, ctx: &ToolContext) -> Result<ToolOutput, String> {
        let offset = config["utcOffsetHours"].as_i64().unwrap_or(0);
        let open = config["openHour"].as_u64().unwrap_or(9) as u32;
        let close = config["closeHour"].as_u64().unwrap_or(18) as u32;
        let days: Vec<String> = config["days"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_else(|| {
                ["mon", "tue", "wed", "thu", "fri"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            });
        let local = ctx.now + chrono::Duration::hours(offset);
        let day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            [local.weekday().num_days_from_monday() as usize];
        let is_open = days.iter().any(|d| d == day) && local.hour() >= open && local.hour() < close;
        Ok(ToolOutput {
            content: format!(
                "{} Opening hours: {}, {open:02}:00-{close:02}:00 (UTC{offset:+}).",
                if is_open { "Open now." } else { "Closed now." },
                days.join(", ")
            ),
            action: None,
        })
    }
}
