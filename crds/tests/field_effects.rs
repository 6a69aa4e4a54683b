//! Every spec field of both custom resources is read by the code that gives it its effect.
//!
//! The table below names, for each field of the generated schemas, the production source file
//! that reads it and the field access it reads it with (compared without whitespace). A new field without an entry fails here
//! (so no field ships without an effect), and so does an entry whose file no longer reads the
//! field (so a refactor cannot quietly disconnect one). What a field does is in
//! docs/custom-resources.md; the end-to-end behaviour of the delivery, lease, pacing, routing and
//! scaling fields is exercised by the worker and operator suites (docs/testing.md).

use std::collections::BTreeSet;
use std::path::Path;

use crds::{AgentPool, WhatsAppAccount};
use kube::CustomResourceExt;
use serde_json::Value;

/// Kubernetes types whose inner fields are Kubernetes' (a container's resource requests).
const OPAQUE: &[&str] = &["resources", "gateways.resources"];

/// `(field path, file that reads it, what it reads it as)`.
const ACCOUNT: &[(&str, &str, &str)] = &[
    (
        "phoneNumber",
        "worker/src/fleet/accounts.rs",
        "spec.phone_number",
    ),
    (
        "provider.cloudApi.phoneNumberId",
        "worker/src/fleet/accounts.rs",
        "cloud.phone_number_id",
    ),
    (
        "provider.cloudApi.apiBaseUrl",
        "worker/src/fleet/accounts.rs",
        "cloud.api_base_url",
    ),
    (
        "media.maxBytes",
        "worker/src/fleet/accounts.rs",
        "spec.media.max_bytes",
    ),
    (
        "media.retentionDays",
        "worker/src/fleet/accounts.rs",
        "spec.media.retention_days",
    ),
    (
        "provider.cloudApi.wabaId",
        "worker/src/fleet/accounts.rs",
        "cloud.waba_id",
    ),
    (
        "provider.cloudApi.credentialsSecretRef.name",
        "worker/src/fleet/accounts.rs",
        "refs.name",
    ),
    (
        "provider.cloudApi.credentialsSecretRef.accessTokenKey",
        "worker/src/fleet/accounts.rs",
        "refs.access_token_key",
    ),
    (
        "provider.cloudApi.credentialsSecretRef.appSecretKey",
        "worker/src/fleet/accounts.rs",
        "refs.app_secret_key",
    ),
    (
        "provider.cloudApi.credentialsSecretRef.verifyTokenKey",
        "worker/src/fleet/accounts.rs",
        "refs.verify_token_key",
    ),
    (
        "provider.whatsappWeb.pairing",
        "worker/src/fleet/accounts.rs",
        "web.pairing",
    ),
    (
        "provider.whatsappWeb.pushName",
        "worker/src/fleet/accounts.rs",
        "web.push_name",
    ),
    (
        "provider.whatsappWeb.serverUrl",
        "worker/src/fleet/accounts.rs",
        "web.server_url",
    ),
    (
        "provider.whatsappWeb.clientVersion",
        "worker/src/fleet/accounts.rs",
        "web.client_version",
    ),
    (
        "provider.whatsappWeb.pacing.messagesPerMinute",
        "worker/src/fleet/accounts.rs",
        "web.pacing.messages_per_minute",
    ),
    (
        "provider.whatsappWeb.pacing.perRecipientPerMinute",
        "worker/src/fleet/accounts.rs",
        "web.pacing.per_recipient_per_minute",
    ),
    (
        "provider.whatsappWeb.pacing.typingMillis",
        "worker/src/fleet/accounts.rs",
        "web.pacing.typing_millis",
    ),
    (
        "provider.whatsappWeb.readReceipts",
        "worker/src/fleet/accounts.rs",
        "web.read_receipts",
    ),
    (
        "agentPoolRef.name",
        "worker/src/fleet/accounts.rs",
        "spec.agent_pool_ref.name",
    ),
    (
        "allowedContacts",
        "worker/src/fleet/accounts.rs",
        "spec.allowed_contacts",
    ),
    (
        "answerGroups",
        "worker/src/fleet/accounts.rs",
        "spec.answer_groups",
    ),
    (
        "handoffMessage",
        "worker/src/fleet/accounts.rs",
        "spec.handoff_message",
    ),
    (
        "lease.durationSeconds",
        "worker/src/fleet/accounts.rs",
        "spec.lease.duration_seconds",
    ),
    (
        "lease.renewDeadlineSeconds",
        "worker/src/fleet/accounts.rs",
        "spec.lease.renew_deadline_seconds",
    ),
    (
        "lease.retryPeriodSeconds",
        "worker/src/fleet/accounts.rs",
        "spec.lease.retry_period_seconds",
    ),
    (
        "delivery.ratePerSecond",
        "worker/src/fleet/accounts.rs",
        "d.rate_per_second",
    ),
    (
        "delivery.perRecipientBurst",
        "worker/src/fleet/accounts.rs",
        "d.per_recipient_burst",
    ),
    (
        "delivery.maxAttempts",
        "worker/src/config.rs",
        "d.max_attempts",
    ),
    (
        "delivery.backoffSeconds",
        "worker/src/config.rs",
        "d.backoff_seconds",
    ),
    (
        "delivery.inDoubtGraceSeconds",
        "worker/src/config.rs",
        "d.in_doubt_grace_seconds",
    ),
    ("suspend", "worker/src/fleet/accounts.rs", "spec.suspend"),
    // Deprecated: their effect is the Deprecated condition that says so.
    ("replicas", "operator/src/account/resources.rs", ".replicas"),
    ("image", "operator/src/account/resources.rs", ".image"),
];

