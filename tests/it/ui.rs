//! The status page (`GET /` on the admin listener) in a real browser: Chromium driven by
//! `playwright-core` from `tests/ui/status-page.test.mjs`, against relays started here with
//! mock sinks. The node script gets the URLs in environment variables, and drives the mock bot
//! and the webhooks through a small control server started here (`BOTRELAY_UI_CONTROL`).
//!
//! Needs `node`, Chromium (`/usr/bin/chromium`, or `BOTRELAY_CHROMIUM`) and
//! `tests/ui/node_modules` (`npm ci --prefix tests/ui`). Without them the test is skipped with
//! one line, or fails saying what is missing when `BOTRELAY_REQUIRE_BROWSER=1` (CI sets it).

use crate::support::{
    APP_SECRET, FAST_RETRY, MockSink, Reply, TestApp, TestResult, fast_bot, post_signed, spawn_app,
    text_message,
};
use axum::extract::{Path, State};
use botrelay::clock::now_ms;
use botrelay::ingest::messenger::normalize;
use botrelay::ingest::verify::{SignatureHeaders, verify_webhook};
use botrelay::signing::sign_sha256;
use botrelay::sink_name::SinkName;
use botrelay::store::{NewEvent, Settle, Store};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PAGE: &str = "111111";
const TOKEN: &str = "ui-admin-token-5c1e";
/// Dead letters of a sink that is not enabled, so that the table has pages to go through.
const SEEDED_LETTERS: usize = 10_000;
const NODE_TIMEOUT: Duration = Duration::from_secs(240);

/// What the browser tests need, found on this machine.
struct Browser {
    chromium: PathBuf,
    dir: PathBuf,
}

/// `Some` when node, Chromium and `tests/ui/node_modules` are all here; otherwise `None` after
/// one line on stderr, or an error when `BOTRELAY_REQUIRE_BROWSER=1`.
fn find_browser() -> TestResult<Option<Browser>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let chromium = std::env::var_os("BOTRELAY_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let mut missing = Vec::new();
    if !node {
        missing.push("node (Node.js 20 or later) on the PATH".to_owned());
    }
    if !chromium.is_file() {
        missing.push(format!(
            "Chromium at {} (apt-get install chromium, or set BOTRELAY_CHROMIUM)",
            chromium.display()
        ));
    }
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push("tests/ui/node_modules (npm ci --prefix tests/ui)".to_owned());
    }
    if missing.is_empty() {
        return Ok(Some(Browser { chromium, dir }));
    }
    if std::env::var("BOTRELAY_REQUIRE_BROWSER").is_ok_and(|value| value == "1") {
        return Err(format!(
            "BOTRELAY_REQUIRE_BROWSER=1, but the status page's browser tests need: {}",
            missing.join("; ")
        )
        .into());
    }
    // Straight to stderr, past the test harness's capture, so that the skip shows.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: the status page's browser tests need {} (BOTRELAY_REQUIRE_BROWSER=1 makes this a failure)",
        missing.join("; ")
    );
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_real_browser() -> TestResult {
    let Some(browser) = find_browser()? else {
        return Ok(());
    };
    let bot = MockSink::start().await?;
    let dashbot = MockSink::start().await?;
    let app = spawn_app(&format!(
        "{}[sinks.dashbot]\nurl = \"{}\"\napi_key = \"ui-dashbot-key\"\n{FAST_RETRY}",
        fast_bot(&bot.url("/webhook")),
        dashbot.url("/track")
    ))
    .await?;
    let guarded_bot = MockSink::start().await?;
    let guarded = spawn_app(&format!(
        "[admin]\ntoken = \"{TOKEN}\"\n{}",
        fast_bot(&guarded_bot.url("/webhook"))
    ))
    .await?;
    seed_dead_letters(&app.store, SEEDED_LETTERS).await?;
    let control = start_control(&app, &bot).await?;

    let out = tempfile::tempdir()?;
    let (stdout_path, stderr_path) = (out.path().join("stdout"), out.path().join("stderr"));
    let mut node = Command::new("node");
    node.args(["--test", "--test-concurrency=1", "status-page.test.mjs"])
        .current_dir(&browser.dir)
        .env("BOTRELAY_CHROMIUM", &browser.chromium)
        .env("BOTRELAY_UI_URL", &app.admin_url)
        .env("BOTRELAY_UI_SINKS", "bot,dashbot")
        .env("BOTRELAY_UI_SEEDED", SEEDED_LETTERS.to_string())
        .env("BOTRELAY_UI_CONTROL", &control)
        .env("BOTRELAY_UI_TOKEN_URL", &guarded.admin_url)
        .env("BOTRELAY_UI_TOKEN", TOKEN)
        .env(
            "BOTRELAY_UI_SCREENSHOT",
            std::env::var_os("BOTRELAY_UI_SCREENSHOT").unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?);
    let mut child = node.spawn()?;
    let deadline = Instant::now() + NODE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = format!(
        "{}\n{}",
        std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    assert!(
        status.is_some_and(|status| status.success()),
        "the browser tests failed ({}):\n{report}",
        status.map_or("timed out".to_owned(), |status| status.to_string())
    );
    // node's summary (`# tests 7`, `# pass 6`, `# skipped 1`, …) in the test's output.
    for line in report.lines().filter(|line| line.starts_with("# ")) {
        println!("status page in a browser: {}", &line[2..]);
    }
    // The replayed dead letter reached the bot: refused once, then delivered.
    let replayed: Vec<u16> = bot
        .received()
        .iter()
        .filter(|request| request.text().contains("mid-ui-dead"))
        .map(|request| request.replied)
        .collect();
    assert_eq!(replayed, [400, 200], "{report}");
    // No secret of the relays reached the page's test output.
    for secret in [APP_SECRET, "ui-dashbot-key"] {
        assert!(!report.contains(secret), "{secret} in:\n{report}");
    }
    app.stop().await?;
    guarded.stop().await?;
    Ok(())
}

/// `count` dead letters of `page_activities`, a sink not enabled here (no dispatcher sends
/// them), for users `seed-0` … straight through the store.
async fn seed_dead_letters(store: &Store, count: usize) -> TestResult {
    let sink = SinkName::PageActivities;
    let now = now_ms();
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let mut events = Vec::new();
        for n in chunk {
            let body = text_message(
                PAGE,
                &format!("seed-{}", n % 500),
                &format!("mid-seed-{n}"),
                "hello",
                1_700_000_000_000,
            );
            let signature = sign_sha256(APP_SECRET.as_bytes(), &body);
            let headers = SignatureHeaders {
                sha256: Some(&signature),
                sha1: None,
            };
            let verified = verify_webhook(APP_SECRET.as_bytes(), false, headers, body.into())?;
            let mut normalized = normalize(&verified, now)?;
            events.push(NewEvent {
                event: normalized.events.remove(0),
                sinks: vec![sink],
            });
        }
        store.enqueue(events, now).await?;
    }
    let dead = Settle::Dead {
        status: Some(400),
        error: "HTTP 400: (#100) Invalid parameter".into(),
        attempted: true,
    };
    loop {
        let claimed = store
            .claim(sink, 1000, now_ms(), Duration::from_secs(60))
            .await?;
        if claimed.deliveries.is_empty() {
            break;
        }
        for delivery in &claimed.deliveries {
            store.settle(delivery, dead.clone(), now_ms()).await?;
        }
    }
    Ok(())
}

