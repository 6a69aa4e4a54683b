//! The WhatsAppAccount controller.

pub mod resources;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use crds::WhatsAppAccount;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use crate::apply::{apply, delete_if_exists, patch_status};
use crate::context::Context;
use crate::metrics::Metrics;
use crate::{Error, Result, labels};
use resources::AccountInputs;
use status::{Credentials, Observed};

/// Check that the credentials Secret exists and has every key the gateway reads.
pub async fn check_credentials(
    client: &kube::Client,
    namespace: &str,
    acct: &WhatsAppAccount,
) -> Result<(Credentials, Option<String>)> {
    let Some(cloud) = &acct.spec.provider.cloud_api else {
        // WhatsApp Web keeps its session in Postgres; there is no Secret to read.
        return Ok((Credentials::NotNeeded, None));
    };
    let creds = &cloud.credentials_secret_ref;
    let Some(secret) = crate::secrets::get(client, namespace, &creds.name).await? else {
        return Ok((Credentials::SecretMissing(creds.name.clone()), None));
    };
    let has = |k: &str| crate::secrets::value(&secret, k).is_some_and(|v| !v.is_empty());
    let missing: Vec<String> = creds
        .keys()
        .iter()
        .filter(|k| !has(k))
        .map(|k| k.to_string())
        .collect();
    let version = secret.metadata.resource_version.clone();
    if missing.is_empty() {
        Ok((Credentials::Valid, version))
    } else {
        Ok((
            Credentials::KeysMissing {
                secret: creds.name.clone(),
                keys: missing,
            },
            version,
        ))
    }
}

#[tracing::instrument(skip_all, fields(account = %acct.name_any(), namespace = acct.namespace().unwrap_or_default()))]
pub async fn reconcile(acct: Arc<WhatsAppAccount>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics
        .runs
        .get_or_create(&Metrics::kind("WhatsAppAccount"))
        .inc();
    let namespace = acct
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = acct.name_any();
    let client = &ctx.client;
    let owner = acct
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;

    let spec_problems = resources::spec_problems(&acct);
    let (credentials, _) = check_credentials(client, &namespace, &acct).await?;
    let inputs = AccountInputs {
        account: &acct,
        name: &name,
        namespace: &namespace,
        owner,
    };
    remove_legacy_gateway(ctx.as_ref(), &namespace, &name).await?;
    let phone_conflict = phone_number_conflict(ctx.as_ref(), &namespace, &name, &acct).await?;
    // A number another account uses: no Lease, so no pod serves this account.
    let lease: Option<Lease> = match phone_conflict {
        None => Some(apply(client, &namespace, "Lease", &resources::lease(&inputs)).await?),
        Some(_) => None,
    };
    let pool_name = &acct.spec.agent_pool_ref.name;
    let fleet = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get_opt(&labels::fleet_name(pool_name))
        .await
        .map_err(|source| Error::Get {
            kind: "Deployment",
            name: labels::fleet_name(pool_name),
            source,
        })?;

    let id = labels::qualified(&namespace, &name);
    let outbound = ctx.outbound_stats(&id).await;
    let fence_epoch = match &ctx.db {
        Some(db) => queue::fence::current(db, &id)
            .await
            .ok()
            .map(|(epoch, _)| epoch),
        None => None,
    };
    let web_session = match (&ctx.db, &acct.spec.provider.whatsapp_web) {
        (Some(db), Some(_)) => queue::web_session::get(db, &id).await.ok().flatten(),
        _ => None,
    };
    let previous = acct.status.clone();
    let deprecated = resources::deprecated_fields(&acct);
    let now = jiff::Timestamp::now();
    let mut next = status::compute(&Observed {
        generation: acct.metadata.generation,
        spec_problems: &spec_problems,
        credentials: &credentials,
        phone_conflict: phone_conflict.as_deref(),
        lease: lease.as_ref().and_then(|l| l.spec.as_ref()),
        ready_replicas: fleet
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        suspended: acct.spec.suspend,
        outbound: outbound.as_ref(),
        fence_epoch,
        provider: acct.spec.provider.kind(),
        web: acct
            .spec
            .provider
            .whatsapp_web
            .as_ref()
            .map(|w| status::WebObserved {
                method: w.pairing,
                session: web_session.as_ref(),
                service: labels::fleet_name(pool_name),
                path: format!("/pairing/{name}"),
            }),
        now,
        previous: previous.as_ref(),
    });
    status::set_deprecated(&mut next, &deprecated, acct.metadata.generation, now);
    let reference = acct.object_ref(&());
    // Who holds the Lease now is the related object of the ownership Events.
    let holder_pod = next
        .owner
        .as_ref()
        .map(|pod| k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.clone()),
            namespace: Some(namespace.clone()),
            ..Default::default()
        });
    let (ownership, other): (Vec<_>, Vec<_>) = status::transitions(previous.as_ref(), &next)
        .into_iter()
        .partition(|e| matches!(e.1, "LeaseAcquired" | "OwnerChanged"));
    ctx.publish_events(&reference, holder_pod.as_ref(), "Reconcile", ownership)
        .await;
    ctx.publish_events(&reference, None, "Reconcile", other)
        .await;
    if previous.as_ref() != Some(&next) {
        let api: Api<WhatsAppAccount> = Api::namespaced(client.clone(), &namespace);
        patch_status(&api, &name, previous.as_ref(), &next).await?;
    }
    // A bad spec waits for a change; otherwise look at the Lease again soon so the status owner
    // stays current (a missing Secret is watched, so it needs no timer either way).
    Ok(ctx.reconciled(
        "WhatsAppAccount",
        started,
        spec_problems.is_empty(),
        ctx.settings.account_resync_seconds,
    ))
}

