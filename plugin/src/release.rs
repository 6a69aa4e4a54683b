//! `release ACCOUNT`: ask the Lease holder to hand over (planned maintenance: drain a node,
//! move the socket of a WhatsApp Web number), then watch who takes over and how fast.
//!
//! The request is an annotation on the Lease naming the holder; the holder reads the Lease at
//! every renewal, stops, waits for its send in flight (or closes its socket), releases the
//! Lease and stays away for one lease duration. Any standby may take it. Needs `patch` on
//! leases.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;

use crate::{PluginError, classify};

/// The annotation the elector watches (`lease::RELEASE_ANNOTATION`; a test keeps them equal).
pub const RELEASE_ANNOTATION: &str = "whatsapp.kube-agents.io/release-holder";

/// What happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Handover {
    pub account: String,
    pub lease: String,
    pub from: String,
    /// The new holder; the old one when no standby took it and it took it back.
    pub to: String,
    pub seconds: f64,
    pub lease_transitions: Option<i32>,
}

fn holder(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

pub async fn release(
    client: &Client,
    namespace: &str,
    account: &str,
    timeout: Duration,
) -> Result<Handover, PluginError> {
    Api::<crds::WhatsAppAccount>::namespaced(client.clone(), namespace)
        .get(account)
        .await
        .map_err(|e| classify(e, "WhatsAppAccount", account, namespace))?;
    let name = crds::lease_name(account);
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let lease = leases
        .get_opt(&name)
        .await
        .map_err(|e| classify(e, "Lease", &name, namespace))?;
    let from = lease
        .as_ref()
        .and_then(holder)
        .ok_or_else(|| PluginError::NotHeld(account.to_string()))?;
    let patch = json!({ "metadata": { "annotations": { RELEASE_ANNOTATION: from } } });
    leases
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| match classify(e, "Lease", &name, namespace) {
            PluginError::Forbidden(m) => {
                PluginError::Forbidden(format!("{m}\n(release needs patch on leases)"))
            }
            other => other,
        })?;
    let asked = Instant::now();
    let mut released = false;
    loop {
        let lease = leases
            .get_opt(&name)
            .await
            .map_err(|e| classify(e, "Lease", &name, namespace))?;
        let now = lease.as_ref().and_then(holder);
        match &now {
            None => released = true,
            Some(h) if h != &from || released => {
                return Ok(Handover {
                    account: account.to_string(),
                    lease: name,
                    from,
                    to: h.clone(),
                    seconds: asked.elapsed().as_secs_f64(),
                    lease_transitions: lease
                        .as_ref()
                        .and_then(|l| l.spec.as_ref())
                        .and_then(|s| s.lease_transitions),
                });
            }
            Some(_) => {}
        }
        if asked.elapsed() >= timeout {
            return Err(PluginError::Timeout(if released {
                format!(
                    "{from} released the Lease {name}, but no gateway took it within {}s: are the standbys running? (kubectl get pods -l whatsapp.kube-agents.io/account={account})",
                    timeout.as_secs()
                )
            } else {
                format!(
                    "{from} still holds the Lease {name} after {}s; it has not seen the request (is it running and renewing?). The annotation {RELEASE_ANNOTATION} stays until it does",
                    timeout.as_secs()
                )
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn render(h: &Handover) -> String {
    if h.to == h.from {
        format!(
            "{}: {} released the Lease {}, no standby took it, and it took it back after {:.1}s\n",
            h.account, h.from, h.lease, h.seconds
        )
    } else {
        format!(
            "{}: {} released the Lease {}; {} took over in {:.1}s (handovers: {})\n",
            h.account,
            h.from,
            h.lease,
            h.to,
            h.seconds,
            h.lease_transitions
                .map_or_else(|| "-".to_string(), |n| n.to_string())
        )
    }
}
