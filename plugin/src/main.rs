//! `kubectl-whatsapp`: kubectl finds it on PATH and runs it as `kubectl whatsapp ...`.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kubectl_whatsapp::admin::PoolAdmin;
use kubectl_whatsapp::{Format, Pairing, Scope};

#[derive(Parser)]
#[command(
    name = "kubectl-whatsapp",
    version,
    about = "The WhatsApp operator from kubectl: status, pairing, dead jobs, handoffs, Lease handover"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Every namespace (status only).
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accounts (Lease holder, outbound counts, conditions) and pools (queue, handoffs).
    Status {
        /// One account, and the pool that answers it.
        account: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Dead jobs of a pool: list them, replay one, or replay them all (after fixing the cause).
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// Conversations handed off to a human and still open.
    Handoffs {
        /// The pool (default: the namespace's only AgentPool).
        #[arg(long)]
        pool: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Hand a conversation back to the agent (it answers what the customer wrote since).
    Resume {
        conversation: i64,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Ask an account's Lease holder to hand over to a standby (planned maintenance), and show
    /// who took over and how fast.
    Release {
        account: String,
        /// Give up waiting for a new holder after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show a WhatsApp Web account's QR code and pair code until it is linked.
    Pair {
        account: String,
        /// Print once and exit, instead of refreshing.
        #[arg(long)]
        once: bool,
        #[arg(long, default_value_t = 3)]
        refresh_seconds: u64,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// Dead jobs, newest first, with their last error.
    Dead {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Replay one dead job (a new job, in its conversation's order).
    Replay {
        id: i64,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Replay every dead job of the pool, oldest first.
    ReplayAll {
        #[arg(long)]
        pool: Option<String>,
    },
}

/// Who runs the command, for the workers' audit trail: the kubeconfig user of the context.
fn actor() -> String {
    kube::config::Kubeconfig::read()
        .ok()
        .and_then(|k| {
            let current = k.current_context.clone()?;
            k.contexts
                .iter()
                .find(|c| c.name == current)
                .and_then(|c| c.context.as_ref())
                .and_then(|c| c.user.clone())
        })
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "unknown".into()))
}

async fn pool_admin(
    client: &kube::Client,
    namespace: &str,
    pool: Option<String>,
) -> anyhow::Result<PoolAdmin> {
    let pool = match pool {
        Some(p) => p,
        None => kubectl_whatsapp::admin::only_pool(client, namespace).await?,
    };
    Ok(PoolAdmin::connect(client, namespace, &pool, &actor()).await?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    service::install_crypto_provider();
    let config = kube::Config::infer()
        .await
        .context("loading the kubeconfig (KUBECONFIG or ~/.kube/config)")?;
    let client = kubectl_whatsapp::client(config)?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match cli.cmd {
        Cmd::Status { account, output } => {
            let scope = if cli.all_namespaces {
                Scope::All
            } else {
                Scope::Namespace(namespace)
            };
            let report = kubectl_whatsapp::status(&client, &scope, account.as_deref()).await?;
            print!("{}", kubectl_whatsapp::render(&report, output)?);
        }
        Cmd::Jobs { cmd } => match cmd {
            JobsCmd::Dead {
                pool,
                limit,
                output,
            } => {
                let admin = pool_admin(&client, &namespace, pool).await?;
                let jobs = admin.dead_jobs(limit).await?;
                print!(
                    "{}",
                    kubectl_whatsapp::admin::render_dead(&admin.pool, &jobs, output)?
                );
            }
            JobsCmd::Replay { id, pool } => {
                let admin = pool_admin(&client, &namespace, pool).await?;
                let new = admin.replay(id).await?;
                println!("job {id} replayed as job {new}");
            }
            JobsCmd::ReplayAll { pool } => {
                let admin = pool_admin(&client, &namespace, pool).await?;
                let n = admin.replay_all().await?;
                println!("replayed {n} dead jobs of pool {}", admin.pool);
            }
        },
        Cmd::Handoffs { pool, output } => {
            let admin = pool_admin(&client, &namespace, pool).await?;
            let handoffs = admin.handoffs().await?;
            print!(
                "{}",
                kubectl_whatsapp::admin::render_handoffs(&admin.pool, &handoffs, output)?
            );
        }
        Cmd::Resume { conversation, pool } => {
            let admin = pool_admin(&client, &namespace, pool).await?;
            let pending = admin.resume(conversation).await?;
            println!(
                "conversation {conversation}: the agent answers again{}",
                if pending {
                    " (it is answering the messages sent since the last human reply)"
                } else {
                    ""
                }
            );
        }
        Cmd::Release {
            account,
            timeout_seconds,
            output,
        } => {
            let h = kubectl_whatsapp::release::release(
                &client,
                &namespace,
                &account,
                Duration::from_secs(timeout_seconds.max(1)),
            )
            .await?;
            match output {
                Format::Table => print!("{}", kubectl_whatsapp::release::render(&h)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&h)?),
                Format::Yaml => print!("{}", serde_saphyr::to_string(&h)?),
            }
        }
        Cmd::Pair {
            account,
            once,
            refresh_seconds,
        } => loop {
            let p = kubectl_whatsapp::pairing(&client, &namespace, &account).await?;
            if !once {
                // Redraw in place: a new QR code replaces the old one every ~20 s.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", kubectl_whatsapp::render_pairing(&account, &p));
            if once || matches!(p, Pairing::Paired { .. }) {
                break;
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(Duration::from_secs(refresh_seconds.max(1))) => {}
            }
        },
    }
    Ok(())
}
