//! The objects a WhatsAppAccount needs, as pure functions of the account (unit-tested without a
//! cluster). Applied with server-side apply by [`super::reconcile`]. A number has no pods of
//! its own: its AgentPool's gateway fleet serves it (`crate::pool::fleet`); the account owns
//! only its Lease.

use crds::WhatsAppAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::labels;

/// Everything needed to render an account's children.
pub struct AccountInputs<'a> {
    pub account: &'a WhatsAppAccount,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
}

/// The Lease, created by the operator with an owner reference so it goes with the account.
/// Only metadata is applied: the spec belongs to the gateway fleet's pods. The pool label
/// lets `kubectl get leases -l whatsapp.kube-agents.io/pool=<pool>` show one fleet's numbers.
pub fn lease(i: &AccountInputs) -> Value {
    let mut labels = labels::common(&labels::fleet_selector(&i.account.spec.agent_pool_ref.name));
    labels.insert("whatsapp.kube-agents.io/account".into(), i.name.into());
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": crds::lease_name(i.name),
            "namespace": i.namespace,
            "labels": labels,
            "ownerReferences": [i.owner],
        }
    })
}

/// Fields that no longer act, and what replaced them (the `Deprecated` condition).
pub fn deprecated_fields(account: &WhatsAppAccount) -> Vec<String> {
    let mut out = Vec::new();
    if account.spec.replicas.is_some() {
        out.push(
            "spec.replicas is ignored: the AgentPool's gateway fleet (spec.gateways) serves this number"
                .to_string(),
        );
    }
    if account.spec.image.is_some() {
        out.push(
            "spec.image is ignored: the gateway fleet runs the AgentPool's spec.image".to_string(),
        );
    }
    out
}

/// Restricted pod security: non-root, read-only root filesystem, nothing escalated or added.
pub fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" }
    })
}

/// Problems CEL cannot catch everywhere (older API servers skip CEL), checked again here so a
/// bad spec becomes a condition instead of a broken Deployment.
pub fn spec_problems(account: &WhatsAppAccount) -> Vec<String> {
    let s = &account.spec;
    let mut p = Vec::new();
    let digits = s.phone_number.strip_prefix('+').unwrap_or("");
    if !(7..=15).contains(&digits.len())
        || !digits.chars().all(|c| c.is_ascii_digit())
        || digits.starts_with('0')
    {
        p.push(format!(
            "phoneNumber {:?} is not E.164 (+ then 7 to 15 digits)",
            s.phone_number
        ));
    }
    let l = &s.lease;
    if l.duration_seconds <= l.renew_deadline_seconds {
        p.push("lease.durationSeconds must be greater than lease.renewDeadlineSeconds".into());
    }
    if l.renew_deadline_seconds * 10 <= l.retry_period_seconds * 12 {
        p.push(
            "lease.renewDeadlineSeconds must be greater than 1.2 x lease.retryPeriodSeconds".into(),
        );
    }
    if s.provider.kind().is_none() {
        p.push("set exactly one of provider.cloudApi and provider.whatsappWeb".into());
    }
    if let Some(url) = s
        .provider
        .whatsapp_web
        .as_ref()
        .and_then(|w| w.server_url.as_ref())
        && !(url.starts_with("wss://") || url.starts_with("ws://"))
    {
        p.push("serverUrl must be a ws:// or wss:// URL".into());
    }
    p
}
