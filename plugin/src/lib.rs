//! `kubectl whatsapp`: what an operator of this project asks every day, answered from the
//! Kubernetes API with the user's kubeconfig and RBAC, as kubectl does.
//!
//! - `status [ACCOUNT]`: accounts (phone, provider, phase, Lease holder and its last renewal,
//!   outbound counts, conditions) and pools (replicas, queue depth, oldest job, dead jobs, open
//!   handoffs). The figures that live in Postgres are the ones the operator copies into each
//!   resource's status; the Lease is read directly, so the holder is never stale.
//! - `pair ACCOUNT`: a WhatsApp Web account's current QR code in the terminal, and its pair
//!   code, until it is paired.

pub mod admin;
pub mod release;

use std::fmt::Write as _;

use crds::{AgentPool, WhatsAppAccount};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;

/// What went wrong, in words a kubectl user acts on.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{kind} \"{name}\" not found in namespace \"{namespace}\"")]
    NotFound {
        kind: &'static str,
        name: String,
        namespace: String,
    },
    #[error(
        "forbidden: {0}\n(kubectl whatsapp needs get/list on whatsappaccounts, agentpools and leases)"
    )]
    Forbidden(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Unreachable(String),
    #[error("\"{0}\" is a Cloud API account; only WhatsApp Web accounts are paired")]
    NotWebAccount(String),
    #[error("the Kubernetes API answered: {0}")]
    Api(String),
    #[error("rendering the output: {0}")]
    Render(String),
    #[error(
        "no core worker of pool \"{pool}\" is reachable ({detail}); the admin commands need one running (kubectl get pods -l whatsapp.kube-agents.io/pool={pool})"
    )]
    NoWorker { pool: String, detail: String },
    #[error(
        "the pool \"{pool}\" has no admin token yet (Secret {secret}, key token); the operator creates it when it reconciles the pool"
    )]
    NoAdminToken { pool: String, secret: String },
    #[error("nobody holds the Lease of \"{0}\": there is nothing to release")]
    NotHeld(String),
    #[error("{0}")]
    Timeout(String),
}

pub(crate) fn classify(
    e: kube::Error,
    kind: &'static str,
    name: &str,
    namespace: &str,
) -> PluginError {
    match e {
        kube::Error::Api(s) if s.code == 404 => PluginError::NotFound {
            kind,
            name: name.to_string(),
            namespace: namespace.to_string(),
        },
        kube::Error::Api(s) if s.code == 403 => PluginError::Forbidden(s.message),
        kube::Error::Api(s) => PluginError::Api(format!("{} {}", s.code, s.message)),
        other => PluginError::Unreachable(other.to_string()),
    }
}

/// The plugin's client for a kubeconfig: like kubectl, it does not retry 503s on its own (kube's
/// default retries them for minutes, which would hide a core pod that does not answer).
pub fn client(mut cfg: kube::Config) -> Result<Client, PluginError> {
    cfg.default_retry = false;
    Client::try_from(cfg).map_err(|e| PluginError::Unreachable(e.to_string()))
}

