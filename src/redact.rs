//! Secret masking: the [`Redactor`] that keeps configured secrets, and the values of keys that
//! are always secret (`access_token=…`, `"apiKey":"…"`), out of log lines and stored errors.
//!
//! A leaf: it knows no other module. Redaction happens twice, on purpose: the dispatcher redacts
//! errors before they reach the dead-letter store, and the log writer (`telemetry`) redacts every
//! formatted line before it reaches stdout, so a token inside a URL or an error message from a
//! library is masked too.

use std::sync::Arc;

/// What a masked secret reads as.
pub const MASK: &str = "[redacted]";

/// Query and JSON keys whose values are always secret, whatever the config says.
const SECRET_KEYS: [&str; 5] = [
    "access_token",
    "apiKey",
    "api_key",
    "appsecret_proof",
    "verify_token",
];

/// Masks secrets in text: every configured secret value, and the value of every secret key in a
/// query string (`access_token=…`) or JSON (`"access_token":"…"`).
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    pub fn new(mut secrets: Vec<String>) -> Redactor {
        // Very short values would mask ordinary words; config secrets are never that short in
        // practice, and the key patterns below still catch tokens in URLs.
        secrets.retain(|secret| secret.len() >= 4);
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Redactor {
            secrets: Arc::new(secrets),
        }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.secrets.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
            out = mask_cut_secret(&out, secret);
        }
        for key in SECRET_KEYS {
            out = mask_after(&out, &format!("{key}="), |c| {
                matches!(c, '&' | '"' | '\'' | ' ' | '\n' | '\\' | '<' | '>' | ')')
            });
            out = mask_after(&out, &format!("\"{key}\":\""), |c| c == '"' || c == '\\');
            out = mask_after(&out, &format!("\\\"{key}\\\":\\\""), |c| {
                c == '\\' || c == '"'
            });
        }
        out
    }
}

/// Below this many characters a secret is masked only whole: a shorter start of it could be
/// any word.
const SECRET_START: usize = 16;

/// Masks a secret that a length limit cut short (an error excerpt of 200 characters that ends
/// inside a quoted token): wherever the secret's first `SECRET_START` characters appear, the
/// mask covers as much of the secret as follows.
fn mask_cut_secret(text: &str, secret: &str) -> String {
    let Some((end, _)) = secret.char_indices().nth(SECRET_START) else {
        return text.to_owned();
    };
    let start = &secret[..end];
    if !text.contains(start) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(position) = rest.find(start) {
        out.push_str(&rest[..position]);
        out.push_str(MASK);
        // Whole characters only, so that the cut stays on a character boundary.
        let matched: usize = rest[position..]
            .chars()
            .zip(secret.chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        rest = &rest[position + matched..];
    }
    out.push_str(rest);
    out
}

/// Replaces what follows each `marker` up to the first `end` character with the mask.
fn mask_after(text: &str, marker: &str, end: impl Fn(char) -> bool) -> String {
    if !text.contains(marker) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(position) = rest.find(marker) {
        let value_start = position + marker.len();
        out.push_str(&rest[..value_start]);
        let value = &rest[value_start..];
        let value_len = value.find(&end).unwrap_or(value.len());
        if value_len > 0 && &value[..value_len] != MASK {
            out.push_str(MASK);
        } else {
            out.push_str(&value[..value_len]);
        }
        rest = &value[value_len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_secrets_are_masked_anywhere() {
        let redactor = Redactor::new(vec![
            "s3cr3t-app".into(),
            "page-token-1".into(),
            "ab".into(),
        ]);
        assert_eq!(
            redactor.redact("failed with s3cr3t-app and page-token-1 (ab)"),
            "failed with [redacted] and [redacted] (ab)"
        );
    }

    #[test]
    fn a_secret_cut_short_by_an_excerpt_is_masked_too() {
        let token = "EAAGm0PX4ZCpsBAKZCfq1Ztoken0123456789abcdefghijklmnop";
        let redactor = Redactor::new(vec![token.into(), "short-secret".into()]);
        // Graph quoting a token, cut at 40 characters by the error excerpt.
        let cut = format!("Malformed access token {}", &token[..40]);
        assert_eq!(redactor.redact(&cut), "Malformed access token [redacted]");
        // Cut in the middle of a longer text, and twice.
        let twice = format!("{} and {}: end", &token[..20], &token[..30]);
        assert_eq!(redactor.redact(&twice), "[redacted] and [redacted]: end");
        // Fewer than 16 characters of a token, or the start of a short secret, stay: they
        // could be any word.
        assert_eq!(redactor.redact(&token[..15]), token[..15]);
        assert_eq!(redactor.redact("short-sec"), "short-sec");
    }

    /// A secret with characters of more than one byte: the cut is counted in characters, and
    /// two characters that share their first byte (é and è) do not end the mask mid-character.
    #[test]
    fn a_cut_secret_with_non_ascii_characters_is_masked_without_a_panic() {
        let redactor = Redactor::new(vec!["0123456789abcdef-clé".to_owned()]);
        assert_eq!(
            redactor.redact("HTTP 400: bad key 0123456789abcdef-clè"),
            "HTTP 400: bad key [redacted]è"
        );
        // 16 characters of this secret are 31 bytes: counted in bytes, its start would be
        // cut inside a character and the cut secret left as it was.
        let secret = format!("a{}", "é".repeat(20));
        let cut: String = secret.chars().take(18).collect();
        assert_eq!(
            Redactor::new(vec![secret]).redact(&format!("x {cut} y")),
            "x [redacted] y"
        );
    }

    #[test]
    fn secret_keys_in_urls_and_json_are_masked() {
        let redactor = Redactor::default();
        assert_eq!(
            redactor.redact("POST https://graph.facebook.com/v20.0/1/page_activities?access_token=EAAB123&appsecret_proof=abc failed"),
            "POST https://graph.facebook.com/v20.0/1/page_activities?access_token=[redacted]&appsecret_proof=[redacted] failed"
        );
        assert_eq!(
            redactor.redact(
                r#"{"qs":{"access_token":"EAAB"},"url":"https://t/track?apiKey=k1&type=incoming"}"#
            ),
            r#"{"qs":{"access_token":"[redacted]"},"url":"https://t/track?apiKey=[redacted]&type=incoming"}"#
        );
        assert_eq!(
            redactor.redact(r#"{\"access_token\":\"EAAB\"}"#),
            r#"{\"access_token\":\"[redacted]\"}"#
        );
        assert_eq!(redactor.redact("access_token=&x=1"), "access_token=&x=1");
    }
}
