//! Who is in a pool's gateway fleet: each pod heartbeats a row while it can reach the API
//! server; every pod sizes its fair share of the pool's Leases from the live count.

use std::time::Duration;

use sqlx::PgPool;

use crate::error::{Result, StepExt};

/// Record that `identity` is alive in `pool`'s fleet and return the members seen within
/// `live`, this one included, sorted.
pub async fn heartbeat(
    db: &PgPool,
    pool: &str,
    identity: &str,
    live: Duration,
) -> Result<Vec<String>> {
    let (mut others,): (Vec<String>,) = sqlx::query_as(
        "WITH me AS (
             INSERT INTO gateway_members (pool, identity, seen_at) VALUES ($1, $2, now())
             ON CONFLICT (pool, identity) DO UPDATE SET seen_at = now()
         )
         SELECT coalesce(array_agg(identity), '{}') FROM gateway_members
         WHERE pool = $1 AND identity <> $2 AND seen_at > now() - make_interval(secs => $3)",
    )
    .bind(pool)
    .bind(identity)
    .bind(live.as_secs_f64())
    .fetch_one(db)
    .await
    .step("heartbeating fleet membership")?;
    others.push(identity.to_string());
    others.sort();
    Ok(others)
}

/// Leave the fleet (a planned stop), so the others' shares grow at once.
pub async fn leave(db: &PgPool, pool: &str, identity: &str) -> Result<()> {
    sqlx::query("DELETE FROM gateway_members WHERE pool = $1 AND identity = $2")
        .bind(pool)
        .bind(identity)
        .execute(db)
        .await
        .step("leaving the fleet")?;
    Ok(())
}

/// Forget members not seen for an hour (pods that were replaced).
pub async fn forget_stale(db: &PgPool) -> Result<u64> {
    let done = sqlx::query("DELETE FROM gateway_members WHERE seen_at < now() - interval '1 hour'")
        .execute(db)
        .await
        .step("forgetting stale fleet members")?;
    Ok(done.rows_affected())
}
