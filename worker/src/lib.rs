//! `whatsapp-worker`: one binary, several roles.
//!
//! - [`gateway`]: one WhatsApp account. Every replica accepts webhooks (signature checked, one
//!   transaction per message, deduped); only the holder of the account's Lease sends, fenced by
//!   an epoch in Postgres.
//! - [`core`]: claims a pool's conversation jobs and runs the agent; each turn's replies and the
//!   job's completion commit in one transaction.
//! - `sandbox` (feature `sandbox`): everything on one machine with the fakes, for trying it
//!   without a cluster.

pub mod config;
pub mod core;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod group_commit;
pub mod http;
pub mod metrics;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod web;

pub use service::{install_crypto_provider, shutdown_signal};
