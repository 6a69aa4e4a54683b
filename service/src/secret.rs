//! Credentials in memory: `SecretString` (the `secrecy` crate) prints `[REDACTED]` in `Debug`,
//! so a config struct or an error that holds one never logs it; and [`redact`] scrubs a known
//! secret from text that came from elsewhere (an upstream error message that echoes a key).

use std::convert::Infallible;

pub use secrecy::{ExposeSecret, SecretString};

/// Parse a command-line or environment value into a secret (clap `value_parser`).
pub fn parse(s: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(s))
}

/// Secrets shorter than this are not scrubbed: replacing "a" everywhere would destroy the text
/// and protect nothing.
const MIN_SCRUBBED_LEN: usize = 4;

/// `text` with every occurrence of each secret replaced by `[REDACTED]`.
pub fn redact<'a>(text: &str, secrets: impl IntoIterator<Item = &'a SecretString>) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        let s = secret.expose_secret();
        if s.len() >= MIN_SCRUBBED_LEN && out.contains(s) {
            out = out.replace(s, "[REDACTED]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_redact_never_show_the_value() {
        let key = SecretString::from("sk-live-0123456789");
        assert!(!format!("{key:?}").contains("sk-live"));
        assert_eq!(
            redact("Incorrect API key provided: sk-live-0123456789.", [&key]),
            "Incorrect API key provided: [REDACTED]."
        );
        let short = SecretString::from("ab");
        assert_eq!(redact("abc", [&short]), "abc");
    }
}
