//! What the team inbox reads and writes. Every change runs in one transaction that locks the
//! conversation row first, the same row an agent turn locks before it commits, so a human and
//! the agent never both answer: whoever commits second sees the other's change.

use chrono::{DateTime, Utc};
use queue::jobs::{self, NewJob};
use queue::outbound::{self, NewOutbound};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::InboxError;
use super::auth::Member;
use super::events::{self, TeamEvent};
use crate::core::job_payload::AgentTurn;
use crate::core::turn::MAX_TEXT;

/// WhatsApp's customer service window (Cloud API): free-form messages only this long after the
/// customer's last message; after it only a template may be sent. (Spelled out in `in_window!`.)
/// A WhatsApp Web number is a person's app: it has no such window.
pub const SERVICE_WINDOW_HOURS: i64 = 24;

/// Which open handoffs to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// Assigned to the caller.
    Mine,
    /// Assigned to nobody.
    Unassigned,
    /// Every open handoff of the pool.
    #[default]
    All,
}

/// A conversation in the inbox list.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct InboxItem {
    pub conversation_id: i64,
    pub task_id: i64,
    pub account_id: String,
    pub contact_name: Option<String>,
    pub contact_phone: String,
    pub assignee: Option<String>,
    pub reason: Option<String>,
    pub handed_off_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub first_reply_at: Option<DateTime<Utc>>,
    pub last_customer_message: Option<String>,
    pub last_customer_at: Option<DateTime<Utc>>,
    /// The customer wrote after the last human reply.
    pub awaiting_reply: bool,
    /// A free-form reply can still be sent (24-hour window open).
    pub in_window: bool,
}

/// One message of a transcript.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct TranscriptMessage {
    pub id: i64,
    /// `customer`, `agent` or `human`.
    pub author: String,
    pub member: Option<String>,
    pub message_type: Option<String>,
    pub text: Option<String>,
    pub at: DateTime<Utc>,
    /// Delivery state of our messages (`queued` .. `read`, `failed`); none for the customer's.
    pub status: Option<String>,
    /// A customer's photo, voice note, document, ...: `{id, kind, state, mime_type, size,
    /// filename, error}`; the bytes are at `GET /api/media/{id}` once `state` is `stored`.
    pub media: Option<Value>,
    /// Why one of our messages failed, with WhatsApp's code: what the team sees under it
    /// (`131047: Re-engagement message` when the 24 hours had passed, ...).
    pub error: Option<String>,
}