const POOL: &[(&str, &str, &str)] = &[
    ("minReplicas", "operator/src/pool/mod.rs", ".min_replicas"),
    ("maxReplicas", "operator/src/pool/mod.rs", ".max_replicas"),
    ("replicas", "operator/src/pool/mod.rs", "spec.replicas"),
    (
        "targetPendingPerReplica",
        "operator/src/pool/mod.rs",
        ".target_pending_per_replica",
    ),
    (
        "maxPendingAgeSeconds",
        "operator/src/pool/mod.rs",
        ".max_pending_age_seconds",
    ),
    (
        "scaleDownStabilizationSeconds",
        "operator/src/pool/mod.rs",
        ".scale_down_stabilization_seconds",
    ),
    (
        "concurrencyPerReplica",
        "worker/src/core/mod.rs",
        ".concurrency_per_replica",
    ),
    ("model.provider", "worker/src/core/mod.rs", "model.provider"),
    ("model.baseUrl", "worker/src/core/mod.rs", ".base_url"),
    ("model.model", "worker/src/core/mod.rs", "model.model"),
    (
        "model.apiKeySecretRef.name",
        "operator/src/pool/resources.rs",
        ".api_key_secret_ref",
    ),
    (
        "model.apiKeySecretRef.key",
        "operator/src/pool/resources.rs",
        ".api_key_secret_ref",
    ),
    (
        "model.timeoutSeconds",
        "worker/src/core/mod.rs",
        ".timeout_seconds",
    ),
    ("model.maxSteps", "worker/src/core/mod.rs", ".max_steps"),
    (
        "model.temperature",
        "worker/src/core/mod.rs",
        ".temperature",
    ),
    ("model.maxTokens", "worker/src/core/mod.rs", ".max_tokens"),
    ("systemPrompt", "worker/src/core/mod.rs", ".system_prompt"),
    (
        "lanes[].name",
        "worker/src/core/agent/rules.rs",
        "lane.name",
    ),
    (
        "lanes[].keywords",
        "worker/src/core/agent/rules.rs",
        ".keywords",
    ),
    (
        "lanes[].prompt",
        "worker/src/core/agent/openai.rs",
        ".prompt",
    ),
    (
        "lanes[].replies",
        "worker/src/core/agent/rules.rs",
        ".replies",
    ),
    (
        "lanes[].handoff",
        "worker/src/core/agent/rules.rs",
        ".handoff",
    ),
    (
        "lanes[].media",
        "worker/src/core/agent/rules.rs",
        "lane.media",
    ),
    (
        "lanes[].buttons[].title",
        "worker/src/core/agent/rules.rs",
        "b.title",
    ),
    (
        "lanes[].buttons[].lane",
        "worker/src/core/agent/rules.rs",
        "b.lane",
    ),
    ("tools[].id", "tools/src/lib.rs", "spec.id"),
    ("tools[].config", "tools/src/lib.rs", "spec.config"),
    ("tools[].channels", "tools/src/lib.rs", "spec.channels"),
    ("team[].id", "worker/src/core/handoff.rs", ".id"),
    ("team[].name", "worker/src/core/handoff.rs", ".name"),
    ("team[].online", "worker/src/core/handoff.rs", ".online"),
    (
        "team[].tokenKey",
        "crds/src/agent_pool.rs",
        "self.token_key",
    ),
    ("inbox.enabled", "operator/src/pool/mod.rs", ".enabled"),
    (
        "inbox.tokensSecretRef.name",
        "operator/src/pool/resources.rs",
        ".tokens_secret_ref",
    ),
    (
        "historyMessages",
        "worker/src/core/mod.rs",
        ".history_messages",
    ),
    (
        "sessionTtlSeconds",
        "worker/src/core/mod.rs",
        ".session_ttl_seconds",
    ),
    ("image", "operator/src/pool/resources.rs", ".image"),
    ("resources", "operator/src/pool/resources.rs", ".resources"),
    (
        "gateways.replicas",
        "crds/src/agent_pool.rs",
        "self.replicas",
    ),
    (
        "gateways.numbersPerPod",
        "crds/src/agent_pool.rs",
        "self.numbers_per_pod",
    ),
    (
        "gateways.minReplicas",
        "crds/src/agent_pool.rs",
        "self.min_replicas",
    ),
    (
        "gateways.maxReplicas",
        "crds/src/agent_pool.rs",
        "self.max_replicas",
    ),
    (
        "gateways.resources",
        "operator/src/pool/fleet.rs",
        "gateways.resources",
    ),
];

