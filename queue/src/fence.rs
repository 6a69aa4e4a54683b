//! The fencing epoch of an account.
//!
//! A Kubernetes Lease says who *should* send for an account, but cannot stop a holder that was
//! paused (GC, SIGSTOP, a partitioned node) from sending when it wakes up after another pod took
//! over. So every new holder bumps `accounts.fence_epoch` on acquisition and every outbound
//! claim and completion is conditional on the epoch it was given: the deposed holder's writes
//! match no row, and it never starts a send it has not claimed.

use sqlx::PgExecutor;

use crate::error::{Error, Result, StepExt};

const BUMP: &str = include_str!("../sql/fence_bump.sql");
const UPSERT: &str = include_str!("../sql/account_upsert.sql");

/// What a gateway writes about its account before serving it.
#[derive(Debug, Clone)]
pub struct AccountRow<'a> {
    pub id: &'a str,
    /// The Cloud API phone number id, or `web:<number>` for WhatsApp Web.
    pub phone_number_id: &'a str,
    pub pool: &'a str,
    pub handoff_message: &'a str,
    pub allowed_contacts: &'a [String],
    /// Attempts of each outbound message (WhatsAppAccount `spec.delivery.maxAttempts`).
    pub outbound_max_attempts: i32,
    /// The WhatsApp Business Account of a Cloud API number, when the spec names it: the team
    /// inbox lists that account's templates.
    pub waba_id: Option<&'a str>,
}

/// Ensure the account row exists and says what the resource says (gateways call this before
/// serving the account). A row of a deleted account with the same id is taken back (its history
/// continues). A phone number in use by another account is [`Error::PhoneNumberInUse`], naming
/// it: the operator reports that as a condition, and nothing starts for this account.
///
/// Replicas of one gateway start together and race to create the row. `ON CONFLICT (id)`
/// settles a race on the id, but the same race also collides on the unique phone number id,
/// which Postgres reports as a unique violation instead; the retry then finds the committed
/// row and updates it. (Without it, one replica crashed at start.)
pub async fn upsert_account_row(db: &sqlx::PgPool, row: &AccountRow<'_>) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = sqlx::query(UPSERT)
            .bind(row.id)
            .bind(row.phone_number_id)
            .bind(row.pool)
            .bind(row.handoff_message)
            .bind(row.allowed_contacts)
            .bind(row.outbound_max_attempts)
            .bind(row.waba_id)
            .execute(db)
            .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let users = phone_number_users(db, row.phone_number_id, row.id).await?;
                if let Some(by) = users.into_iter().next() {
                    return Err(Error::PhoneNumberInUse {
                        phone_number_id: row.phone_number_id.to_string(),
                        by,
                    });
                }
                if attempt >= 3 {
                    Err::<(), _>(sqlx::Error::Database(e)).step("upserting account")?;
                }
            }
            other => {
                other.step("upserting account")?;
                return Ok(());
            }
        }
    }
}

/// The accounts in use, other than `except`, with this phone number id (at most one).
pub async fn phone_number_users(
    db: &sqlx::PgPool,
    phone_number_id: &str,
    except: &str,
) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT id FROM accounts WHERE phone_number_id = $1 AND released_at IS NULL AND id <> $2",
    )
    .bind(phone_number_id)
    .bind(except)
    .fetch_all(db)
    .await
    .step("finding who uses the phone number")
}

/// [`upsert_account_row`] with the default attempts (tests and benchmarks).
pub async fn upsert_account(
    db: &sqlx::PgPool,
    account: &str,
    phone_number_id: &str,
    pool: &str,
    handoff_message: &str,
    allowed_contacts: &[String],
) -> Result<()> {
    upsert_account_row(
        db,
        &AccountRow {
            id: account,
            phone_number_id,
            pool,
            handoff_message,
            allowed_contacts,
            outbound_max_attempts: crate::outbound::MAX_ATTEMPTS_DEFAULT,
            waba_id: None,
        },
    )
    .await
}

/// Release the phone number of a deleted account (its row and history stay), so that another
/// account may use it. Returns whether a row was released.
pub async fn release_account(db: &sqlx::PgPool, account: &str) -> Result<bool> {
    let released = sqlx::query(
        "UPDATE accounts SET released_at = now() WHERE id = $1 AND released_at IS NULL",
    )
    .bind(account)
    .execute(db)
    .await
    .step("releasing the account's phone number")?;
    Ok(released.rows_affected() > 0)
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
