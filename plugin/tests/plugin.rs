//! `kubectl whatsapp` against the fake API server over HTTP: every subcommand's output, and its
//! error when the resource does not exist, when RBAC forbids, and when the API is unreachable.

use fakes::kube_api::FakeKubeApi;
use kubectl_whatsapp::{Format, Pairing, PluginError, Scope};
use serde_json::{Value, json};

const NS: &str = "shop";
const ACCOUNTS: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/shop/whatsappaccounts";
const POOLS: &str = "/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/shop/agentpools";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";

fn client(url: &str) -> kube::Client {
    service::install_crypto_provider();
    let mut cfg = kube::Config::new(url.parse().expect("url"));
    cfg.default_namespace = NS.into();
    cfg.connect_timeout = Some(std::time::Duration::from_secs(2));
    kubectl_whatsapp::client(cfg).expect("client")
}

fn now_minus(seconds: i64) -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(seconds)).to_string()
}

fn condition(t: &str, status: &str, reason: &str) -> Value {
    json!({ "type": t, "status": status, "reason": reason, "message": format!("{t} is {status}"),
            "lastTransitionTime": now_minus(60) })
}

async fn cluster() -> FakeKubeApi {
    let api = FakeKubeApi::start().await.expect("fake api");
    api.put(
        &format!("{ACCOUNTS}/support-line"),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "uid": "a1" },
            "spec": { "phoneNumber": "+15550783881",
                      "provider": { "cloudApi": { "phoneNumberId": "1065", "credentialsSecretRef": { "name": "creds" } } },
                      "agentPoolRef": { "name": "support" } },
            "status": { "phase": "Ready", "provider": "CloudAPI", "fenceEpoch": 7, "outboundQueued": 3, "outboundSent": 120, "outboundFailed": 1, "sentLast5m": 42, "failedLast5m": 1,
                        "conditions": [condition("Ready", "True", "Ready"), condition("LeaseHeld", "True", "Held")] }
        }),
    );
    api.put(
        &format!("{LEASES}/whatsapp-support-line"),
        json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": { "namespace": NS },
                "spec": { "holderIdentity": "ap-support-gateway-7d9f-x2k4", "leaseDurationSeconds": 15,
                          "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 4 } }),
    );
    api.put(
        &format!("{ACCOUNTS}/sales-line"),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
            "metadata": { "namespace": NS, "uid": "a2" },
            "spec": { "phoneNumber": "+5511987650001", "provider": { "whatsappWeb": {} },
                      "agentPoolRef": { "name": "sales" } },
            "status": { "phase": "Pending", "provider": "WhatsAppWeb",
                        "conditions": [condition("Paired", "False", "PairingRequired"), condition("Connected", "False", "NoHolder")],
                        "pairing": { "method": "QrCode", "qrCode": "2@AbCdEf,ghIJkl,mnOPqr,stUV==",
                                     "expiresAt": (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(20)).to_string(),
                                     "instructions": "On the phone: WhatsApp > Settings > Linked devices > Link a device, then scan." } }
        }),
    );
    api.put(
        &format!("{POOLS}/support"),
        json!({
            "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
            "metadata": { "namespace": NS, "uid": "p1" }, "spec": {},
            "status": { "replicas": 3, "desiredReplicas": 3, "readyReplicas": 2, "queueDepth": 57, "runningJobs": 16,
                        "deadJobs": 2, "oldestPendingSeconds": 95, "openHandoffs": 4, "oldestHandoffSeconds": 400,
                        "gatewayReplicas": 2, "gatewayReadyReplicas": 2, "numbers": 1,
                        "conditions": [condition("ScalingActive", "True", "Scaled")] }
        }),
    );
    api.put(
        &format!("{POOLS}/sales"),
        json!({ "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
                "metadata": { "namespace": NS, "uid": "p2" }, "spec": {}, "status": { "replicas": 1 } }),
    );
    api
}

