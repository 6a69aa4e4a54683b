//! `whatsapp-operator`: reconciles `WhatsAppAccount` and `AgentPool`.
//!
//! - [`account`]: an account becomes a gateway Deployment, Service, ServiceAccount, a Role and
//!   RoleBinding limited to the account's Lease, and the Lease itself; status shows the Lease
//!   holder (the only pod that sends), credentials and readiness.
//! - [`pool`]: a pool becomes a core Deployment scaled from queue depth ([`pool::scaling`]).
//! - [`context`], [`metrics`], [`http`], [`error`]: shared plumbing.

pub mod account;
pub mod apply;
pub mod context;
pub mod error;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod pool;
pub mod secrets;

pub use error::{Error, Result};

/// Field manager of every server-side apply.
pub const MANAGER: &str = "whatsapp-operator";
