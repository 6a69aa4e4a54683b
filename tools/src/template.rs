//! WhatsApp template messages (Cloud API): the one message shape the team inbox and the
//! `send_template` tool both queue, checked for what Meta refuses outright.

use serde_json::{Value, json};

/// Characters of one template parameter at most (a text message's limit).
pub const MAX_PARAMETER: usize = 4096;

/// The Cloud API message object of template `name` in `language` with its body's `{{1}}`,
/// `{{2}}`, ... in order; an error naming what is wrong (a name, a language code, a blank or
/// too long parameter).
pub fn message(name: &str, language: &str, parameters: &[String]) -> Result<Value, String> {
    let name_ok = !name.is_empty()
        && name.len() <= 512
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !name_ok {
        return Err("template name: 1 to 512 lowercase letters, digits and underscores".into());
    }
    let language_ok = (2..=8).contains(&language.len())
        && language
            .chars()
            .all(|c| c.is_ascii_alphabetic() || c == '_');
    if !language_ok {
        return Err("template language: a code such as en, en_US or pt_BR".into());
    }
    if parameters.len() > 100 {
        return Err("at most 100 template parameters".into());
    }
    if parameters
        .iter()
        .any(|p| p.trim().is_empty() || p.chars().count() > MAX_PARAMETER)
    {
        return Err("each template parameter: 1 to 4096 characters, not blank".into());
    }
    let mut template = json!({ "name": name, "language": { "code": language } });
    if !parameters.is_empty() {
        template["components"] = json!([{
            "type": "body",
            "parameters": parameters.iter()
                .map(|p| json!({ "type": "text", "text": p }))
                .collect::<Vec<_>>(),
        }]);
    }
    Ok(json!({ "type": "template", "template": template }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_metas_shape_and_refuses_what_meta_would() {
        let m = message("order_update", "en_US", &["Ana".into(), "#1".into()]).expect("valid");
        assert_eq!(
            m["template"]["components"][0]["parameters"][1]["text"],
            "#1"
        );
        assert!(message("Order Update", "en_US", &[]).is_err());
        assert!(message("x", "english-us", &[]).is_err());
        assert!(message("x", "en", &[" ".into()]).is_err());
        assert!(message("x", "en", &[]).expect("valid")["template"]["components"].is_null());
    }
}