#[tokio::test]
async fn status_shows_accounts_with_their_lease_holder_and_pools_with_their_queue() {
    let _deadline = queue::testing::deadline(queue::testing::test_deadline());
    let api = cluster().await;
    let c = client(&api.url());
    let report = kubectl_whatsapp::status(&c, &Scope::Namespace(NS.into()), None)
        .await
        .expect("status");
    let table = kubectl_whatsapp::render(&report, Format::Table).expect("table");
    let line = |needle: &str| {
        table
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle} in\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        &line("shop/support-line")[..12],
        [
            "shop/support-line",
            "+15550783881",
            "CloudAPI",
            "Ready",
            "ap-support-gateway-7d9f-x2k4",
            "7",
            "0s",
            "4",
            "3",
            "120",
            "1",
            "42/1"
        ]
    );
    let sales = line("shop/sales-line");
    assert_eq!(sales[4], "-", "no Lease, no holder: {sales:?}");
    assert!(
        sales.iter().any(|c| c == "Paired=False(PairingRequired)"),
        "{sales:?}"
    );
    assert_eq!(
        &line("shop/support ")[..11],
        [
            "shop/support",
            "2/3",
            "3",
            "2/2",
            "1",
            "57",
            "16",
            "95s",
            "2",
            "4",
            "6m"
        ]
    );
    // Numbers per gateway pod, from the Leases.
    assert_eq!(
        line("shop/ap-support-gateway-7d9f-x2k4 "),
        ["shop/ap-support-gateway-7d9f-x2k4", "1"]
    );

    // -o json carries the same, machine-readable.
    let json: Value =
        serde_json::from_str(&kubectl_whatsapp::render(&report, Format::Json).expect("json"))
            .expect("valid json");
    assert_eq!(json["accounts"].as_array().map(Vec::len), Some(2));
    let support = json["accounts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "support-line"))
        .expect("support-line");
    assert_eq!(support["holder"], "ap-support-gateway-7d9f-x2k4");
    assert_eq!(support["leaseTransitions"], 4);
    assert_eq!(support["fenceEpoch"], 7);
    assert_eq!(support["sentLast5m"], 42);
    let yaml = kubectl_whatsapp::render(&report, Format::Yaml).expect("yaml");
    assert!(yaml.contains("queueDepth: 57"), "{yaml}");

    // One account: it and the pool that answers it, nothing else.
    let one = kubectl_whatsapp::status(&c, &Scope::Namespace(NS.into()), Some("sales-line"))
        .await
        .expect("one account");
    assert_eq!(
        (
            one.accounts.len(),
            one.pools.len(),
            one.pools[0].name.as_str()
        ),
        (1, 1, "sales")
    );
}

#[tokio::test]
async fn pair_draws_the_qr_code_and_says_when_there_is_nothing_to_pair() {
    let _deadline = queue::testing::deadline(queue::testing::test_deadline());
    let api = cluster().await;
    let c = client(&api.url());
    let p = kubectl_whatsapp::pairing(&c, NS, "sales-line")
        .await
        .expect("pairing");
    let Pairing::Code { seconds_left, .. } = &p else {
        panic!("expected a code, got {p:?}");
    };
    assert!(
        seconds_left.is_some_and(|s| (15..=20).contains(&s)),
        "{p:?}"
    );
    let out = kubectl_whatsapp::render_pairing("sales-line", &p);
    // A QR code of half blocks, then the steps.
    assert!(out.lines().count() > 15, "{out}");
    assert!(
        out.contains('▀') || out.contains('▄') || out.contains('█'),
        "{out}"
    );
    assert!(out.contains("Linked devices"), "{out}");

    let err = kubectl_whatsapp::pairing(&c, NS, "support-line")
        .await
        .expect_err("a Cloud API account");
    assert!(matches!(err, PluginError::NotWebAccount(_)), "{err}");

    // Once linked, pair says so and stops.
    let mut linked = api.get(&format!("{ACCOUNTS}/sales-line")).expect("stored");
    linked["status"]["conditions"] = json!([
        condition("Paired", "True", "Paired"),
        condition("Connected", "True", "Connected")
    ]);
    api.put(&format!("{ACCOUNTS}/sales-line"), linked);
    let p = kubectl_whatsapp::pairing(&c, NS, "sales-line")
        .await
        .expect("paired");
    assert_eq!(p, Pairing::Paired { connected: true });
    assert_eq!(
        kubectl_whatsapp::render_pairing("sales-line", &p),
        "sales-line is linked and connected.\n"
    );
}

#[tokio::test]
async fn errors_name_the_missing_resource_the_rbac_to_ask_for_and_an_unreachable_api() {
    let _deadline = queue::testing::deadline(queue::testing::test_deadline());
    let api = cluster().await;
    let c = client(&api.url());
    let scope = Scope::Namespace(NS.into());
    let missing = kubectl_whatsapp::status(&c, &scope, Some("nope"))
        .await
        .expect_err("missing account");
    assert_eq!(
        missing.to_string(),
        "WhatsAppAccount \"nope\" not found in namespace \"shop\""
    );
    let missing = kubectl_whatsapp::pairing(&c, NS, "nope")
        .await
        .expect_err("missing account");
    assert!(matches!(missing, PluginError::NotFound { .. }), "{missing}");

    api.forbid("agentpools");
    let forbidden = kubectl_whatsapp::status(&c, &scope, None)
        .await
        .expect_err("forbidden");
    assert!(
        matches!(forbidden, PluginError::Forbidden(_)),
        "{forbidden}"
    );
    assert!(
        forbidden
            .to_string()
            .contains("get/list on whatsappaccounts, agentpools and leases"),
        "{forbidden}"
    );

    let nowhere = client("http://127.0.0.1:1");
    let unreachable = kubectl_whatsapp::status(&nowhere, &scope, None)
        .await
        .expect_err("unreachable");
    assert!(
        matches!(unreachable, PluginError::Unreachable(_)),
        "{unreachable}"
    );
}
