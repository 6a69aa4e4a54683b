//! The objects a WhatsAppAccount needs, as pure functions of the account (unit-tested without a
//! cluster). Applied with server-side apply by [`super::reconcile`].

use crds::WhatsAppAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};
use service::secret::ExposeSecret;

use crate::context::Settings;
use crate::labels;

/// Everything needed to render an account's children.
pub struct AccountInputs<'a> {
    pub account: &'a WhatsAppAccount,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub settings: &'a Settings,
    /// Gateway replicas to run: 0 when suspended or when credentials are not usable.
    pub replicas: i32,
    /// ResourceVersion of the credentials Secret: changing it rolls the pods (token rotation).
    pub credentials_version: Option<String>,
}

fn metadata(i: &AccountInputs, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": i.namespace,
        "labels": labels::common(&labels::gateway_selector(i.name)),
        "ownerReferences": [i.owner],
    })
}

pub fn service_account(i: &AccountInputs) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(i, &labels::gateway_name(i.name)) })
}

/// Gateways may only read and update their own Lease. The operator creates it, so they need no
/// `create` (which Kubernetes cannot restrict to one name).
pub fn role(i: &AccountInputs) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(i, &labels::gateway_name(i.name)),
        "rules": [{
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [crds::lease_name(i.name)],
            "verbs": ["get", "update"]
        }]
    })
}

pub fn role_binding(i: &AccountInputs) -> Value {
    let name = labels::gateway_name(i.name);
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(i, &name),
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": i.namespace }]
    })
}

/// Webhooks reach any gateway replica through this Service (point Meta's callback URL at an
/// Ingress or Gateway route to it); for WhatsApp Web it serves the `/pairing` page.
pub fn service(i: &AccountInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(i, &labels::gateway_name(i.name)),
        "spec": {
            "selector": labels::gateway_selector(i.name),
            "ports": [{ "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" }]
        }
    })
}

/// The Lease, created by the operator with an owner reference so it goes with the account.
/// Only metadata is applied: the spec belongs to the gateways.
pub fn lease(i: &AccountInputs) -> Value {
    json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata(i, &crds::lease_name(i.name)) })
}

/// The database URL for the gateway pods.
pub fn db_secret(i: &AccountInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(i, &labels::account_db_secret(i.name)),
        "type": "Opaque",
        // `data`, not `stringData`: stringData is write-only and muddles server-side apply
        // field ownership. ByteString serializes as base64.
        "data": { "url": k8s_openapi::ByteString(i.settings.database_url.expose_secret().as_bytes().to_vec()) }
    })
}

fn env(name: &str, value: impl Into<Value>) -> Value {
    json!({ "name": name, "value": value.into() })
}

