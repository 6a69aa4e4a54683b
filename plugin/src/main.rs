//! `kubectl-whatsapp`: kubectl finds it on PATH and runs it as `kubectl whatsapp ...`.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kubectl_whatsapp::{Format, Pairing, Scope};

#[derive(Parser)]
#[command(
    name = "kubectl-whatsapp",
    version,
    about = "The WhatsApp operator from kubectl: status of accounts and pools, pairing"
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    service::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .context("loading the kubeconfig (KUBECONFIG or ~/.kube/config)")?;
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
