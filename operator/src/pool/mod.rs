//! The AgentPool controller: a core Deployment sized from the pool's queue.

pub mod fleet;
pub mod resources;
pub mod scaling;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::conditions::{
    self, INBOX_READY, READY, SCALING_ACTIVE, SPEC_VALID, STATUS_FALSE, STATUS_TRUE, TOOLS_VALID,
};
use crds::{AgentPool, AgentPoolStatus, WhatsAppAccount};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::apply::{apply, apply_as, delete_if_exists, patch_status};
use crate::context::Context;
use crate::metrics::{Metrics, Pool};
use crate::{Error, Result, labels};
use resources::PoolInputs;
use scaling::{ScaleInput, desired_replicas};

/// Recommendations older than this are dropped from memory.
const HISTORY_KEEP: Duration = Duration::from_secs(3600);

#[tracing::instrument(skip_all, fields(pool = %pool.name_any(), namespace = pool.namespace().unwrap_or_default()))]
pub async fn reconcile(pool: Arc<AgentPool>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics
        .runs
        .get_or_create(&Metrics::kind("AgentPool"))
        .inc();
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = pool.name_any();
    let queue_name = labels::qualified(&namespace, &name);
    let client = &ctx.client;
    let owner = pool
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let spec = &pool.spec;
    let now = jiff::Timestamp::now();

    let spec_problems = resources::spec_problems(&pool);
    let (registry, mut diagnostics) = tools::Registry::builtin();
    let (_, more) = registry.enable(&spec.tools);
    diagnostics.extend(more);

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let core_name = labels::core_name(&name);
    let existing = deployments
        .get_opt(&core_name)
        .await
        .map_err(|source| Error::Get {
            kind: "Deployment",
            name: core_name.clone(),
            source,
        })?;
    let current = existing
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(spec.min_replicas.max(0));

    let stats = match &ctx.db {
        Some(db) => queue::stats::for_queue(db, &queue_name)
            .await
            .map_err(|e| e.to_string()),
        None => Err("the operator has no database configured".to_string()),
    };
    let (desired, scaling_msg, scaling_ok) = if !spec_problems.is_empty() {
        (
            current,
            "spec is invalid; replicas left unchanged".to_string(),
            false,
        )
    } else if let Some(fixed) = spec.replicas {
        (
            fixed.clamp(
                spec.min_replicas.max(0),
                spec.max_replicas.max(spec.min_replicas),
            ),
            format!("spec.replicas is set ({fixed}): queue autoscaling is off"),
            true,
        )
    } else {
        match &stats {
            Ok(s) => {
                let mut all = ctx
                    .recommendations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let history = all.entry(queue_name.clone()).or_default();
                let keep_from = now
                    - jiff::SignedDuration::try_from(HISTORY_KEEP)
                        .unwrap_or(jiff::SignedDuration::ZERO);
                history.retain(|r| r.at >= keep_from);
                let d = desired_replicas(&ScaleInput {
                    pending: s.pending,
                    oldest_pending_seconds: s.oldest_pending_seconds,
                    current,
                    min: spec.min_replicas,
                    max: spec.max_replicas,
                    target_pending_per_replica: spec.target_pending_per_replica,
                    max_pending_age_seconds: spec.max_pending_age_seconds,
                    stabilization: Duration::from_secs(
                        spec.scale_down_stabilization_seconds.max(0) as u64,
                    ),
                    now,
                    history,
                });
                history.push(d.recommendation);
                (
                    d.desired,
                    format!(
                        "{} pending, oldest {:.0}s: {} replicas wanted",
                        s.pending, s.oldest_pending_seconds, d.recommendation.replicas
                    ),
                    true,
                )
            }
            Err(e) => (
                current,
                format!("queue depth unavailable ({e}); replicas left unchanged"),
                false,
            ),
        }
    };

    let spec_text = resources::spec_json(&pool);
    let inputs = PoolInputs {
        pool: &pool,
        name: &name,
        namespace: &namespace,
        owner,
        settings: &ctx.settings,
        replicas: desired,
        spec_hash: resources::spec_hash(&spec_text),
    };
    apply::<ServiceAccount>(
        client,
        &namespace,
        "ServiceAccount",
        &resources::service_account(&inputs),
    )
    .await?;
    apply::<ConfigMap>(
        client,
        &namespace,
        "ConfigMap",
        &resources::config_map(&inputs),
    )
    .await?;
    apply::<Secret>(client, &namespace, "Secret", &resources::db_secret(&inputs)).await?;
    ensure_admin_secret(client, &namespace, &inputs).await?;
    let deployment: Deployment = apply(
        client,
        &namespace,
        "Deployment",
        &resources::deployment(&inputs),
    )
    .await?;
    if spec.inbox.as_ref().is_some_and(|b| b.enabled) {
        apply::<Service>(
            client,
            &namespace,
            "Service",
            &resources::inbox_service(&inputs),
        )
        .await?;
    } else {
        delete_if_exists::<Service>(client, &namespace, "Service", &labels::inbox_service(&name))
            .await?;
    }
    let gateways =
        reconcile_fleet(client, &namespace, &name, &inputs, spec_problems.is_empty()).await?;
    let inbox = check_inbox(client, &namespace, &pool).await?;
    let handoffs = match &ctx.db {
        Some(db) => queue::stats::handoffs_for_pool(db, &queue_name).await.ok(),
        None => None,
    };

    let previous = pool.status.clone();
    let mut conds = previous
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if inbox.is_none() {
        conds.retain(|c| c.type_ != INBOX_READY);
    }
    let generation = pool.metadata.generation;
    let t = Time(now);
    let mut set = |ty: &str, ok: bool, reason: &str, msg: String| {
        conditions::set_condition(
            &mut conds,
            ty,
            if ok { STATUS_TRUE } else { STATUS_FALSE },
            reason,
            msg,
            generation,
            t.clone(),
        );
    };
    let spec_ok = spec_problems.is_empty();
    set(
        SPEC_VALID,
        spec_ok,
        if spec_ok { "Valid" } else { "InvalidSpec" },
        if spec_ok {
            "spec is valid".into()
        } else {
            spec_problems.join("; ")
        },
    );
    let tools_ok = diagnostics.is_empty();
    set(
        TOOLS_VALID,
        tools_ok,
        if tools_ok {
            "AllToolsValid"
        } else {
            "ToolsRejected"
        },
        if tools_ok {
            "every configured tool is valid".into()
        } else {
            diagnostics
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    set(
        SCALING_ACTIVE,
        scaling_ok,
        if scaling_ok {
            "QueueDepth"
        } else {
            "NoMetrics"
        },
        scaling_msg,
    );
    if let Some((ok, reason, message)) = &inbox {
        set(INBOX_READY, *ok, reason, message.clone());
    }
    let dstatus = deployment.status.clone().unwrap_or_default();
    let ready = dstatus.ready_replicas.unwrap_or(0);
    let is_ready = ready >= desired && spec_ok;
    set(
        READY,
        is_ready,
        if is_ready { "Ready" } else { "Progressing" },
        format!("{ready}/{desired} core workers ready"),
    );
    let previous_desired = previous.as_ref().and_then(|s| s.desired_replicas);
    let scaled = previous_desired.is_some_and(|p| p != desired);
    let stats_ok = stats.as_ref().ok();
    let next = AgentPoolStatus {
        replicas: dstatus.replicas.unwrap_or(0),
        desired_replicas: Some(desired),
        ready_replicas: Some(ready),
        queue_depth: stats_ok.map(|s| s.pending),
        running_jobs: stats_ok.map(|s| s.running),
        dead_jobs: stats_ok.map(|s| s.dead),
        oldest_pending_seconds: stats_ok.map(|s| s.oldest_pending_seconds.round() as i64),
        open_handoffs: handoffs.as_ref().map(|h| h.open),
        oldest_handoff_seconds: handoffs.as_ref().map(|h| h.oldest_seconds.round() as i64),
        last_scale_time: if scaled {
            Some(Time(now))
        } else {
            previous.as_ref().and_then(|s| s.last_scale_time.clone())
        },
        gateway_replicas: Some(gateways.replicas),
        gateway_ready_replicas: Some(gateways.ready),
        numbers: Some(gateways.numbers),
        selector: Some(labels::selector_string(&labels::core_selector(&name))),
        observed_generation: generation,
        conditions: conds,
    };
    ctx.metrics
        .desired_replicas
        .get_or_create(&Pool {
            pool: queue_name.clone(),
        })
        .set(i64::from(desired));
    if let Some(s) = stats_ok {
        ctx.metrics
            .queue_depth
            .get_or_create(&Pool {
                pool: queue_name.clone(),
            })
            .set(s.pending);
    }
    let mut events: Vec<(bool, &str, String)> = Vec::new();
    if let Some(p) = previous_desired.filter(|p| *p != desired) {
        events.push((
            false,
            if desired > p {
                "ScaledUp"
            } else {
                "ScaledDown"
            },
            format!(
                "core workers {p} -> {desired}: {}",
                conditions::find(&next.conditions, SCALING_ACTIVE)
                    .map(|c| c.message.clone())
                    .unwrap_or_default()
            ),
        ));
    }
    let was = |ty: &str| {
        previous
            .as_ref()
            .and_then(|s| conditions::find(&s.conditions, ty))
            .map(|c| c.status.clone())
    };
    if !tools_ok && was(TOOLS_VALID).as_deref() != Some(STATUS_FALSE) {
        events.push((
            true,
            "ToolsRejected",
            diagnostics
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    if !spec_ok && was(SPEC_VALID).as_deref() != Some(STATUS_FALSE) {
        events.push((true, "InvalidSpec", spec_problems.join("; ")));
    }
    let reference = pool.object_ref(&());
    ctx.publish_events(&reference, None, "Scale", events).await;
    if previous.as_ref() != Some(&next) {
        let api: Api<AgentPool> = Api::namespaced(client.clone(), &namespace);
        patch_status(&api, &name, previous.as_ref(), &next).await?;
    }
    Ok(ctx.reconciled(
        "AgentPool",
        started,
        spec_ok,
        ctx.settings.pool_resync_seconds,
    ))
}

/// What the pool's gateway fleet looks like after a reconcile.
struct FleetObserved {
    replicas: i32,
    ready: i32,
    numbers: i32,
}

/// The gateway fleet: its RBAC follows the namespace's accounts (by name), its size follows the
/// pool's numbers; and the namespace's webhook Service, co-owned by every pool.
async fn reconcile_fleet(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    inputs: &PoolInputs<'_>,
    spec_ok: bool,
) -> Result<FleetObserved> {
    let accounts = Api::<WhatsAppAccount>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .map_err(|source| Error::Get {
            kind: "WhatsAppAccount",
            name: format!("{namespace}/*"),
            source,
        })?
        .items;
    let mine: Vec<&WhatsAppAccount> = accounts
        .iter()
        .filter(|a| a.spec.agent_pool_ref.name == name)
        .collect();
    let numbers = mine.iter().filter(|a| !a.spec.suspend).count();
    let secret_names = |of: &[&WhatsAppAccount]| {
        let mut names: Vec<String> = of
            .iter()
            .filter_map(|a| a.spec.provider.cloud_api.as_ref())
            .map(|c| c.credentials_secret_ref.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let mut access = fleet::FleetAccess {
        leases: mine
            .iter()
            .map(|a| crds::lease_name(&a.name_any()))
            .collect(),
        secrets: secret_names(&mine),
    };
    access.leases.sort();
    let namespace_secrets = secret_names(&accounts.iter().collect::<Vec<_>>());
    let fleet_name = labels::fleet_name(name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let replicas = if spec_ok {
        inputs.pool.spec.gateways.replicas_for(numbers)
    } else {
        // Keep what runs: a spec mistake must not stop the numbers.
        deployments
            .get_opt(&fleet_name)
            .await
            .ok()
            .flatten()
            .and_then(|d| d.spec.and_then(|s| s.replicas))
            .unwrap_or(inputs.pool.spec.gateways.min_replicas)
    };
    apply::<ServiceAccount>(
        client,
        namespace,
        "ServiceAccount",
        &fleet::service_account(inputs),
    )
    .await?;
    apply::<Role>(client, namespace, "Role", &fleet::role(inputs, &access)).await?;
    apply::<RoleBinding>(
        client,
        namespace,
        "RoleBinding",
        &fleet::role_binding(inputs),
    )
    .await?;
    apply::<Service>(client, namespace, "Service", &fleet::service(inputs)).await?;
    // The namespace's webhook ingress, shared by its pools (each under its own field manager).
    let manager = format!("{}-pool-{name}", crate::MANAGER);
    apply_as::<ServiceAccount>(
        client,
        namespace,
        "ServiceAccount",
        &fleet::ingress_service_account(inputs),
        &manager,
    )
    .await?;
    apply_as::<Role>(
        client,
        namespace,
        "Role",
        &fleet::ingress_role(inputs, &namespace_secrets),
        &manager,
    )
    .await?;
    apply_as::<RoleBinding>(
        client,
        namespace,
        "RoleBinding",
        &fleet::ingress_role_binding(inputs),
        &manager,
    )
    .await?;
    apply_as::<Secret>(
        client,
        namespace,
        "Secret",
        &fleet::ingress_db_secret(inputs),
        &manager,
    )
    .await?;
    apply_as::<Deployment>(
        client,
        namespace,
        "Deployment",
        &fleet::ingress_deployment(inputs),
        &manager,
    )
    .await?;
    apply_as::<Service>(
        client,
        namespace,
        "Service",
        &fleet::webhook_service(inputs),
        &manager,
    )
    .await?;
    let deployment: Deployment = apply(
        client,
        namespace,
        "Deployment",
        &fleet::deployment(inputs, replicas),
    )
    .await?;
    Ok(FleetObserved {
        replicas,
        ready: deployment
            .status
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        numbers: numbers as i32,
    })
}

/// Whether every team member can log in to the inbox: `None` when the pool has no inbox,
/// else (ok, reason, message) for the `InboxReady` condition.
async fn check_inbox(
    client: &kube::Client,
    namespace: &str,
    pool: &AgentPool,
) -> Result<Option<(bool, &'static str, String)>> {
    let Some(inbox) = &pool.spec.inbox else {
        return Ok(None);
    };
    let service = if inbox.enabled {
        format!("Service {}", labels::inbox_service(&pool.name_any()))
    } else {
        "no Service (inbox.enabled is false)".to_string()
    };
    let Some(secret_ref) = &inbox.tokens_secret_ref else {
        return Ok(Some((
            false,
            "NoTokens",
            "inbox.tokensSecretRef is not set: nobody can log in".into(),
        )));
    };
    let Some(secret) = crate::secrets::get(client, namespace, &secret_ref.name).await? else {
        return Ok(Some((
            false,
            "TokensSecretMissing",
            format!(
                "Secret {} does not exist: nobody can log in",
                secret_ref.name
            ),
        )));
    };
    // The same test the core workers apply when they load the tokens.
    let usable = |key: &str| {
        crate::secrets::value(&secret, key).is_some_and(|v| {
            String::from_utf8_lossy(v).trim().chars().count()
                >= crds::agent_pool::INBOX_MIN_TOKEN_LEN
        })
    };
    let locked_out: Vec<String> = pool
        .spec
        .team
        .iter()
        .filter(|m| !usable(&m.effective_token_key()))
        .map(|m| format!("{} (key {})", m.id, m.effective_token_key()))
        .collect();
    Ok(Some(if locked_out.is_empty() {
        (
            true,
            "TokensValid",
            format!(
                "{} team members can log in; {service}",
                pool.spec.team.len()
            ),
        )
    } else {
        (
            false,
            "TokensMissing",
            format!(
                "no token of at least {} characters in Secret {} for: {}",
                crds::agent_pool::INBOX_MIN_TOKEN_LEN,
                secret_ref.name,
                locked_out.join(", ")
            ),
        )
    }))
}

pub fn error_policy(pool: Arc<AgentPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.reconcile_failed("AgentPool", &pool.name_any(), error)
}

pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=whatsapp-operator");
    let controller = Controller::new(
        Api::<AgentPool>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let pools = controller.store();
    controller
        .owns(Api::<Deployment>::all(client.clone()), managed.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), managed)
        // A number added, moved or removed changes the fleets' size and RBAC in its namespace.
        .watches(
            Api::<WhatsAppAccount>::all(client),
            watcher::Config::default(),
            move |account: WhatsAppAccount| {
                let ns = account.namespace();
                pools
                    .state()
                    .into_iter()
                    .filter(|p| p.namespace() == ns)
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(error) = res {
                tracing::debug!(%error, "pool controller event");
            }
        })
        .await;
}

/// Create the pool's admin token Secret when it does not exist; never overwrite it.
async fn ensure_admin_secret(
    client: &kube::Client,
    namespace: &str,
    inputs: &PoolInputs<'_>,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = labels::pool_admin_secret(inputs.name);
    let exists = secrets
        .get_opt(&name)
        .await
        .map_err(|source| Error::Get {
            kind: "Secret",
            name: name.clone(),
            source,
        })?
        .is_some();
    if exists {
        return Ok(());
    }
    let secret: Secret = serde_json::from_value(resources::admin_secret(
        inputs,
        &resources::new_admin_token(),
    ))
    .map_err(|e| Error::Serialize("admin Secret", e))?;
    match secrets.create(&Default::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %name, "created the pool's admin token");
            Ok(())
        }
        // Another reconcile (or a user) made it meanwhile: keep theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply {
            kind: "Secret",
            name,
            source,
        }),
    }
}
