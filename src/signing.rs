//! HMAC signatures the relay computes: Meta's webhook signature (which the bot sink sends, and
//! verification recomputes), the legacy SHA-1 one (also Dashbot's), and Graph's
//! `appsecret_proof`. A leaf: bytes and a key in, lowercase hex out.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

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
}
