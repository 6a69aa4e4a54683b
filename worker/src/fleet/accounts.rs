//! The fleet's accounts, learnt from the API server: a watch of the namespace's
//! `WhatsAppAccount`s and a read of each Cloud API account's credentials Secret. Nothing is baked
//! into the pod template, so numbers come and go without restarting a pod; credentials are
//! read again every refresh period, so a rotated token reaches a running pod.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::WhatsAppAccount;
use crds::account::PairingMethod;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use service::secret::SecretString;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{AccountArgs, MediaArgs, RetryArgs, RoutingArgs, WebAccountArgs};

/// Lease timings of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// How an account reaches WhatsApp, with what its duty needs.
#[derive(Debug, Clone)]
pub enum Provider {
    Cloud(Box<AccountArgs>),
    Web(Box<WebAccountArgs>),
}

/// One usable account: its spec, and for the Cloud API its credentials.
#[derive(Debug, Clone)]
pub struct FleetAccount {
    /// `<namespace>/<name>`.
    pub id: String,
    pub name: String,
    /// The AgentPool's name (same namespace).
    pub pool_name: String,
    pub routing: RoutingArgs,
    pub timings: Timings,
    pub provider: Provider,
    /// Changes whenever the spec or the credentials change (not on status writes).
    pub fingerprint: String,
}

impl FleetAccount {
    /// The phone number id of its account row (WhatsApp Web rows are keyed by the number).
    /// Attempts of each outbound message (`spec.delivery.maxAttempts`).
    pub fn max_attempts(&self) -> i32 {
        match &self.provider {
            Provider::Cloud(a) => a.retry.max_attempts(),
            Provider::Web(w) => w.retry.max_attempts(),
        }
    }

    /// The WhatsApp Business Account of a Cloud API number, when its spec names one.
    pub fn waba_id(&self) -> Option<&str> {
        match &self.provider {
            Provider::Cloud(a) => a.waba_id.as_deref(),
            Provider::Web(_) => None,
        }
    }

    pub fn phone_key(&self) -> String {
        match &self.provider {
            Provider::Cloud(a) => a.phone_number_id.clone(),
            Provider::Web(w) => format!("web:{}", w.phone_number),
        }
    }
}

/// Every usable account of the namespace, by id.
pub type AccountSet = BTreeMap<String, Arc<FleetAccount>>;

/// A Secret's value, from `data` or (not yet normalized) `stringData`.
fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| v.clone().into_bytes())
        })?;
    let text = String::from_utf8(bytes).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// What the fleet serves for `acct`, or why it serves nothing (suspended, a Secret or key
/// missing, no provider): the operator reports the same reasons as conditions.
pub fn from_resource(
    acct: &WhatsAppAccount,
    secret: Option<&Secret>,
) -> Result<FleetAccount, String> {
    let namespace = acct.namespace().unwrap_or_default();
    let name = acct.name_any();
    let id = format!("{namespace}/{name}");
    let spec = &acct.spec;
    if spec.suspend {
        return Err("suspended".into());
    }
    if let Some(conflict) = acct.phone_number_conflict() {
        return Err(conflict);
    }
    let routing = RoutingArgs {
        pool: format!("{namespace}/{}", spec.agent_pool_ref.name),
        handoff_message: spec.handoff_message.clone(),
        allowed_contacts: spec.allowed_contacts.clone(),
        max_message_age_seconds: 86_400,
        answer_groups: spec.answer_groups,
    };
    let secs = |s: i32| Duration::from_secs(s.max(1) as u64);
    let timings = Timings {
        duration: secs(spec.lease.duration_seconds),
        renew_deadline: secs(spec.lease.renew_deadline_seconds),
        retry_period: secs(spec.lease.retry_period_seconds),
    };
    let generation = acct.metadata.generation.unwrap_or_default();
    let d = &spec.delivery;
    let media = MediaArgs {
        media_max_bytes: spec.media.max_bytes.max(1024) as u64,
        media_retention_days: spec.media.retention_days.max(1) as u32,
    };
    let (provider, secret_version) = if let Some(cloud) = &spec.provider.cloud_api {
        let refs = &cloud.credentials_secret_ref;
        let secret = secret.ok_or_else(|| format!("Secret {} not found", refs.name))?;
        let get = |key: &str| {
            secret_value(secret, key)
                .map(SecretString::from)
                .ok_or_else(|| format!("Secret {} has no key {key}", refs.name))
        };
        let args = AccountArgs {
            id: id.clone(),
            phone_number_id: cloud.phone_number_id.clone(),
            api_base_url: cloud.api_base_url.clone(),
            waba_id: cloud.waba_id.clone(),
            routing: routing.clone(),
            access_token: get(&refs.access_token_key)?,
            app_secret: get(&refs.app_secret_key)?,
            verify_token: get(&refs.verify_token_key)?,
            rate_per_second: d.rate_per_second.max(1) as u32,
            per_recipient_burst: d.per_recipient_burst.max(1) as u32,
            retry: RetryArgs::from_delivery(d),
            media: media.clone(),
        };
        (
            Provider::Cloud(Box::new(args)),
            secret.metadata.resource_version.clone().unwrap_or_default(),
        )
    } else if let Some(web) = &spec.provider.whatsapp_web {
        let client_version = match &web.client_version {
            Some(v) => Some(crate::config::parse_client_version(v)?),
            None => None,
        };
        let args = WebAccountArgs {
            id: id.clone(),
            phone_number: spec.phone_number.clone(),
            routing: routing.clone(),
            pairing: match web.pairing {
                PairingMethod::QrCode => "QrCode".into(),
                PairingMethod::PairCode => "PairCode".into(),
            },
            push_name: web.push_name.clone(),
            server_url: web.server_url.clone(),
            client_version,
            messages_per_minute: web.pacing.messages_per_minute.max(1) as u32,
            per_recipient_per_minute: web.pacing.per_recipient_per_minute.max(1) as u32,
            typing_millis: web.pacing.typing_millis.max(0) as u64,
            read_receipts: web.read_receipts,
            retry: RetryArgs::from_delivery(d),
            media,
        };
        (Provider::Web(Box::new(args)), String::new())
    } else {
        return Err("no provider set".into());
    };
    Ok(FleetAccount {
        id,
        name,
        pool_name: spec.agent_pool_ref.name.clone(),
        routing,
        timings,
        provider,
        fingerprint: format!("{generation}/{secret_version}"),
    })
}

