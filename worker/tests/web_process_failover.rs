//! The WhatsApp Web gateway as real processes (`whatsapp-worker web-gateway`, as in a pod)
//! against the stand-in: the holder is killed with SIGKILL while connected, the standby process
//! waits out the Lease and logs in from the session in Postgres (IK, no pairing), and the
//! stand-in never sees two sockets or two sessions for the number. Then SIGTERM: the socket
//! closes and the Lease is released.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Env, WEB_LEASE, WEB_PHONE, spawn_web_gateway as spawn, wait_web_session};
use fakes::whatsapp_web::{LoginKind, Pattern, WebServer};

async fn connected_under(env: &Env, what: &str, who: &str) {
    wait_web_session(env, what, Duration::from_secs(30), |s| {
        s.state == "connected" && s.holder.as_deref() == Some(who)
    })
    .await;
}

#[tokio::test]
async fn a_killed_holder_is_replaced_without_pairing_and_never_two_sockets() {
    let env = Env::new().await;
    let server = WebServer::start(WEB_PHONE).await.expect("stand-in");
    let dir = std::env::temp_dir().join(format!("web-failover-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = env
        .kube
        .write_kubeconfig(&dir, "default")
        .expect("kubeconfig");

    let first = spawn(&env, &kubeconfig, server.url(), "web-a", &dir);
    let row = wait_web_session(&env, "a QR code", Duration::from_secs(30), |s| {
        s.qr_code.is_some()
    })
    .await;
    let jid = server.link(&row.qr_code.expect("qr")).expect("linked");
    connected_under(&env, "the first process connected", first.name).await;

    let second = spawn(&env, &kubeconfig, server.url(), "web-b", &dir);
    // The standby is up (migrations checked, elector and HTTP server running), holding no socket.
    common::eventually("the standby to serve", Duration::from_secs(15), || {
        std::fs::read_to_string(dir.join("web-b.log"))
            .is_ok_and(|l| l.contains("web gateway serving"))
    })
    .await;
    assert_eq!(server.open_sockets(), 1);

    // SIGKILL the holder: no goodbye, the socket dies with the process.
    let mut first = first;
    let killed = Instant::now();
    first.child.kill().expect("kill -9");
    first.child.wait().expect("reaped");
    connected_under(&env, "the standby logged in", second.name).await;
    eprintln!(
        "WhatsApp Web session back after SIGKILL of the holder: {:?}",
        killed.elapsed()
    );
    let shakes = server.handshakes();
    let last = shakes.last().expect("a login");
    assert_eq!(last.kind, LoginKind::Login(jid.clone()));
    assert_eq!(last.pattern, Pattern::Ik, "resumed from Postgres");
    assert_eq!(server.pair_requests(), 1, "never paired again");

    // SIGTERM: the socket closes, the session row says so, the Lease is released.
    let status = Command::new("kill")
        .args(["-TERM", &second.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let mut second = second;
    let mut exit = None;
    common::eventually("web-b to exit on SIGTERM", Duration::from_secs(15), || {
        exit = second.child.try_wait().ok().flatten();
        exit.is_some()
    })
    .await;
    let exit = exit.expect("exited");
    assert!(exit.success(), "a clean exit after SIGTERM, not {exit:?}");
    assert_eq!(server.open_sockets(), 0);
    let lease = env
        .kube
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/{WEB_LEASE}"
        ))
        .expect("the Lease is kept, released, not deleted");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_default();
    assert!(holder.is_empty(), "Lease released, holder {holder:?}");

    assert_eq!(server.peak_sockets(), 1, "two sockets for one number");
    assert_eq!(server.peak_per_device(), 1, "two sessions for one device");
    let _ = std::fs::remove_dir_all(&dir);
}
