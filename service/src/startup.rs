//! Starting before a dependency is reachable.
//!
//! In a cluster, Postgres or the API server may not answer yet when a pod starts (a Service name
//! that does not resolve yet, a database still recovering). A process that exits then is
//! restarted with a growing back-off and shows CrashLoopBackOff for what is only a wait. Instead
//! each binary retries with exponential back-off and, meanwhile, answers its probes on its own
//! port: alive (`/healthz` 200, so the kubelet does not restart it) and not ready (`/readyz` 503
//! naming what it waits for). Once the dependency answers, the placeholder stops and the
//! binary's own server takes the port.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use backon::{ExponentialBuilder, Retryable};

/// Run `attempt` until it succeeds, backing off from 1 s to 30 s, and answer probes on `listen`
/// meanwhile. `what` names the dependency in the logs and in `/readyz`.
pub async fn wait_for<T, E, F, Fut>(listen: &str, what: &'static str, attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let placeholder = Placeholder::start(listen, what).await;
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let mut attempt = attempt;
    let value = loop {
        let result = (&mut attempt)
            .retry(backoff)
            .notify(|error: &E, wait: Duration| {
                tracing::warn!(dependency = what, %error, retry_in_ms = wait.as_millis() as u64, "not reachable yet; waiting");
            })
            .await;
        // Without a limit on attempts the retry ends only with success; should it ever give
        // up, start over.
        if let Ok(value) = result {
            break value;
        }
    };
    if let Some(p) = placeholder {
        p.stop().await;
    }
    value
}

/// The probe server that answers while the binary waits.
struct Placeholder {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Placeholder {
    /// None when the port cannot be bound (the binary's own bind reports that later).
    async fn start(listen: &str, what: &'static str) -> Option<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await.ok()?;
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("waiting for {what}"),
                    )
                }),
            );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Some(Self { stop, task })
    }

    /// Stop and free the port.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
