//! The `web-gateway` role: one WhatsApp Web account. Every replica serves probes, metrics and
//! the `/pairing` page (read from Postgres, so any replica shows the current code); only the
//! Lease holder runs the [`SessionOwner`] and holds the socket.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use lease::{Elector, Fence, Leadership, LeaseSettings};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::inbound::WebInbound;
use super::owner::{SessionOwner, WebSettings};
use crate::config::RoutingArgs;
use crate::metrics::Metrics;

/// Everything a web gateway needs to start.
pub struct WebGatewaySettings {
    pub web: WebSettings,
    pub routing: RoutingArgs,
    pub lease: LeaseSettings,
    pub listen: String,
}

/// A running web gateway.
pub struct RunningWebGateway {
    pub addr: SocketAddr,
    pub leadership: Arc<Leadership>,
    server: JoinHandle<()>,
    server_stop: CancellationToken,
    elector: (Arc<Elector>, JoinHandle<()>, CancellationToken),
    owner: (JoinHandle<()>, CancellationToken),
}

impl RunningWebGateway {
    /// SIGTERM: close the socket (flushing the session store), then release the Lease, then
    /// stop serving.
    pub async fn shutdown(self) {
        let (owner, owner_cancel) = self.owner;
        owner_cancel.cancel();
        let _ = owner.await;
        let (elector, task, cancel) = self.elector;
        cancel.cancel();
        let _ = task.await;
        elector.release().await;
        self.server_stop.cancel();
        let _ = self.server.await;
    }

    /// A crash: every task stops where it is (sockets die with their tasks); the Lease is not
    /// released.
    pub fn kill(self) {
        self.owner.0.abort();
        self.elector.1.abort();
        self.server.abort();
    }
}

#[derive(Clone)]
struct PageState {
    db: PgPool,
    account: String,
}

