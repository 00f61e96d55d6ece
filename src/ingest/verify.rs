//! Authentication of what reaches the public listener: Meta's subscribe handshake, the
//! `X-Hub-Signature-256` (and legacy `X-Hub-Signature`) HMAC over the raw body, and Dashbot's
//! `x-dashbot-signature`, and the bearer tokens of `/outgoing`, `/events` and the admin API.
//! Pure and synchronous: bytes in, a verdict out.
//!
//! A [`VerifiedBody`] can only be made here, so code that parses a webhook cannot forget to
//! check its signature first. Every comparison is constant-time.

use crate::telemetry::metric;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a signed request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature header is missing")]
    Missing,
    #[error("signature header is malformed")]
    Malformed,
    #[error("signature does not match the body")]
    Mismatch,
}

impl VerifyError {
    /// Its `reason` label on `botrelay_webhook_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            VerifyError::Missing => metric::REJECTED_SIGNATURE_MISSING,
            VerifyError::Malformed => metric::REJECTED_SIGNATURE_MALFORMED,
            VerifyError::Mismatch => metric::REJECTED_SIGNATURE_MISMATCH,
        }
    }
}

/// A request body whose signature was checked against the app secret.
#[derive(Debug, Clone)]
pub struct VerifiedBody(Bytes);

impl VerifiedBody {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The signature headers of a webhook POST, as received.
#[derive(Debug, Default, Clone, Copy)]
pub struct SignatureHeaders<'a> {
    /// `X-Hub-Signature-256`.
    pub sha256: Option<&'a str>,
    /// `X-Hub-Signature` (legacy, SHA-1).
    pub sha1: Option<&'a str>,
}

/// Checks Meta's signature over the exact raw bytes, before anything is parsed.
///
/// The SHA-256 header wins when present. The SHA-1 header is considered only when `accept_sha1`
/// is set and no SHA-256 header came.
pub fn verify_webhook(
    app_secret: &[u8],
    accept_sha1: bool,
    headers: SignatureHeaders<'_>,
    body: Bytes,
) -> Result<VerifiedBody, VerifyError> {
    match (headers.sha256, headers.sha1) {
        (Some(header), _) => {
            let expected = decode_signature(header, "sha256=")?;
            check_hmac::<Hmac<Sha256>>(app_secret, &body, &expected)?;
        }
        (None, Some(header)) if accept_sha1 => {
            let expected = decode_signature(header, "sha1=")?;
            check_hmac::<Hmac<Sha1>>(app_secret, &body, &expected)?;
        }
        _ => return Err(VerifyError::Missing),
    }
    Ok(VerifiedBody(body))
}

/// Checks `x-dashbot-signature: sha1=<hex>` over the raw body, then over the compact
/// re-serialization of the JSON (Dashbot's own examples sign `JSON.stringify(req.body)`).
pub fn verify_dashbot(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), VerifyError> {
    let expected = decode_signature(header.ok_or(VerifyError::Missing)?, "sha1=")?;
    if check_hmac::<Hmac<Sha1>>(secret, body, &expected).is_ok() {
        return Ok(());
    }
    let compact = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| serde_json::to_vec(&value).ok())
        .ok_or(VerifyError::Mismatch)?;
    check_hmac::<Hmac<Sha1>>(secret, &compact, &expected)
}

/// The subscribe handshake: `Some(challenge)` when mode and token match.
pub fn handshake<'a>(
    verify_token: &[u8],
    mode: Option<&str>,
    token: Option<&str>,
    challenge: Option<&'a str>,
) -> Option<&'a str> {
    // Digests of equal length, compared in constant time: `ct_eq` on the raw bytes would
    // return at once on a length mismatch, and so tell the token's length.
    let token_matches: bool = token
        .map(|token| {
            Sha256::digest(token.as_bytes())
                .ct_eq(&Sha256::digest(verify_token))
                .into()
        })
        .unwrap_or(false);
    (mode == Some("subscribe") && token_matches)
        .then_some(challenge)
        .flatten()
}

fn decode_signature(header: &str, prefix: &str) -> Result<Vec<u8>, VerifyError> {
    let hex_digits = header
        .trim()
        .strip_prefix(prefix)
        .ok_or(VerifyError::Malformed)?;
    hex::decode(hex_digits).map_err(|_| VerifyError::Malformed)
}

