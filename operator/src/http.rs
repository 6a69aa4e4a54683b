//! `/healthz`, `/readyz` (ready once this replica leads and its controllers run) and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    // A standby replica is healthy but not "ready" in the sense of reconciling; report 200 for
    // both so rollouts proceed, with the role in the body.
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "leading")
    } else {
        (StatusCode::OK, "standby")
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    service::encode_metrics(&s.registry)
}
