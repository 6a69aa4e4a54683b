//! The rules agent: no LLM. Picks a lane by keywords (whole words, case-insensitive) and answers
//! with the lane's canned replies in turn; a lane marked `handoff` hands the conversation to a
//! human. Works with no API key, which makes it the default.

use crds::agent_pool::LaneSpec;

use super::{AgentReply, TurnInput};
use crate::core::tools::Action;
use crate::gateway::payload::is_media_context;

#[derive(Debug, Clone, Default)]
pub struct RulesAgent;

impl RulesAgent {
    pub fn respond(&self, input: &TurnInput) -> AgentReply {
        let words: Vec<String> = input
            .new_messages
            .iter()
            .flat_map(|m| {
                m.split(|c: char| !c.is_alphanumeric())
                    .map(str::to_lowercase)
                    .collect::<Vec<_>>()
            })
            .filter(|w| !w.is_empty())
            .collect();
        // A reply button tapped (or its title, or its number on WhatsApp Web, typed) decides.
        let tapped = input
            .new_messages
            .iter()
            .rev()
            .find_map(|m| button_target(input, m));
        let matched = tapped
            .or_else(|| {
                input
                    .lanes
                    .iter()
                    .filter(|lane| {
                        lane.keywords
                            .iter()
                            .any(|k| words.iter().any(|w| *w == k.to_lowercase()))
                    })
                    .max_by_key(|lane| lane.handoff) // an explicit ask for a human wins
            })
            .or_else(|| {
                // Media with no keyword in its caption: the lane that takes media.
                let media = input.new_messages.iter().any(|m| is_media_context(m));
                media
                    .then(|| input.lanes.iter().find(|lane| lane.media))
                    .flatten()
            })
            .or_else(|| {
                input
                    .lane
                    .as_ref()
                    .and_then(|cur| input.lanes.iter().find(|l| &l.name == cur))
            })
            .or_else(|| input.lanes.first());
        let mut reply = AgentReply::default();
        let Some(lane) = matched else {
            reply
                .texts
                .push("Thanks for your message! We'll get back to you shortly.".into());
            return reply;
        };
        if input.lane.as_deref() != Some(lane.name.as_str()) {
            reply.actions.push(Action::SetLane(lane.name.clone()));
        }
        if lane.handoff {
            reply.actions.push(Action::Handoff {
                reason: format!("routed to lane {}", lane.name),
            });
            return reply;
        }
        if !lane.replies.is_empty() {
            let i = (input.turn_index.max(0) as usize) % lane.replies.len();
            reply.texts.push(lane.replies[i].clone());
            reply.buttons = lane.buttons.iter().map(|b| b.title.clone()).collect();
        }
        reply
    }
}

/// The lane a customer's message leads to as a reply button: a button's title (what a tap sends
/// on the Cloud API, or what was typed), or the number of one of the options our last message
/// listed (WhatsApp Web shows buttons as `1. <title>` lines).
fn button_target<'a>(input: &'a TurnInput, message: &str) -> Option<&'a LaneSpec> {
    let said = message.trim();
    let numbered = said.parse::<usize>().ok().and_then(|n| {
        let last = input.history.iter().rev().find(|h| h.role == "assistant")?;
        last.text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{n}. ")))
            .map(str::trim)
    });
    let title = numbered.unwrap_or(said);
    input.lanes.iter().find_map(|offering| {
        let b = offering
            .buttons
            .iter()
            .find(|b| b.title.eq_ignore_ascii_case(title))?;
        let target = b.lane.as_deref().unwrap_or(&offering.name);
        input.lanes.iter().find(|l| l.name == target)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::agent_pool::default_lanes;

    fn input(text: &str, lane: Option<&str>) -> TurnInput {
        TurnInput {
            conversation_id: 1,
            contact_name: None,
            lane: lane.map(str::to_string),
            history: vec![],
            new_messages: vec![text.to_string()],
            system_prompt: None,
            lanes: default_lanes(),
            turn_index: 0,
        }
    }

    #[test]
    fn routes_by_whole_word_keywords_and_hands_off_on_request() {
        let r = RulesAgent.respond(&input("What PRICES do you have?", None));
        assert_eq!(r.actions, vec![Action::SetLane("commerce".into())]);
        assert_eq!(r.texts.len(), 1);
        let r = RulesAgent.respond(&input(
            "I want a human please, this is a problem",
            Some("support"),
        ));
        assert!(r.actions.contains(&Action::Handoff {
            reason: "routed to lane human".into()
        }));
        assert!(r.texts.is_empty());
        // "shopping" does not match the keyword "shop"; stays in the current lane.
        let r = RulesAgent.respond(&input("shopping", Some("support")));
        assert!(r.actions.is_empty());
        assert!(r.texts[0].contains("Describe the problem"));
        // A photo goes to the lane that takes media; a keyword in its caption still wins.
        let r = RulesAgent.respond(&input("[image: the box arrived like this]", Some("info")));
        assert_eq!(r.actions, vec![Action::SetLane("support".into())]);
        let r = RulesAgent.respond(&input("[image: what is the price of this?]", None));
        assert_eq!(r.actions, vec![Action::SetLane("commerce".into())]);
        let r = RulesAgent.respond(&input("[voice note]", Some("commerce")));
        assert_eq!(r.actions, vec![Action::SetLane("support".into())]);
    }
}
