//! `whatsapp-operator`: `run` (the controller, default) or `crds` (print the CRDs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lease::{Duty, Elector, Fence, Leadership, LeaseGauges, LeaseSettings};
use operator::context::{Context, Settings};
use operator::metrics::Metrics;
use service::secret::{ExposeSecret, SecretString};
use tokio_util_lite::Shutdown;

#[derive(Parser)]
#[command(
    name = "whatsapp-operator",
    version,
    about = "Kubernetes operator for WhatsApp agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controllers (the default).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (`kubectl apply -f -` ready).
    Crds {
        /// Write them into crds/manifests/ and charts/whatsapp-operator/crds/ under this directory
        /// instead of printing.
        #[arg(long)]
        write: Option<std::path::PathBuf>,
    },
}

#[derive(Parser, Debug, Clone)]
#[command(name = "whatsapp-operator")]
struct RunArgs {
    /// Postgres URL of the queue (scaling reads depth from it; handed to workers).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = service::secret::parse)]
    database_url: Option<SecretString>,
    /// Image of gateways and core workers.
    #[arg(
        long,
        env = "WORKER_IMAGE",
        default_value = "ghcr.io/kube-agents/whatsapp-operator:latest"
    )]
    worker_image: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    listen: String,
    /// This replica's name (its Lease holder identity).
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    identity: String,
    /// Namespace of the operator's own Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Run only while holding the Lease `whatsapp-operator-leader` (two replicas are safe).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Seconds between queue-depth checks of each AgentPool.
    #[arg(long, env = "POOL_RESYNC_SECONDS", default_value_t = 3)]
    pool_resync_seconds: u64,
    /// Seconds between Lease checks of each WhatsAppAccount.
    #[arg(long, env = "ACCOUNT_RESYNC_SECONDS", default_value_t = 10)]
    account_resync_seconds: u64,
}

fn default_identity() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("operator-{}", std::process::id()))
}

mod tokio_util_lite {
    /// A shutdown signal every controller can await.
    #[derive(Clone)]
    pub struct Shutdown(pub tokio::sync::watch::Receiver<bool>);
    impl Shutdown {
        pub async fn wait(mut self) {
            let _ = self.0.wait_for(|v| *v).await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service::telemetry::init();
    service::install_crypto_provider();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Crds { write: None }) => {
            print!("{}", crds::manifests::combined()?);
            Ok(())
        }
        Some(Cmd::Crds { write: Some(root) }) => {
            for dir in ["crds/manifests", "charts/whatsapp-operator/crds"] {
                let dir = root.join(dir);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (name, yaml) in crds::manifests::all()? {
                    std::fs::write(dir.join(name), yaml)
                        .with_context(|| format!("writing {name}"))?;
                }
            }
            Ok(())
        }
        Some(Cmd::Run(args)) => run(args).await,
        None => run(RunArgs::parse_from(["whatsapp-operator"])).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let db = match &args.database_url {
        // A database that does not answer yet is waited for (alive, not ready), not an exit.
        Some(url) => Some(
            service::startup::wait_for(&args.listen, "Postgres", || async {
                queue::connect(url.expose_secret(), 5)
                    .await
                    .map_err(|e| queue::rescuer::error_chain(&e))
            })
            .await,
        ),
        None => {
            tracing::warn!(
                "no DATABASE_URL: AgentPools will not autoscale and workers get no database"
            );
            None
        }
    };
    let (metrics, registry) = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let http = operator::http::router(operator::http::HttpState {
        registry: Arc::new(registry),
        ready: ready.clone(),
    });
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tokio::spawn(async move { axum::serve(listener, http).await });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = Shutdown(stop_rx);
    let leadership = Arc::new(Leadership::new(Duration::from_secs(10)));
    let elector = if args.leader_election {
        let elector = Arc::new(Elector::new(
            client.clone(),
            LeaseSettings {
                duty: Duty::Lead,
                name: "whatsapp-operator-leader".into(),
                namespace: args.namespace.clone(),
                identity: args.identity.clone(),
                duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            },
            Fence::None,
            leadership.clone(),
            LeaseGauges {
                held: metrics.leader.clone(),
                ..LeaseGauges::default()
            },
        ));
        let e = elector.clone();
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move { e.run(c).await });
        let mut changes = leadership.subscribe();
        tracing::info!(identity = %args.identity, "waiting to lead");
        while leadership.may_act().is_none() {
            tokio::select! {
                _ = changes.changed() => {}
                _ = service::shutdown_signal() => return Ok(()),
            }
        }
        tracing::info!(identity = %args.identity, "leading: starting controllers");
        Some((elector, cancel))
    } else {
        None
    };
    ready.store(true, Ordering::SeqCst);
    let settings = Settings {
        worker_image: args.worker_image.clone(),
        database_url: args
            .database_url
            .clone()
            .unwrap_or_else(|| SecretString::from("")),
        pool_resync_seconds: args.pool_resync_seconds,
        account_resync_seconds: args.account_resync_seconds,
    };
    let ctx = Arc::new(Context::new(client, db, settings, metrics, &args.identity));
    let accounts = tokio::spawn(operator::account::run(ctx.clone(), shutdown.clone().wait()));
    let pools = tokio::spawn(operator::pool::run(ctx, shutdown.clone().wait()));
    let mut changes = leadership.subscribe();
    let lost = async {
        if args.leader_election {
            let _ = changes.wait_for(|e| e.is_none()).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let exit_code = tokio::select! {
        _ = service::shutdown_signal() => 0,
        _ = lost => {
            tracing::error!("lost leadership; exiting so a fresh process can stand by");
            1
        }
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        let _ = accounts.await;
        let _ = pools.await;
    })
    .await;
    if let Some((elector, cancel)) = elector {
        cancel.cancel();
        elector.release().await;
    }
    if exit_code != 0 {
        std::process::exit(exit_code);
    }
    Ok(())
}
