//! WhatsApp Web login against a stand-in server speaking the real Noise handshake: the first
//! gateway pairs (XX, QR code read from the `/pairing` page's source row, scanned by the
//! stand-in's "phone") and persists the session in Postgres; a second gateway on the same
//! Postgres logs in with IK and without pairing. The phone removing the device ends in
//! `logged_out` without a reconnect storm.

mod common;

use std::time::Duration;

use common::{Env, WEB_LEASE, wait_web_session, web_gateway};
use fakes::whatsapp_web::{LoginKind, Pattern, WebServer};

fn renew_time(env: &Env) -> Option<String> {
    env.kube
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/{WEB_LEASE}"
        ))
        .and_then(|l| l["spec"]["renewTime"].as_str().map(str::to_string))
}

#[tokio::test]
async fn pairs_once_then_reconnects_without_pairing() {
    let env = Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await.expect("stand-in");

    // First gateway: an empty store, so the client registers and shows a QR code.
    let first = web_gateway(&env, "web-0", server.url()).await;
    let row = wait_web_session(&env, "a QR code to scan", Duration::from_secs(20), |s| {
        s.state == "pairing" && s.qr_code.is_some()
    })
    .await;
    let page = reqwest::get(format!("http://{}/pairing", first.addr))
        .await
        .expect("pairing page")
        .text()
        .await
        .expect("page body");
    assert!(
        page.contains("<svg"),
        "the page renders the QR code: {page}"
    );
    let qr = row.qr_code.expect("qr");
    assert_eq!(
        qr.split(',').count(),
        5,
        "ref,noise,identity,adv,type: {qr}"
    );

    // The phone scans it; the device signs, the server ends the stream (515), the client logs in.
    let jid = server.link(&qr).expect("phone links the device");
    let row = wait_web_session(
        &env,
        "connected after pairing",
        Duration::from_secs(40),
        |s| s.state == "connected",
    )
    .await;
    assert_eq!(row.device_jid.as_deref(), Some(jid.as_str()));
    assert_eq!(row.holder.as_deref(), Some("web-0"));
    assert!(row.qr_code.is_none(), "the code is gone once linked");
    assert_eq!(server.pair_requests(), 1);
    let shakes = server.handshakes();
    assert_eq!(shakes[0].kind, LoginKind::Registration);
    assert_eq!(
        shakes.last().map(|h| &h.kind),
        Some(&LoginKind::Login(jid.clone()))
    );
    assert_eq!(server.online(), 1);

    // SIGTERM: the socket closes and the Lease is released; nothing but Postgres is carried over.
    first.shutdown().await;
    assert_eq!(server.open_sockets(), 0, "socket closed on shutdown");
    let before = server.handshakes().len();

    let second = web_gateway(&env, "web-1", server.url()).await;
    let row = wait_web_session(
        &env,
        "the second gateway connected",
        Duration::from_secs(30),
        |s| s.state == "connected" && s.holder.as_deref() == Some("web-1"),
    )
    .await;
    assert_eq!(row.device_jid.as_deref(), Some(jid.as_str()));
    assert_eq!(server.pair_requests(), 1, "logged in again without pairing");
    let shakes = server.handshakes();
    let relogin = &shakes[before..];
    assert!(!relogin.is_empty());
    assert!(
        relogin
            .iter()
            .all(|h| h.kind == LoginKind::Login(jid.clone())),
        "{relogin:?}"
    );
    assert_eq!(
        relogin[0].pattern,
        Pattern::Ik,
        "the cached server certificate (in Postgres) lets the new process use IK"
    );
    assert_eq!(
        server.peak_per_device(),
        1,
        "never two sessions for the device"
    );

    // The phone removes the linked device: logged_out, the device forgotten, and no new
    // connection attempts while the Lease keeps being renewed.
    server.unlink(&jid);
    let row = wait_web_session(&env, "logged out", Duration::from_secs(20), |s| {
        s.state == "logged_out"
    })
    .await;
    assert!(row.detail.unwrap_or_default().contains("removed"));
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM wa_web_devices")
        .fetch_one(&env.db.pool)
        .await
        .expect("count");
    assert_eq!(devices, 0, "the void identity is dropped");
    let sockets = server.total_sockets();
    for _ in 0..2 {
        let seen = renew_time(&env);
        common::eventually("a Lease renewal", Duration::from_secs(10), || {
            renew_time(&env) != seen
        })
        .await;
    }
    assert_eq!(server.total_sockets(), sockets, "no reconnect after logout");
    assert_eq!(server.open_sockets(), 0);
    second.shutdown().await;
}
