//! How deliveries reach a sink: over HTTPS, trusting the system's roots (which
//! `SSL_CERT_FILE` can name), and through the proxy the environment names.

use crate::support::{
    APP_SECRET, MockSink, RelayProcess, TestResult, VERIFY_TOKEN, fast_bot, metrics_text,
    post_signed, spawn_app, start_relay, text_message,
};
use botrelay::signing::sign_sha256;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

/// The real binary with a store in `dir`, only a bot at `bot_url`, and `env` on top.
async fn start(dir: &Path, bot_url: &str, env: &[(&str, &str)]) -> TestResult<RelayProcess> {
    let config = dir.join("botrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [store]\npath = \"{}\"\n{}",
            dir.join("botrelay.db").display(),
            fast_bot(bot_url),
        ),
    )?;
    let mut all = vec![
        ("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET),
        ("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN),
    ];
    all.extend_from_slice(env);
    start_relay(&["--config".as_ref(), config.as_os_str()], &all).await
}

/// Waits until the relay's `/metrics` counts `count` deliveries to the bot as delivered (the
/// attempt has read the whole answer by then, so its connection is idle again).
async fn delivered(http: &reqwest::Client, admin_url: &str, count: u64) -> TestResult {
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = metrics_text(http, admin_url).await?;
        let now = metrics
            .lines()
            .filter(|line| {
                line.starts_with("botrelay_deliveries_total{")
                    && line.contains("sink=\"bot\"")
                    && line.contains("outcome=\"delivered\"")
            })
            .find_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        if now >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{now} deliveries counted, expected {count}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn test_ca() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/ca.pem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_go_out_over_https_to_a_sink_whose_issuer_the_system_trusts() -> TestResult {
    let bot = MockSink::start_tls().await?;
    let dir = tempfile::tempdir()?;
    let ca = test_ca();
    let ca = ca.to_str().ok_or("the CA's path is not UTF-8")?;
    let mut relay = start(
        dir.path(),
        &bot.https_url("/webhook"),
        &[("SSL_CERT_FILE", ca), ("SSL_CERT_DIR", "/nonexistent")],
    )
    .await?;
    let body = text_message("PAGE", "alice", "m.tls.1", "over TLS", 1_700_000_000_000);
    let http = reqwest::Client::new();
    assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    assert_eq!(
        post_signed(&http, &relay.url, &body).await?.status(),
        200,
        "a repeat is acked (and not delivered again)"
    );
    let received = bot.wait_for(1, WAIT).await?;
    let request = &received[0];
    assert_eq!(
        (request.method.as_str(), request.uri.as_str()),
        ("POST", "/webhook")
    );
    assert_eq!(request.body, body, "one item: forwarded verbatim");
    assert_eq!(
        request.header("x-hub-signature-256"),
        Some(sign_sha256(APP_SECRET.as_bytes(), &request.body).as_str())
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.header("user-agent"),
        Some(concat!("botrelay/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(request.header("host"), Some(bot.addr.to_string().as_str()));

    // Webhooks one after another, each once the last was delivered: all go over the first
    // connection (one TLS handshake), kept alive in the client's pool.
    delivered(&http, &relay.admin_url, 1).await?;
    for index in 2u8..=3 {
        let next = text_message(
            "PAGE",
            "alice",
            &format!("m.tls.{index}"),
            "again",
            1_700_000_000_000 + i64::from(index),
        );
        assert_eq!(post_signed(&http, &relay.url, &next).await?.status(), 200);
        let received = bot.wait_for(usize::from(index), WAIT).await?;
        assert_eq!(received[usize::from(index) - 1].body, next);
        delivered(&http, &relay.admin_url, u64::from(index)).await?;
    }
    assert_eq!(bot.connections(), 1, "one connection for every delivery");
    relay.terminate(WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_sink_whose_certificate_no_root_vouches_for_is_not_sent_anything() -> TestResult {
    // In process, with this machine's roots: the test CA is not among them.
    let bot = MockSink::start_tls().await?;
    let app = spawn_app(&fast_bot(&bot.https_url("/webhook"))).await?;
    let body = text_message("PAGE", "bob", "m.tls.untrusted", "hi", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    let failed = app
        .wait_for_deliveries(
            |delivery| delivery.sink == "bot" && delivery.attempts >= 1,
            1,
            WAIT,
        )
        .await?;
    let error = failed[0].last_error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("connection failed: ") && error.contains("certificate"),
        "{error}"
    );
    assert_eq!(failed[0].last_status, None);
    assert!(
        bot.received().is_empty(),
        "no request got through the handshake"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_go_through_the_proxy_the_environment_names() -> TestResult {
    // The bot's host does not resolve: only the proxy can carry the request.
    let proxy = MockSink::start().await?;
    let dir = tempfile::tempdir()?;
    let proxy_url = format!("http://{}", proxy.addr);
    let mut relay = start(
        dir.path(),
        "http://bot.invalid:8080/hook?v=1",
        &[("HTTP_PROXY", &proxy_url), ("NO_PROXY", "")],
    )
    .await?;
    let body = text_message("PAGE", "carol", "m.proxy.1", "via proxy", 1_700_000_000_000);
    let http = reqwest::Client::new();
    assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    let received = proxy.wait_for(1, WAIT).await?;
    let request = &received[0];
    assert_eq!(
        (request.method.as_str(), request.uri.as_str()),
        ("POST", "/hook?v=1")
    );
    assert_eq!(request.header("host"), Some("bot.invalid:8080"));
    assert_eq!(request.body, body);
    assert_eq!(
        request.header("x-hub-signature-256"),
        Some(sign_sha256(APP_SECRET.as_bytes(), &body).as_str())
    );
    relay.terminate(WAIT).await?;
    Ok(())
}
