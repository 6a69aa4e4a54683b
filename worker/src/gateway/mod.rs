//! The gateway role: one WhatsApp account (`gateway`), or the shared pieces of a fleet pod's
//! ingress and egress (`crate::fleet`).

pub mod cloud_api;
pub mod ingest;
pub mod media;
pub mod outbound_media;
pub use ::lease;
pub mod payload;
pub mod routes;
pub mod sender;
pub mod signature;
pub mod status_writer;
pub mod templates;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use queue::notifier::Notifier;
use service::secret::ExposeSecret;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AccountArgs;
use crate::metrics::Metrics;
use lease::{Elector, Fence, Leadership, LeaseSettings};
use sender::Sender;
use webhook::WebhookState;

/// Everything a gateway needs to start.
pub struct GatewaySettings {
    pub account: AccountArgs,
    pub lease: LeaseSettings,
    pub listen: String,
    /// Serve webhooks only (no election, no sending): an extra ingress replica.
    pub ingress_only: bool,
}

/// A running gateway.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub leadership: Arc<Leadership>,
    pub metrics: Metrics,
    server: JoinHandle<()>,
    server_stop: CancellationToken,
    elector: Option<(Arc<Elector>, JoinHandle<()>, CancellationToken)>,
    sender: Option<(JoinHandle<()>, CancellationToken)>,
    aux: Vec<JoinHandle<()>>,
}

impl RunningGateway {
    /// What a pod does on SIGTERM: stop sending, finish the send in flight, release the Lease,
    /// then stop serving webhooks.
    pub async fn shutdown(mut self) {
        self.leadership.stop();
        if let Some((task, cancel)) = self.sender.take() {
            cancel.cancel();
            let _ = task.await;
        }
        if let Some((elector, task, cancel)) = self.elector.take() {
            cancel.cancel();
            let _ = task.await;
            elector.release().await;
        }
        self.server_stop.cancel();
        let _ = (&mut self.server).await;
        for t in &self.aux {
            t.abort();
        }
    }

    /// A crash: every task stops where it is; the Lease is not released.
    pub fn kill(self) {
        self.server.abort();
        if let Some((_, t, _)) = &self.elector {
            t.abort();
        }
        if let Some((t, _)) = &self.sender {
            t.abort();
        }
        for t in &self.aux {
            t.abort();
        }
    }
}

/// Start serving one account: webhook server, and unless ingress-only, the elector and sender.
pub async fn start(
    pool: PgPool,
    kube: Option<kube::Client>,
    settings: GatewaySettings,
    metrics: Metrics,
    extra_routes: axum::Router,
) -> anyhow::Result<RunningGateway> {
    let a = &settings.account;
    queue::fence::upsert_account_row(
        &pool,
        &queue::fence::AccountRow {
            id: &a.id,
            phone_number_id: &a.phone_number_id,
            pool: &a.routing.pool,
            handoff_message: &a.routing.handoff_message,
            allowed_contacts: &a.routing.allowed(),
            outbound_max_attempts: a.retry.max_attempts(),
            waba_id: a.waba_id.as_deref(),
        },
    )
    .await?;
    let route = routes::Route {
        phone_number_id: a.phone_number_id.clone(),
        app_secret: a.app_secret.expose_secret().into(),
        verify_token: a.verify_token.expose_secret().into(),
        target: Arc::new(a.routing.ingest_target(&a.id)),
        waba_id: a.waba_id.as_deref().map(Arc::from),
    };
    let state = WebhookState {
        pool: pool.clone(),
        routes: routes::Routes::new(routes::RouteTable::new([route])),
        namespace: a.id.split('/').next().unwrap_or_default().into(),
        metrics: metrics.clone(),
        publisher: queue::notifier::Publisher::start(pool.clone()),
        statuses: status_writer::StatusWriter::start(pool.clone()),
    };
    // Deliveries that arrived for this number before it was served.
    if let Err(error) = webhook::replay_unrouted(&state, &a.phone_number_id).await {
        tracing::warn!(error = %queue::rescuer::error_chain(&error), "could not replay kept webhooks; they stay kept");
    }
    let router = webhook::router(state).merge(extra_routes);
    let crate::http::Server {
        addr,
        task: server,
        stop: server_stop,
    } = crate::http::serve(&settings.listen, router, "webhook").await?;
    let leadership = Arc::new(Leadership::new(settings.lease.renew_deadline));
    let mut running = RunningGateway {
        addr,
        leadership: leadership.clone(),
        metrics: metrics.clone(),
        server,
        server_stop,
        elector: None,
        sender: None,
        aux: Vec::new(),
    };
    if settings.ingress_only {
        return Ok(running);
    }
    let Some(kube) = kube else {
        anyhow::bail!("a sending gateway needs a Kubernetes client for its Lease");
    };
    let elector = Arc::new(Elector::new(
        kube,
        settings.lease.clone(),
        Fence::Postgres {
            pool: pool.clone(),
            account: a.id.clone(),
        },
        leadership.clone(),
        metrics.lease_gauges(),
    ));
    let elector_cancel = CancellationToken::new();
    let e = elector.clone();
    let c = elector_cancel.clone();
    let elector_task = tokio::spawn(async move { e.run(c).await });
    running.elector = Some((elector, elector_task, elector_cancel));

    let notifier = Notifier::start(pool.clone());
    let api = cloud_api::CloudApi::new(
        &a.api_base_url,
        &a.phone_number_id,
        &a.access_token,
        Duration::from_secs(20),
    )?;
    if let Some(waba_id) = &a.waba_id {
        let sync = templates::TemplateSync::new(
            pool.clone(),
            cloud_api::CloudApi::http_client(Duration::from_secs(20))?,
            &a.api_base_url,
            waba_id,
            &a.access_token,
        );
        // Aborted with the other auxiliary tasks when the gateway stops.
        let (l, w, c) = (
            leadership.clone(),
            notifier.templates(waba_id),
            CancellationToken::new(),
        );
        running
            .aux
            .push(tokio::spawn(async move { sync.run(l, w, c).await }));
    }
    let media = media::MediaFetcher::new(
        pool.clone(),
        &a.id,
        &a.routing.pool,
        a.media.limits(),
        media::CloudMedia::new(
            cloud_api::CloudApi::http_client(Duration::from_secs(60))?,
            &a.api_base_url,
            &a.access_token,
        ),
        metrics.clone(),
    );
    let (l, wake) = (leadership.clone(), notifier.media(&a.id));
    running.aux.push(tokio::spawn(async move {
        media.run(l, wake, CancellationToken::new()).await
    }));
    let sender = Sender::new(
        pool.clone(),
        a.sender_config(&settings.lease.identity),
        outbound_media::CloudDelivery::new(api, pool.clone()),
        leadership,
        notifier.outbound(&a.id),
        metrics,
    );
    let sender_cancel = CancellationToken::new();
    let sc = sender_cancel.clone();
    let sender_task = tokio::spawn(async move {
        // The notifier lives as long as the sender.
        let _notifier = notifier;
        sender.run(sc).await;
    });
    running.sender = Some((sender_task, sender_cancel));
    Ok(running)
}
