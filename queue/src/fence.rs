//! The fencing epoch of an account.
//!
//! A Kubernetes Lease says who *should* send for an account, but cannot stop a holder that was
//! paused (GC, SIGSTOP, a partitioned node) from sending when it wakes up after another pod took
//! over. So every new holder bumps `accounts.fence_epoch` on acquisition and every outbound
//! claim and completion is conditional on the epoch it was given: the deposed holder's writes
//! match no row, and it never starts a send it has not claimed.

use sqlx::PgExecutor;

use crate::error::{Result, StepExt};

const BUMP: &str = include_str!("../sql/fence_bump.sql");

/// Ensure the account row exists (gateways call this at start, before any webhook).
///
/// Replicas of one gateway start together and race to create the row. `ON CONFLICT (id)`
/// settles a race on the id, but the same race also collides on the unique phone number id,
/// which Postgres reports as a unique violation instead; the retry then finds the committed
/// row and updates it. (Without it, one replica crashed at start.)
pub async fn upsert_account(
    db: &sqlx::PgPool,
    account: &str,
    phone_number_id: &str,
    pool: &str,
    handoff_message: &str,
    allowed_contacts: &[String],
) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = sqlx::query(
            "INSERT INTO accounts (id, phone_number_id, pool, handoff_message, allowed_contacts)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET phone_number_id = EXCLUDED.phone_number_id,
                 pool = EXCLUDED.pool, handoff_message = EXCLUDED.handoff_message,
                 allowed_contacts = EXCLUDED.allowed_contacts",
        )
        .bind(account)
        .bind(phone_number_id)
        .bind(pool)
        .bind(handoff_message)
        .bind(allowed_contacts)
        .execute(db)
        .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 3 => continue,
            other => {
                other.step("upserting account")?;
                return Ok(());
            }
        }
    }
}

/// Bump the fence for a new holder and return the new epoch.
pub async fn bump<'e>(db: impl PgExecutor<'e>, account: &str, holder: &str) -> Result<i64> {
    let (epoch,): (i64,) = sqlx::query_as(BUMP)
        .bind(account)
        .bind(holder)
        .fetch_one(db)
        .await
        .step("bumping fence epoch")?;
    Ok(epoch)
}

/// The account's current epoch and holder.
pub async fn current<'e>(db: impl PgExecutor<'e>, account: &str) -> Result<(i64, Option<String>)> {
    sqlx::query_as("SELECT fence_epoch, fence_holder FROM accounts WHERE id = $1")
        .bind(account)
        .fetch_one(db)
        .await
        .step("reading fence epoch")
}
