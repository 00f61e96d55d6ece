//! HMAC signatures the relay computes: Meta's webhook signature (which the bot sink sends, and
//! verification recomputes), the legacy SHA-1 one (also Dashbot's), and Graph's
//! `appsecret_proof`; and the constant-time bearer-token check both listeners use. A leaf.

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `sha256=<hex>` as Meta signs the bot-sink bodies, computed over exactly `body`.
pub fn sign_sha256(app_secret: &[u8], body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_bytes::<Hmac<Sha256>>(app_secret, body))
    )
}

/// `sha1=<hex>`: the legacy webhook header, and Dashbot's pause signature.
pub fn sign_sha1(secret: &[u8], body: &[u8]) -> String {
    format!(
        "sha1={}",
        hex::encode(hmac_bytes::<Hmac<Sha1>>(secret, body))
    )
}

/// Lowercase hex HMAC-SHA256 of a page token keyed by the app secret (Graph's `appsecret_proof`).
pub fn appsecret_proof(app_secret: &[u8], access_token: &str) -> String {
    hex::encode(hmac_bytes::<Hmac<Sha256>>(
        app_secret,
        access_token.as_bytes(),
    ))
}

fn hmac_bytes<M: Mac + hmac::digest::KeyInit>(key: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
    match <M as hmac::digest::KeyInit>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// `Authorization: Bearer <token>`. The digests are compared in constant time, so that neither
/// the token's bytes nor its length leak through timing.
pub fn bearer_matches(expected: &SecretString, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    let presented = Sha256::digest(presented.trim().as_bytes());
    let expected = Sha256::digest(expected.expose_secret().as_bytes());
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(presented.as_slice().ct_eq(expected.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test_app_secret";
    const LEGACY: &[u8] = include_bytes!("../tests/data/messenger/message-text-legacy-seq.json");

    #[test]
    fn legacy_sha1_vector_matches_the_reference() {
        assert_eq!(
            sign_sha1(SECRET, LEGACY),
            "sha1=daac25b34bfd9fe67f4fb8c58580fdc33d68a407"
        );
    }

    #[test]
    fn appsecret_proof_is_lowercase_hex_hmac_of_the_token() {
        let proof = appsecret_proof(b"secret", "token");
        assert_eq!(proof.len(), 64);
        assert_eq!(proof, proof.to_lowercase());
        assert_eq!(format!("sha256={proof}"), sign_sha256(b"secret", b"token"));
    }

    #[test]
    fn the_bearer_token_must_match_exactly() {
        let token = SecretString::from("s3cret-admin");
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            if let Ok(value) = axum::http::HeaderValue::from_str(value) {
                headers.insert(header::AUTHORIZATION, value);
            }
            headers
        };
        assert!(bearer_matches(&token, &headers("Bearer s3cret-admin")));
        assert!(bearer_matches(&token, &headers("bearer  s3cret-admin ")));
        for wrong in [
            "",
            "Bearer",
            "Bearer s3cret",
            "Bearer s3cret-admin2",
            "Basic s3cret-admin",
            "s3cret-admin",
        ] {
            assert!(!bearer_matches(&token, &headers(wrong)), "{wrong}");
        }
    }
}
