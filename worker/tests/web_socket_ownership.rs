//! One socket per phone: two WhatsApp Web gateways with a real Lease election (fake Kubernetes
//! API) against a stand-in server that counts open connections. At no moment may two be open,
//! through a SIGTERM handover and a holder whose renewals fail; standbys hold none.
//!
//! The stand-in accepts TCP connections and never answers, so the client stays in its opening
//! handshake: what is counted is the socket itself, the thing WhatsApp kicks duplicates for.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Env, eventually};
use tokio::io::AsyncReadExt;
use worker::gateway::sender::Pacing;
use worker::metrics::Metrics;
use worker::web::gateway::{RunningWebGateway, WebGatewaySettings};
use worker::web::owner::{Pairing, WebSettings};

const ACCOUNT: &str = "default/sales-line";

/// Counts open connections and remembers the most ever open at once.
#[derive(Default)]
struct Counter {
    open: AtomicUsize,
    peak: AtomicUsize,
    total: AtomicUsize,
}

async fn stand_in() -> (String, Arc<Counter>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}/ws/chat", listener.local_addr().expect("addr"));
    let counter = Arc::new(Counter::default());
    let c = counter.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
            c.peak.fetch_max(now, Ordering::SeqCst);
            c.total.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (url, counter)
}

async fn web_gateway(env: &Env, identity: &str, url: &str) -> RunningWebGateway {
    let (metrics, registry) = Metrics::new();
    let mut lease = env.lease(identity, 3, 2, 1);
    lease.duty = lease::Duty::Connect;
    lease.name = "whatsapp-sales-line".into();
    worker::web::gateway::start(
        env.db.pool.clone(),
        env.kube_client(),
        WebGatewaySettings {
            web: WebSettings {
                account: ACCOUNT.into(),
                phone_number: "+5511987650001".into(),
                pairing: Pairing::QrCode,
                push_name: None,
                server_url: Some(url.into()),
                identity: identity.into(),
                pacing: Pacing::whatsapp_web(20, 6),
                typing: Duration::ZERO,
            },
            routing: common::routing(),
            lease,
            listen: "127.0.0.1:0".into(),
        },
        metrics,
        Arc::new(registry),
    )
    .await
    .expect("web gateway starts")
}

fn holder(env: &Env) -> Option<String> {
    env.kube
        .get("/apis/coordination.k8s.io/v1/namespaces/default/leases/whatsapp-sales-line")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn only_the_lease_holder_ever_has_a_socket_open() {
    let env = Env::new().await;
    let (url, sockets) = stand_in().await;
    let mut gws = vec![
        ("web-0".to_string(), web_gateway(&env, "web-0", &url).await),
        ("web-1".to_string(), web_gateway(&env, "web-1", &url).await),
    ];
    eventually("the holder's socket", Duration::from_secs(15), || {
        sockets.open.load(Ordering::SeqCst) == 1 && holder(&env).is_some()
    })
    .await;
    let first = holder(&env).expect("a holder");
    // Standbys open nothing: let several election rounds pass, still one socket.
    let seen = sockets.total.load(Ordering::SeqCst);
    let standby = gws.iter().find(|(id, _)| *id != first).expect("standby");
    assert!(standby.1.leadership.may_act().is_none());
    let row: (String, Option<String>) =
        sqlx::query_as("SELECT state, holder FROM wa_web_sessions WHERE account_id = $1")
            .bind(ACCOUNT)
            .fetch_one(&env.db.pool)
            .await
            .expect("session row");
    assert_eq!(row.1.as_deref(), Some(first.as_str()), "state {}", row.0);

    // SIGTERM the holder: socket closed, Lease released, the standby connects.
    let idx = gws.iter().position(|(id, _)| *id == first).expect("holder");
    let (_, leaving) = gws.remove(idx);
    let t = Instant::now();
    leaving.shutdown().await;
    assert_eq!(
        sockets.open.load(Ordering::SeqCst),
        0,
        "socket closed before the Lease was released"
    );
    eventually("the standby's socket", Duration::from_secs(15), || {
        sockets.open.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = holder(&env).expect("new holder");
    assert_ne!(second, first);
    eprintln!("socket handover after SIGTERM: {:?}", t.elapsed());
    assert!(sockets.total.load(Ordering::SeqCst) > seen);

    // The holder loses the API server: it must close its socket within the renew deadline
    // (2 s), before any standby could legally take the Lease (3 s).
    gws.push(("web-2".into(), web_gateway(&env, "web-2", &url).await));
    env.kube.set_available(false);
    let cut = Instant::now();
    eventually(
        "the self-fenced socket to close",
        Duration::from_secs(8),
        || sockets.open.load(Ordering::SeqCst) == 0,
    )
    .await;
    let closed_after = cut.elapsed();
    assert!(
        closed_after <= Duration::from_millis(2800),
        "kept the socket {closed_after:?} without renewing"
    );
    env.kube.set_available(true);
    eventually("a socket again", Duration::from_secs(15), || {
        sockets.open.load(Ordering::SeqCst) == 1
    })
    .await;

    assert_eq!(
        sockets.peak.load(Ordering::SeqCst),
        1,
        "two sockets were open for one phone at the same time"
    );
    for (_, g) in gws {
        g.shutdown().await;
    }
    assert_eq!(sockets.open.load(Ordering::SeqCst), 0);
}