/// Watches the namespace's accounts and publishes the usable ones.
pub struct AccountSource {
    pub accounts: watch::Receiver<Arc<AccountSet>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Start watching `namespace`: the accounts of `pool` only (a fleet pod, whose Role names only
/// its pool's Secrets), or every account (the namespace's webhook ingress). Secrets are read
/// when an account needs one first and again every `secret_refresh`; a failed read keeps the
/// last value (a blip of the API server must not stop a number).
pub fn watch_accounts(
    client: kube::Client,
    namespace: &str,
    pool: Option<String>,
    secret_refresh: Duration,
    cancel: CancellationToken,
) -> AccountSource {
    let (tx, rx) = watch::channel(Arc::new(AccountSet::new()));
    let accounts: Api<WhatsAppAccount> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let task = tokio::spawn(async move {
        let (reader, writer) = reflector::store();
        let mut events = std::pin::pin!(
            reflector(writer, watcher(accounts, watcher::Config::default()))
                .default_backoff()
                .touched_objects()
                .ready_chunks(1024)
        );
        let mut cache: HashMap<String, (Instant, Option<Secret>)> = HashMap::new();
        let mut tick = tokio::time::interval(secret_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut synced = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                batch = events.next() => {
                    let Some(batch) = batch else { return };
                    for e in batch {
                        if let Err(error) = e {
                            tracing::warn!(%error, "watching WhatsAppAccounts");
                        } else {
                            synced = true;
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            if !synced {
                continue;
            }
            let state = reader.state();
            let mut set = AccountSet::new();
            for acct in &state {
                if pool
                    .as_ref()
                    .is_some_and(|p| *p != acct.spec.agent_pool_ref.name)
                {
                    continue;
                }
                let secret = match &acct.spec.provider.cloud_api {
                    Some(cloud) => {
                        let name = &cloud.credentials_secret_ref.name;
                        let stale = cache
                            .get(name)
                            .is_none_or(|(at, _)| at.elapsed() >= secret_refresh);
                        if stale {
                            match secrets.get_opt(name).await {
                                Ok(s) => {
                                    cache.insert(name.clone(), (Instant::now(), s));
                                }
                                Err(error) => {
                                    tracing::warn!(secret = %name, %error, "reading a credentials Secret; keeping the last value");
                                }
                            }
                        }
                        cache.get(name).and_then(|(_, s)| s.as_ref())
                    }
                    None => None,
                };
                match from_resource(acct, secret) {
                    Ok(a) => {
                        set.insert(a.id.clone(), Arc::new(a));
                    }
                    Err(reason) => {
                        tracing::debug!(account = %acct.name_any(), %reason, "account not served")
                    }
                }
            }
            let changed = {
                let current = tx.borrow();
                current.len() != set.len()
                    || current
                        .iter()
                        .zip(set.iter())
                        .any(|((a, x), (b, y))| a != b || x.fingerprint != y.fingerprint)
            };
            if changed {
                tx.send_replace(Arc::new(set));
            }
        }
    });
    AccountSource { accounts: rx, task }
}
