//! One socket per phone: two WhatsApp Web gateways with a real Lease election (fake Kubernetes
//! API) against the WhatsApp Web stand-in (real Noise handshake, pairing and login). At no
//! moment may two sockets be open, through a SIGTERM handover and a holder whose renewals fail;
//! standbys hold none; every new holder logs in with the session in Postgres, never re-pairing.
//! The stand-in counts open WebSockets and logged-in sessions per device, and the real server's
//! answer to a second login (kicking the first) would show up in both. Every time the Lease
//! changes hands (taken, released, taken over after expiry) the fake API server looks at the
//! stand-in's open sockets at that moment: there must be none.

mod common;

use std::sync::{Arc, Mutex};
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

/// Each change of the Lease's holder, with the sockets open at that moment.
type Handovers = Arc<Mutex<Vec<(Option<String>, Option<String>, usize)>>>;

fn watch_handovers(env: &Env, server: &WebServer) -> Handovers {
    let seen: Handovers = Arc::default();
    let (log, server) = (seen.clone(), server.clone());
    let last: Mutex<Option<String>> = Mutex::new(None);
    env.kube.on_change(move |collection, kind, lease| {
        if !collection.ends_with("/leases") || lease["metadata"]["name"] != WEB_LEASE {
            return;
        }
        let now = lease["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty() && kind != "DELETED")
            .map(str::to_string);
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if *last != now {
            log.lock().unwrap_or_else(|e| e.into_inner()).push((
                last.clone(),
                now.clone(),
                server.open_sockets(),
            ));
            *last = now;
        }
    });
    seen
}

#[tokio::test]
async fn only_the_lease_holder_ever_has_a_socket_open() {
    let env = Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await.expect("stand-in");
    let handovers = watch_handovers(&env, &server);
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
    let logins_before = server.logins();
    env.kube.set_available(true);
    // A new login on a new socket, by whoever holds the Lease now (the session row still says
    // `connected` from before the outage, so it alone proves nothing).
    eventually(
        "a new login after the outage",
        Duration::from_secs(20),
        || server.logins() > logins_before && server.open_sockets() == 1,
    )
    .await;
    let third = holder(&env).expect("a holder after the outage");
    connected_under(&env, "logged in again after the outage", Some(&third)).await;

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
    let handovers = handovers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Taken, released, taken (and taken over after the outage, unless the same pod won it back).
    assert!(handovers.len() >= 3, "{handovers:?}");
    assert!(
        handovers.iter().all(|(_, _, open)| *open == 0),
        "a socket was open when the Lease changed hands (from, to, open sockets): {handovers:?}"
    );
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
