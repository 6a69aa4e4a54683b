//! What every long-running binary of this project shares: logging, the shutdown signal, the
//! TLS crypto provider, and the OpenMetrics response. The operator and the workers both use it,
//! so neither depends on the other.

pub mod secret;
pub mod startup;
pub mod telemetry;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

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

/// The OpenMetrics text of a registry, as a response.
pub fn encode_metrics(registry: &Registry) -> axum::response::Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            String::new(),
        ),
    }
    .into_response()
}