/// Which namespaces to look in.
#[derive(Debug, Clone)]
pub enum Scope {
    Namespace(String),
    All,
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match self {
            Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
            Scope::All => Api::all(client.clone()),
        }
    }

    fn label(&self) -> &str {
        match self {
            Scope::Namespace(ns) => ns,
            Scope::All => "(all namespaces)",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

fn conditions(c: &[Condition]) -> Vec<ConditionView> {
    c.iter()
        .map(|c| ConditionView {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    pub namespace: String,
    pub name: String,
    pub phone: String,
    pub provider: String,
    pub phase: String,
    /// The Lease holder: the one pod that sends (and, for WhatsApp Web, holds the socket).
    pub holder: Option<String>,
    pub lease_transitions: Option<i32>,
    /// The fencing epoch the holder sends under (from the operator's last look at Postgres).
    pub fence_epoch: Option<i64>,
    pub seconds_since_renew: Option<i64>,
    pub outbound_queued: Option<i64>,
    pub outbound_sent: Option<i64>,
    pub outbound_failed: Option<i64>,
    /// Sends accepted and messages failed for good in the last five minutes.
    pub sent_last5m: Option<i64>,
    pub failed_last5m: Option<i64>,
    pub conditions: Vec<ConditionView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    pub namespace: String,
    pub name: String,
    pub replicas: i32,
    pub desired_replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub queue_depth: Option<i64>,
    pub running_jobs: Option<i64>,
    pub dead_jobs: Option<i64>,
    pub oldest_pending_seconds: Option<i64>,
    pub open_handoffs: Option<i64>,
    pub oldest_handoff_seconds: Option<i64>,
    /// The pool's gateway fleet: pods, ready pods, and the numbers it serves.
    pub gateway_replicas: Option<i32>,
    pub gateway_ready_replicas: Option<i32>,
    pub numbers: Option<i32>,
    pub conditions: Vec<ConditionView>,
}

/// How many numbers one gateway pod holds the Lease of.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HolderView {
    pub namespace: String,
    pub pod: String,
    pub numbers: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    pub accounts: Vec<AccountView>,
    pub pools: Vec<PoolView>,
    /// Numbers per gateway pod, from the Leases' holders.
    pub holders: Vec<HolderView>,
}

/// Numbers per holder, by namespace and pod name.
pub fn numbers_per_pod(accounts: &[AccountView]) -> Vec<HolderView> {
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for a in accounts {
        if let Some(h) = &a.holder {
            *counts.entry((a.namespace.clone(), h.clone())).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|((namespace, pod), numbers)| HolderView {
            namespace,
            pod,
            numbers,
        })
        .collect()
}

pub(crate) fn seconds_since(t: &Time) -> i64 {
    jiff::Timestamp::now().duration_since(t.0).as_secs().max(0)
}

fn seconds_until(t: &Time) -> i64 {
    t.0.duration_since(jiff::Timestamp::now()).as_secs().max(0)
}

async fn account_view(client: &Client, a: &WhatsAppAccount) -> Result<AccountView, PluginError> {
    let namespace = a.namespace().unwrap_or_default();
    let name = a.name_any();
    let lease_name = crds::lease_name(&name);
    let lease = Api::<Lease>::namespaced(client.clone(), &namespace)
        .get_opt(&lease_name)
        .await
        .map_err(|e| classify(e, "Lease", &lease_name, &namespace))?;
    let spec = lease.and_then(|l| l.spec);
    let status = a.status.clone().unwrap_or_default();
    Ok(AccountView {
        phone: a.spec.phone_number.clone(),
        provider: status
            .provider
            .clone()
            .or_else(|| a.spec.provider.kind().map(|k| k.as_str().to_string()))
            .unwrap_or_else(|| "-".into()),
        phase: status
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Pending".into()),
        holder: spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        lease_transitions: spec.as_ref().and_then(|s| s.lease_transitions),
        seconds_since_renew: spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| seconds_since(&Time(t.0))),
        fence_epoch: status.fence_epoch,
        outbound_queued: status.outbound_queued,
        outbound_sent: status.outbound_sent,
        outbound_failed: status.outbound_failed,
        sent_last5m: status.sent_last5m,
        failed_last5m: status.failed_last5m,
        conditions: conditions(&status.conditions),
        namespace,
        name,
    })
}

fn pool_view(p: &AgentPool) -> PoolView {
    let s = p.status.clone().unwrap_or_default();
    PoolView {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        replicas: s.replicas,
        desired_replicas: s.desired_replicas,
        ready_replicas: s.ready_replicas,
        queue_depth: s.queue_depth,
        running_jobs: s.running_jobs,
        dead_jobs: s.dead_jobs,
        oldest_pending_seconds: s.oldest_pending_seconds,
        open_handoffs: s.open_handoffs,
        oldest_handoff_seconds: s.oldest_handoff_seconds,
        gateway_replicas: s.gateway_replicas,
        gateway_ready_replicas: s.gateway_ready_replicas,
        numbers: s.numbers,
        conditions: conditions(&s.conditions),
    }
}

/// Accounts and pools in scope; with `account`, that account and the pool that answers it.
pub async fn status(
    client: &Client,
    scope: &Scope,
    account: Option<&str>,
) -> Result<StatusReport, PluginError> {
    let accounts: Vec<WhatsAppAccount> = match account {
        Some(name) => {
            let Scope::Namespace(ns) = scope else {
                return Err(PluginError::Api(
                    "name an account in one namespace (-n), not across all".into(),
                ));
            };
            let a = Api::<WhatsAppAccount>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map_err(|e| classify(e, "WhatsAppAccount", name, ns))?;
            vec![a]
        }
        None => {
            scope
                .api::<WhatsAppAccount>(client)
                .list(&ListParams::default())
                .await
                .map_err(|e| classify(e, "WhatsAppAccount", "", scope.label()))?
                .items
        }
    };
    let mut pools: Vec<AgentPool> = scope
        .api::<AgentPool>(client)
        .list(&ListParams::default())
        .await
        .map_err(|e| classify(e, "AgentPool", "", scope.label()))?
        .items;
    if account.is_some() {
        let wanted: Vec<(String, String)> = accounts
            .iter()
            .map(|a| {
                (
                    a.namespace().unwrap_or_default(),
                    a.spec.agent_pool_ref.name.clone(),
                )
            })
            .collect();
        pools.retain(|p| wanted.contains(&(p.namespace().unwrap_or_default(), p.name_any())));
    }
    let mut views = Vec::with_capacity(accounts.len());
    for a in &accounts {
        views.push(account_view(client, a).await?);
    }
    Ok(StatusReport {
        holders: numbers_per_pod(&views),
        accounts: views,
        pools: pools.iter().map(pool_view).collect(),
    })
}

/// Output formats, as `kubectl -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

pub(crate) fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub(crate) fn age(seconds: Option<i64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) => format!("{}h", s / 3600),
    }
}

/// Columns padded to their widest cell, like kubectl's tables.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}   ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// Conditions that are not as they should be, as `Type=Status(Reason)`; "all good" when none.
fn condition_summary(c: &[ConditionView]) -> String {
    let bad: Vec<String> = c
        .iter()
        .filter(|c| c.status != "True")
        .map(|c| format!("{}={}({})", c.type_, c.status, c.reason))
        .collect();
    if bad.is_empty() {
        "all True".into()
    } else {
        bad.join(" ")
    }
}

pub fn render(report: &StatusReport, format: Format) -> Result<String, PluginError> {
    match format {
        Format::Json => serde_json::to_string_pretty(report)
            .map(|s| s + "\n")
            .map_err(|e| PluginError::Render(e.to_string())),
        Format::Yaml => {
            serde_saphyr::to_string(report).map_err(|e| PluginError::Render(e.to_string()))
        }
        Format::Table => {
            let mut out = String::new();
            if report.accounts.is_empty() {
                out.push_str("No WhatsAppAccounts.\n");
            } else {
                let rows: Vec<Vec<String>> = report
                    .accounts
                    .iter()
                    .map(|a| {
                        vec![
                            format!("{}/{}", a.namespace, a.name),
                            a.phone.clone(),
                            a.provider.clone(),
                            a.phase.clone(),
                            opt(a.holder.as_deref()),
                            opt(a.fence_epoch),
                            age(a.seconds_since_renew),
                            opt(a.lease_transitions),
                            opt(a.outbound_queued),
                            opt(a.outbound_sent),
                            opt(a.outbound_failed),
                            format!("{}/{}", opt(a.sent_last5m), opt(a.failed_last5m)),
                            condition_summary(&a.conditions),
                        ]
                    })
                    .collect();
                out.push_str(&table(
                    &[
                        "ACCOUNT",
                        "PHONE",
                        "PROVIDER",
                        "PHASE",
                        "LEASE HOLDER",
                        "EPOCH",
                        "RENEWED",
                        "HANDOVERS",
                        "QUEUED",
                        "SENT",
                        "FAILED",
                        "SENT/FAILED 5M",
                        "CONDITIONS",
                    ],
                    &rows,
                ));
            }
            out.push('\n');
            if report.pools.is_empty() {
                out.push_str("No AgentPools.\n");
            } else {
                let rows: Vec<Vec<String>> = report
                    .pools
                    .iter()
                    .map(|p| {
                        vec![
                            format!("{}/{}", p.namespace, p.name),
                            format!("{}/{}", opt(p.ready_replicas), p.replicas),
                            opt(p.desired_replicas),
                            format!(
                                "{}/{}",
                                opt(p.gateway_ready_replicas),
                                opt(p.gateway_replicas)
                            ),
                            opt(p.numbers),
                            opt(p.queue_depth),
                            opt(p.running_jobs),
                            age(p.oldest_pending_seconds),
                            opt(p.dead_jobs),
                            opt(p.open_handoffs),
                            age(p.oldest_handoff_seconds),
                            condition_summary(&p.conditions),
                        ]
                    })
                    .collect();
                out.push_str(&table(
                    &[
                        "POOL",
                        "READY",
                        "DESIRED",
                        "GATEWAYS",
                        "NUMBERS",
                        "QUEUE",
                        "RUNNING",
                        "OLDEST JOB",
                        "DEAD",
                        "HANDOFFS",
                        "OLDEST HANDOFF",
                        "CONDITIONS",
                    ],
                    &rows,
                ));
            }
            if !report.holders.is_empty() {
                out.push('\n');
                let rows: Vec<Vec<String>> = report
                    .holders
                    .iter()
                    .map(|h| vec![format!("{}/{}", h.namespace, h.pod), h.numbers.to_string()])
                    .collect();
                out.push_str(&table(&["GATEWAY POD", "NUMBERS"], &rows));
            }
            Ok(out)
        }
    }
}

/// Where a WhatsApp Web account is with pairing.
#[derive(Debug, Clone, PartialEq)]
pub enum Pairing {
    /// Linked; `connected` while the holder's socket is logged in.
    Paired { connected: bool },
    /// Waiting to be linked with this code.
    Code {
        qr_code: Option<String>,
        pair_code: Option<String>,
        seconds_left: Option<i64>,
        instructions: String,
    },
    /// Not linked and no code yet (no gateway holds the Lease, or it is still connecting).
    Waiting { reason: String },
}

/// The account's pairing state, from its status.
pub async fn pairing(client: &Client, namespace: &str, name: &str) -> Result<Pairing, PluginError> {
    let a = Api::<WhatsAppAccount>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| classify(e, "WhatsAppAccount", name, namespace))?;
    if a.spec.provider.whatsapp_web.is_none() {
        return Err(PluginError::NotWebAccount(name.to_string()));
    }
    let status = a.status.unwrap_or_default();
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
    let paired = condition(crds::conditions::PAIRED);
    if paired.as_ref().is_some_and(|c| c.status == "True") {
        let connected = condition(crds::conditions::CONNECTED).is_some_and(|c| c.status == "True");
        return Ok(Pairing::Paired { connected });
    }
    match status.pairing {
        Some(p) if p.qr_code.is_some() || p.pair_code.is_some() => Ok(Pairing::Code {
            qr_code: p.qr_code,
            pair_code: p.pair_code,
            seconds_left: p.expires_at.map(|t| seconds_until(&t)),
            instructions: p.instructions,
        }),
        _ => Ok(Pairing::Waiting {
            reason: paired
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_else(|| "the operator has not reported on this account yet".into()),
        }),
    }
}