/// A conversation with its transcript.
#[derive(Debug, Serialize)]
pub struct Transcript {
    pub conversation: ConversationView,
    pub task: Option<TaskView>,
    pub messages: Vec<TranscriptMessage>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ConversationView {
    pub id: i64,
    pub account_id: String,
    pub pool: String,
    pub state: String,
    pub agent_enabled: bool,
    pub lane: Option<String>,
    pub contact_name: Option<String>,
    /// The WhatsApp id replies go to (the phone number, or the contact key without one).
    pub contact_phone: String,
    pub last_customer_at: Option<DateTime<Utc>>,
    /// When free-form replies stop being possible (none on a WhatsApp Web number).
    pub window_closes_at: Option<DateTime<Utc>>,
    pub in_window: bool,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct TaskView {
    pub id: i64,
    pub assignee: Option<String>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub first_reply_at: Option<DateTime<Utc>>,
}

/// A human reply that was queued for delivery.
#[derive(Debug, Serialize)]
pub struct QueuedReply {
    pub outbound_id: i64,
    /// Seconds from handoff to this reply when it is the handoff's first human reply.
    #[serde(skip)]
    pub first_reply_seconds: Option<f64>,
}

/// The customer's last message time, capped at when we received it (a sender's clock cannot
/// stretch the window). A macro so that queries stay `&'static str` (sqlx refuses built strings).
macro_rules! last_customer_at {
    () => {
        "(SELECT max(least(coalesce(i.provider_timestamp, i.received_at), i.received_at))
          FROM inbound_messages i WHERE i.conversation_id = c.id)"
    };
}
/// Whether conversation `c` is on a WhatsApp Web number (no service window).
macro_rules! web_number {
    () => {
        "EXISTS (SELECT 1 FROM accounts a WHERE a.id = c.account_id AND a.phone_number_id LIKE 'web:%')"
    };
}
/// Whether a free-form message may be sent now (`SERVICE_WINDOW_HOURS`; always on WhatsApp Web).
macro_rules! in_window {
    () => {
        concat!(
            "(",
            web_number!(),
            " OR coalesce(",
            last_customer_at!(),
            " > now() - interval '24 hours', false))"
        )
    };
}

pub async fn list(
    db: &PgPool,
    pool: &str,
    member: &Member,
    view: View,
) -> Result<Vec<InboxItem>, InboxError> {
    let view = match view {
        View::Mine => "mine",
        View::Unassigned => "unassigned",
        View::All => "all",
    };
    let sql = concat!(
        "SELECT t.conversation_id, t.id AS task_id, c.account_id, ct.display_name AS contact_name,
                coalesce(ct.wa_id, ct.contact_key) AS contact_phone, t.assignee, t.reason,
                t.created_at AS handed_off_at, t.claimed_at, t.first_reply_at,
                last_in.body AS last_customer_message, last_in.received_at AS last_customer_at,
                coalesce(last_in.received_at > (SELECT max(o.created_at) FROM outbound_messages o
                          WHERE o.conversation_id = c.id AND NOT o.sent_by_agent), last_in.id IS NOT NULL) AS awaiting_reply, ",
        in_window!(),
        " AS in_window
         FROM handoff_tasks t
         JOIN conversations c ON c.id = t.conversation_id
         JOIN contacts ct ON ct.id = c.contact_id
         LEFT JOIN LATERAL (SELECT i.id, i.body, i.received_at FROM inbound_messages i
                            WHERE i.conversation_id = c.id ORDER BY i.id DESC LIMIT 1) last_in ON true
         WHERE t.pool = $1 AND t.state = 'open'
           AND ($2 = 'all' OR ($2 = 'mine' AND t.assignee = $3) OR ($2 = 'unassigned' AND t.assignee IS NULL))
         ORDER BY t.created_at, t.id
         LIMIT 500"
    );
    Ok(sqlx::query_as(sql)
        .bind(pool)
        .bind(view)
        .bind(&member.id)
        .fetch_all(db)
        .await?)
}

/// Check that the conversation exists and belongs to `pool`; lock it when `lock`.
async fn check_access(
    conn: &mut PgConnection,
    pool: &str,
    conversation_id: i64,
    lock: bool,
) -> Result<(), InboxError> {
    let sql = if lock {
        "SELECT pool FROM conversations WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT pool FROM conversations WHERE id = $1"
    };
    let owner: Option<String> = sqlx::query_scalar(sql)
        .bind(conversation_id)
        .fetch_optional(&mut *conn)
        .await?;
    match owner {
        None => Err(InboxError::NotFound),
        Some(p) if p != pool => Err(InboxError::Forbidden),
        Some(_) => Ok(()),
    }
}

async fn conversation_view(
    conn: &mut PgConnection,
    conversation_id: i64,
) -> Result<ConversationView, InboxError> {
    let sql = concat!(
        "SELECT c.id, c.account_id, c.pool, c.state, c.agent_enabled, c.lane,
                ct.display_name AS contact_name, coalesce(ct.wa_id, ct.contact_key) AS contact_phone, ",
        last_customer_at!(),
        " AS last_customer_at, CASE WHEN ",
        web_number!(),
        " THEN NULL ELSE ",
        last_customer_at!(),
        " + interval '24 hours' END AS window_closes_at, ",
        in_window!(),
        " AS in_window FROM conversations c JOIN contacts ct ON ct.id = c.contact_id WHERE c.id = $1"
    );
    Ok(sqlx::query_as(sql)
        .bind(conversation_id)
        .fetch_one(conn)
        .await?)
}

/// A transaction on a conversation the caller's pool may touch (locked when `lock`).
async fn begin<'a>(
    db: &'a PgPool,
    pool: &str,
    conversation_id: i64,
    lock: bool,
) -> Result<Transaction<'a, Postgres>, InboxError> {
    let mut tx = db.begin().await?;
    check_access(&mut tx, pool, conversation_id, lock).await?;
    Ok(tx)
}

