//! End-to-end against a real cluster. Runs only with WA_E2E=1 (docs/e2e.md); otherwise it says
//! why it skipped and passes. With WA_E2E=1, an unusable kubeconfig or API server fails it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::{AgentPool, WhatsAppAccount};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{CustomResourceExt, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const NS: &str = "wa-e2e";

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn exists<K>(client: &kube::Client, name: &str) -> bool
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    // Only a 404 means absent: a permission or connection error must fail the test, not pass
    // a garbage-collection check.
    match Api::<K>::namespaced(client.clone(), NS).get_opt(name).await {
        Ok(found) => found.is_some(),
        Err(error) => panic!("reading {name}: {error}"),
    }
}

fn example_docs(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example");
    serde_saphyr::from_multiple(&text).expect("yaml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_reconciles_examples_and_the_lease_holder_matches_status_on_a_real_cluster() {
    if std::env::var("WA_E2E").ok().as_deref() != Some("1") {
        eprintln!("e2e skipped: set WA_E2E=1 and point KUBECONFIG at a cluster (see docs/e2e.md)");
        return;
    }
    worker::install_crypto_provider();
    // Asked for and not possible is a failure, not a skip.
    let client = kube::Client::try_default()
        .await
        .expect("WA_E2E=1 but no usable kubeconfig");
    client
        .apiserver_version()
        .await
        .expect("WA_E2E=1 but the API server does not answer");
    let ssa = PatchParams::apply("wa-e2e").force();

    // 1. CRDs and namespace.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [WhatsAppAccount::crd(), AgentPool::crd()] {
        let name = crd.metadata.name.clone().expect("crd name");
        crds.patch(&name, &ssa, &Patch::Apply(&crd))
            .await
            .expect("apply CRD");
        let crds = crds.clone();
        wait_for("CRD established", Duration::from_secs(60), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                crds.get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            }
        })
        .await;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            NS,
            &ssa,
            &Patch::Apply(
                &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NS } }),
            ),
        )
        .await
        .expect("namespace");

    // 2. The operator's controllers, in this process.
    let db = queue::testing::TestDb::new().await.expect("postgres");
    let (metrics, _) = operator::metrics::Metrics::new();
    let settings = operator::context::Settings {
        worker_image: std::env::var("WORKER_IMAGE")
            .unwrap_or_else(|_| "ghcr.io/kube-agents/whatsapp-operator:latest".into()),
        database_url: db.url.as_str().into(),
        pool_resync_seconds: 3,
        account_resync_seconds: 2,
    };
    let ctx = Arc::new(operator::context::Context::new(
        client.clone(),
        Some(db.pool.clone()),
        settings,
        metrics,
        "e2e-operator",
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let accounts_task = tokio::spawn(operator::account::run(ctx.clone(), stop()));
    let pools_task = tokio::spawn(operator::pool::run(ctx, stop()));

    // 3. The examples.
    for file in ["agentpool.yaml", "whatsappaccount.yaml"] {
        for doc in example_docs(file) {
            let name = doc["metadata"]["name"].as_str().expect("name").to_string();
            match doc["kind"].as_str() {
                Some("Secret") => drop(
                    Api::<Secret>::namespaced(client.clone(), NS)
                        .patch(&name, &ssa, &Patch::Apply(&doc))
                        .await
                        .expect("secret"),
                ),
                Some("AgentPool") => drop(
                    Api::<AgentPool>::namespaced(client.clone(), NS)
                        .patch(&name, &ssa, &Patch::Apply(&doc))
                        .await
                        .expect("pool"),
                ),
                Some("WhatsAppAccount") => drop(
                    Api::<WhatsAppAccount>::namespaced(client.clone(), NS)
                        .patch(&name, &ssa, &Patch::Apply(&doc))
                        .await
                        .expect("account"),
                ),
                other => panic!("unexpected kind {other:?}"),
            }
        }
    }

    // 4. Everything the operator creates.
    let c = client.clone();
    wait_for(
        "the gateway fleet, core and webhook objects",
        Duration::from_secs(90),
        || {
            let c = c.clone();
            async move {
                exists::<Deployment>(&c, "ap-support-gateway").await
                    && exists::<Deployment>(&c, "ap-support-core").await
                    && exists::<Service>(&c, "ap-support-inbox").await
                    && exists::<Service>(&c, "ap-support-gateway").await
                    && exists::<Service>(&c, "whatsapp-webhooks").await
                    && exists::<Deployment>(&c, "whatsapp-ingress").await
                    && exists::<ServiceAccount>(&c, "ap-support-gateway").await
                    && exists::<Role>(&c, "ap-support-gateway").await
                    && exists::<RoleBinding>(&c, "ap-support-gateway").await
                    && exists::<Lease>(&c, "whatsapp-support-line").await
                    && !exists::<Deployment>(&c, "wa-support-line-gateway").await
            }
        },
    )
    .await;

    // 5. Two fleet pods outside the cluster (the in-cluster ones run the image) learn the
    // account from the API server and contend for its Lease.
    let mut gateways: Vec<worker::fleet::RunningFleet> = Vec::new();
    for id in ["e2e-gw-a", "e2e-gw-b"] {
        let (m, _) = worker::metrics::Metrics::new();
        let mut settings = worker::fleet::FleetSettings::new("support", NS, id, "127.0.0.1:0");
        settings.drain = Duration::ZERO;
        gateways.push(
            worker::fleet::start(
                db.pool.clone(),
                client.clone(),
                settings,
                m,
                Default::default(),
                axum::Router::new(),
            )
            .await
            .expect("fleet pod"),
        );
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let accounts: Api<WhatsAppAccount> = Api::namespaced(client.clone(), NS);
    let (l, a) = (leases.clone(), accounts.clone());
    wait_for(
        "kubectl get leases and the account status to name the same holder",
        Duration::from_secs(90),
        || {
            let (l, a) = (l.clone(), a.clone());
            async move {
                let holder = l
                    .get("whatsapp-support-line")
                    .await
                    .ok()
                    .and_then(|x| x.spec)
                    .and_then(|s| s.holder_identity);
                let owner = a
                    .get("support-line")
                    .await
                    .ok()
                    .and_then(|x| x.status)
                    .and_then(|s| s.owner);
                holder.is_some() && holder == owner
            }
        },
    )
    .await;
    let mut holders: Vec<bool> = Vec::new();
    for g in &gateways {
        holders.push(g.held().await.contains(&format!("{NS}/support-line")));
    }
    assert_eq!(
        holders.iter().filter(|h| **h).count(),
        1,
        "exactly one gateway may send"
    );

    // The holder shuts down (SIGTERM): it releases, the other takes over, status follows.
    let idx = holders.iter().position(|h| *h).expect("a holder");
    let leaving = gateways.remove(idx);
    let before = l
        .get("whatsapp-support-line")
        .await
        .ok()
        .and_then(|x| x.spec)
        .and_then(|s| s.holder_identity);
    leaving.shutdown().await;
    let (l2, a2, before2) = (leases.clone(), accounts.clone(), before.clone());
    wait_for(
        "the standby to take over and the status to follow",
        Duration::from_secs(30),
        || {
            let (l, a, before) = (l2.clone(), a2.clone(), before2.clone());
            async move {
                let holder = l
                    .get("whatsapp-support-line")
                    .await
                    .ok()
                    .and_then(|x| x.spec)
                    .and_then(|s| s.holder_identity);
                let owner = a
                    .get("support-line")
                    .await
                    .ok()
                    .and_then(|x| x.status)
                    .and_then(|s| s.owner);
                holder.is_some() && holder != before && holder == owner
            }
        },
    )
    .await;

    // 6. Delete the account: its objects go with it.
    for g in gateways {
        g.shutdown().await;
    }
    accounts
        .delete("support-line", &DeleteParams::foreground())
        .await
        .expect("delete account");
    let c = client.clone();
    wait_for(
        "the account's objects to be garbage collected",
        Duration::from_secs(120),
        || {
            let c = c.clone();
            async move { !exists::<Lease>(&c, "whatsapp-support-line").await }
        },
    )
    .await;

    let _ = stop_tx.send(true);
    accounts_task.await.expect("account controller panicked");
    pools_task.await.expect("pool controller panicked");
    let _ = namespaces.delete(NS, &DeleteParams::default()).await;
}
