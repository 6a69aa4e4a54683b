//! The objects of a pool's gateway fleet and of the namespace's shared webhook ingress (the
//! Deployment and Service `whatsapp-ingress` / `whatsapp-webhooks`, co-owned by every pool of
//! the namespace), as pure functions (unit-tested without a cluster).
//!
//! The fleet's pods learn their accounts from the API server, so nothing about the numbers is
//! in the pod template: adding, changing or removing a number never restarts them. Only the
//! Role follows the numbers (the Leases and credentials Secrets it may touch, by name).

use serde_json::{Value, json};

use super::resources::{self, PoolInputs};
use crate::account::resources::container_security;
use crate::labels;

/// What the fleet's Role may touch, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetAccess {
    /// Leases of the pool's numbers (`whatsapp-<account>`).
    pub leases: Vec<String>,
    /// Credentials Secrets of the pool's Cloud API numbers (their access tokens send).
    pub secrets: Vec<String>,
}

fn metadata(i: &PoolInputs, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": i.namespace,
        "labels": labels::common(&labels::fleet_selector(i.name)),
        "ownerReferences": [i.owner],
    })
}

pub fn service_account(i: &PoolInputs) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(i, &labels::fleet_name(i.name)) })
}

/// Least privilege: read the namespace's WhatsAppAccounts and list its Leases (one list per
/// round instead of a read per number); read and update only the pool's Leases and read only
/// the credentials Secrets, by name. An empty name list would mean "every object" to RBAC, so
/// such a rule is left out instead.
pub fn role(i: &PoolInputs, access: &FleetAccess) -> Value {
    let mut rules = vec![
        json!({ "apiGroups": ["whatsapp.kube-agents.io"], "resources": ["whatsappaccounts"], "verbs": ["get", "list", "watch"] }),
        json!({ "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["list"] }),
    ];
    if !access.leases.is_empty() {
        rules.push(json!({ "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": access.leases, "verbs": ["get", "update"] }));
    }
    if !access.secrets.is_empty() {
        rules.push(json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": access.secrets, "verbs": ["get"] }));
    }
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(i, &labels::fleet_name(i.name)),
        "rules": rules
    })
}

pub fn role_binding(i: &PoolInputs) -> Value {
    let name = labels::fleet_name(i.name);
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(i, &name),
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": i.namespace }]
    })
}

/// The fleet's own Service: metrics, and `/pairing/<account>` through port-forward.
pub fn service(i: &PoolInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(i, &labels::fleet_name(i.name)),
        "spec": {
            "selector": labels::fleet_selector(i.name),
            "ports": [{ "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" }]
        }
    })
}

/// Metadata of an object every pool of the namespace shares: each pool applies it under its
/// own field manager with its own (non-controller) owner reference, so it lives while any pool
/// does and Kubernetes deletes it with the last one.
fn shared_metadata(i: &PoolInputs, name: &str) -> Value {
    let mut owner = serde_json::to_value(&i.owner).unwrap_or_default();
    owner["controller"] = json!(false);
    json!({
        "name": name,
        "namespace": i.namespace,
        "labels": labels::common(&labels::ingress_selector()),
        "ownerReferences": [owner],
    })
}

pub fn ingress_service_account(i: &PoolInputs) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": shared_metadata(i, labels::INGRESS) })
}

/// The ingress reads the namespace's WhatsAppAccounts and the credentials Secrets of every
/// Cloud API number (verifying a webhook needs the app secret of the number it names), by
/// name; it holds no Lease and sends nothing.
pub fn ingress_role(i: &PoolInputs, namespace_secrets: &[String]) -> Value {
    let mut rules = vec![
        json!({ "apiGroups": ["whatsapp.kube-agents.io"], "resources": ["whatsappaccounts"], "verbs": ["get", "list", "watch"] }),
    ];
    if !namespace_secrets.is_empty() {
        rules.push(json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": namespace_secrets, "verbs": ["get"] }));
    }
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": shared_metadata(i, labels::INGRESS),
        "rules": rules
    })
}

pub fn ingress_role_binding(i: &PoolInputs) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": shared_metadata(i, labels::INGRESS),
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": labels::INGRESS },
        "subjects": [{ "kind": "ServiceAccount", "name": labels::INGRESS, "namespace": i.namespace }]
    })
}

/// The ingress's database URL.
pub fn ingress_db_secret(i: &PoolInputs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": shared_metadata(i, &labels::ingress_db_secret()),
        "type": "Opaque",
        "data": { "url": k8s_openapi::ByteString(service::secret::ExposeSecret::expose_secret(&i.settings.database_url).as_bytes().to_vec()) }
    })
}

