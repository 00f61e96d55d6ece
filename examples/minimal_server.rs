//! The least a webhook receiver must do per request, as a yardstick for the relay's CPU per
//! webhook (`benches/pipeline.rs` runs both under the same load): check Meta's
//! `X-Hub-Signature-256` (HMAC-SHA256 of the raw body, the relay's own check), parse the body
//! as JSON with serde_json, answer 200. Nothing is stored. Same HTTP stack, runtime and
//! allocator as the `botrelay` binary.
//!
//! With `--forward URL` (repeatable) it is also the least a relay with this one's fan-out must
//! do: before answering, it POSTs the verified body to every such URL at once, with the relay's
//! own delivery client (pooled connections), and answers 200 when every one answered 2xx, 502
//! otherwise. Nothing is stored, nothing is retried, nothing is encoded per sink: one inbound
//! exchange plus one outbound exchange per URL. With this HTTP stack, that is as low as the
//! relay's CPU per webhook could go while each vendor takes one event per request.
//!
//! `cargo run --release --example minimal_server -- [--listen 127.0.0.1:0] [--secret S]
//! [--forward URL]...` prints `listening <address>` on its first line of standard output, then
//! serves until killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use botrelay::delivery::{Client, Method, Outcome, Request};
use botrelay::ingest::verify::{SignatureHeaders, verify_webhook};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What the server was started with.
struct Settings {
    secret: Vec<u8>,
    forward: Vec<url::Url>,
    client: Client,
}

async fn receive(settings: Arc<Settings>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = SignatureHeaders {
        sha256: headers
            .get("x-hub-signature-256")
            .and_then(|value| value.to_str().ok()),
        sha1: None,
    };
    let Ok(verified) = verify_webhook(&settings.secret, false, signature, body.clone()) else {
        return StatusCode::FORBIDDEN;
    };
    if serde_json::from_slice::<serde_json::Value>(verified.as_bytes()).is_err() {
        return StatusCode::BAD_REQUEST;
    }
    let sends = settings.forward.iter().map(|url| {
        let request = Request {
            method: Method::Post,
            url: url.clone(),
            headers: vec![("content-type", "application/json".to_owned())],
            body: Some(body.clone()),
        };
        settings
            .client
            .send(request, Duration::from_secs(10), |_| None)
    });
    let all_delivered = futures_util::future::join_all(sends)
        .await
        .iter()
        .all(|sent| matches!(sent.outcome, Outcome::Delivered { .. }));
    if all_delivered {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    }
}

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut secret = "app_secret".to_owned();
    let mut forward = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDRESS"),
            "--secret" => secret = args.next().expect("--secret SECRET"),
            "--forward" => {
                let url = args.next().expect("--forward URL");
                forward.push(url::Url::parse(&url).expect("--forward takes an http(s) URL"));
            }
            other => panic!(
                "unknown argument {other}; takes --listen ADDRESS, --secret SECRET, --forward URL"
            ),
        }
    }
    let settings = Arc::new(Settings {
        secret: secret.into_bytes(),
        forward,
        client: Client::new().expect("the delivery client"),
    });
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            receive(settings.clone(), headers, body)
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
