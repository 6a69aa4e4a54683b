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
    let now = jiff::Timestamp::now();

    let spec_problems = resources::spec_problems(&pool);
    let (registry, mut diagnostics) = tools::Registry::builtin();
    let (_, more) = registry.enable(&pool.spec.tools);
    diagnostics.extend(more);

    let current = current_replicas(client, &namespace, &name, &pool).await?;
    let stats = match &ctx.db {
        Some(db) => queue::stats::for_queue(db, &queue_name)
            .await
            .map_err(|e| e.to_string()),
        None => Err("the operator has no database configured".to_string()),
    };
    let scaling = scale(
        &ctx,
        &pool,
        &queue_name,
        current,
        spec_problems.is_empty(),
        &stats,
        now,
    );

    let spec_text = resources::spec_json(&pool);
    let inputs = PoolInputs {
        pool: &pool,
        name: &name,
        namespace: &namespace,
        owner,
        settings: &ctx.settings,
        replicas: scaling.desired,
        spec_hash: resources::spec_hash(&spec_text),
    };
    let deployment = apply_core(client, &namespace, &name, &inputs).await?;
    let gateways =
        reconcile_fleet(client, &namespace, &name, &inputs, spec_problems.is_empty()).await?;
    let inbox = check_inbox(client, &namespace, &pool).await?;
    let handoffs = match &ctx.db {
        Some(db) => queue::stats::handoffs_for_pool(db, &queue_name).await.ok(),
        None => None,
    };

    let previous = pool.status.clone();
    let observed = PoolObserved {
        name: &name,
        generation: pool.metadata.generation,
        now,
        spec_problems: &spec_problems,
        diagnostics: &diagnostics,
        scaling: &scaling,
        inbox: inbox.as_ref(),
        deployment: deployment.status.clone().unwrap_or_default(),
        stats: stats.as_ref().ok(),
        handoffs: handoffs.as_ref(),
        gateways: &gateways,
        previous: previous.as_ref(),
    };
    let next = compute_status(&observed);
    record_metrics(&ctx, &queue_name, scaling.desired, observed.stats);
    let reference = pool.object_ref(&());
    ctx.publish_events(&reference, None, "Scale", transitions(&observed, &next))
        .await;
    if previous.as_ref() != Some(&next) {
        let api: Api<AgentPool> = Api::namespaced(client.clone(), &namespace);
        patch_status(&api, &name, previous.as_ref(), &next).await?;
    }
    Ok(ctx.reconciled(
        "AgentPool",
        started,
        spec_problems.is_empty(),
        ctx.settings.pool_resync_seconds,
    ))
}

/// The core Deployment's replicas now (the pool's minimum before it exists).
async fn current_replicas(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    pool: &AgentPool,
) -> Result<i32> {
    let core_name = labels::core_name(name);
    let existing = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(&core_name)
        .await
        .map_err(|source| Error::Get {
            kind: "Deployment",
            name: core_name.clone(),
            source,
        })?;
    Ok(existing
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(pool.spec.min_replicas.max(0)))
}

/// How many core workers the pool should run, and why (the `ScalingActive` condition).
struct Scaling {
    desired: i32,
    message: String,
    /// False when the queue could not be read or the spec is invalid: replicas stay as they are.
    ok: bool,
}

/// The core workers wanted: from the queue's depth and age within the pool's bounds, with the
/// scale-down stabilization window's history; a fixed `spec.replicas`; or unchanged.
fn scale(
    ctx: &Context,
    pool: &AgentPool,
    queue_name: &str,
    current: i32,
    spec_ok: bool,
    stats: &std::result::Result<queue::stats::QueueStats, String>,
    now: jiff::Timestamp,
) -> Scaling {
    let spec = &pool.spec;
    if !spec_ok {
        return Scaling {
            desired: current,
            message: "spec is invalid; replicas left unchanged".to_string(),
            ok: false,
        };
    }
    if let Some(fixed) = spec.replicas {
        return Scaling {
            desired: fixed.clamp(
                spec.min_replicas.max(0),
                spec.max_replicas.max(spec.min_replicas),
            ),
            message: format!("spec.replicas is set ({fixed}): queue autoscaling is off"),
            ok: true,
        };
    }
    match stats {
        Ok(s) => {
            let mut all = ctx
                .recommendations
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let history = all.entry(queue_name.to_string()).or_default();
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
                    spec.scale_down_stabilization_seconds.max(0) as u64
                ),
                now,
                history,
            });
            history.push(d.recommendation);
            Scaling {
                desired: d.desired,
                message: format!(
                    "{} pending, oldest {:.0}s: {} replicas wanted",
                    s.pending, s.oldest_pending_seconds, d.recommendation.replicas
                ),
                ok: true,
            }
        }
        Err(e) => Scaling {
            desired: current,
            message: format!("queue depth unavailable ({e}); replicas left unchanged"),
            ok: false,
        },
    }
}

/// The core workers' objects: ServiceAccount, spec ConfigMap, database and admin Secrets, the
/// Deployment, and the inbox Service while the inbox is on. Returns the Deployment as applied.
async fn apply_core(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    inputs: &PoolInputs<'_>,
) -> Result<Deployment> {
    apply::<ServiceAccount>(
        client,
        namespace,
        "ServiceAccount",
        &resources::service_account(inputs),
    )
    .await?;
    apply::<ConfigMap>(
        client,
        namespace,
        "ConfigMap",
        &resources::config_map(inputs),
    )
    .await?;
    apply::<Secret>(client, namespace, "Secret", &resources::db_secret(inputs)).await?;
    ensure_admin_secret(client, namespace, inputs).await?;
    let deployment: Deployment = apply(
        client,
        namespace,
        "Deployment",
        &resources::deployment(inputs),
    )
    .await?;
    if inputs.pool.spec.inbox.as_ref().is_some_and(|b| b.enabled) {
        apply::<Service>(
            client,
            namespace,
            "Service",
            &resources::inbox_service(inputs),
        )
        .await?;
    } else {
        delete_if_exists::<Service>(client, namespace, "Service", &labels::inbox_service(name))
            .await?;
    }
    Ok(deployment)
}

