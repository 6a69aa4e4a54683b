//! WhatsApp Web login against a stand-in server speaking the real Noise handshake: the first
//! gateway pairs (XX, QR code read from the `/pairing` page's source row, scanned by the
//! stand-in's "phone") and persists the session in Postgres; a second gateway on the same
//! Postgres logs in with IK and without pairing. A session WhatsApp replaced by another login
//! stays down without fighting back; the phone removing the device ends in `logged_out`; neither
//! reconnects while the Lease is held.

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

/// The gateway's `/pairing` page, fetched as a port-forwarded browser would (from loopback).
async fn pairing_page(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/pairing"))
        .await
        .expect("pairing page")
        .text()
        .await
        .expect("page body")
}

/// Wait until the Lease holder has renewed `n` times.
async fn wait_renewals(env: &Env, n: usize) {
    for _ in 0..n {
        let seen = renew_time(env);
        common::eventually("a Lease renewal", Duration::from_secs(10), || {
            renew_time(env) != seen
        })
        .await;
    }
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
    let page = pairing_page(first.addr).await;
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
    // The pairing request described the device (the library's defaults), though the device
    // was created, stored in Postgres and loaded back before it was sent.
    let props = server.pairing_props();
    assert_eq!(props.len(), 1);
    assert!(
        props[0].os.as_deref().is_some_and(|os| !os.is_empty())
            && props[0].has_version
            && props[0].platform_type.is_some()
            && props[0].has_history_sync_config,
        "the pairing request went out without DeviceProps: {props:?}"
    );
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

    // Another program logs in as this device: WhatsApp keeps it and ends ours. The gateway says
    // so and does not fight back while its Lease is renewed; a restart brings it back.
    server.replace(&jid);
    wait_web_session(
        &env,
        "disconnected as replaced",
        Duration::from_secs(20),
        |s| {
            s.state == "disconnected"
                && s.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("StreamReplaced"))
        },
    )
    .await;
    let sockets = server.total_sockets();
    wait_renewals(&env, 2).await;
    assert_eq!(
        server.total_sockets(),
        sockets,
        "no reconnect after StreamReplaced"
    );
    second.shutdown().await;
    let third = web_gateway(&env, "web-2", server.url()).await;
    wait_web_session(
        &env,
        "connected after the restart",
        Duration::from_secs(30),
        |s| s.state == "connected" && s.holder.as_deref() == Some("web-2"),
    )
    .await;
    assert_eq!(server.pair_requests(), 1);

    // The phone removes the linked device: logged_out, the identity forgotten, and no new
    // connection attempts while the Lease keeps being renewed. First, the state a device
    // accumulates talking to contacts (sessions, pre-keys, sender keys, LID mappings, tokens,
    // sent messages): none of it may be reused by the next pairing, maybe with another phone.
    for seed in [
        "INSERT INTO wa_web_records (account_id, kind, key, value) VALUES ($1, 'session', 'c1', '\\x01')",
        "INSERT INTO wa_web_prekeys (account_id, id, record) VALUES ($1, 999999, '\\x01')",
        "INSERT INTO wa_web_mutation_macs VALUES ($1, 'regular', '\\x01', 1, '\\x01')",
        "INSERT INTO wa_web_lid_mappings VALUES ($1, '1@lid', '5511', 1, 1, 'usync')",
        "INSERT INTO wa_web_sender_key_devices VALUES ($1, 'g@g.us', 'c1@s.whatsapp.net', true)",
        "INSERT INTO wa_web_tc_tokens (account_id, jid, token, token_timestamp) VALUES ($1, 'c1', '\\x01', 1)",
        "INSERT INTO wa_web_sent_messages VALUES ($1, 'c1', 'm1', '\\x01', 1)",
        "INSERT INTO wa_web_pending_inbound VALUES ($1, 'c1', 'c1', 'm2', '\\x01', 1)",
        "INSERT INTO wa_web_msg_secrets VALUES ($1, 'c1', 'c1', 'm1', '\\x01', 1, 1)",
    ] {
        sqlx::query(seed)
            .bind(common::WEB_ACCOUNT)
            .execute(&env.db.pool)
            .await
            .expect("a device's accumulated state");
    }
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
    let left: Vec<i64> = sqlx::query_scalar(
        "SELECT n FROM (VALUES
            ((SELECT count(*) FROM wa_web_records)), ((SELECT count(*) FROM wa_web_prekeys)),
            ((SELECT count(*) FROM wa_web_mutation_macs)), ((SELECT count(*) FROM wa_web_lid_mappings)),
            ((SELECT count(*) FROM wa_web_sender_key_devices)), ((SELECT count(*) FROM wa_web_tc_tokens)),
            ((SELECT count(*) FROM wa_web_sent_messages)), ((SELECT count(*) FROM wa_web_pending_inbound)),
            ((SELECT count(*) FROM wa_web_msg_secrets))) AS t(n)",
    )
    .fetch_all(&env.db.pool)
    .await
    .expect("counts");
    assert_eq!(
        left,
        vec![0; 9],
        "the removed device's state (records, pre-keys, MACs, LIDs, sender keys, tokens, sent, pending, secrets) is kept"
    );
    let session: i64 = sqlx::query_scalar("SELECT count(*) FROM wa_web_sessions")
        .fetch_one(&env.db.pool)
        .await
        .expect("count");
    assert_eq!(session, 1, "the session row stays for the operator");
    let sockets = server.total_sockets();
    wait_renewals(&env, 2).await;
    assert_eq!(server.total_sockets(), sockets, "no reconnect after logout");
    assert_eq!(server.open_sockets(), 0);
    third.shutdown().await;
}

