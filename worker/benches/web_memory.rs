//! Memory per connected WhatsApp Web account in one gateway process.
//!
//! `cargo bench -p worker --bench web_memory -- --accounts 50`
//!
//! N web gateways (each: Lease elector, session owner, whatsapp-rust client on the Postgres
//! store, HTTP server) run in this process against the WhatsApp Web stand-in, which runs in a
//! child process so that its memory is not counted. Every account is paired through its QR
//! code and logged in; the resident set size (VmRSS) is read before any gateway starts, once
//! all are connected, and again after they have idled. Postgres is a throwaway cluster (its
//! own processes, not counted).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Child mode: the stand-in. Prints its URL, then links every QR payload read from stdin.
async fn stand_in() -> anyhow::Result<()> {
    let server = fakes::whatsapp_web::WebServer::start(common::WEB_PHONE).await?;
    println!("{}", server.url());
    let stdin = BufReader::new(std::io::stdin());
    for line in stdin.lines() {
        let qr = line?;
        match server.link(&qr) {
            Ok(jid) => println!("linked {jid}"),
            Err(error) => println!("error {error:#}"),
        }
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn connected(env: &common::Env, account: &str) -> bool {
    queue::web_session::get(&env.db.pool, account)
        .await
        .ok()
        .flatten()
        .is_some_and(|s| s.state == "connected")
}

async fn bench(accounts: usize, idle: Duration) -> anyhow::Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--stand-in")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the stand-in process")?;
    let mut to_child = child.stdin.take().context("stand-in stdin")?;
    let mut from_child = BufReader::new(child.stdout.take().context("stand-in stdout")?).lines();
    let url = from_child.next().context("stand-in URL")??;

    // Every gateway holds a LISTEN connection; in production each has its own pod and pool.
    let env = common::Env::with_pool_size(10 + 3 * accounts as u32).await;
    let base = common::rss_kib("self");
    let started = Instant::now();
    let mut gateways = Vec::new();
    for i in 0..accounts {
        gateways.push(
            common::web_gateway_for(
                &env,
                &format!("bench/line-{i}"),
                &format!("+55119{i:08}"),
                &format!("whatsapp-line-{i}"),
                &format!("web-{i}"),
                &url,
                worker::web::owner::Pairing::QrCode,
            )
            .await,
        );
    }
    // Link each number as its QR code shows up.
    let mut linked = vec![false; accounts];
    let deadline = Instant::now() + Duration::from_secs(60 + accounts as u64);
    while linked.iter().any(|l| !l) {
        if Instant::now() > deadline {
            bail!("not every account showed a QR code in time");
        }
        for (i, done) in linked.iter_mut().enumerate() {
            if *done {
                continue;
            }
            let row = queue::web_session::get(&env.db.pool, &format!("bench/line-{i}")).await?;
            if let Some(qr) = row.and_then(|r| r.qr_code) {
                writeln!(to_child, "{qr}")?;
                let answer = from_child.next().context("stand-in answer")??;
                if !answer.starts_with("linked ") {
                    bail!("stand-in could not link line-{i}: {answer}");
                }
                *done = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Connected: logged in, first app-state sync done (the client waits ~10 s for a key share).
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..accounts {
        while !connected(&env, &format!("bench/line-{i}")).await {
            if Instant::now() > deadline {
                bail!("line-{i} did not connect in time");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let up = started.elapsed();
    let at_connect = common::rss_kib("self");
    tokio::time::sleep(idle).await;
    let idle_rss = common::rss_kib("self");

    let per = |now: u64| mib(now.saturating_sub(base)) / accounts as f64;
    println!(
        "web_memory: {accounts} WhatsApp Web accounts paired and connected in one process in {:.1} s",
        up.as_secs_f64()
    );
    println!(
        "  baseline (runtime, Postgres pool, fakes):  {:8.1} MiB",
        mib(base)
    );
    println!(
        "  all connected:                             {:8.1} MiB  ({:.2} MiB per account)",
        mib(at_connect),
        per(at_connect)
    );
    println!(
        "  after {:>3} s idle:                         {:8.1} MiB  ({:.2} MiB per account)",
        idle.as_secs(),
        mib(idle_rss),
        per(idle_rss)
    );
    for g in gateways {
        g.shutdown().await;
    }
    drop(to_child);
    let _ = child.wait();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.iter().any(|a| a == "--stand-in") {
        return runtime.block_on(stand_in());
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let accounts = value("--accounts").unwrap_or(20) as usize;
    let idle = Duration::from_secs(value("--idle-seconds").unwrap_or(30));
    runtime.block_on(bench(accounts, idle))
}
