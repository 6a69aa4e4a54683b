//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

#[derive(Clone)]
pub struct Probes {
    pub pool: PgPool,
    pub registry: Arc<Registry>,
}

pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&p.pool).await {
        Ok(_) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    service::encode_metrics(&p.registry)
}