pub fn error_policy(acct: Arc<WhatsAppAccount>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.reconcile_failed("WhatsAppAccount", &acct.name_any(), error)
}

/// Another WhatsAppAccount in use with this account's phone number. A database row whose
/// resource is gone (deleted while no account claimed its number since) is released on the way,
/// keeping its history, so a re-created number (same or another name or namespace) works.
async fn phone_number_conflict(
    ctx: &Context,
    namespace: &str,
    name: &str,
    acct: &WhatsAppAccount,
) -> Result<Option<String>> {
    let (Some(db), Some(phone)) = (&ctx.db, acct.spec.phone_key()) else {
        return Ok(None);
    };
    let me = labels::qualified(namespace, name);
    let users = match queue::fence::phone_number_users(db, &phone, &me).await {
        Ok(users) => users,
        Err(error) => {
            // The fleet cannot write the row either while the database is away.
            tracing::warn!(account = %me, error = %queue::rescuer::error_chain(&error), "could not check the phone number");
            return Ok(None);
        }
    };
    for other in users {
        let Some((other_ns, other_name)) = other.split_once('/') else {
            continue;
        };
        let found = Api::<WhatsAppAccount>::namespaced(ctx.client.clone(), other_ns)
            .get_opt(other_name)
            .await
            .map_err(|source| Error::Get {
                kind: "WhatsAppAccount",
                name: other.clone(),
                source,
            })?;
        let still_names_it = found
            .as_ref()
            .is_some_and(|o| o.spec.phone_key().as_deref() == Some(phone.as_str()));
        if still_names_it {
            return Ok(Some(other));
        }
        if found.is_none() {
            match queue::fence::release_account(db, &other).await {
                Ok(_) => {
                    tracing::info!(account = %other, phone_number_id = %phone, "released the phone number of a deleted WhatsAppAccount")
                }
                Err(error) => {
                    tracing::warn!(account = %other, error = %queue::rescuer::error_chain(&error), "could not release the phone number")
                }
            }
        }
    }
    Ok(None)
}

/// Delete the per-number gateway objects an operator before the fleets created for this
/// account (once per account per operator process; gone already is fine).
async fn remove_legacy_gateway(ctx: &Context, namespace: &str, name: &str) -> Result<()> {
    let key = labels::qualified(namespace, name);
    if ctx
        .legacy_removed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key)
    {
        return Ok(());
    }
    let client = &ctx.client;
    let gateway = labels::gateway_name(name);
    delete_if_exists::<Deployment>(client, namespace, "Deployment", &gateway).await?;
    delete_if_exists::<Service>(client, namespace, "Service", &gateway).await?;
    delete_if_exists::<RoleBinding>(client, namespace, "RoleBinding", &gateway).await?;
    delete_if_exists::<Role>(client, namespace, "Role", &gateway).await?;
    delete_if_exists::<ServiceAccount>(client, namespace, "ServiceAccount", &gateway).await?;
    delete_if_exists::<Secret>(
        client,
        namespace,
        "Secret",
        &labels::account_db_secret(name),
    )
    .await?;
    ctx.legacy_removed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    Ok(())
}

/// What of a Lease an account's status depends on, beyond time: its holder and transitions.
fn lease_holder(lease: &Lease) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let spec = lease.spec.as_ref()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec.holder_identity.hash(&mut h);
    spec.lease_transitions.hash(&mut h);
    Some(h.finish())
}

/// Run the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let accounts: Api<WhatsAppAccount> = Api::all(client.clone());
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=whatsapp-operator");
    let controller = Controller::new(accounts, watcher::Config::default().any_semantic());
    let store = controller.store();
    // The accounts-by-phase gauge, from what the controller sees.
    let phases = {
        let (store, ctx) = (controller.store(), ctx.clone());
        tokio::spawn(async move {
            loop {
                ctx.count_account_phases(&store.state());
                tokio::time::sleep(std::time::Duration::from_secs(15)).await;
            }
        })
    };
    // A Lease changes at every renewal (every retry period, per number); only a new holder or
    // a transition matters here. An expired holder is seen by the periodic reconcile.
    let leases = watcher(Api::<Lease>::all(client.clone()), managed)
        .default_backoff()
        .touched_objects()
        .predicate_filter(lease_holder, Default::default());
    controller
        .owns_stream(leases)
        .watches(
            Api::<Secret>::all(client),
            watcher::Config::default(),
            move |secret: Secret| {
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|a| {
                        a.namespace() == ns
                            && a.spec
                                .provider
                                .cloud_api
                                .as_ref()
                                .is_some_and(|c| c.credentials_secret_ref.name == name)
                    })
                    .map(|a| ObjectRef::from_obj(a.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(error) = res {
                tracing::debug!(%error, "account controller event");
            }
        })
        .await;
    phases.abort();
}