pub async fn transcript(
    db: &PgPool,
    pool: &str,
    conversation_id: i64,
    limit: i64,
) -> Result<Transcript, InboxError> {
    let mut conn = db.acquire().await?;
    check_access(&mut conn, pool, conversation_id, false).await?;
    let conversation = conversation_view(&mut conn, conversation_id).await?;
    let task: Option<TaskView> = sqlx::query_as(
        "SELECT id, assignee, reason, created_at, claimed_at, first_reply_at FROM handoff_tasks
         WHERE conversation_id = $1 AND state = 'open'",
    )
    .bind(conversation_id)
    .fetch_optional(&mut *conn)
    .await?;
    // Both sides are stamped by the database clock, so they interleave correctly.
    let mut messages: Vec<TranscriptMessage> = sqlx::query_as(
        "SELECT id, author, member, message_type, text, at, status, error, media FROM (
             SELECT i.id, 'customer' AS author, NULL::text AS member, i.message_type, i.body AS text,
                    i.received_at AS at, NULL::text AS status, NULL::text AS error,
                    (SELECT jsonb_build_object('id', md.id, 'kind', md.kind, 'state', md.state,
                                'mime_type', md.mime_type, 'size', md.size_bytes,
                                'filename', md.filename, 'error', md.last_error)
                     FROM media md WHERE md.inbound_id = i.id) AS media
             FROM inbound_messages i WHERE i.conversation_id = $1
             UNION ALL
             SELECT id, CASE WHEN sent_by_agent THEN 'agent' ELSE 'human' END, sent_by_member,
                    message->>'type',
                    coalesce(message->'text'->>'body', message->'interactive'->'body'->>'text',
                             CASE WHEN message->>'type' IN ('image', 'audio', 'video', 'document') THEN
                                 '[' || (message->>'type') || coalesce(': ' || coalesce(
                                     message->(message->>'type')->>'filename',
                                     message->(message->>'type')->>'caption'), '') || ']' END,
                             'template ' || (message->'template'->>'name') || coalesce(': ' || (
                                 SELECT string_agg(p->>'text', ', ')
                                 FROM jsonb_array_elements(message->'template'->'components'->0->'parameters') p), ''),
                             message->>'type'), created_at, state,
                    CASE WHEN state = 'failed' THEN
                        concat_ws(': ', error_code::text, coalesce(last_error, 'not delivered')) END,
                    NULL::jsonb
             FROM outbound_messages WHERE conversation_id = $1
         ) m ORDER BY at DESC, author DESC, id DESC LIMIT $2",
    )
    .bind(conversation_id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    messages.reverse();
    Ok(Transcript {
        conversation,
        task,
        messages,
    })
}