fn secret_env(name: &str, secret: &str, key: &str) -> Value {
    json!({ "name": name, "valueFrom": { "secretKeyRef": { "name": secret, "key": key } } })
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

/// The gateway's command and provider-specific environment.
fn provider_container(i: &AccountInputs) -> (&'static str, Vec<Value>) {
    let spec = &i.account.spec;
    if let Some(web) = &spec.provider.whatsapp_web {
        let method = match web.pairing {
            crds::account::PairingMethod::QrCode => "QrCode",
            crds::account::PairingMethod::PairCode => "PairCode",
        };
        let mut env_vars = vec![
            env("WA_PHONE_NUMBER", spec.phone_number.clone()),
            env("WA_WEB_PAIRING", method),
            env(
                "WA_WEB_MESSAGES_PER_MINUTE",
                web.pacing.messages_per_minute.to_string(),
            ),
            env(
                "WA_WEB_PER_RECIPIENT_PER_MINUTE",
                web.pacing.per_recipient_per_minute.to_string(),
            ),
            env("WA_WEB_TYPING_MILLIS", web.pacing.typing_millis.to_string()),
        ];
        if let Some(name) = &web.push_name {
            env_vars.push(env("WA_WEB_PUSH_NAME", name.clone()));
        }
        if let Some(url) = &web.server_url {
            env_vars.push(env("WA_WEB_SERVER_URL", url.clone()));
        }
        if let Some(version) = &web.client_version {
            env_vars.push(env("WA_WEB_CLIENT_VERSION", version.clone()));
        }
        return ("web-gateway", env_vars);
    }
    let Some(cloud) = &spec.provider.cloud_api else {
        // spec_problems reports this; the Deployment is scaled to 0 meanwhile.
        return ("gateway", Vec::new());
    };
    let creds = &cloud.credentials_secret_ref;
    (
        "gateway",
        vec![
            env("WA_PHONE_NUMBER_ID", cloud.phone_number_id.clone()),
            env("WA_API_BASE_URL", cloud.api_base_url.clone()),
            secret_env("WA_ACCESS_TOKEN", &creds.name, &creds.access_token_key),
            secret_env("WA_APP_SECRET", &creds.name, &creds.app_secret_key),
            secret_env("WA_VERIFY_TOKEN", &creds.name, &creds.verify_token_key),
            env(
                "WA_RATE_PER_SECOND",
                spec.delivery.rate_per_second.to_string(),
            ),
            env(
                "WA_PER_RECIPIENT_BURST",
                spec.delivery.per_recipient_burst.to_string(),
            ),
            env("WA_MAX_ATTEMPTS", spec.delivery.max_attempts.to_string()),
            env(
                "WA_BACKOFF_SECONDS",
                spec.delivery.backoff_seconds.to_string(),
            ),
        ],
    )
}

pub fn deployment(i: &AccountInputs) -> Value {
    let spec = &i.account.spec;
    let name = labels::gateway_name(i.name);
    let selector = labels::gateway_selector(i.name);
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| i.settings.worker_image.clone());
    let mut annotations = serde_json::Map::new();
    if let Some(v) = &i.credentials_version {
        annotations.insert(
            "whatsapp.kube-agents.io/credentials-version".into(),
            json!(v),
        );
    }
    let (role, provider_env) = provider_container(i);
    let mut env_vars = vec![
        json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
        json!({ "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } }),
        secret_env("DATABASE_URL", &labels::account_db_secret(i.name), "url"),
        env("LOG_FORMAT", "json"),
        env("WA_ACCOUNT", labels::qualified(i.namespace, i.name)),
        env(
            "WA_POOL",
            labels::qualified(i.namespace, &spec.agent_pool_ref.name),
        ),
        env("WA_HANDOFF_MESSAGE", spec.handoff_message.clone()),
        env("WA_ALLOWED_CONTACTS", spec.allowed_contacts.join(",")),
    ];
    env_vars.extend(provider_env);
    env_vars.extend([
        env("WA_LEASE_NAME", crds::lease_name(i.name)),
        env(
            "WA_LEASE_DURATION_SECONDS",
            spec.lease.duration_seconds.to_string(),
        ),
        env(
            "WA_LEASE_RENEW_DEADLINE_SECONDS",
            spec.lease.renew_deadline_seconds.to_string(),
        ),
        env(
            "WA_LEASE_RETRY_PERIOD_SECONDS",
            spec.lease.retry_period_seconds.to_string(),
        ),
    ]);
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(i, &name),
        "spec": {
            "replicas": i.replicas,
            "selector": { "matchLabels": selector },
            // Replace one pod at a time: the Lease moves at most once per step.
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
            "template": {
                "metadata": { "labels": labels::common(&selector), "annotations": annotations },
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532 },
                    "containers": [{
                        "name": "gateway",
                        "image": image,
                        "command": ["/usr/local/bin/whatsapp-worker"],
                        "args": [role],
                        "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                        "env": env_vars,
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http" }, "periodSeconds": 5 },
                        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 10, "failureThreshold": 6 },
                        "resources": { "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } },
                        "securityContext": container_security()
                    }]
                }
            }
        }
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
    if s.replicas < 0 {
        p.push("replicas must not be negative".into());
    }
    p
}
