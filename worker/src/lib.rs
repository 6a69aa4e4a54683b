//! `whatsapp-worker`: one binary, several roles.
//!
//! - [`gateway`]: one WhatsApp account. Every replica accepts webhooks (signature checked, one
//!   transaction per message, deduped); only the holder of the account's Lease sends, fenced by
//!   an epoch in Postgres.
//! - [`core`]: claims a pool's conversation jobs and runs the agent; each turn's replies and the
//!   job's completion commit in one transaction.
//! - [`sandbox`]: everything on one machine with the fakes, for trying it without a cluster.

pub mod config;
pub mod core;
pub mod error;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod sandbox;
pub mod telemetry;

/// Install rustls' ring provider once; reqwest and kube are built without a default provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