/// What the control server drives.
#[derive(Clone)]
struct Control {
    relay: String,
    bot: MockSink,
    http: reqwest::Client,
}

/// Starts the control server the node script calls; returns its URL.
///
/// - `POST /bot/status/{code}`: the mock bot answers `code` from now on.
/// - `POST /messages/{user}/{mid}`: a signed webhook with one message to the relay.
/// - `GET /bot/received/{mid}`: the statuses the bot answered the requests carrying `mid` with.
async fn start_control(app: &TestApp, bot: &MockSink) -> TestResult<String> {
    use axum::routing::{get, post};
    let control = Control {
        relay: app.url.clone(),
        bot: bot.clone(),
        http: reqwest::Client::new(),
    };
    let router = axum::Router::new()
        .route(
            "/bot/status/{code}",
            post(
                |State(control): State<Control>, Path(code): Path<u16>| async move {
                    control.bot.set_default(Reply::status(code));
                    axum::Json(json!({ "status": code }))
                },
            ),
        )
        .route(
            "/messages/{user}/{mid}",
            post(
                |State(control): State<Control>,
                 Path((user, mid)): Path<(String, String)>| async move {
                    let body = text_message(PAGE, &user, &mid, "hello from the ui test", now_ms());
                    let status = post_signed(&control.http, &control.relay, &body)
                        .await
                        .map_or(0, |response| response.status().as_u16());
                    axum::Json(json!({ "status": status }))
                },
            ),
        )
        .route(
            "/bot/received/{mid}",
            get(
                |State(control): State<Control>, Path(mid): Path<String>| async move {
                    let replied: Vec<u16> = control
                        .bot
                        .received()
                        .iter()
                        .filter(|request| request.text().contains(&mid))
                        .map(|request| request.replied)
                        .collect();
                    axum::Json(json!({ "replied": replied }))
                },
            ),
        )
        .with_state(control);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(url)
}