async fn audit(
    conn: &mut PgConnection,
    pool: &str,
    member: &Member,
    action: &str,
    conversation_id: i64,
    detail: Value,
) -> Result<(), InboxError> {
    sqlx::query(
        "INSERT INTO team_audit (pool, member_id, action, conversation_id, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(pool)
    .bind(&member.id)
    .bind(action)
    .bind(conversation_id)
    .bind(&detail)
    .execute(&mut *conn)
    .await?;
    tracing::info!(pool, member = %member.id, action, conversation_id, %detail, "team action");
    Ok(())
}

/// Audit, notify and commit one human action.
async fn finish(
    mut tx: Transaction<'_, Postgres>,
    pool: &str,
    member: &Member,
    action: &str,
    conversation_id: i64,
    detail: Value,
) -> Result<(), InboxError> {
    audit(&mut tx, pool, member, action, conversation_id, detail).await?;
    events::notify(&mut tx, &TeamEvent::new(pool, conversation_id, action)).await?;
    tx.commit().await?;
    Ok(())
}

/// Take an open handoff that nobody (or the caller) holds. Of concurrent claims one wins: the
/// update re-checks `assignee` on the row the winner committed.
pub async fn claim(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
) -> Result<(), InboxError> {
    let mut tx = begin(db, pool, conversation_id, false).await?;
    let claimed: Option<i64> = sqlx::query_scalar(
        "UPDATE handoff_tasks SET assignee = $2, claimed_at = now()
         WHERE conversation_id = $1 AND state = 'open' AND (assignee IS NULL OR assignee = $2)
         RETURNING id",
    )
    .bind(conversation_id)
    .bind(&member.id)
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        let holder: Option<Option<String>> = sqlx::query_scalar(
            "SELECT assignee FROM handoff_tasks WHERE conversation_id = $1 AND state = 'open'",
        )
        .bind(conversation_id)
        .fetch_optional(&mut *tx)
        .await?;
        return Err(match holder {
            None => InboxError::Conflict("this conversation has no open handoff".into()),
            Some(h) => InboxError::Conflict(format!(
                "already assigned to {}; use assign to take it over",
                h.unwrap_or_default()
            )),
        });
    }
    finish(tx, pool, member, "claim", conversation_id, json!({})).await
}

/// Give an open handoff to a member of the pool's team (the caller included).
pub async fn assign(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
    to: &str,
) -> Result<(), InboxError> {
    let mut tx = begin(db, pool, conversation_id, false).await?;
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM team_members WHERE pool = $1 AND member_id = $2)",
    )
    .bind(pool)
    .bind(to)
    .fetch_one(&mut *tx)
    .await?;
    if !known {
        return Err(InboxError::BadRequest(format!(
            "{to:?} is not a member of this pool's team"
        )));
    }
    let previous: Option<Option<String>> = sqlx::query_scalar(
        "UPDATE handoff_tasks t SET assignee = $2, claimed_at = now()
         FROM (SELECT id, assignee FROM handoff_tasks WHERE conversation_id = $1 AND state = 'open' FOR UPDATE) old
         WHERE t.id = old.id RETURNING old.assignee",
    )
    .bind(conversation_id)
    .bind(to)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(previous) = previous else {
        return Err(InboxError::Conflict(
            "this conversation has no open handoff".into(),
        ));
    };
    sqlx::query(
        "UPDATE team_members SET last_assigned_at = clock_timestamp() WHERE pool = $1 AND member_id = $2",
    )
    .bind(pool)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    finish(
        tx,
        pool,
        member,
        "assign",
        conversation_id,
        json!({ "to": to, "from": previous }),
    )
    .await
}

/// Send a reply as a human: through the same outbox and fenced sender as the agent's replies.
/// A human replying takes the conversation over: the agent stops answering it.
pub async fn reply(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
    text: &str,
) -> Result<QueuedReply, InboxError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(InboxError::BadRequest("text is empty".into()));
    }
    if text.chars().count() > MAX_TEXT {
        return Err(InboxError::BadRequest(format!(
            "text is longer than WhatsApp's {MAX_TEXT} characters"
        )));
    }
    send_as_member(
        db,
        pool,
        member,
        conversation_id,
        json!({ "type": "text", "text": { "body": text, "preview_url": false } }),
        "reply",
        None,
    )
    .await
}

/// A file a team member sends.
pub struct Attachment {
    pub bytes: Vec<u8>,
    pub mime_type: String,
    pub filename: Option<String>,
    pub caption: Option<String>,
}