/// What `pair` prints: the QR code drawn with half-block characters, the pair code, and the
/// steps on the phone.
pub fn render_pairing(name: &str, p: &Pairing) -> String {
    match p {
        Pairing::Paired { connected: true } => format!("{name} is linked and connected.\n"),
        Pairing::Paired { connected: false } => format!(
            "{name} is linked; its gateway is not connected right now (see kubectl whatsapp status {name}).\n"
        ),
        Pairing::Waiting { reason } => format!("{name} has no pairing code yet: {reason}\n"),
        Pairing::Code {
            qr_code,
            pair_code,
            seconds_left,
            instructions,
        } => {
            let mut out = String::new();
            if let Some(qr) = qr_code {
                match qrcode::QrCode::new(qr.as_bytes()) {
                    Ok(code) => {
                        use qrcode::render::unicode::Dense1x2;
                        out.push_str(
                            &code
                                .render::<Dense1x2>()
                                .dark_color(Dense1x2::Light)
                                .light_color(Dense1x2::Dark)
                                .quiet_zone(true)
                                .build(),
                        );
                        out.push('\n');
                    }
                    Err(e) => {
                        let _ = writeln!(out, "(cannot draw the QR code: {e})");
                    }
                }
            }
            if let Some(code) = pair_code {
                let _ = writeln!(out, "Pair code: {code}");
            }
            if let Some(s) = seconds_left {
                let _ = writeln!(out, "Expires in {s}s; a new one follows.");
            }
            let _ = writeln!(out, "{instructions}");
            out
        }
    }
}