/// Everything one reconcile observed, for the status and its Events.
struct PoolObserved<'a> {
    name: &'a str,
    generation: Option<i64>,
    now: jiff::Timestamp,
    spec_problems: &'a [String],
    diagnostics: &'a [tools::Diagnostic],
    scaling: &'a Scaling,
    inbox: Option<&'a (bool, &'static str, String)>,
    deployment: k8s_openapi::api::apps::v1::DeploymentStatus,
    stats: Option<&'a queue::stats::QueueStats>,
    handoffs: Option<&'a queue::stats::HandoffStats>,
    gateways: &'a FleetObserved,
    previous: Option<&'a AgentPoolStatus>,
}

impl PoolObserved<'_> {
    fn tools_message(&self) -> String {
        self.diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The pool's status as a function of what was observed.
fn compute_status(o: &PoolObserved) -> AgentPoolStatus {
    let mut conds = o.previous.map(|s| s.conditions.clone()).unwrap_or_default();
    if o.inbox.is_none() {
        conds.retain(|c| c.type_ != INBOX_READY);
    }
    let t = Time(o.now);
    let mut set = |ty: &str, ok: bool, reason: &str, msg: String| {
        conditions::set_condition(
            &mut conds,
            ty,
            if ok { STATUS_TRUE } else { STATUS_FALSE },
            reason,
            msg,
            o.generation,
            t.clone(),
        );
    };
    let spec_ok = o.spec_problems.is_empty();
    set(
        SPEC_VALID,
        spec_ok,
        if spec_ok { "Valid" } else { "InvalidSpec" },
        if spec_ok {
            "spec is valid".into()
        } else {
            o.spec_problems.join("; ")
        },
    );
    let tools_ok = o.diagnostics.is_empty();
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
            o.tools_message()
        },
    );
    set(
        SCALING_ACTIVE,
        o.scaling.ok,
        if o.scaling.ok {
            "QueueDepth"
        } else {
            "NoMetrics"
        },
        o.scaling.message.clone(),
    );
    if let Some((ok, reason, message)) = o.inbox {
        set(INBOX_READY, *ok, reason, message.clone());
    }
    let desired = o.scaling.desired;
    let ready = o.deployment.ready_replicas.unwrap_or(0);
    let is_ready = ready >= desired && spec_ok;
    set(
        READY,
        is_ready,
        if is_ready { "Ready" } else { "Progressing" },
        format!("{ready}/{desired} core workers ready"),
    );
    let scaled = o
        .previous
        .and_then(|s| s.desired_replicas)
        .is_some_and(|p| p != desired);
    AgentPoolStatus {
        replicas: o.deployment.replicas.unwrap_or(0),
        desired_replicas: Some(desired),
        ready_replicas: Some(ready),
        queue_depth: o.stats.map(|s| s.pending),
        running_jobs: o.stats.map(|s| s.running),
        dead_jobs: o.stats.map(|s| s.dead),
        oldest_pending_seconds: o.stats.map(|s| s.oldest_pending_seconds.round() as i64),
        open_handoffs: o.handoffs.map(|h| h.open),
        oldest_handoff_seconds: o.handoffs.map(|h| h.oldest_seconds.round() as i64),
        last_scale_time: if scaled {
            Some(Time(o.now))
        } else {
            o.previous.and_then(|s| s.last_scale_time.clone())
        },
        gateway_replicas: Some(o.gateways.replicas),
        gateway_ready_replicas: Some(o.gateways.ready),
        numbers: Some(o.gateways.numbers),
        selector: Some(labels::selector_string(&labels::core_selector(o.name))),
        observed_generation: o.generation,
        conditions: conds,
    }
}

/// The operator's gauges for the pool.
fn record_metrics(
    ctx: &Context,
    queue_name: &str,
    desired: i32,
    stats: Option<&queue::stats::QueueStats>,
) {
    let pool = Pool {
        pool: queue_name.to_string(),
    };
    ctx.metrics
        .desired_replicas
        .get_or_create(&pool)
        .set(i64::from(desired));
    if let Some(s) = stats {
        ctx.metrics.queue_depth.get_or_create(&pool).set(s.pending);
    }
}

/// Events for what changed: a scale, and tools or spec turning invalid.
fn transitions(o: &PoolObserved, next: &AgentPoolStatus) -> Vec<(bool, &'static str, String)> {
    let mut events = Vec::new();
    let desired = o.scaling.desired;
    if let Some(p) = o
        .previous
        .and_then(|s| s.desired_replicas)
        .filter(|p| *p != desired)
    {
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
        o.previous
            .and_then(|s| conditions::find(&s.conditions, ty))
            .map(|c| c.status.clone())
    };
    if !o.diagnostics.is_empty() && was(TOOLS_VALID).as_deref() != Some(STATUS_FALSE) {
        events.push((true, "ToolsRejected", o.tools_message()));
    }
    if !o.spec_problems.is_empty() && was(SPEC_VALID).as_deref() != Some(STATUS_FALSE) {
        events.push((true, "InvalidSpec", o.spec_problems.join("; ")));
    }
    events
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
