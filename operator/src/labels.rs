//! Names and labels of the objects the operator creates.

use std::collections::BTreeMap;

pub const PART_OF: &str = "whatsapp-operator";

pub fn gateway_name(account: &str) -> String {
    format!("wa-{account}-gateway")
}

/// The gateway fleet of a pool: its Deployment, Service, ServiceAccount and Role.
pub fn fleet_name(pool: &str) -> String {
    format!("ap-{pool}-gateway")
}

/// The namespace's one webhook URL (the ingress pods).
pub const WEBHOOK_SERVICE: &str = "whatsapp-webhooks";

/// Selector labels of a pool's gateway fleet pods.
pub fn fleet_selector(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "whatsapp-gateway".into()),
        ("whatsapp.kube-agents.io/pool".into(), pool.into()),
    ])
}

/// The namespace's webhook ingress: Deployment, ServiceAccount, Role, RoleBinding.
pub const INGRESS: &str = "whatsapp-ingress";

/// The ingress's database URL Secret.
pub fn ingress_db_secret() -> String {
    format!("{INGRESS}-db")
}

/// Selector labels of the ingress pods.
pub fn ingress_selector() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".into(), INGRESS.into())])
}

/// Pods that take the namespace's webhooks.
pub fn webhook_selector() -> BTreeMap<String, String> {
    BTreeMap::from([("whatsapp.kube-agents.io/webhooks".into(), "true".into())])
}

pub fn account_db_secret(account: &str) -> String {
    format!("wa-{account}-db")
}

pub fn core_name(pool: &str) -> String {
    format!("ap-{pool}-core")
}

pub fn pool_spec_configmap(pool: &str) -> String {
    format!("ap-{pool}-spec")
}

pub fn inbox_service(pool: &str) -> String {
    format!("ap-{pool}-inbox")
}

pub fn pool_db_secret(pool: &str) -> String {
    format!("ap-{pool}-db")
}

/// The pool's admin API token (`kubectl whatsapp jobs|handoffs|resume`), key `token`.
pub fn pool_admin_secret(pool: &str) -> String {
    format!("ap-{pool}-admin")
}

/// The key of the admin token in [`pool_admin_secret`].
pub const ADMIN_TOKEN_KEY: &str = "token";

/// Queue (and account) ids are namespace-qualified: two namespaces may reuse a name.
pub fn qualified(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Selector labels of a gateway's pods.
pub fn gateway_selector(account: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "whatsapp-gateway".into()),
        ("whatsapp.kube-agents.io/account".into(), account.into()),
    ])
}

/// Selector labels of a pool's core pods.
pub fn core_selector(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "whatsapp-core".into()),
        ("whatsapp.kube-agents.io/pool".into(), pool.into()),
    ])
}

/// Labels on everything the operator creates.
pub fn common(selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = selector.clone();
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "whatsapp-operator".into(),
    );
    l.insert("app.kubernetes.io/part-of".into(), PART_OF.into());
    l
}

/// `k=v,k=v` for label selectors.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
