//! A role started before its database is alive and not ready while it waits, and becomes ready
//! once Postgres answers, in the same process: no exit, so no CrashLoopBackOff in a cluster
//! where the database comes up after the workers.

use std::process::Command;
use std::time::Duration;

use queue::testing::{Durability, StopMode, deadline, eventually, start_cluster, test_deadline};

async fn status(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let r = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_worker_started_before_postgres_waits_then_serves_without_a_restart() {
    let _deadline = deadline(test_deadline());
    worker::install_crypto_provider();
    let cluster = start_cluster(Durability::Fast).expect("cluster");
    cluster.stop(StopMode::Fast).expect("stop");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(format!("startup-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let log_path = dir.join("core.log");
    // Each attempt waits up to the pool's 10 s acquire timeout before it fails.
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_whatsapp-worker"))
        .arg("core")
        .env("DATABASE_URL", &cluster.url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("POD_NAME", "core-0")
        .env("POD_NAMESPACE", "default")
        .env("WA_POOL", "default/support")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");

    // Alive (the kubelet keeps it) and not ready (the Service sends it nothing), retrying.
    eventually("alive and not ready", Duration::from_secs(20), || async {
        let live = status(&http, &format!("{base}/healthz")).await;
        let ready = status(&http, &format!("{base}/readyz")).await;
        matches!(live, Some((200, _)))
            && ready.is_some_and(|(code, body)| code == 503 && body.contains("Postgres"))
    })
    .await;
    eventually("two failed attempts", Duration::from_secs(60), || async {
        std::fs::read_to_string(&log_path)
            .is_ok_and(|l| l.matches("not reachable yet").count() >= 2)
    })
    .await;
    assert!(child.try_wait().expect("status").is_none(), "it exited");

    cluster.start().expect("start");
    eventually(
        "ready once Postgres answers",
        Duration::from_secs(60),
        || async {
            matches!(
                status(&http, &format!("{base}/readyz")).await,
                Some((200, _))
            )
        },
    )
    .await;
    assert!(
        child.try_wait().expect("status").is_none(),
        "the same process serves"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
