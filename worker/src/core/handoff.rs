//! Human handoff: turn the agent off for one conversation and open a task for a team member.
//!
//! Assignment is round-robin by recency: the online member assigned least recently (never
//! assigned first, ties by member id, so it is stable). `FOR UPDATE` on the chosen member makes
//! concurrent handoffs of one pool take turns instead of picking the same person. With nobody
//! online the task is created unassigned.

use sqlx::{PgConnection, PgPool};

/// Hand a conversation off, inside the turn's transaction. Returns the assignee, if any.
pub async fn hand_off(
    conn: &mut PgConnection,
    pool: &str,
    account: &str,
    conversation_id: i64,
    reason: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query(
        "UPDATE conversations SET agent_enabled = false, state = 'handed_off' WHERE id = $1",
    )
    .bind(conversation_id)
    .execute(&mut *conn)
    .await?;
    let assignee: Option<String> = sqlx::query_scalar(
        "SELECT member_id FROM team_members WHERE pool = $1 AND online
         ORDER BY last_assigned_at NULLS FIRST, member_id LIMIT 1 FOR UPDATE",
    )
    .bind(pool)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(member) = &assignee {
        sqlx::query("UPDATE team_members SET last_assigned_at = clock_timestamp() WHERE pool = $1 AND member_id = $2")
            .bind(pool)
            .bind(member)
            .execute(&mut *conn)
            .await?;
    }
    // One open task per conversation (unique index): a handoff while one is open joins it.
    sqlx::query(
        "INSERT INTO handoff_tasks (account_id, conversation_id, pool, assignee, reason) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (conversation_id) WHERE state = 'open' DO NOTHING",
    )
        .bind(account)
        .bind(conversation_id)
        .bind(pool)
        .bind(&assignee)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    super::inbox::events::notify(
        conn,
        &super::inbox::events::TeamEvent::new(pool, conversation_id, "handoff"),
    )
    .await?;
    tracing::info!(conversation_id, assignee = ?assignee, "conversation handed off to a human");
    Ok(assignee)
}

/// Make the pool's team in the database match the AgentPool spec: members upserted with their
/// online flag, members no longer listed marked offline (their assignment history is kept).
pub async fn sync_team(
    db: &PgPool,
    pool: &str,
    team: &[crds::agent_pool::TeamMember],
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    let ids: Vec<&str> = team.iter().map(|m| m.id.as_str()).collect();
    sqlx::query(
        "UPDATE team_members SET online = false WHERE pool = $1 AND NOT (member_id = ANY($2))",
    )
    .bind(pool)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    for m in team {
        sqlx::query(
            "INSERT INTO team_members (pool, member_id, display_name, online) VALUES ($1, $2, $3, $4)
             ON CONFLICT (pool, member_id) DO UPDATE SET display_name = EXCLUDED.display_name, online = EXCLUDED.online",
        )
        .bind(pool)
        .bind(&m.id)
        .bind(&m.name)
        .bind(m.online)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}
