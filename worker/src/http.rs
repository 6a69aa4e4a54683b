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
    /// Set on SIGTERM: readiness fails first, so endpoints move away before the pod stops
    /// serving.
    pub draining: Draining,
}

/// Whether the process is stopping (readiness answers 503 from then on).
#[derive(Clone, Default)]
pub struct Draining(Arc<std::sync::atomic::AtomicBool>);

impl Draining {
    pub fn start(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

/// How long readiness waits for the database: well under a kubelet probe's timeout, instead of
/// the pool's 10 s acquire timeout while Postgres is down.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    if p.draining.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping");
    }
    let ping = sqlx::query("SELECT 1").execute(&p.pool);
    match tokio::time::timeout(READY_TIMEOUT, ping).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready"),
        Ok(Err(_)) | Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    service::encode_metrics(&p.registry)
}

/// A bound HTTP server that stops gracefully when its token is cancelled.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// Bind `listen` and serve `router` in the background; `what` names it in the error log.
pub async fn serve(listen: &str, router: Router, what: &'static str) -> std::io::Result<Server> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let cancelled = stop.clone();
    let task = tokio::spawn(async move {
        // Peer addresses reach handlers that care who is asking (the pairing page).
        let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancelled.cancelled().await });
        if let Err(error) = serve.await {
            tracing::error!(%error, server = what, "HTTP server failed");
        }
    });
    Ok(Server { addr, task, stop })
}