fn check_hmac<M: Mac + hmac::digest::KeyInit>(
    key: &[u8],
    message: &[u8],
    expected: &[u8],
) -> Result<(), VerifyError> {
    let mut mac =
        <M as hmac::digest::KeyInit>::new_from_slice(key).map_err(|_| VerifyError::Mismatch)?;
    mac.update(message);
    // `verify_slice` compares in constant time.
    mac.verify_slice(expected)
        .map_err(|_| VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{sign_sha1, sign_sha256};

    const SECRET: &[u8] = b"test_app_secret";
    const LEGACY: &[u8] = include_bytes!("../../tests/data/messenger/message-text-legacy-seq.json");

    fn headers(sha256: Option<&str>) -> SignatureHeaders<'_> {
        SignatureHeaders { sha256, sha1: None }
    }

    #[test]
    fn fixture_vector_from_the_issue_verifies() {
        let header = "sha256=fe7199be257da51b7f02fe68841ebdbb1c2c400167ab9a3e68cfa63231bddefc";
        assert_eq!(sign_sha256(SECRET, LEGACY), header);
        let verified = verify_webhook(
            SECRET,
            false,
            headers(Some(header)),
            Bytes::from_static(LEGACY),
        );
        assert_eq!(
            verified.map(|body| body.as_bytes().len()).ok(),
            Some(LEGACY.len())
        );
    }

    #[test]
    fn a_single_changed_byte_is_a_mismatch() {
        let header = sign_sha256(SECRET, LEGACY);
        let mut tampered = LEGACY.to_vec();
        tampered[10] ^= 1;
        let result = verify_webhook(SECRET, false, headers(Some(&header)), Bytes::from(tampered));
        assert_eq!(result.err(), Some(VerifyError::Mismatch));
    }

    #[test]
    fn wrong_secret_missing_header_and_bad_prefix_are_rejected() {
        let body = Bytes::from_static(LEGACY);
        let other = sign_sha256(b"another_secret", LEGACY);
        assert_eq!(
            verify_webhook(SECRET, false, headers(Some(&other)), body.clone()).err(),
            Some(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_webhook(SECRET, false, headers(None), body.clone()).err(),
            Some(VerifyError::Missing)
        );
        let good = sign_sha256(SECRET, LEGACY);
        let wrong_prefix = good.replace("sha256=", "sha1=");
        assert_eq!(
            verify_webhook(SECRET, false, headers(Some(&wrong_prefix)), body.clone()).err(),
            Some(VerifyError::Malformed)
        );
        assert_eq!(
            verify_webhook(SECRET, false, headers(Some("sha256=zz")), body).err(),
            Some(VerifyError::Malformed)
        );
    }

    #[test]
    fn uppercase_hex_is_accepted_like_lowercase() {
        let header = sign_sha256(SECRET, LEGACY)
            .to_uppercase()
            .replace("SHA256=", "sha256=");
        assert!(
            verify_webhook(
                SECRET,
                false,
                headers(Some(&header)),
                Bytes::from_static(LEGACY)
            )
            .is_ok()
        );
    }

    #[test]
    fn sha1_is_accepted_only_when_enabled() {
        let sha1 = sign_sha1(SECRET, LEGACY);
        let only_sha1 = SignatureHeaders {
            sha256: None,
            sha1: Some(&sha1),
        };
        let body = Bytes::from_static(LEGACY);
        assert_eq!(
            verify_webhook(SECRET, false, only_sha1, body.clone()).err(),
            Some(VerifyError::Missing)
        );
        assert!(verify_webhook(SECRET, true, only_sha1, body).is_ok());
    }

    #[test]
    fn escaped_bytes_are_verified_as_sent_not_as_reparsed() {
        let body: &[u8] = br#"{"object":"page","entry":[{"id":"1","url":"https:\/\/x","t":"\u00e4\u00f6\u00e5"}]}"#;
        let header = sign_sha256(SECRET, body);
        assert!(
            verify_webhook(
                SECRET,
                false,
                headers(Some(&header)),
                Bytes::from_static(body)
            )
            .is_ok()
        );
        let reparsed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let compact = serde_json::to_vec(&reparsed).unwrap_or_default();
        assert_ne!(sign_sha256(SECRET, &compact), header);
    }

    #[test]
    fn handshake_needs_subscribe_and_the_exact_token() {
        let token = b"verify-me";
        assert_eq!(
            handshake(
                token,
                Some("subscribe"),
                Some("verify-me"),
                Some("1158201444")
            ),
            Some("1158201444")
        );
        assert_eq!(
            handshake(token, Some("subscribe"), Some("verify-mE"), Some("1")),
            None
        );
        assert_eq!(
            handshake(token, Some("subscribe"), Some("verify-me-too"), Some("1")),
            None
        );
        assert_eq!(
            handshake(token, Some("unsubscribe"), Some("verify-me"), Some("1")),
            None
        );
        assert_eq!(handshake(token, None, Some("verify-me"), Some("1")), None);
        assert_eq!(handshake(token, Some("subscribe"), None, Some("1")), None);
        assert_eq!(
            handshake(token, Some("subscribe"), Some("verify-me"), None),
            None
        );
    }

    #[test]
    fn dashbot_signature_over_raw_or_compact_body() {
        let secret = b"dashbot-secret";
        let spaced = br#"{ "userId": "123", "paused": true }"#;
        let compact = br#"{"userId":"123","paused":true}"#;
        let over_raw = sign_sha1(secret, spaced);
        let over_compact = sign_sha1(secret, compact);
        assert!(verify_dashbot(secret, Some(&over_raw), spaced).is_ok());
        assert!(verify_dashbot(secret, Some(&over_compact), spaced).is_ok());
        assert_eq!(
            verify_dashbot(b"other", Some(&over_raw), spaced).err(),
            Some(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_dashbot(secret, None, spaced).err(),
            Some(VerifyError::Missing)
        );
    }
}