/// Leaf field paths of a CRD's `spec`.
fn leaves(crd: &Value) -> BTreeSet<String> {
    fn walk(schema: &Value, path: &str, out: &mut BTreeSet<String>) {
        if !path.is_empty() && OPAQUE.contains(&path) {
            out.insert(path.to_string());
            return;
        }
        if let Some(props) = schema["properties"].as_object() {
            for (name, s) in props {
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                walk(s, &p, out);
            }
        } else if schema["items"]["properties"].is_object() {
            walk(&schema["items"], &format!("{path}[]"), out);
        } else {
            out.insert(path.to_string());
        }
    }
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut out = BTreeSet::new();
    walk(spec, "", &mut out);
    out
}

fn check(kind: &str, crd: Value, table: &[(&str, &str, &str)]) {
    let fields = leaves(&crd);
    let listed: BTreeSet<String> = table.iter().map(|(p, _, _)| p.to_string()).collect();
    let unlisted: Vec<_> = fields.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "{kind} fields with no reader in the table (give them an effect, or remove them): {unlisted:?}"
    );
    let stale: Vec<_> = listed.difference(&fields).collect();
    assert!(
        stale.is_empty(),
        "{kind} table names fields the CRD does not have: {stale:?}"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Compared without whitespace: rustfmt splits a long field access over lines.
    let squeeze = |t: &str| t.split_whitespace().collect::<String>();
    for (path, file, reads) in table {
        let text = squeeze(&std::fs::read_to_string(root.join(file)).unwrap_or_default());
        assert!(
            text.contains(&squeeze(reads)),
            "{kind} {path}: {file} does not read `{reads}` any more"
        );
    }
}

#[test]
fn every_account_field_is_read_where_it_acts() {
    let crd = serde_json::to_value(WhatsAppAccount::crd()).expect("crd");
    check("WhatsAppAccount", crd, ACCOUNT);
}

#[test]
fn every_pool_field_is_read_where_it_acts() {
    let crd = serde_json::to_value(AgentPool::crd()).expect("crd");
    check("AgentPool", crd, POOL);
}