/// The namespace's webhook ingress: two pods, the operator's worker image (pools may run
/// different images; the ingress is theirs together).
pub fn ingress_deployment(i: &PoolInputs) -> Value {
    let selector = labels::ingress_selector();
    let mut pod_labels = labels::common(&selector);
    pod_labels.extend(labels::webhook_selector());
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": shared_metadata(i, labels::INGRESS),
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": selector },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": { resources::DATABASE_HASH: resources::database_hash(i) }
                },
                "spec": {
                    "serviceAccountName": labels::INGRESS,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532 },
                    "containers": [{
                        "name": "ingress",
                        "image": i.settings.worker_image,
                        "command": ["/usr/local/bin/whatsapp-worker"],
                        "args": ["ingress"],
                        "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                        "env": [
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                            { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                            { "name": "DATABASE_URL", "valueFrom": { "secretKeyRef": { "name": labels::ingress_db_secret(), "key": "url" } } },
                            { "name": "LOG_FORMAT", "value": "json" },
                        ],
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http" }, "periodSeconds": 2, "failureThreshold": 1 },
                        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 10, "failureThreshold": 6 },
                        "resources": { "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } },
                        "securityContext": container_security()
                    }]
                }
            }
        }
    })
}

/// The namespace's one webhook URL: the ingress pods.
pub fn webhook_service(i: &PoolInputs) -> Value {
    let mut owner = serde_json::to_value(&i.owner).unwrap_or_default();
    owner["controller"] = json!(false);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": labels::WEBHOOK_SERVICE,
            "namespace": i.namespace,
            "labels": labels::common(&labels::webhook_selector()),
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": labels::webhook_selector(),
            "ports": [{ "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" }]
        }
    })
}

pub fn deployment(i: &PoolInputs, replicas: i32) -> Value {
    let spec = &i.pool.spec;
    let name = labels::fleet_name(i.name);
    let selector = labels::fleet_selector(i.name);
    let pod_labels = labels::common(&selector);
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| i.settings.worker_image.clone());
    let resources = spec
        .gateways
        .resources
        .as_ref()
        .and_then(|r| serde_json::to_value(r).ok())
        .unwrap_or_else(|| json!({ "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "512Mi" } }));
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(i, &name),
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": selector },
            // A new pod joins before an old one leaves: Leases move by planned release.
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": { resources::DATABASE_HASH: resources::database_hash(i) }
                },
                "spec": {
                    "serviceAccountName": name,
                    // Drain (readiness off while endpoints move) + finish sends + release.
                    "terminationGracePeriodSeconds": 45,
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532 },
                    "containers": [{
                        "name": "gateway",
                        "image": image,
                        "command": ["/usr/local/bin/whatsapp-worker"],
                        "args": ["fleet"],
                        "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                        "env": [
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                            { "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                            { "name": "DATABASE_URL", "valueFrom": { "secretKeyRef": { "name": labels::pool_db_secret(i.name), "key": "url" } } },
                            { "name": "LOG_FORMAT", "value": "json" },
                            { "name": "WA_POOL", "value": labels::qualified(i.namespace, i.name) },
                        ],
                        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http" }, "periodSeconds": 2, "failureThreshold": 1 },
                        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 10, "failureThreshold": 6 },
                        "resources": resources,
                        "securityContext": container_security()
                    }]
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_name_list_grants_nothing_instead_of_everything() {
        let rules = |access: &FleetAccess| {
            let pool: crds::AgentPool = serde_json::from_value(json!({
                "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool",
                "metadata": { "name": "support", "namespace": "ns", "uid": "u" }, "spec": {}
            }))
            .expect("pool");
            let settings = crate::context::Settings {
                worker_image: "example.com/worker:test".into(),
                database_url: "postgres://queue".into(),
                pool_resync_seconds: 3,
                account_resync_seconds: 10,
            };
            let i = PoolInputs {
                pool: &pool,
                name: "support",
                namespace: "ns",
                owner: Default::default(),
                settings: &settings,
                replicas: 1,
                spec_hash: String::new(),
            };
            role(&i, access)["rules"]
                .as_array()
                .cloned()
                .expect("rules")
        };
        let none = rules(&FleetAccess::default());
        assert!(none.iter().all(|r| r["resources"] != json!(["secrets"])));
        assert!(none.iter().all(|r| {
            r.get("resourceNames").is_none()
                && r["verbs"]
                    .as_array()
                    .is_some_and(|v| !v.contains(&json!("update")))
        }));
        let some = rules(&FleetAccess {
            leases: vec!["whatsapp-a".into()],
            secrets: vec!["a-creds".into()],
        });
        assert!(some.contains(&json!({ "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["whatsapp-a"], "verbs": ["get", "update"] })));
        assert!(some.contains(&json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["a-creds"], "verbs": ["get"] })));
    }
}