#[tokio::test]
async fn a_pair_code_is_asked_for_the_spec_number_and_shown() {
    let env = Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await.expect("stand-in");
    let gateway = common::web_gateway_for(
        &env,
        common::WEB_ACCOUNT,
        common::WEB_PHONE,
        WEB_LEASE,
        "web-0",
        server.url(),
        worker::web::owner::Pairing::PairCode,
    )
    .await;
    let row = wait_web_session(&env, "a pair code", Duration::from_secs(20), |s| {
        s.state == "pairing" && s.pair_code.is_some()
    })
    .await;
    let code = row.pair_code.expect("code");
    assert_eq!(row.pairing_method.as_deref(), Some("PairCode"));
    assert_eq!(code.len(), 8, "{code}");
    assert!(code.chars().all(|c| c.is_ascii_alphanumeric()), "{code}");
    assert_eq!(
        server.pair_code_requests(),
        vec!["5511987650001@s.whatsapp.net".to_string()],
        "asked for spec.phoneNumber, without the +"
    );
    let page = pairing_page(gateway.addr).await;
    assert!(page.contains(&code), "the page shows the code: {page}");
    gateway.shutdown().await;
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// An unpinned gateway for the stand-in, reading the current version from `version_check_url`.
async fn unpinned(
    env: &Env,
    server: &WebServer,
    version_check_url: &str,
) -> worker::web::gateway::RunningWebGateway {
    common::web_gateway_versioned(
        env,
        common::WEB_ACCOUNT,
        common::WEB_PHONE,
        WEB_LEASE,
        "web-0",
        server.url(),
        worker::web::owner::Pairing::QrCode,
        None,
        version_check_url,
    )
    .await
}

#[tokio::test]
async fn a_number_whose_version_check_fails_still_connects_with_the_last_known_version() {
    // Pods without egress to web.whatsapp.com: the version check is refused. The library would
    // fail the whole connect; the gateway connects with the last known version instead.
    let env = Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await.expect("stand-in");
    let gateway = unpinned(
        &env,
        &server,
        &format!("http://127.0.0.1:{}/sw.js", closed_port()),
    )
    .await;
    wait_web_session(&env, "a QR code", Duration::from_secs(30), |s| {
        s.state == "pairing" && s.qr_code.is_some()
    })
    .await;
    let built_in = whatsapp_rust::wacore::store::Device::new();
    let announced = server.handshakes().first().and_then(|h| h.version);
    assert_eq!(
        announced,
        Some((
            built_in.app_version_primary,
            built_in.app_version_secondary,
            built_in.app_version_tertiary
        )),
        "a new device falls back to the library's built-in version"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_number_announces_the_version_the_check_returns() {
    let env = Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await.expect("stand-in");
    let sw = fakes::Server::start(axum::Router::new().route(
        "/sw.js",
        axum::routing::get(|| async { r#"self.x={"client_revision":1029384756,"other":1};"# }),
    ))
    .await
    .expect("version server");
    let gateway = unpinned(&env, &server, &format!("{}/sw.js", sw.url())).await;
    wait_web_session(&env, "a QR code", Duration::from_secs(30), |s| {
        s.state == "pairing"
    })
    .await;
    assert_eq!(
        server.handshakes().first().and_then(|h| h.version),
        Some((2, 3000, 1_029_384_756))
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_socket_that_cannot_open_is_reported_for_the_status() {
    // The WhatsApp Web server cannot be reached (no egress, DNS): the session row says why,
    // which the operator turns into Connected=False(ConnectFailed) and an Event, instead of
    // "waiting for the gateway to show a code".
    let env = Env::new().await;
    let gateway = web_gateway(
        &env,
        "web-0",
        &format!("ws://127.0.0.1:{}/ws/chat", closed_port()),
    )
    .await;
    let row = wait_web_session(&env, "the connect error", Duration::from_secs(30), |s| {
        s.connect_error.is_some()
    })
    .await;
    let error = row.connect_error.unwrap_or_default();
    assert!(error.contains("socket did not open"), "{error}");
    assert_ne!(row.state, "pairing");
    gateway.shutdown().await;
}
