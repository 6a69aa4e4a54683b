//! WhatsApp Web messages end to end through one number, and the takeover after a SIGKILL.
//!
//! `cargo bench -p worker --bench web_messages -- --contacts 10 --rounds 20`
//!
//! Two `whatsapp-worker web-gateway` processes (holder and standby) serve the number against
//! the WhatsApp Web stand-in; a core worker (rules agent) runs in this process; N contacts are
//! whatsapp-rust clients on the library's in-memory store. Each contact, concurrently with the
//! others, writes and waits for the reply, `rounds` times: the contact encrypts, the gateway
//! decrypts with its Postgres Signal state and stores the message, the agent answers, the
//! gateway encrypts, the contact decrypts. Pacing is lifted (the product's default is 20
//! messages a minute per number, on purpose) so the figure is what the pipeline can do.
//! Then the holder is SIGKILLed, a contact writes at once, and the time until it has decrypted
//! the new holder's reply is measured. Everything shares the machine's cores with Postgres.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fakes::whatsapp_web::WebServer;
use fakes::whatsapp_web::contact::Contact;

const QUESTION: &str = "what are your opening hours?";
const WAIT: Duration = Duration::from_secs(120);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn bench(contacts: usize, rounds: usize) -> anyhow::Result<()> {
    let env = common::Env::new().await;
    let server = WebServer::start(common::WEB_PHONE).await?;
    let mut gateways = common::HolderAndStandby::start_with(
        &env,
        &server,
        &[
            ("WA_WEB_MESSAGES_PER_MINUTE", "600000"),
            ("WA_WEB_PER_RECIPIENT_PER_MINUTE", "600000"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    let _core = common::core(&env, serde_json::json!({})).await;
    let linking = Instant::now();
    let people = futures::future::try_join_all((0..contacts).map(|i| {
        let server = &server;
        async move { Contact::link(server, &format!("5511988{i:06}")).await }
    }))
    .await?;
    println!(
        "WhatsApp Web end to end: {contacts} contacts linked in {:.1} s (the client waits up to 10 s for the phone's app-state key)",
        linking.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let per_contact = futures::future::try_join_all(people.iter().map(|c| async move {
        let mut latencies = Vec::with_capacity(rounds);
        for round in 1..=rounds {
            let t = Instant::now();
            c.send_text(common::WEB_PHONE, QUESTION).await?;
            c.wait_messages(round, WAIT).await?;
            latencies.push(t.elapsed());
        }
        anyhow::Ok(latencies)
    }))
    .await?;
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = per_contact.into_iter().flatten().collect();
    latencies.sort();
    let total = latencies.len();
    println!(
        "  {total} messages answered in {:.2} s: {:.1} messages/s (each: contact encrypts, gateway decrypts and stores, agent turn, gateway encrypts, contact decrypts)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  round trip: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.95).as_secs_f64() * 1e3,
        percentile(&latencies, 1.0).as_secs_f64() * 1e3
    );

    // Takeover: SIGKILL the holder; a contact writes at once; its reply comes from web-b.
    let first = people.first().context("at least one contact")?;
    let before = first.messages().len();
    let killed = Instant::now();
    gateways.kill_holder(&server, contacts).await;
    first.send_text(common::WEB_PHONE, QUESTION).await?;
    first.wait_messages(before + 1, WAIT).await?;
    let takeover = killed.elapsed();
    println!(
        "  SIGKILL of the holder -> first decrypted reply from the new holder: {:.2} s (Lease 4 s, renew deadline 3 s, retry 1 s)",
        takeover.as_secs_f64()
    );

    // What must hold for the figures to mean anything.
    let undecryptable: usize = people.iter().map(|c| c.undecryptable().len()).sum();
    let retries = server
        .receipts()
        .iter()
        .filter(|r| r.kind == "retry")
        .count();
    let new_sessions = server
        .relayed()
        .iter()
        .filter(|r| {
            // The contacts' own devices (their phones never answer, so every message to one
            // stays a pkmsg, as to a real phone that stays offline).
            r.from == gateways.gateway_jid
                && r.enc_type == "pkmsg"
                && people.iter().any(|c| c.jid == r.to)
        })
        .count();
    let answered: usize = people.iter().map(|c| c.messages().len()).sum();
    println!(
        "  checks: {answered} replies for {} messages, {undecryptable} undecryptable, {retries} retry receipts, {new_sessions} sessions the gateway had to start again",
        total + 1
    );
    if answered != total + 1 || undecryptable + retries + new_sessions != 0 {
        bail!("a message was lost, duplicated or unreadable");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let contacts = value("--contacts").unwrap_or(10).max(1);
    let rounds = value("--rounds").unwrap_or(20).max(1);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(contacts, rounds))
}