/// Start serving one WhatsApp Web account.
pub async fn start(
    db: PgPool,
    kube: kube::Client,
    settings: WebGatewaySettings,
    metrics: Metrics,
    registry: Arc<prometheus_client::registry::Registry>,
) -> anyhow::Result<RunningWebGateway> {
    let account = settings.web.account.clone();
    // WhatsApp Web has no phone number id; the number itself keys the account row.
    queue::fence::upsert_account_row(
        &db,
        &queue::fence::AccountRow {
            id: &account,
            phone_number_id: &format!("web:{}", settings.web.phone_number),
            pool: &settings.routing.pool,
            handoff_message: &settings.routing.handoff_message,
            allowed_contacts: &settings.routing.allowed(),
            outbound_max_attempts: settings.web.max_attempts,
            waba_id: None,
        },
    )
    .await?;
    let router = crate::http::router(crate::http::Probes {
        pool: db.clone(),
        registry,
        draining: Default::default(),
    })
    .merge(
        Router::new()
            .route("/pairing", get(pairing_page))
            .with_state(PageState {
                db: db.clone(),
                account: account.clone(),
            }),
    );
    let crate::http::Server {
        addr,
        task: server,
        stop: server_stop,
    } = crate::http::serve(&settings.listen, router, "web gateway").await?;
    let leadership = Arc::new(Leadership::new(settings.lease.renew_deadline));
    let elector = Arc::new(Elector::new(
        kube,
        settings.lease.clone(),
        Fence::Postgres {
            pool: db.clone(),
            account: account.clone(),
        },
        leadership.clone(),
        metrics.lease_gauges(),
    ));
    let elector_cancel = CancellationToken::new();
    let (e, c) = (elector.clone(), elector_cancel.clone());
    let elector_task = tokio::spawn(async move { e.run(c).await });
    let inbound = WebInbound::new(
        db.clone(),
        settings.routing.ingest_target(&account),
        metrics.clone(),
    )
    .with_read_receipts(settings.web.read_receipts);
    let notifier = queue::notifier::Notifier::start(db.clone());
    let owner = SessionOwner::new(
        db,
        notifier,
        settings.web,
        leadership.clone(),
        inbound,
        metrics,
    );
    let owner_cancel = CancellationToken::new();
    let oc = owner_cancel.clone();
    let owner_task = tokio::spawn(async move { owner.run(oc).await });
    Ok(RunningWebGateway {
        addr,
        leadership,
        server,
        server_stop,
        elector: (elector, elector_task, elector_cancel),
        owner: (owner_task, owner_cancel),
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Whether a request may see the pairing code: only from inside the pod, which is where
/// `kubectl port-forward` connections arrive (so RBAC on `pods/portforward` decides). Anyone
/// who scans the code links this gateway to *their* WhatsApp account, so other pods in the
/// cluster, which can reach the Service, must not see it.
fn may_see_code(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// The current pairing code as a page that refreshes itself; the QR code is an inline SVG.
async fn pairing_page(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(s): State<PageState>,
) -> impl IntoResponse {
    render_pairing_page(peer, &s.db, &s.account).await
}

/// The pairing page of `account` for a request from `peer` (403 unless port-forwarded).
pub async fn render_pairing_page(
    peer: SocketAddr,
    db: &PgPool,
    account: &str,
) -> (axum::http::StatusCode, Html<String>) {
    if !may_see_code(peer) {
        return (
            axum::http::StatusCode::FORBIDDEN,
            Html(
                "<p>The pairing page is served only through <code>kubectl port-forward</code> \
                 (or use <code>kubectl whatsapp pair ACCOUNT</code>).</p>"
                    .to_string(),
            ),
        );
    }
    let row = match queue::web_session::get(db, account).await {
        Ok(row) => row,
        Err(_) => {
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                Html("<p>database unreachable</p>".to_string()),
            );
        }
    };
    let body = match row {
        None => "<p>No gateway has opened the session yet. Waiting for the Lease holder...</p>"
            .to_string(),
        Some(r) if r.state == "pairing" => {
            let mut out = String::from(
                "<p>On the phone: WhatsApp &gt; Settings &gt; Linked devices &gt; Link a device.</p>",
            );
            if let Some(code) = &r.pair_code {
                out.push_str(&format!(
                    "<p>Choose \"Link with phone number instead\" and type:</p><p class=code>{}</p>",
                    escape(code)
                ));
            }
            if let Some(qr) = &r.qr_code {
                match qrcode::QrCode::new(qr.as_bytes()) {
                    Ok(code) => out.push_str(
                        &code
                            .render::<qrcode::render::svg::Color>()
                            .min_dimensions(280, 280)
                            .build(),
                    ),
                    Err(_) => out.push_str(&format!("<pre>{}</pre>", escape(qr))),
                }
            }
            out
        }
        Some(r) if r.state == "connected" => format!(
            "<p>Linked as {} and connected.</p>",
            escape(r.device_jid.as_deref().unwrap_or("this number"))
        ),
        Some(r) => format!(
            "<p>State: {}. {}</p>",
            escape(&r.state),
            escape(r.detail.as_deref().unwrap_or_default())
        ),
    };
    (
        axum::http::StatusCode::OK,
        Html(format!(
            "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
             <title>Link WhatsApp: {}</title><style>body{{font-family:sans-serif;margin:2em}}\
             .code{{font-size:2em;letter-spacing:.2em;font-family:monospace}}</style></head>\
             <body><h1>Link {}</h1>{body}</body></html>",
            escape(account),
            escape(account)
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use tower::ServiceExt;

    async fn status_from(peer: &str) -> axum::http::StatusCode {
        // A pool that never connects: a request that passes the check fails on the database.
        let db = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let app = Router::new()
            .route("/pairing", get(pairing_page))
            .with_state(PageState {
                db,
                account: "default/sales-line".into(),
            })
            .layer(MockConnectInfo(peer.parse::<SocketAddr>().expect("addr")));
        let request = axum::http::Request::get("/pairing")
            .body(Body::empty())
            .expect("request");
        app.oneshot(request).await.expect("response").status()
    }

    #[tokio::test]
    async fn pairing_code_only_for_port_forwarded_requests() {
        let _deadline = queue::testing::deadline(queue::testing::test_deadline());
        for peer in ["10.244.1.7:41000", "192.168.0.2:80", "[fd00::3]:9000"] {
            assert_eq!(
                status_from(peer).await,
                axum::http::StatusCode::FORBIDDEN,
                "{peer}"
            );
        }
        for peer in ["127.0.0.1:50000", "[::1]:50000", "[::ffff:127.0.0.1]:50000"] {
            // Past the check: the (unreachable) database answers.
            assert_eq!(
                status_from(peer).await,
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "{peer}"
            );
        }
    }
}
