//! Groups on the stand-in, as WhatsApp's server keeps them for the clients: who is in a group
//! (answered to the group info query, `xmlns="w:g2"`), and the fan-out of a group message to
//! every member's devices. The sender encrypts the text once with its sender key (`skmsg`) and
//! sends its sender key to the devices that lack it inside `<participants>` (each a `pkmsg` or
//! `msg` of its own); the server gives each device its own `<enc>` (if any) with the shared one.

use std::collections::HashMap;

use whatsapp_rust::Jid;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::{Node, NodeRef};

use super::{State, attr};
use crate::cloud_api::{lock, now_unix};

pub(super) struct Group {
    subject: String,
    /// Members' phone numbers (digits), the creator first.
    members: Vec<String>,
    created: u64,
}

#[derive(Default)]
pub(super) struct Groups {
    by_id: std::sync::Mutex<HashMap<String, Group>>,
    next: std::sync::atomic::AtomicU64,
}

impl Groups {
    /// A new group of `members` (digits; the first is its creator); returns its JID.
    pub(super) fn create(&self, subject: &str, members: &[&str]) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("1203630{:011}", 4_200_000_000 + n);
        lock(&self.by_id).insert(
            id.clone(),
            Group {
                subject: subject.to_string(),
                members: members
                    .iter()
                    .map(|m| m.trim_start_matches('+').to_string())
                    .collect(),
                created: now_unix(),
            },
        );
        Jid::group(id.as_str()).to_string()
    }

    /// The members (digits) of the group `id` (the JID's user part).
    pub(super) fn members(&self, id: &str) -> Vec<String> {
        lock(&self.by_id)
            .get(id)
            .map(|g| g.members.clone())
            .unwrap_or_default()
    }

    /// `<group>` as the info query's answer carries it: phone-number addressing, every member.
    fn info(&self, id: &str) -> Option<Node> {
        let groups = lock(&self.by_id);
        let g = groups.get(id)?;
        let participants = g.members.iter().enumerate().map(|(i, m)| {
            let p = NodeBuilder::new("participant").attr("jid", Jid::pn(m.as_str()));
            if i == 0 {
                p.attr("type", "superadmin")
            } else {
                p
            }
            .build()
        });
        Some(
            NodeBuilder::new("group")
                .attr("id", id.to_string())
                .attr("subject", g.subject.clone())
                .attr("s_t", g.created.to_string())
                .attr("creation", g.created.to_string())
                .attr("creator", Jid::pn(g.members[0].as_str()))
                .attr("addressing_mode", "pn")
                .attr("size", g.members.len().to_string())
                .children(participants)
                .build(),
        )
    }
}

/// `xmlns="w:g2"`: a group's info (`<query request="interactive"/>` to the group's JID);
/// anything else about groups is answered empty.
pub(super) fn group_iq(state: &State, node: &NodeRef<'_>) -> Vec<Node> {
    let id = attr(node, "id");
    let to = attr(node, "to");
    let group = to.split('@').next().unwrap_or_default();
    let asks_info = node
        .children()
        .unwrap_or_default()
        .iter()
        .any(|c| c.tag.as_ref() == "query");
    let result = NodeBuilder::new("iq")
        .attr("from", to.clone())
        .attr("id", id.clone())
        .attr("type", "result");
    match (asks_info, state.relay.groups.info(group)) {
        (true, Some(info)) => vec![result.children([info]).build()],
        (true, None) => vec![
            NodeBuilder::new("iq")
                .attr("from", to)
                .attr("id", id)
                .attr("type", "error")
                .children([NodeBuilder::new("error")
                    .attr("code", "404")
                    .attr("text", "item-not-found")
                    .build()])
                .build(),
        ],
        (false, _) => vec![result.build()],
    }
}
