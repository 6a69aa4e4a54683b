//! `/metrics` of the operator as a real process (`whatsapp-operator`, leader election on) on the
//! fake API server and real Postgres: after it has reconciled a pool and two accounts, one of
//! which it may not write (RBAC answers 403), every metric docs/runbook.md says the operator
//! sets is served and has moved, with the documented labels.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fakes::kube_api::FakeKubeApi;
use fakes::scrape::{Documented, documented, parse, total};
use queue::testing::{TestDb, deadline, test_deadline};
use serde_json::json;

const NS: &str = "shop";
const API: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/shop";

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn put_account(api: &FakeKubeApi, name: &str, phone_number_id: &str) {
    api.put(
        &format!("{API}/whatsappaccounts/{name}"),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "uid": format!("uid-{name}"), "generation": 1 },
            "spec": {
                "phoneNumber": format!("+1555{phone_number_id}"),
                "provider": { "cloudApi": {
                    "phoneNumberId": phone_number_id,
                    "credentialsSecretRef": { "name": "creds" }
                }},
                "agentPoolRef": { "name": "support" }
            }
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_serves_and_moves_every_metric_the_runbook_gives_it() {
    let _deadline = deadline(test_deadline());
    let db = TestDb::new().await.expect("test db");
    let api = FakeKubeApi::start().await.expect("fake kube api");
    api.put(
        &format!("/api/v1/namespaces/{NS}/secrets/creds"),
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "namespace": NS },
                "data": { "accessToken": "dmFsdWU=", "appSecret": "dmFsdWU=", "verifyToken": "dmFsdWU=" } }),
    );
    api.put(
        &format!("{API}/agentpools/support"),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
            "metadata": { "namespace": NS, "uid": "uid-pool", "generation": 1 },
            "spec": { "model": { "provider": "rules" } }
        }),
    );
    put_account(&api, "line", "1001");
    put_account(&api, "locked", "1002");
    // The operator may not write this account's status: its reconciles fail.
    api.forbid("whatsappaccounts/locked/status");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(format!("op-scrape-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = api.write_kubeconfig(&dir, NS).expect("kubeconfig");
    let log = std::fs::File::create(dir.join("operator.log")).expect("log");
    let _operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_whatsapp-operator"))
            .env("DATABASE_URL", &db.url)
            .env("KUBECONFIG", &kubeconfig)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("POD_NAME", "operator-0")
            .env("POD_NAMESPACE", NS)
            .env("POOL_RESYNC_SECONDS", "1")
            .env("ACCOUNT_RESYNC_SECONDS", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start whatsapp-operator"),
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = documented(&root, "whatsapp_operator_");
    assert!(docs.len() >= 6, "the operator's rows were not found");
    let http = reqwest::Client::new();
    // The accounts gauge is counted every 15 s: look again at every tick until all show.
    let mut failures = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let settled = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tick.tick().await;
            failures = missing(&http, port, &docs).await;
            if failures.is_empty() {
                return;
            }
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "after 60 s (log in {}):\n{}",
        dir.display(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the operator's `/metrics` does not show yet of what the runbook gives it (empty: all).
async fn missing(http: &reqwest::Client, port: u16, docs: &[Documented]) -> Vec<String> {
    let mut failures = Vec::new();
    let text = match http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("# not served: {e}"),
    };
    let (families, samples) = parse(&text);
    for d in docs.iter().filter(|d| d.set_by("operator", &[])) {
        if !families.contains(d.family()) {
            failures.push(format!("{} not served", d.sample));
            continue;
        }
        let series = match d.kind.as_str() {
            "histogram" => format!("{}_count", d.family()),
            _ => d.sample.clone(),
        };
        // Gauges: a sample with the documented labels (the pool's depth may be 0).
        let moved = |v: f64| d.kind == "gauge" || v > 0.0;
        match samples.iter().find(|s| s.name == series && moved(s.value)) {
            None => failures.push(format!("{} has no sample", d.sample)),
            Some(s) if s.labels != d.labels => failures.push(format!(
                "{} has labels {:?}, docs say {:?}",
                d.sample, s.labels, d.labels
            )),
            Some(_) => {}
        }
    }
    if total(&samples, "whatsapp_operator_leader") != 1.0 {
        failures.push("not the leader".into());
    }
    if total(&samples, "whatsapp_operator_accounts") != 2.0 {
        failures.push("accounts by phase do not add up to 2".into());
    }
    failures
}
