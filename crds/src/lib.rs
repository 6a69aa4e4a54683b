//! Custom resources of the WhatsApp operator.
//!
//! - [`WhatsAppAccount`]: one WhatsApp phone number, served by gateway pods of which exactly one
//!   (the holder of the account's Lease) sends.
//! - [`AgentPool`]: a scalable fleet of core workers that run the agent on queued conversations.
//!
//! The generated CustomResourceDefinitions are checked in under `crds/manifests/` and in the Helm
//! chart; `tests/manifests.rs` fails when they no longer match these types.
// kube-derive takes one `printcolumn(...)` per column; clippy reads the repeated `type_ = ...` inside
// them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod account;
pub mod agent_pool;
pub mod conditions;
pub mod manifests;

pub use account::{WhatsAppAccount, WhatsAppAccountSpec, WhatsAppAccountStatus};
pub use agent_pool::{AgentPool, AgentPoolSpec, AgentPoolStatus};

/// API group of both kinds.
pub const GROUP: &str = "whatsapp.kube-agents.io";
/// API version of both kinds.
pub const VERSION: &str = "v1alpha1";

/// The name of the Lease that grants the right to send for an account.
pub fn lease_name(account: &str) -> String {
    format!("whatsapp-{account}")
}