impl Attachment {
    /// How WhatsApp carries it: an image (JPEG or PNG up to 5 MB), audio, video (MP4 or 3GPP),
    /// or else a document, which takes any type up to 100 MB.
    pub fn kind(&self) -> &'static str {
        let essence = self
            .mime_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/jpeg" | "image/png" if self.bytes.len() <= 5 * 1024 * 1024 => "image",
            "audio/aac" | "audio/amr" | "audio/mpeg" | "audio/mp4" | "audio/ogg" => "audio",
            "video/mp4" | "video/3gpp" => "video",
            _ => "document",
        }
    }

    /// The outbound message naming the stored file (`outbound_media` row `id`).
    fn message(&self, id: i64) -> Value {
        let kind = self.kind();
        let mut media = json!({ "outbound_media_id": id });
        // Audio takes no caption; a document shows its file name.
        if let Some(c) = self.caption.as_deref().filter(|c| !c.trim().is_empty())
            && kind != "audio"
        {
            media["caption"] = json!(c);
        }
        if kind == "document"
            && let Some(f) = &self.filename
        {
            media["filename"] = json!(f);
        }
        json!({ "type": kind, kind: media })
    }
}

/// Send a file as a human: stored, then queued like a reply (24-hour window, takeover, the
/// fenced outbox); the Lease holder uploads it when it sends (to the Cloud API, or encrypted to
/// WhatsApp's media servers over WhatsApp Web).
pub async fn send_file(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
    file: Attachment,
) -> Result<QueuedReply, InboxError> {
    if file.bytes.is_empty() {
        return Err(InboxError::BadRequest("the file is empty".into()));
    }
    if file
        .caption
        .as_deref()
        .is_some_and(|c| c.chars().count() > 1024)
    {
        return Err(InboxError::BadRequest(
            "a caption is at most 1,024 characters".into(),
        ));
    }
    send_as_member(
        db,
        pool,
        member,
        conversation_id,
        Value::Null,
        "file",
        Some(file),
    )
    .await
}

/// A template message to send: an approved template of the account's WhatsApp Business
/// Account, its language, and the values of its body's `{{1}}`, `{{2}}`, ... in order.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TemplateSend {
    pub name: String,
    pub language: String,
    #[serde(default)]
    pub parameters: Vec<String>,
}

impl TemplateSend {
    /// The Cloud API message object, after checking what Meta would refuse outright.
    fn message(&self) -> Result<serde_json::Value, InboxError> {
        tools::template::message(&self.name, &self.language, &self.parameters)
            .map_err(InboxError::BadRequest)
    }
}

/// A customer's media, as stored.
#[derive(sqlx::FromRow)]
pub struct MediaContent {
    pub mime_type: Option<String>,
    pub filename: Option<String>,
    pub kind: String,
    pub bytes: Vec<u8>,
}

