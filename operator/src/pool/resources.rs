//! The objects an AgentPool needs, as pure functions.

use crds::AgentPool;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};
use service::secret::ExposeSecret;

use crate::account::resources::container_security;
use crate::context::Settings;
use crate::labels;

pub struct PoolInputs<'a> {
    pub pool: &'a AgentPool,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub settings: &'a Settings,
    pub replicas: i32,
    /// Hash of the rendered spec: a change rolls the core pods so they read the new spec.
    pub spec_hash: String,
}

fn metadata(i: &PoolInputs, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": i.namespace,
        "labels": labels::common(&labels::core_selector(i.name)),
        "ownerReferences": [i.owner],
    })
}

/// The spec JSON the core workers read (mounted from this ConfigMap).
pub fn spec_json(pool: &AgentPool) -> String {
    serde_json::to_string_pretty(&pool.spec).unwrap_or_else(|_| "{}".into())
}

/// A stable, dependency-free hash (FNV-1a) of the spec, for the rollout annotation.
pub fn spec_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The pod-template annotation that follows the database URL: env from a Secret is read only
/// when a container starts, so a new URL (a new password, another server) must roll the pods.
pub const DATABASE_HASH: &str = "whatsapp.kube-agents.io/database-hash";

/// A hash of the database URL the workers get (the URL itself stays in the Secret).
pub fn database_hash(i: &PoolInputs) -> String {
    spec_hash(i.settings.database_url.expose_secret())
}

pub fn config_map(i: &PoolInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(i, &labels::pool_spec_configmap(i.name)),
        "data": { "pool.json": spec_json(i.pool) }
    })
}

pub fn db_secret(i: &PoolInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(i, &labels::pool_db_secret(i.name)),
        "type": "Opaque",
        // `data`, not `stringData`: stringData is write-only and muddles server-side apply
        // field ownership. ByteString serializes as base64.
        "data": { "url": k8s_openapi::ByteString(i.settings.database_url.expose_secret().as_bytes().to_vec()) }
    })
}

/// The admin API token of the pool's core workers, made once with a random token (`token` is
/// only used when the Secret does not exist yet: it is created, never overwritten, so a
/// token a user rotated by hand stays).
pub fn admin_secret(i: &PoolInputs, token: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(i, &labels::pool_admin_secret(i.name)),
        "type": "Opaque",
        "data": { labels::ADMIN_TOKEN_KEY: k8s_openapi::ByteString(token.as_bytes().to_vec()) }
    })
}

/// A new admin token: 43 random alphanumerics (~256 bits).
pub fn new_admin_token() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(43)
        .map(char::from)
        .collect()
}

pub fn service_account(i: &PoolInputs) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(i, &labels::core_name(i.name)), "automountServiceAccountToken": false })
}

/// Where core workers find the team members' tokens (the inbox Secret, mounted).
pub const TEAM_TOKENS_DIR: &str = "/etc/whatsapp/team-tokens";

/// The team inbox of the core workers, for an Ingress to route to (only with `inbox.enabled`).
pub fn inbox_service(i: &PoolInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(i, &labels::inbox_service(i.name)),
        "spec": {
            "selector": labels::core_selector(i.name),
            "ports": [{ "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" }]
        }
    })
}

pub fn deployment(i: &PoolInputs) -> Value {
    let spec = &i.pool.spec;
    let name = labels::core_name(i.name);
    let selector = labels::core_selector(i.name);
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| i.settings.worker_image.clone());
    let mut env = vec![
        json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
        json!({ "name": "DATABASE_URL", "valueFrom": { "secretKeyRef": { "name": labels::pool_db_secret(i.name), "key": "url" } } }),
        json!({ "name": "LOG_FORMAT", "value": "json" }),
        json!({ "name": "WA_POOL", "value": labels::qualified(i.namespace, i.name) }),
        json!({ "name": "AGENT_POOL_SPEC_FILE", "value": "/etc/whatsapp/pool.json" }),
        // Optional: without it only the admin API (kubectl whatsapp jobs|handoffs) is off.
        json!({ "name": "WA_ADMIN_TOKEN", "valueFrom": { "secretKeyRef": { "name": labels::pool_admin_secret(i.name), "key": labels::ADMIN_TOKEN_KEY, "optional": true } } }),
    ];
    if let Some(key) = &spec.model.api_key_secret_ref {
        env.push(json!({ "name": "LLM_API_KEY", "valueFrom": { "secretKeyRef": { "name": key.name, "key": key.key } } }));
    }
    let mut mounts =
        vec![json!({ "name": "spec", "mountPath": "/etc/whatsapp", "readOnly": true })];
    let mut volumes = vec![
        json!({ "name": "spec", "configMap": { "name": labels::pool_spec_configmap(i.name) } }),
    ];
    if let Some(tokens) = spec
        .inbox
        .as_ref()
        .and_then(|b| b.tokens_secret_ref.as_ref())
    {
        env.push(json!({ "name": "TEAM_TOKENS_DIR", "value": TEAM_TOKENS_DIR }));
        mounts
            .push(json!({ "name": "team-tokens", "mountPath": TEAM_TOKENS_DIR, "readOnly": true }));
        // Optional: a missing Secret locks the inbox (InboxReady says why), never the agent.
        volumes.push(json!({ "name": "team-tokens", "secret": { "secretName": tokens.name, "optional": true, "defaultMode": 0o440 } }));
    }
    let resources = spec
        .resources
        .as_ref()
        .and_then(|r| serde_json::to_value(r).ok())
        .unwrap_or_else(|| json!({ "requests": { "cpu": "100m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } }));
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(i, &name),
        "spec": {
            "replicas": i.replicas,
            "selector": { "matchLabels": selector },
            "template": {
                "metadata": {
                    "labels": labels::common(&selector),
                    "annotations": {
                        "whatsapp.kube-agents.io/spec-hash": i.spec_hash,
                        DATABASE_HASH: database_hash(i),
                    }
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": false,
                    // Running turns finish and commit before the pod goes (SIGTERM drains).
                    "terminationGracePeriodSeconds": 60,
                    // fsGroup: the worker's group may read the mounted token files (mode 0440).
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532 },
                    "containers": [{
                        "name": "core",
                        "image": image,
                        "command": ["/usr/local/bin/whatsapp-worker"],
                        "args": ["core"],
                        "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                        "env": env,
                        "volumeMounts": mounts,
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http" }, "periodSeconds": 5 },
                        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 10, "failureThreshold": 6 },
                        "resources": resources,
                        "securityContext": container_security()
                    }],
                    "volumes": volumes
                }
            }
        }
    })
}

/// Problems with the spec that CEL may not have caught (older API servers).
pub fn spec_problems(pool: &AgentPool) -> Vec<String> {
    let s = &pool.spec;
    let mut p = Vec::new();
    if s.min_replicas > s.max_replicas {
        p.push(format!(
            "minReplicas ({}) must be less than or equal to maxReplicas ({})",
            s.min_replicas, s.max_replicas
        ));
    }
    if s.model.provider == crds::agent_pool::ModelProvider::Openai && s.model.model.is_none() {
        p.push("model.model is required when model.provider is openai".into());
    }
    if s.inbox
        .as_ref()
        .is_some_and(|b| b.enabled && b.tokens_secret_ref.is_none())
    {
        p.push(
            "inbox.enabled needs inbox.tokensSecretRef: without tokens nobody can log in".into(),
        );
    }
    p
}
