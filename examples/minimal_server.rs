//! The least a webhook receiver must do per request, as a yardstick for the relay's CPU per
//! webhook (`benches/pipeline.rs` runs both under the same load): check Meta's
//! `X-Hub-Signature-256` (HMAC-SHA256 of the raw body, the relay's own check), parse the body
//! as JSON with serde_json, answer 200. Nothing is stored or forwarded. Same HTTP stack,
//! runtime and allocator as the `botrelay` binary.
//!
//! `cargo run --release --example minimal_server -- [--listen 127.0.0.1:0] [--secret S]`
//! prints `listening <address>` on its first line of standard output, then serves until killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use botrelay::ingest::verify::{SignatureHeaders, verify_webhook};
use std::io::Write;
use std::sync::Arc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn receive(secret: Arc<[u8]>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = SignatureHeaders {
        sha256: headers
            .get("x-hub-signature-256")
            .and_then(|value| value.to_str().ok()),
        sha1: None,
    };
    let Ok(verified) = verify_webhook(&secret, false, signature, body) else {
        return StatusCode::FORBIDDEN;
    };
    match serde_json::from_slice::<serde_json::Value>(verified.as_bytes()) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut secret = "app_secret".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDRESS"),
            "--secret" => secret = args.next().expect("--secret SECRET"),
            other => panic!("unknown argument {other}; takes --listen ADDRESS, --secret SECRET"),
        }
    }
    let secret: Arc<[u8]> = secret.into_bytes().into();
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            receive(secret.clone(), headers, body)
        }),
    );
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("bind --listen");
    println!(
        "listening {}",
        listener.local_addr().expect("local address")
    );
    std::io::stdout().flush().expect("stdout");
    axum::serve(listener, app).await.expect("serve");
}
