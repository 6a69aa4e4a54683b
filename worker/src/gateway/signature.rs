//! `X-Hub-Signature-256` verification: HMAC-SHA256 of the raw body with the App Secret, compared
//! in constant time. Always over the bytes received, never a re-serialization: Meta signs its
//! escaped-unicode form of the JSON.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// True when `header` is `sha256=<hex>` and the HMAC of `body` under `app_secret` matches.
pub fn verify(app_secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_right_signature_only() {
        let body = br#"{"a":"caf\u00e9"}"#;
        let good = fakes::cloud_api::sign("secret", body);
        assert!(verify("secret", body, Some(&good)));
        assert!(!verify("other", body, Some(&good)));
        assert!(
            !verify("secret", b"{\"a\":\"caf\xc3\xa9\"}", Some(&good)),
            "re-encoded body must not verify"
        );
        assert!(!verify("secret", body, None));
        assert!(!verify("secret", body, Some("sha1=abc")));
        assert!(!verify("secret", body, Some("sha256=zz")));
    }
}
