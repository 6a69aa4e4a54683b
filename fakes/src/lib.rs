//! Fakes that speak the real protocols over real HTTP, for tests and the local sandbox.
//!
//! - [`cloud_api`]: the WhatsApp Cloud API: signed webhooks out (exact bytes, escaped non-ASCII),
//!   sends in (validated, recorded), status webhooks, error injection, and a web chat page.
//! - [`llm`]: an OpenAI-compatible Chat Completions server with scripted replies and errors.
//! - [`kube_api`]: a small Kubernetes API server (get/create/replace/patch/delete/list with
//!   resourceVersion conflicts) that the real kube client talks to.
//! - [`whatsapp_web`]: a WhatsApp Web server stand-in (Noise XX/IK, pairing, login) over a local
//!   WebSocket.
//! - [`scrape`]: reading `/metrics` and the runbook's metrics table, to check one against the
//!   other.

pub mod cloud_api;
pub mod kube_api;
pub mod llm;
pub mod scrape;
mod serve;
pub mod whatsapp_web;

pub use serve::Server;

/// Install the ring crypto provider for rustls once (reqwest is built without a default one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
