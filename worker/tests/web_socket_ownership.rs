//! One socket per phone: two WhatsApp Web gateways with a real Lease election (fake Kubernetes
//! API) against the WhatsApp Web stand-in (real Noise handshake, pairing and login). At no
//! moment may two sockets be open, through a SIGTERM handover and a holder whose renewals fail;
//! standbys hold none; every new holder logs in with the session in Postgres, never re-pairing.
//! The stand-in counts open WebSockets and logged-in sessions per device, and the real server's
//! answer to a second login (kicking the first) would show up in both.

mod common;

use std::time::{Duration, Instant};

use common::{Env, WEB_ACCOUNT, WEB_LEASE, eventually, wait_web_session, web_gateway};
use fakes::whatsapp_web::WebServer;

fn holder(env: &Env) -> Option<String> {
    env.kube
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/{WEB_LEASE}"
        ))
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

/// Wait until the session is connected under `who` (any holder when None); returns the holder.
async fn connected_under(env: &Env, what: &str, who: Option<&str>) -> String {
    let row = wait_web_session(env, what, Duration::from_secs(20), |s| {
        s.state == "connected" && who.is_none_or(|w| s.holder.as_deref() == Some(w))
    })
    .await;
    row.holder.expect("holder")
}

#[tokio::test]
async fn only_the_lease_holder_ever_has_a_socket_open() {
    let env = Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await.expect("stand-in");
    let url = server.url().to_string();
    let mut gws = vec![
        ("web-0".to_string(), web_gateway(&env, "web-0", &url).await),
        ("web-1".to_string(), web_gateway(&env, "web-1", &url).await),
    ];
    // Link the number once, through whichever gateway won the Lease.
    let row = wait_web_session(&env, "a QR code", Duration::from_secs(20), |s| {
        s.qr_code.is_some()
    })
    .await;
    server.link(&row.qr_code.expect("qr")).expect("linked");
    let first = connected_under(&env, "connected after pairing", None).await;
    assert_eq!(holder(&env).as_deref(), Some(first.as_str()));
    assert_eq!(server.open_sockets(), 1);
    // Standbys open nothing while the holder renews.
    let standby = gws.iter().find(|(id, _)| *id != first).expect("standby");
    assert!(standby.1.leadership.may_act().is_none());
    let seen = server.total_sockets();

    // SIGTERM the holder: socket closed, Lease released, the standby logs in.
    let idx = gws.iter().position(|(id, _)| *id == first).expect("holder");
    let (_, leaving) = gws.remove(idx);
    let t = Instant::now();
    leaving.shutdown().await;
    assert_eq!(
        server.open_sockets(),
        0,
        "socket closed before the Lease was released"
    );
    let second = gws[0].0.clone();
    connected_under(&env, "the standby logged in", Some(&second)).await;
    eprintln!(
        "WhatsApp Web session handover after SIGTERM: {:?}",
        t.elapsed()
    );
    assert_eq!(holder(&env).as_deref(), Some(second.as_str()));
    assert!(server.total_sockets() > seen);

    // The holder loses the API server: it must close its socket within the renew deadline
    // (2 s), before any standby could legally take the Lease (3 s).
    gws.push(("web-2".into(), web_gateway(&env, "web-2", &url).await));
    env.kube.set_available(false);
    let cut = Instant::now();
    eventually(
        "the self-fenced socket to close",
        Duration::from_secs(8),
        || server.open_sockets() == 0,
    )
    .await;
    let closed_after = cut.elapsed();
    assert!(
        closed_after <= Duration::from_millis(2800),
        "kept the socket {closed_after:?} without renewing"
    );
    env.kube.set_available(true);
    connected_under(&env, "logged in again after the outage", None).await;

    assert_eq!(
        server.peak_sockets(),
        1,
        "two sockets were open for one phone at the same time"
    );
    assert_eq!(
        server.peak_per_device(),
        1,
        "two logged-in sessions at once"
    );
    assert_eq!(server.pair_requests(), 1, "every holder reused the session");
    let session_holder: Option<String> =
        sqlx::query_scalar("SELECT holder FROM wa_web_sessions WHERE account_id = $1")
            .bind(WEB_ACCOUNT)
            .fetch_one(&env.db.pool)
            .await
            .expect("session row");
    assert_eq!(session_holder, holder(&env));
    for (_, g) in gws {
        g.shutdown().await;
    }
    assert_eq!(server.open_sockets(), 0);
}