/// The bytes of a stored media of one of this pool's conversations. 404 while it is not
/// stored (pending, too large, failed, expired): the transcript says which.
pub async fn media(db: &PgPool, pool: &str, media_id: i64) -> Result<MediaContent, InboxError> {
    let mut conn = db.acquire().await?;
    let conversation: Option<i64> =
        sqlx::query_scalar("SELECT conversation_id FROM media WHERE id = $1")
            .bind(media_id)
            .fetch_optional(&mut *conn)
            .await?;
    let conversation = conversation.ok_or(InboxError::NotFound)?;
    check_access(&mut conn, pool, conversation, false).await?;
    sqlx::query_as(
        "SELECT mime_type, filename, kind, content AS bytes FROM media
         WHERE id = $1 AND state = 'stored' AND content IS NOT NULL",
    )
    .bind(media_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(InboxError::NotFound)
}

/// A template the inbox offers, as the holder last listed it (or a status webhook moved it).
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct TemplateView {
    pub name: String,
    pub language: String,
    pub category: Option<String>,
    /// `APPROVED` can be sent; `PENDING`, `REJECTED`, `PAUSED`, `DISABLED` are shown, not sent.
    pub status: String,
    pub status_reason: Option<String>,
    /// The body, with `{{1}}`.. where the parameters go.
    pub body: Option<String>,
    pub parameters: i32,
    pub updated_at: DateTime<Utc>,
}

/// The templates a conversation's number can send.
#[derive(Debug, Serialize)]
pub struct Templates {
    /// Why the list is empty when it cannot be otherwise (no `wabaId`, a WhatsApp Web number,
    /// not listed yet); absent when the list is what Meta has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When the WABA's templates were last listed in full, and the last listing error.
    pub synced_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_error: Option<String>,
    /// Whether a free-form reply is still possible (else only a template).
    pub in_window: bool,
    /// Approved first, then by name and language.
    pub templates: Vec<TemplateView>,
}

/// The message templates of the conversation's WhatsApp Business Account.
pub async fn templates(
    db: &PgPool,
    pool: &str,
    conversation_id: i64,
) -> Result<Templates, InboxError> {
    let mut conn = db.acquire().await?;
    check_access(&mut conn, pool, conversation_id, false).await?;
    let conversation = conversation_view(&mut conn, conversation_id).await?;
    let (phone_key, waba_id): (String, Option<String>) =
        sqlx::query_as("SELECT phone_number_id, waba_id FROM accounts WHERE id = $1")
            .bind(&conversation.account_id)
            .fetch_one(&mut *conn)
            .await?;
    let empty = |note: &str| Templates {
        note: Some(note.into()),
        synced_at: None,
        sync_error: None,
        in_window: conversation.in_window,
        templates: vec![],
    };
    if phone_key.starts_with("web:") {
        return Ok(empty(
            "templates are a WhatsApp Cloud API feature; this is a WhatsApp Web number",
        ));
    }
    let Some(waba_id) = waba_id else {
        return Ok(empty(
            "set spec.provider.cloudApi.wabaId on the WhatsAppAccount to list its templates",
        ));
    };
    let sync: Option<(Option<DateTime<Utc>>, Option<String>)> =
        sqlx::query_as("SELECT synced_at, last_error FROM template_syncs WHERE waba_id = $1")
            .bind(&waba_id)
            .fetch_optional(&mut *conn)
            .await?;
    let (synced_at, sync_error) = sync.unwrap_or_default();
    let templates: Vec<TemplateView> = sqlx::query_as(
        "SELECT name, language, category, status, status_reason, body,
                body_parameters AS parameters, updated_at
         FROM message_templates WHERE waba_id = $1
         ORDER BY status <> 'APPROVED', name, language",
    )
    .bind(&waba_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Templates {
        note: synced_at
            .is_none()
            .then(|| "not listed yet: the number's gateway lists them within seconds of holding its Lease".into()),
        synced_at,
        sync_error,
        in_window: conversation.in_window,
        templates,
    })
}

/// What the listed templates say of a send: one known as not approved, or given the wrong
/// number of parameters, is refused here with the reason instead of failing at Meta. One not
/// listed (yet) goes to Meta, which has the last word.
async fn check_listed_template(
    conn: &mut PgConnection,
    account_id: &str,
    message: &Value,
) -> Result<(), InboxError> {
    let name = message["template"]["name"].as_str().unwrap_or_default();
    let language = message["template"]["language"]["code"]
        .as_str()
        .unwrap_or_default();
    let listed: Option<(String, i32)> = sqlx::query_as(
        "SELECT t.status, t.body_parameters FROM accounts a
         JOIN message_templates t ON t.waba_id = a.waba_id
         WHERE a.id = $1 AND t.name = $2 AND t.language = $3",
    )
    .bind(account_id)
    .bind(name)
    .bind(language)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((status, expected)) = listed else {
        return Ok(());
    };
    if status != "APPROVED" {
        return Err(InboxError::BadRequest(format!(
            "template {name} ({language}) is {status}: only approved templates can be sent"
        )));
    }
    let given = message["template"]["components"][0]["parameters"]
        .as_array()
        .map_or(0, Vec::len);
    if given != expected as usize {
        return Err(InboxError::BadRequest(format!(
            "template {name} ({language}) takes {expected} parameters; {given} given"
        )));
    }
    Ok(())
}

/// Send a template as a human (any time: templates are what WhatsApp allows outside the
/// 24-hour window). Cloud API numbers only. Same outbox, fenced sender and takeover as a reply.
pub async fn send_template(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
    template: &TemplateSend,
) -> Result<QueuedReply, InboxError> {
    let message = template.message()?;
    send_as_member(db, pool, member, conversation_id, message, "template", None).await
}

/// Queue `message` from `member` in the conversation's outbox (`action` names it in the audit):
/// refused outside the 24-hour window unless it is a template; the human takes the
/// conversation over from the agent.
async fn send_as_member(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
    message: serde_json::Value,
    action: &'static str,
    file: Option<Attachment>,
) -> Result<QueuedReply, InboxError> {
    let template = message["type"] == "template";
    let mut tx = begin(db, pool, conversation_id, true).await?;
    let target = conversation_view(&mut tx, conversation_id).await?;
    if template {
        let web: bool =
            sqlx::query_scalar("SELECT phone_number_id LIKE 'web:%' FROM accounts WHERE id = $1")
                .bind(&target.account_id)
                .fetch_one(&mut *tx)
                .await?;
        if web {
            return Err(InboxError::BadRequest(
                "templates are a WhatsApp Cloud API feature; this is a WhatsApp Web number".into(),
            ));
        }
    }
    if template {
        check_listed_template(&mut tx, &target.account_id, &message).await?;
    }
    if !target.in_window && !template {
        // Recorded (who tried, when); nothing is queued.
        audit(
            &mut tx,
            pool,
            member,
            "refused_reply",
            conversation_id,
            json!({ "reason": "outside_service_window", "last_customer_at": target.last_customer_at }),
        )
        .await?;
        tx.commit().await?;
        return Err(InboxError::OutsideWindow {
            last_customer_at: target.last_customer_at,
        });
    }
    if target.agent_enabled {
        sqlx::query(
            "UPDATE conversations SET agent_enabled = false, state = 'handed_off' WHERE id = $1",
        )
        .bind(conversation_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO handoff_tasks (account_id, conversation_id, pool, assignee, reason, claimed_at)
             VALUES ($1, $2, $3, $4, 'taken over by a team member', now())
             ON CONFLICT (conversation_id) WHERE state = 'open' DO NOTHING",
        )
        .bind(&target.account_id)
        .bind(conversation_id)
        .bind(pool)
        .bind(&member.id)
        .execute(&mut *tx)
        .await?;
    }
    let message = match &file {
        None => message,
        Some(f) => {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO outbound_media (account_id, conversation_id, mime_type, filename, content, size_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(&target.account_id)
            .bind(conversation_id)
            .bind(&f.mime_type)
            .bind(&f.filename)
            .bind(&f.bytes)
            .bind(f.bytes.len() as i64)
            .fetch_one(&mut *tx)
            .await?;
            f.message(id)
        }
    };
    let ids = outbound::enqueue(
        &mut tx,
        &[NewOutbound {
            account_id: target.account_id.clone(),
            conversation_id: Some(conversation_id),
            job_id: None,
            recipient: target.contact_phone,
            message,
            sent_by_agent: false,
            sent_by_member: Some(member.id.clone()),
            max_attempts: None,
        }],
    )
    .await?;
    let outbound_id = ids.first().copied().unwrap_or_default();
    let first_reply_seconds: Option<f64> = sqlx::query_scalar(
        "UPDATE handoff_tasks SET first_reply_at = now(), assignee = coalesce(assignee, $2)
         WHERE conversation_id = $1 AND state = 'open' AND first_reply_at IS NULL
         RETURNING extract(epoch FROM now() - created_at)::float8",
    )
    .bind(conversation_id)
    .bind(&member.id)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query("UPDATE conversations SET last_activity_at = now() WHERE id = $1")
        .bind(conversation_id)
        .execute(&mut *tx)
        .await?;
    finish(
        tx,
        pool,
        member,
        action,
        conversation_id,
        json!({ "outbound_id": outbound_id, "took_over": target.agent_enabled }),
    )
    .await?;
    Ok(QueuedReply {
        outbound_id,
        first_reply_seconds,
    })
}

/// Hand the conversation back to the agent. Customer messages up to the last human reply count
/// as answered; any the customer sent after it are answered by the agent now. The lane is
/// cleared: a conversation left in a handoff lane would be handed straight back.
pub async fn resume(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
) -> Result<bool, InboxError> {
    let mut tx = begin(db, pool, conversation_id, true).await?;
    let through: i64 = sqlx::query_scalar(
        "UPDATE conversations c SET agent_enabled = true, state = 'open', lane = NULL,
             answered_through = greatest(c.answered_through, coalesce(
                 (SELECT max(i.id) FROM inbound_messages i WHERE i.conversation_id = c.id
                    AND i.received_at <= (SELECT max(o.created_at) FROM outbound_messages o
                                          WHERE o.conversation_id = c.id AND NOT o.sent_by_agent)), 0))
         WHERE c.id = $1 RETURNING answered_through",
    )
    .bind(conversation_id)
    .fetch_one(&mut *tx)
    .await?;
    close_tasks(&mut tx, conversation_id, member).await?;
    let unanswered: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM inbound_messages WHERE conversation_id = $1 AND id > $2 AND runs_agent)",
    )
    .bind(conversation_id)
    .bind(through)
    .fetch_one(&mut *tx)
    .await?;
    if unanswered {
        let job = NewJob::new(
            pool,
            AgentTurn::KIND,
            AgentTurn::resume(conversation_id).to_json(),
        )
        .keyed(format!("conversation:{conversation_id}"));
        jobs::enqueue(&mut tx, &job).await?;
    }
    finish(
        tx,
        pool,
        member,
        "resume",
        conversation_id,
        json!({ "agent_answers_pending": unanswered }),
    )
    .await?;
    Ok(unanswered)
}

