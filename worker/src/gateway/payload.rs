//! The webhook JSON of the WhatsApp Cloud API, tolerant of fields we do not use.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub struct Webhook {
    pub object: String,
    #[serde(default)]
    pub entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
pub struct Entry {
    /// The WhatsApp Business Account the changes are about.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub changes: Vec<Change>,
}

#[derive(Debug, Deserialize)]
pub struct Change {
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub value: ChangeValue,
}

#[derive(Debug, Deserialize, Default)]
pub struct ChangeValue {
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub contacts: Vec<Contact>,
    #[serde(default)]
    pub messages: Vec<Value>,
    #[serde(default)]
    pub statuses: Vec<Status>,
    /// `message_template_status_update`: the template's new status (`APPROVED`, `PAUSED`, ...).
    #[serde(default)]
    pub event: Option<String>,
    /// A number in Meta's payloads; a string is accepted too.
    #[serde(default)]
    pub message_template_id: Option<Value>,
    #[serde(default)]
    pub message_template_name: Option<String>,
    #[serde(default)]
    pub message_template_language: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub phone_number_id: String,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Contact {
    #[serde(default)]
    pub wa_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub profile: Option<Profile>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Profile {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Status {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub recipient_id: Option<String>,
    #[serde(default)]
    pub biz_opaque_callback_data: Option<String>,
    #[serde(default)]
    pub errors: Vec<GraphErrorItem>,
}

#[derive(Debug, Deserialize)]
pub struct GraphErrorItem {
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// What an inbound message means to us.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    pub provider_message_id: String,
    pub message_type: String,
    /// Text the agent reads: the text body, a button/list reply title, a caption.
    pub body: Option<String>,
    /// Key of the contact: business-scoped user id when present, else the phone (wa_id).
    pub contact_key: String,
    pub wa_id: Option<String>,
    pub user_id: Option<String>,
    pub display_name: Option<String>,
    /// Whether the agent runs on it (text and interactive replies) or it is only stored.
    pub runs_agent: bool,
    /// Written in a group (WhatsApp Web): answered only where the account answers groups.
    pub in_group: bool,
    pub timestamp: Option<i64>,
    pub raw: Value,
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_string)
}

/// The kinds of media a customer can send; their bytes are fetched by the Lease holder.
pub const MEDIA_KINDS: &[&str] = &["image", "audio", "video", "document", "sticker"];

/// What the agent reads for a media message, until it can see the bytes: `[image]`,
/// `[image: <caption>]`, `[document: <file name>]`, `[voice note]`, `[sticker]`. Always starts
/// with `[` and a kind ([`is_media_context`]): the rules agent routes on it.
pub fn media_context(kind: &str, media: &Value) -> String {
    media_text(
        kind,
        media["caption"].as_str(),
        media["filename"].as_str(),
        media["voice"].as_bool() == Some(true),
    )
}

/// [`media_context`] from its parts (WhatsApp Web messages carry them in their own types).
pub fn media_text(
    kind: &str,
    caption: Option<&str>,
    filename: Option<&str>,
    voice: bool,
) -> String {
    let label = if kind == "audio" && voice {
        "voice note"
    } else {
        kind
    };
    let detail = non_empty(caption).or_else(|| non_empty(filename).filter(|_| kind == "document"));
    match detail {
        Some(d) => format!("[{label}: {d}]"),
        None => format!("[{label}]"),
    }
}

/// Whether an inbound text is [`media_context`]'s (a media message).
pub fn is_media_context(text: &str) -> bool {
    text.strip_prefix('[').is_some_and(|rest| {
        MEDIA_KINDS
            .iter()
            .chain(&["voice note"])
            .any(|k| rest.starts_with(&format!("{k}]")) || rest.starts_with(&format!("{k}: ")))
    })
}

/// Interpret one message object of a change. `None` when it has no id or no sender at all.
pub fn interpret(message: &Value, contacts: &[Contact]) -> Option<InboundMessage> {
    let id = non_empty(message["id"].as_str())?;
    let from = non_empty(message["from"].as_str());
    let from_user_id = non_empty(message["from_user_id"].as_str());
    let contact = contacts.iter().find(|c| {
        (from_user_id.is_some() && c.user_id.as_deref() == from_user_id.as_deref())
            || (from.is_some() && c.wa_id.as_deref() == from.as_deref())
    });
    let contact = contact.or(if contacts.len() == 1 {
        contacts.first()
    } else {
        None
    });
    let user_id = from_user_id.or_else(|| contact.and_then(|c| non_empty(c.user_id.as_deref())));
    let wa_id = from.or_else(|| contact.and_then(|c| non_empty(c.wa_id.as_deref())));
    let contact_key = user_id.clone().or_else(|| wa_id.clone())?;
    let message_type = message["type"].as_str().unwrap_or("unknown").to_string();
    let (body, runs_agent) = match message_type.as_str() {
        "text" => (non_empty(message["text"]["body"].as_str()), true),
        "interactive" => {
            let i = &message["interactive"];
            let reply = match i["type"].as_str() {
                Some("button_reply") => non_empty(i["button_reply"]["title"].as_str()),
                Some("list_reply") => non_empty(i["list_reply"]["title"].as_str()),
                _ => None,
            };
            let runs = reply.is_some();
            (reply, runs)
        }
        "button" => (
            non_empty(message["button"]["text"].as_str())
                .or_else(|| non_empty(message["button"]["payload"].as_str())),
            true,
        ),
        "image" | "video" | "document" | "audio" | "sticker" => (
            Some(media_context(
                &message_type,
                &message[message_type.as_str()],
            )),
            true,
        ),
        _ => (None, false),
    };
    Some(InboundMessage {
        provider_message_id: id,
        body,
        contact_key,
        wa_id,
        user_id,
        display_name: contact
            .and_then(|c| c.profile.as_ref())
            .and_then(|p| non_empty(p.name.as_deref())),
        runs_agent: runs_agent && message_type != "unknown",
        in_group: false,
        timestamp: message["timestamp"].as_str().and_then(|t| t.parse().ok()),
        message_type,
        raw: message.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contact(wa: &str, user: Option<&str>) -> Contact {
        Contact {
            wa_id: Some(wa.into()),
            user_id: user.map(str::to_string),
            profile: Some(Profile {
                name: Some("Sheena".into()),
            }),
        }
    }

    #[test]
    fn text_interactive_and_media_run_the_agent_location_does_not() {
        let c = [contact("16505551234", None)];
        let text = interpret(&json!({"from":"16505551234","id":"wamid.1","timestamp":"1749416383","type":"text","text":{"body":"Hi"}}), &c).expect("text");
        assert!(text.runs_agent);
        assert_eq!(text.body.as_deref(), Some("Hi"));
        assert_eq!(text.contact_key, "16505551234");
        assert_eq!(text.display_name.as_deref(), Some("Sheena"));
        let button = interpret(&json!({"from":"16505551234","id":"wamid.2","type":"interactive","interactive":{"type":"button_reply","button_reply":{"id":"change","title":"Change"}}}), &c).expect("button");
        assert!(button.runs_agent);
        assert_eq!(button.body.as_deref(), Some("Change"));
        let list = interpret(&json!({"from":"16505551234","id":"wamid.3","type":"interactive","interactive":{"type":"list_reply","list_reply":{"id":"x","title":"Express","description":"d"}}}), &c).expect("list");
        assert_eq!(list.body.as_deref(), Some("Express"));
        let template_button = interpret(&json!({"from":"16505551234","id":"wamid.4","type":"button","button":{"payload":"STOP","text":"Stop promos"}}), &c).expect("template button");
        assert!(template_button.runs_agent);
        let image = interpret(&json!({"from":"16505551234","id":"wamid.5","type":"image","image":{"id":"m","mime_type":"image/jpeg","caption":"look"}}), &c).expect("image");
        assert!(image.runs_agent);
        assert_eq!(image.body.as_deref(), Some("[image: look]"));
        let voice = interpret(&json!({"from":"16505551234","id":"wamid.9","type":"audio","audio":{"id":"a","mime_type":"audio/ogg; codecs=opus","voice":true}}), &c).expect("voice");
        assert_eq!(voice.body.as_deref(), Some("[voice note]"));
        let pdf = interpret(&json!({"from":"16505551234","id":"wamid.10","type":"document","document":{"id":"d","mime_type":"application/pdf","filename":"invoice.pdf"}}), &c).expect("pdf");
        assert_eq!(pdf.body.as_deref(), Some("[document: invoice.pdf]"));
        for media in [&image, &voice, &pdf] {
            assert!(is_media_context(media.body.as_deref().unwrap_or_default()));
        }
        assert!(!is_media_context("[imagine]") && !is_media_context("image"));
        let location = interpret(&json!({"from":"16505551234","id":"wamid.6","type":"location","location":{"latitude":1.0,"longitude":2.0}}), &c).expect("location");
        assert!(!location.runs_agent);
    }

    #[test]
    fn business_scoped_user_id_is_preferred_and_empty_wa_id_tolerated() {
        let c = [Contact {
            wa_id: Some(String::new()),
            user_id: Some("user.9373".into()),
            profile: None,
        }];
        let m = interpret(&json!({"from":"","from_user_id":"user.9373","id":"wamid.7","type":"text","text":{"body":"yo"}}), &c).expect("bsuid");
        assert_eq!(m.contact_key, "user.9373");
        assert_eq!(m.wa_id, None);
        assert!(
            interpret(
                &json!({"from":"","id":"wamid.8","type":"text","text":{"body":"?"}}),
                &[]
            )
            .is_none()
        );
    }
}
