//! What a WhatsApp Web account's socket is doing: written by the Lease holder under its fencing
//! epoch, read by the operator for the account's `Paired` / `Connected` conditions and
//! `status.pairing`, and by the gateway's `/pairing` page.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::error::{Result, StepExt};

/// The socket's state. Stored as text (`wa_web_sessions.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// No device identity yet: nothing has been paired.
    Unpaired,
    /// Connected to the server and showing a QR / pair code.
    Pairing,
    /// Paired; opening the socket.
    Connecting,
    /// Logged in: messages flow.
    Connected,
    /// Paired, socket closed (handover, network, shutdown).
    Disconnected,
    /// The phone removed this linked device; a new pairing is needed.
    LoggedOut,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Unpaired => "unpaired",
            SessionState::Pairing => "pairing",
            SessionState::Connecting => "connecting",
            SessionState::Connected => "connected",
            SessionState::Disconnected => "disconnected",
            SessionState::LoggedOut => "logged_out",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unpaired" => SessionState::Unpaired,
            "pairing" => SessionState::Pairing,
            "connecting" => SessionState::Connecting,
            "connected" => SessionState::Connected,
            "disconnected" => SessionState::Disconnected,
            "logged_out" => SessionState::LoggedOut,
            _ => return None,
        })
    }
}

/// One account's row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WebSession {
    pub account_id: String,
    pub state: String,
    pub device_jid: Option<String>,
    pub pairing_method: Option<String>,
    pub qr_code: Option<String>,
    pub pair_code: Option<String>,
    pub code_expires_at: Option<DateTime<Utc>>,
    pub detail: Option<String>,
    pub holder: Option<String>,
    pub connected_since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The last failed attempt to reach WhatsApp, until the server answers again.
    pub connect_error: Option<String>,
    pub connect_error_at: Option<DateTime<Utc>>,
}

impl WebSession {
    pub fn state(&self) -> Option<SessionState> {
        SessionState::parse(&self.state)
    }
}

/// The row of one account, if its gateway ever wrote one.
pub async fn get<'e>(db: impl PgExecutor<'e>, account: &str) -> Result<Option<WebSession>> {
    sqlx::query_as("SELECT * FROM wa_web_sessions WHERE account_id = $1")
        .bind(account)
        .fetch_optional(db)
        .await
        .step("reading WhatsApp Web session state")
}

/// A state change, written only while `epoch` is the account's fence (false when fenced off).
/// Leaving a pairing state clears the code; reaching `connected` stamps `connected_since`.
pub async fn set_state<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    epoch: i64,
    holder: &str,
    state: SessionState,
    device_jid: Option<&str>,
    detail: &str,
) -> Result<bool> {
    let row: Option<(i32,)> = sqlx::query_as(
        "WITH fence AS (SELECT 1 FROM accounts WHERE id = $1 AND fence_epoch = $2 FOR SHARE)
         INSERT INTO wa_web_sessions (account_id, state, device_jid, detail, holder, connected_since, updated_at)
         SELECT $1, $3, $4, $5, $6, CASE WHEN $3 = 'connected' THEN now() END, now() FROM fence
         ON CONFLICT (account_id) DO UPDATE SET
             state = EXCLUDED.state,
             device_jid = coalesce(EXCLUDED.device_jid, wa_web_sessions.device_jid),
             detail = EXCLUDED.detail,
             holder = EXCLUDED.holder,
             qr_code = CASE WHEN EXCLUDED.state = 'pairing' THEN wa_web_sessions.qr_code END,
             pair_code = CASE WHEN EXCLUDED.state = 'pairing' THEN wa_web_sessions.pair_code END,
             code_expires_at = CASE WHEN EXCLUDED.state = 'pairing' THEN wa_web_sessions.code_expires_at END,
             connected_since = CASE
                 WHEN EXCLUDED.state = 'connected' AND wa_web_sessions.state = 'connected'
                     THEN wa_web_sessions.connected_since
                 ELSE EXCLUDED.connected_since END,
             connect_error = CASE WHEN EXCLUDED.state = 'connected' THEN NULL ELSE wa_web_sessions.connect_error END,
             connect_error_at = CASE WHEN EXCLUDED.state = 'connected' THEN NULL ELSE wa_web_sessions.connect_error_at END,
             updated_at = now()
         RETURNING 1",
    )
    .bind(account)
    .bind(epoch)
    .bind(state.as_str())
    .bind(device_jid)
    .bind(detail)
    .bind(holder)
    .fetch_optional(db)
    .await
    .step("writing WhatsApp Web session state")?;
    Ok(row.is_some())
}

/// A new QR code or pair code to show (state `pairing`). False when fenced off.
#[allow(clippy::too_many_arguments)]
pub async fn set_pairing_code<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    epoch: i64,
    holder: &str,
    method: &str,
    qr_code: Option<&str>,
    pair_code: Option<&str>,
    expires_at: DateTime<Utc>,
) -> Result<bool> {
    let row: Option<(i32,)> = sqlx::query_as(
        "WITH fence AS (SELECT 1 FROM accounts WHERE id = $1 AND fence_epoch = $2 FOR SHARE)
         INSERT INTO wa_web_sessions (account_id, state, pairing_method, qr_code, pair_code, code_expires_at, holder, detail, updated_at)
         SELECT $1, 'pairing', $3, $4, $5, $6, $7, 'waiting for the phone to link this device', now() FROM fence
         ON CONFLICT (account_id) DO UPDATE SET
             state = 'pairing',
             pairing_method = EXCLUDED.pairing_method,
             qr_code = coalesce(EXCLUDED.qr_code, wa_web_sessions.qr_code),
             pair_code = coalesce(EXCLUDED.pair_code, wa_web_sessions.pair_code),
             code_expires_at = EXCLUDED.code_expires_at,
             holder = EXCLUDED.holder,
             detail = EXCLUDED.detail,
             connected_since = NULL,
             connect_error = NULL,
             connect_error_at = NULL,
             updated_at = now()
         RETURNING 1",
    )
    .bind(account)
    .bind(epoch)
    .bind(method)
    .bind(qr_code)
    .bind(pair_code)
    .bind(expires_at)
    .bind(holder)
    .fetch_optional(db)
    .await
    .step("writing WhatsApp Web pairing code")?;
    Ok(row.is_some())
}

/// A failed attempt to reach WhatsApp (the socket did not open, the version could not be
/// fetched), kept with the state until the server answers. False when fenced off.
pub async fn set_connect_error<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    epoch: i64,
    holder: &str,
    error: &str,
) -> Result<bool> {
    let row: Option<(i32,)> = sqlx::query_as(
        "WITH fence AS (SELECT 1 FROM accounts WHERE id = $1 AND fence_epoch = $2 FOR SHARE)
         INSERT INTO wa_web_sessions (account_id, holder, connect_error, connect_error_at, updated_at)
         SELECT $1, $3, $4, now(), now() FROM fence
         ON CONFLICT (account_id) DO UPDATE SET
             holder = EXCLUDED.holder,
             connect_error = EXCLUDED.connect_error,
             connect_error_at = EXCLUDED.connect_error_at,
             updated_at = now()
         RETURNING 1",
    )
    .bind(account)
    .bind(epoch)
    .bind(holder)
    .bind(error)
    .fetch_optional(db)
    .await
    .step("writing WhatsApp Web connect error")?;
    Ok(row.is_some())
}