/// The conversation is resolved: the handoff closes, and the customer's next message starts a
/// fresh session with the agent.
pub async fn close(
    db: &PgPool,
    pool: &str,
    member: &Member,
    conversation_id: i64,
) -> Result<(), InboxError> {
    let mut tx = begin(db, pool, conversation_id, true).await?;
    sqlx::query(
        "UPDATE conversations c SET agent_enabled = true, state = 'closed', lane = NULL,
             session_started_at = now(),
             answered_through = greatest(c.answered_through,
                 coalesce((SELECT max(i.id) FROM inbound_messages i WHERE i.conversation_id = c.id), 0))
         WHERE c.id = $1",
    )
    .bind(conversation_id)
    .execute(&mut *tx)
    .await?;
    close_tasks(&mut tx, conversation_id, member).await?;
    finish(tx, pool, member, "close", conversation_id, json!({})).await
}

async fn close_tasks(
    conn: &mut PgConnection,
    conversation_id: i64,
    member: &Member,
) -> Result<(), InboxError> {
    sqlx::query(
        "UPDATE handoff_tasks SET state = 'closed', closed_at = now(), closed_by = $2
         WHERE conversation_id = $1 AND state = 'open'",
    )
    .bind(conversation_id)
    .bind(&member.id)
    .execute(conn)
    .await?;
    Ok(())
}
