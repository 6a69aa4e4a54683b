//! `whatsapp-worker`: `gateway`, `core`, `all` or `sandbox`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crds::AgentPoolSpec;
use service::secret::{ExposeSecret, SecretString};
use worker::config::{
    AccountArgs, Common, FleetArgs, IngressArgs, LeaseArgs, PoolArgs, WebAccountArgs,
};
use worker::gateway::lease::LeaseSettings;
use worker::gateway::{self, GatewaySettings};
use worker::metrics::Metrics;

#[derive(Parser)]
#[command(
    name = "whatsapp-worker",
    version,
    about = "WhatsApp agent worker: gateway (webhooks + lease-gated sends) and core (agent turns)"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve one WhatsApp account: accept webhooks; send while holding the account's Lease.
    Gateway {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        account: AccountArgs,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Serve one WhatsApp Web account: hold its one socket while holding the account's Lease.
    WebGateway {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        account: WebAccountArgs,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// One pod of an AgentPool's gateway fleet: webhooks for every Cloud API number of the
    /// namespace; sends and WhatsApp Web sockets for the pool's numbers whose Leases it holds.
    Fleet {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// The namespace's webhook ingress: one URL for every Cloud API number of the namespace
    /// (verified, routed by phone number id, stored); it never sends and holds no Lease.
    Ingress {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        ingress: IngressArgs,
    },
    /// Run agent turns for one AgentPool.
    Core {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        pool: PoolArgs,
    },
    /// Gateway and core in one process (local runs; the Lease still comes from a Kubernetes API).
    All {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        account: AccountArgs,
        #[command(flatten)]
        lease: LeaseArgs,
        #[command(flatten)]
        pool: PoolArgs,
    },
    /// Inspect and replay dead jobs.
    Jobs {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = service::secret::parse)]
        database_url: SecretString,
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// Everything on this machine with the fakes: open the printed URL and chat (built with
    /// `--features sandbox`).
    #[cfg(feature = "sandbox")]
    Sandbox {
        #[command(flatten)]
        args: worker::sandbox::SandboxArgs,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// List dead jobs of a pool, newest first.
    Dead {
        #[arg(long)]
        pool: String,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Replay one dead job (a new job with the same payload, in the conversation's order).
    Replay { id: i64 },
    /// Replay every dead job of a pool (after fixing the cause).
    ReplayAll {
        #[arg(long)]
        pool: String,
    },
}

/// Postgres for a long-running role. A database that does not answer yet (its Service name does
/// not resolve, it is recovering) is waited for, alive and not ready, instead of exiting.
async fn database(common: &Common) -> sqlx::PgPool {
    let url = common.database_url.expose_secret().to_string();
    let max = common.db_max_connections;
    service::startup::wait_for(&common.listen, "Postgres", || async {
        queue::connect(&url, max)
            .await
            .map_err(|e| queue::rescuer::error_chain(&e))
    })
    .await
}

async fn jobs_command(url: &str, cmd: JobsCmd) -> anyhow::Result<()> {
    let db = queue::connect(url, 2).await?;
    match cmd {
        JobsCmd::Dead { pool, limit } => {
            for j in queue::jobs::list_dead(&db, &pool, limit).await? {
                println!(
                    "{}\t{}\t{}\tattempts={}\t{}\t{}",
                    j.id,
                    j.kind,
                    j.concurrency_key.unwrap_or_default(),
                    j.attempts,
                    j.finished_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    j.last_error.unwrap_or_default()
                );
            }
        }
        JobsCmd::Replay { id } => {
            let mut tx = db.begin().await?;
            match queue::jobs::replay_dead(&mut tx, None, id).await? {
                Some(new) => println!("job {id} replayed as {new}"),
                None => println!("job {id} is not dead (or was replayed already)"),
            }
            tx.commit().await?;
        }
        JobsCmd::ReplayAll { pool } => {
            let n = queue::jobs::replay_all_dead(&db, &pool).await?;
            println!("replayed {n} dead jobs of {pool}");
        }
    }
    Ok(())
}

/// The AgentPool spec the operator mounted (defaults without one).
fn pool_spec(pool: &PoolArgs) -> anyhow::Result<AgentPoolSpec> {
    {
        let Some(path) = &pool.pool_spec_file else {
            return Ok(serde_json::from_value(serde_json::json!({}))?);
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        serde_json::from_str::<AgentPoolSpec>(&text)
            .map_err(anyhow::Error::from)
            .or_else(|_| crds::manifests::from_yaml(&text).map_err(anyhow::Error::from))
            .with_context(|| format!("parsing the AgentPool spec in {path}"))
    }
}

fn lease_settings(
    account: &str,
    lease: &LeaseArgs,
    identity: &str,
    duty: lease::Duty,
) -> LeaseSettings {
    let name = account.rsplit('/').next().unwrap_or(account);
    LeaseSettings {
        duty,
        name: lease
            .lease_name
            .clone()
            .unwrap_or_else(|| crds::lease_name(name)),
        namespace: lease.lease_namespace.clone(),
        identity: identity.to_string(),
        duration: Duration::from_secs(lease.lease_duration_seconds),
        renew_deadline: Duration::from_secs(lease.renew_deadline_seconds),
        retry_period: Duration::from_secs(lease.retry_period_seconds),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service::telemetry::init();
    worker::install_crypto_provider();
    let cli = Cli::parse();
    match cli.role {
        Role::Jobs { database_url, cmd } => jobs_command(database_url.expose_secret(), cmd).await?,
        #[cfg(feature = "sandbox")]
        Role::Sandbox { args } => {
            let addr = args.addr.clone();
            let sandbox = worker::sandbox::Sandbox::start(args).await?;
            println!(
                "WhatsApp sandbox ready: open http://{addr} and type as a customer (Ctrl-C to stop)"
            );
            println!(
                "Team inbox: open {}/inbox and log in as Alice with the token {} (type \"human\" as the customer to hand off)",
                sandbox.inbox.url(),
                sandbox.team_token
            );
            worker::shutdown_signal().await;
            sandbox.shutdown().await;
        }
        Role::Gateway {
            common,
            account,
            lease,
        } => {
            let db = database(&common).await;
            let (metrics, registry) = Metrics::new();
            let gw = start_gateway(
                db,
                common,
                account,
                lease,
                metrics,
                registry,
                axum::Router::new(),
            )
            .await?;
            tracing::info!(addr = %gw.addr, "gateway serving");
            worker::shutdown_signal().await;
            gw.shutdown().await;
        }
        Role::WebGateway {
            common,
            account,
            lease,
        } => {
            let db = database(&common).await;
            let (metrics, registry) = Metrics::new();
            let kube = kube::Client::try_default()
                .await
                .context("a web gateway needs the Kubernetes API for its Lease")?;
            let lease_settings =
                lease_settings(&account.id, &lease, &common.identity, lease::Duty::Connect);
            let gw = worker::web::gateway::start(
                db,
                kube,
                worker::web::gateway::WebGatewaySettings {
                    web: account.web_settings(&common.identity),
                    routing: account.routing.clone(),
                    lease: lease_settings,
                    listen: common.listen.clone(),
                },
                metrics,
                Arc::new(registry),
            )
            .await?;
            tracing::info!(addr = %gw.addr, "web gateway serving");
            worker::shutdown_signal().await;
            gw.shutdown().await;
        }
        Role::Fleet { common, fleet } => {
            let (namespace, pool) = fleet.split();
            let mut settings = worker::fleet::FleetSettings::new(
                pool,
                namespace,
                &common.identity,
                &common.listen,
            );
            settings.round = Duration::from_millis(fleet.round_millis.max(100));
            settings.member_ttl = Duration::from_secs(fleet.member_ttl_seconds.max(1));
            settings.secret_refresh = Duration::from_secs(fleet.secret_refresh_seconds.max(1));
            settings.drain = Duration::from_secs(fleet.drain_seconds);
            run_fleet(&common, settings).await?;
        }
        Role::Ingress { common, ingress } => {
            let mut settings = worker::fleet::FleetSettings::ingress(
                &ingress.namespace,
                &common.identity,
                &common.listen,
            );
            settings.secret_refresh = Duration::from_secs(ingress.secret_refresh_seconds.max(1));
            settings.drain = Duration::from_secs(ingress.drain_seconds);
            run_fleet(&common, settings).await?;
        }
        Role::Core { common, pool } => {
            let db = database(&common).await;
            let (metrics, registry) = Metrics::new();
            let core = start_core(&db, &common, &pool, metrics.clone()).await?;
            let probes = worker::http::router(worker::http::Probes {
                pool: db.clone(),
                registry: Arc::new(registry),
                draining: Default::default(),
            })
            .merge(inbox_router(db.clone(), &pool, metrics)?)
            .merge(worker::core::admin::router(
                worker::core::admin::AdminState::new(
                    db,
                    pool.queue.clone(),
                    pool.admin_token.as_ref(),
                ),
            ));
            let listener = tokio::net::TcpListener::bind(&common.listen).await?;
            let server = tokio::spawn(async move { axum::serve(listener, probes).await });
            worker::shutdown_signal().await;
            core.shutdown().await;
            server.abort();
        }
        Role::All {
            common,
            account,
            lease,
            pool,
        } => {
            let db = database(&common).await;
            let (metrics, registry) = Metrics::new();
            let core = start_core(&db, &common, &pool, metrics.clone()).await?;
            let routes = inbox_router(db.clone(), &pool, metrics.clone())?.merge(
                worker::core::admin::router(worker::core::admin::AdminState::new(
                    db.clone(),
                    pool.queue.clone(),
                    pool.admin_token.as_ref(),
                )),
            );
            let gw = start_gateway(db, common, account, lease, metrics, registry, routes).await?;
            worker::shutdown_signal().await;
            core.shutdown().await;
            gw.shutdown().await;
        }
    }
    Ok(())
}

/// A fleet pod or the namespace's ingress until SIGTERM: its probes' readiness fails first.
async fn run_fleet(common: &Common, settings: worker::fleet::FleetSettings) -> anyhow::Result<()> {
    let db = database(common).await;
    let (metrics, registry) = Metrics::new();
    let kube = kube::Client::try_default()
        .await
        .context("gateway fleets and the ingress learn their accounts from the Kubernetes API")?;
    let draining = worker::http::Draining::default();
    let probes = worker::http::router(worker::http::Probes {
        pool: db.clone(),
        registry: Arc::new(registry),
        draining: draining.clone(),
    });
    let ingress = settings.ingress_only;
    let running = worker::fleet::start(db, kube, settings, metrics, draining, probes).await?;
    tracing::info!(addr = %running.addr, ingress, "serving");
    worker::shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

/// A sending gateway on the cluster's Lease, with probes, metrics and `extra_routes` on its HTTP
/// server.
async fn start_gateway(
    db: sqlx::PgPool,
    common: Common,
    account: AccountArgs,
    lease: LeaseArgs,
    metrics: Metrics,
    registry: prometheus_client::registry::Registry,
    extra_routes: axum::Router,
) -> anyhow::Result<gateway::RunningGateway> {
    let kube = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let probes = worker::http::router(worker::http::Probes {
        pool: db.clone(),
        registry: Arc::new(registry),
        draining: Default::default(),
    })
    .merge(extra_routes);
    let lease = lease_settings(&account.id, &lease, &common.identity, lease::Duty::Send);
    let settings = GatewaySettings {
        account,
        lease,
        listen: common.listen,
        ingress_only: false,
    };
    gateway::start(db, Some(kube), settings, metrics, probes).await
}

/// The team inbox of the pool's core worker.
fn inbox_router(
    db: sqlx::PgPool,
    pool: &PoolArgs,
    metrics: Metrics,
) -> anyhow::Result<axum::Router> {
    use worker::core::inbox::{self, auth::SharedTokens, events::TeamEvents};
    let tokens = match &pool.team_tokens_dir {
        Some(dir) => SharedTokens::watch_dir(pool_spec(pool)?.team, dir.clone()),
        None => {
            tracing::info!(
                "team inbox: no tokens directory (AgentPool spec.inbox.tokensSecretRef); every team endpoint answers 401"
            );
            SharedTokens::default()
        }
    };
    Ok(inbox::router(inbox::InboxState {
        events: TeamEvents::start(db.clone()),
        db,
        pool: pool.queue.clone(),
        tokens,
        metrics,
    }))
}

async fn start_core(
    db: &sqlx::PgPool,
    common: &Common,
    pool: &PoolArgs,
    metrics: Metrics,
) -> anyhow::Result<worker::core::RunningCore> {
    worker::core::start(
        db.clone(),
        worker::core::CoreSettings {
            queue: pool.queue.clone(),
            spec: pool_spec(pool)?,
            api_key: pool.llm_api_key.clone(),
            processor_id: format!(
                "{}-{}",
                common.identity,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lock: Duration::from_secs(pool.job_lock_seconds.max(3)),
            poll_interval: Duration::from_secs(1),
        },
        metrics,
    )
    .await
}
