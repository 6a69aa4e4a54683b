//! The Postgres queue shared by gateways, core workers and the operator.
//!
//! - [`jobs`]: agent jobs: enqueue in the caller's transaction, batch claim with
//!   `FOR UPDATE SKIP LOCKED`, heartbeat, complete and fail guarded by a claim token, at most one
//!   running job per concurrency key (a conversation) enforced by a unique index.
//! - [`outbound`]: the outbox of agent turns, claimed and completed only under the account's
//!   current fencing epoch ([`fence`]).
//! - [`rescuer`]: returns jobs whose lock expired; safe to run in every worker.
//! - [`notifier`]: LISTEN/NOTIFY wake-ups with a polling fallback.
//! - [`runner`]: a claim loop that batches claims and completions.
//! - [`stats`]: queue depth per pool and outbound counters per account, one query each.
//! - [`testing`]: a throwaway Postgres cluster and per-test databases.
//! - [`web_session`]: a WhatsApp Web account's socket state and pairing code.
//! - [`unrouted`]: verified webhooks for numbers with no account yet, replayed when it appears.
//! - [`members`]: the live members of a pool's gateway fleet.
//!
//! Protocol and hot-path statements live in `queue/sql/`, one per file, each starting with what
//! it guarantees; blocks several statements share are `part_*.sql` files spliced in by
//! `src/sql.rs`; a small query with one caller and no protocol stays inline next to it
//! (docs/queue.md).

pub mod backoff;
pub mod error;
pub mod fence;
pub mod jobs;
pub mod members;
pub mod notifier;
pub mod outbound;
pub mod rescuer;
pub mod runner;
mod sql;
pub mod stats;
/// Tests and benchmarks only (feature `testing`): it starts Postgres clusters with `initdb`.
#[cfg(feature = "testing")]
pub mod testing;
pub mod unrouted;
pub mod web_session;

pub use error::{Error, Result};
pub use jobs::{ClaimedJob, NewJob};
pub use sqlx::PgPool;

/// The schema migrations. `MIGRATOR.run(&pool)` takes a Postgres advisory lock, so every process
/// may run it at start: the first applies, the others wait and find nothing to do.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The settings of this project's sessions, sent at connect.
///
/// - `plan_cache_mode = force_generic_plan`: every statement here is a short indexed lookup or
///   write whose best plan does not depend on its arguments, yet Postgres kept planning some of
///   them afresh on every call (a plan for a one-element array looks cheaper than the generic
///   one): the completion's follow-up promotion spent 1.3 ms planning per 0.07 ms of execution,
///   a tenth of the pipeline's CPU. Generic plans are planned once per connection; the tests
///   check those plans (`hot_statements_probe_indexes_when_planned_on_a_fresh_install`,
///   `batch_statements_probe_by_key_even_with_stale_statistics`).
/// - `random_page_cost = 1.1` (the default 4 models spinning disks): the hot rows of the queue
///   and the outbox are in memory. A connection keeps a generic plan until the table is analyzed
///   again, and with the default, plans made on a fresh install's never-analyzed `jobs` joined a
///   batch of ids against a sequential scan of the table and kept doing so as it grew: a one-job
///   completion read 20,000 rows (10 ms instead of 0.3) until autovacuum came by.
/// - `idle_in_transaction_session_timeout = 5s`: every transaction here is a few statements
///   with nothing else awaited in between, so one idle for seconds belongs to a process that
///   stopped (a paused pod, a stuck node, SIGSTOP). Its locks would otherwise stay until TCP
///   gives up on it: a frozen WhatsApp Web holder's share lock on its account row blocked the
///   next holder's fence bump, and with it the takeover, for as long as it stayed frozen.
pub fn session_settings(
    options: sqlx::postgres::PgConnectOptions,
) -> sqlx::postgres::PgConnectOptions {
    options.options([
        ("plan_cache_mode", "force_generic_plan"),
        ("random_page_cost", "1.1"),
        (
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        ),
    ])
}

/// How long a transaction may sit idle before Postgres ends it (see [`session_settings`]).
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

/// A connection idle longer than this is pinged before it is handed out.
pub const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// The pool settings of this project's processes.
///
/// sqlx pings every connection it hands out (`test_before_acquire`): one more round trip per
/// query made on the pool, each a wakeup of Postgres and of the worker, about a tenth of the
/// pipeline's round trips. Here only a connection idle for [`PING_AFTER_IDLE`] is pinged (one a
/// firewall or a restarted server may have dropped); one in steady use fails its next query
/// instead when the server goes away, and every caller already retries a failed query (jobs,
/// sends, webhooks answered 500 and redelivered).
pub fn pool_options(max_connections: u32) -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Connect a pool and apply migrations.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions =
        url.parse().map_err(|source| Error::Connect { source })?;
    let pool = pool_options(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(session_settings(options))
        .await
        .map_err(|source| Error::Connect { source })?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| Error::Migrate { source })?;
    Ok(pool)
}
