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
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::apply::{apply, patch_status};
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
    let (credentials, credentials_version) = check_credentials(client, &namespace, &acct).await?;
    let usable = spec_problems.is_empty() && credentials.usable();
    let replicas = if acct.spec.suspend || !usable {
        0
    } else {
        acct.spec.replicas.max(0)
    };
    let inputs = AccountInputs {
        account: &acct,
        name: &name,
        namespace: &namespace,
        owner,
        settings: &ctx.settings,
        replicas,
        credentials_version,
    };
    apply::<ServiceAccount>(
        client,
        &namespace,
        "ServiceAccount",
        &resources::service_account(&inputs),
    )
    .await?;
    apply::<Role>(client, &namespace, "Role", &resources::role(&inputs)).await?;
    apply::<RoleBinding>(
        client,
        &namespace,
        "RoleBinding",
        &resources::role_binding(&inputs),
    )
    .await?;
    apply::<Secret>(client, &namespace, "Secret", &resources::db_secret(&inputs)).await?;
    apply::<Service>(client, &namespace, "Service", &resources::service(&inputs)).await?;
    let lease: Lease = apply(client, &namespace, "Lease", &resources::lease(&inputs)).await?;
    let deployment: Deployment = apply(
        client,
        &namespace,
        "Deployment",
        &resources::deployment(&inputs),
    )
    .await?;

    let id = labels::qualified(&namespace, &name);
    let outbound = match &ctx.db {
        Some(db) => queue::stats::outbound_by_account(db)
            .await
            .ok()
            .and_then(|all| all.into_iter().find(|s| s.account_id == id)),
        None => None,
    };
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
    let next = status::compute(&Observed {
        generation: acct.metadata.generation,
        spec_problems: &spec_problems,
        credentials: &credentials,
        lease: lease.spec.as_ref(),
        ready_replicas: deployment
            .status
            .as_ref()
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
                service: labels::gateway_name(&name),
            }),
        now: jiff::Timestamp::now(),
        previous: previous.as_ref(),
    });
    let reference = acct.object_ref(&());
    ctx.publish_events(
        &reference,
        "Reconcile",
        status::transitions(previous.as_ref(), &next),
    )
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
    controller
        .owns(Api::<Deployment>::all(client.clone()), managed.clone())
        .owns(Api::<Service>::all(client.clone()), managed.clone())
        .owns(Api::<ServiceAccount>::all(client.clone()), managed.clone())
        .owns(Api::<Role>::all(client.clone()), managed.clone())
        .owns(Api::<RoleBinding>::all(client.clone()), managed.clone())
        .owns(Api::<Lease>::all(client.clone()), managed)
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
}
