//! `GET /webhook`, `POST /webhook`, `/healthz`, `/readyz`: the verified, durable ingress.

use crate::support::{
    APP_SECRET, EventKind, TestResult, VERIFY_TOKEN, fixture, run_cli, spawn_app, stderr, stdout,
    text_message,
};
use botrelay::signing::{sign_sha1, sign_sha256};
use std::time::Duration;

const BOT: &str = "[bot]\nurl = \"http://127.0.0.1:9/unused\"\n";

#[tokio::test]
async fn handshake_echoes_the_challenge_only_for_the_right_token() -> TestResult {
    let app = spawn_app("").await?;
    let ok = app
        .http
        .get(format!(
            "{}/webhook?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444",
            app.url
        ))
        .send()
        .await?;
    assert_eq!(ok.status(), 200);
    assert!(
        ok.headers()["content-type"]
            .to_str()?
            .starts_with("text/plain")
    );
    assert_eq!(ok.text().await?, "1158201444");

    for query in [
        "hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
        "hub.mode=unsubscribe&hub.verify_token=test_verify_token&hub.challenge=1",
        "hub.verify_token=test_verify_token&hub.challenge=1",
        "hub.mode=subscribe&hub.challenge=1",
        "",
    ] {
        let refused = app
            .http
            .get(format!("{}/webhook?{query}", app.url))
            .send()
            .await?;
        assert_eq!(refused.status(), 403, "{query}");
        assert_eq!(refused.text().await?, "", "{query}");
    }
    app.stop().await
}

#[tokio::test]
async fn signed_batch_is_stored_before_the_ack_with_one_delivery_per_sink() -> TestResult {
    let app = spawn_app(BOT).await?;
    let body = fixture("messenger/message-text-legacy-seq.json");
    let response = app.post_webhook(&body).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "EVENT_RECEIVED");
    // The ack came after the commit: the rows are there the moment it arrives.
    assert_eq!(
        app.count_events(|event| event.kind == EventKind::Message)
            .await?,
        1
    );
    assert_eq!(
        app.count_deliveries(|delivery| delivery.sink == "bot")
            .await?,
        1
    );
    let stored: Vec<(Option<String>, Option<String>)> = app
        .events()
        .await?
        .into_iter()
        .map(|event| (event.user_id, event.page_id))
        .collect();
    assert_eq!(
        stored,
        [(Some("USER_ID".to_owned()), Some("111111".to_owned()))]
    );
    app.stop().await
}

#[tokio::test]
async fn missing_or_bad_signatures_get_401_and_store_nothing() -> TestResult {
    let app = spawn_app(BOT).await?;
    let body = fixture("messenger/message-text-quick-reply.json");
    let url = format!("{}/webhook", app.url);
    let unsigned = app.http.post(&url).body(body.clone()).send().await?;
    assert_eq!(unsigned.status(), 401);
    let wrong_secret = app
        .http
        .post(&url)
        .header("x-hub-signature-256", sign_sha256(b"not_the_secret", &body))
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(wrong_secret.status(), 401);
    let mut tampered = body.clone();
    tampered.push(b' ');
    let tampered_body = app
        .http
        .post(&url)
        .header(
            "x-hub-signature-256",
            sign_sha256(APP_SECRET.as_bytes(), &body),
        )
        .body(tampered)
        .send()
        .await?;
    assert_eq!(tampered_body.status(), 401);
    let garbage = app
        .http
        .post(&url)
        .header("x-hub-signature-256", "sha256=not-hex")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(garbage.status(), 401);
    // The legacy SHA-1 header is refused unless enabled.
    let sha1_only = app
        .http
        .post(&url)
        .header("x-hub-signature", sign_sha1(APP_SECRET.as_bytes(), &body))
        .body(body)
        .send()
        .await?;
    assert_eq!(sha1_only.status(), 401);
    assert_eq!(app.events().await?.len(), 0);
    assert_eq!(app.deliveries().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn legacy_sha1_signature_is_accepted_when_enabled() -> TestResult {
    let app =
        crate::support::spawn_app_with_env(BOT, &[("BOTRELAY__MESSENGER__ACCEPT_SHA1", "true")])
            .await?;
    let body = fixture("messenger/message-text-legacy-seq.json");
    let response = app
        .http
        .post(format!("{}/webhook", app.url))
        .header(
            "x-hub-signature",
            "sha1=daac25b34bfd9fe67f4fb8c58580fdc33d68a407",
        )
        .body(body)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(app.events().await?.len(), 1);
    app.stop().await
}

#[tokio::test]
async fn body_over_the_limit_gets_413() -> TestResult {
    let app = spawn_app(&format!("[server]\nmax_body_bytes = 1024\n{BOT}")).await?;
    let big = text_message("1", "2", "m.big", &"x".repeat(2000), 1_700_000_000_000);
    let response = app.post_webhook(&big).await?;
    assert_eq!(response.status(), 413);
    let small = text_message("1", "2", "m.small", "hi", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&small).await?.status(), 200);
    assert_eq!(app.events().await?.len(), 1);
    app.stop().await
}

#[tokio::test]
async fn signed_non_json_gets_400_and_stores_nothing() -> TestResult {
    let app = spawn_app(BOT).await?;
    let response = app.post_webhook(b"this is not json").await?;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.text().await?,
        r#"{"error":"body is not JSON: expected ident at line 1 column 2"}"#
    );
    assert_eq!(app.events().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn signed_json_that_is_not_a_batch_is_acked_and_ignored() -> TestResult {
    let app = spawn_app(BOT).await?;
    let body = fixture("messenger/dashboard-test-format.json");
    let response = app.post_webhook(&body).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "EVENT_RECEIVED");
    assert_eq!(app.events().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn a_repeated_post_stores_nothing_new() -> TestResult {
    let app = spawn_app(BOT).await?;
    let body = fixture("messenger/batch-multi-entry.json");
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    let events = app.events().await?.len();
    let deliveries = app.deliveries().await?.len();
    assert!(events >= 2, "multi-page batch stored {events} events");
    for _ in 0..3 {
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    assert_eq!(app.events().await?.len(), events);
    assert_eq!(app.deliveries().await?.len(), deliveries);
    app.stop().await
}

#[tokio::test]
async fn escaped_bodies_verify_and_the_raw_item_is_stored_verbatim() -> TestResult {
    let app = spawn_app(BOT).await?;
    // `\u2764\ufe0f` in the reactions fixture, `https:\/\/` in a body of our own.
    let reactions = fixture("messenger/message-reactions.json");
    assert_eq!(app.post_webhook(&reactions).await?.status(), 200);
    let escaped = br#"{"object":"page","entry":[{"id":"42","time":1,"messaging":[{"sender":{"id":"7"},"recipient":{"id":"42"},"timestamp":1700000000000,"message":{"mid":"m.esc","text":"caf\u00e9 \u00e4\u00f6\u00e5 https:\/\/example.com\/a"}}]}]}"#;
    assert_eq!(app.post_webhook(escaped).await?.status(), 200);
    let events = app.events().await?;
    let stored = |kind: EventKind| -> TestResult<String> {
        let event = events
            .iter()
            .find(|event| event.kind == kind)
            .ok_or(format!("no {kind} stored"))?;
        Ok(serde_json::to_string(event)?)
    };
    let payload = stored(EventKind::Message)?;
    assert!(
        payload.contains(r#""text":"caf\u00e9 \u00e4\u00f6\u00e5 https:\/\/example.com\/a""#),
        "{payload}"
    );
    let reaction = stored(EventKind::Reaction)?;
    assert!(
        reaction.contains(r#""emoji": "\u2764\ufe0f""#),
        "{reaction}"
    );
    app.stop().await
}

/// POSTs ~1 KB messages of different users until the capped store answers 503: how many
/// were acknowledged (200) before, and the 503.
async fn fill_until_503(app: &crate::support::TestApp) -> TestResult<(i64, reqwest::Response)> {
    for index in 0..200 {
        let body = text_message(
            "1",
            &format!("u{index}"),
            &format!("m.{index}"),
            &"x".repeat(900),
            1_700_000_000_000,
        );
        let answer = app.post_webhook(&body).await?;
        match answer.status().as_u16() {
            200 => {}
            503 => return Ok((index, answer)),
            other => return Err(format!("unexpected status {other}").into()),
        }
    }
    Err("the capped store never filled up".into())
}

#[tokio::test]
async fn full_store_answers_503_and_readyz_follows() -> TestResult {
    // A store capped at a few pages: the schema fits, a couple of hundred messages do not.
    let app =
        crate::support::spawn_app_with_env(BOT, &[("BOTRELAY__STORE__MAX_BYTES", "90000")]).await?;
    assert_eq!(
        app.http
            .get(format!("{}/readyz", app.url))
            .send()
            .await?
            .status(),
        200
    );
    // `botrelay healthcheck` (the image's HEALTHCHECK) finds the relay at server.listen.
    let listen = app.url.trim_start_matches("http://").to_owned();
    let ready = run_cli(&["healthcheck"], &[("BOTRELAY__SERVER__LISTEN", &listen)]).await?;
    assert_eq!(
        (ready.status.code(), stdout(&ready).trim()),
        (Some(0), "ready")
    );
    let (_, full_answer) = fill_until_503(&app).await?;
    // The error says why (SQLite has already rolled the group back by itself: the answer must
    // not be the failed ROLLBACK's "no transaction is active").
    let text = full_answer.text().await?;
    assert!(text.contains("the store is full"), "{text}");
    assert_eq!(
        app.http
            .get(format!("{}/readyz", app.url))
            .send()
            .await?
            .status(),
        503
    );
    assert_eq!(
        app.http
            .get(format!("{}/healthz", app.url))
            .send()
            .await?
            .status(),
        200
    );
    let full = run_cli(&["healthcheck"], &[("BOTRELAY__SERVER__LISTEN", &listen)]).await?;
    let reason = stderr(&full);
    assert_eq!(full.status.code(), Some(1), "{reason}");
    assert!(
        reason.contains("not ready: ") && reason.contains("answered 503"),
        "{reason}"
    );
    app.stop().await
}

#[tokio::test]
async fn health_endpoints_answer() -> TestResult {
    let app = spawn_app("").await?;
    let health = app.http.get(format!("{}/healthz", app.url)).send().await?;
    assert_eq!(health.status(), 200);
    let ready = app.http.get(format!("{}/readyz", app.url)).send().await?;
    assert_eq!(ready.status(), 200);
    app.stop().await
}

/// A message whose text was cut inside an emoji (`"\ud83d"`, an unpaired surrogate) passes the
/// body's JSON check, so it is acked: it must then be stored and reach the bot byte for byte,
/// not be dropped.
#[tokio::test]
async fn an_item_with_a_lone_surrogate_is_stored_and_forwarded_verbatim() -> TestResult {
    let bot = crate::support::MockSink::start().await?;
    let app = spawn_app(&crate::support::fast_bot(&bot.url("/webhook"))).await?;
    let item = r#"{"sender":{"id":"U1"},"recipient":{"id":"111"},"timestamp":1700000000000,"message":{"mid":"m.cut","text":"cut \ud83d"}}"#;
    let body = format!(
        r#"{{"object":"page","entry":[{{"id":"111","time":1700000000000,"messaging":[{item}]}}]}}"#
    );
    assert_eq!(app.post_webhook(body.as_bytes()).await?.status(), 200);
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        1,
        std::time::Duration::from_secs(5),
    )
    .await?;
    assert_eq!(
        app.count_events(|event| event.kind == EventKind::Message)
            .await?,
        1
    );
    let received = bot.received();
    assert_eq!(received.len(), 1);
    assert!(
        String::from_utf8_lossy(&received[0].body).contains(item),
        "{}",
        String::from_utf8_lossy(&received[0].body)
    );
    app.stop().await
}

/// `botrelay healthcheck` asks the relay on this machine directly, even with `HTTP_PROXY` set
/// (a container behind an egress proxy): the proxy cannot reach the container's loopback.
#[tokio::test]
async fn healthcheck_ignores_an_http_proxy_for_the_local_relay() -> TestResult {
    let app = spawn_app("").await?;
    let listen = app.url.trim_start_matches("http://").to_owned();
    // A proxy address where nothing listens.
    let proxy = {
        let unused = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", unused.local_addr()?)
    };
    let output = tokio::task::spawn_blocking(move || {
        crate::support::relay_command()
            .arg("healthcheck")
            .env("BOTRELAY__SERVER__LISTEN", listen)
            .env("HTTP_PROXY", &proxy)
            .env("http_proxy", &proxy)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output()
    })
    .await??;
    app.stop().await?;
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}stderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `healthcheck` exits 0 or 1 only, a bad `server.listen` included: Docker's HEALTHCHECK
/// reserves 2.
#[tokio::test]
async fn healthcheck_exits_0_or_1_only() -> TestResult {
    let output = run_cli(&["healthcheck"], &[("BOTRELAY__SERVER__LISTEN", "8080")]).await?;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    Ok(())
}

/// A full store still drains: retries settle in the full file, a restart releases the leases
/// the last run left (an UPDATE in a full file), and everything acknowledged reaches the bot.
#[tokio::test]
async fn a_full_store_restarts_and_delivers_everything_it_acknowledged() -> TestResult {
    let bot = crate::support::MockSink::start().await?;
    bot.set_default(crate::support::Reply::status(503));
    let extra = format!(
        "[bot]\nurl = \"{}\"\nbackoff = \"10ms\"\nmax_backoff = \"20ms\"\ntimeout = \"10s\"\n\
         max_attempts = 1000\n",
        bot.url("/webhook")
    );
    let app = crate::support::spawn_app_with_env(
        &extra,
        &[
            ("BOTRELAY__STORE__MAX_BYTES", "90000"),
            ("BOTRELAY__SERVER__SHUTDOWN_GRACE", "100ms"),
        ],
    )
    .await?;
    let (acknowledged, _) = fill_until_503(&app).await?;
    assert!(acknowledged > 0);
    // Failed attempts settle in the full file; then the bot stops answering, so the relay
    // stops with its deliveries in flight.
    let before = bot.received().len();
    bot.wait_for(before + 2 * acknowledged as usize, Duration::from_secs(5))
        .await?;
    let hanging = bot.received().len() + 1;
    bot.set_default(crate::support::Reply::hang());
    // An attempt hangs: the relay stops with it in flight (every attempt, or, once the sink is
    // recognised as down, its one probe).
    bot.wait_for(hanging, Duration::from_secs(10)).await?;
    let app = app.restart().await?;
    bot.set_default(crate::support::Reply::status(200));
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        acknowledged as usize,
        Duration::from_secs(10),
    )
    .await?;
    app.stop().await
}

/// What a slow client gets: the server's answer and close, or `None` when the connection is
/// still open and silent after `within`.
async fn answer_within(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> TestResult<Option<String>> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut answer)).await {
        Err(_) => Ok(None),
        // A reset is a close too.
        Ok(_) => Ok(Some(String::from_utf8_lossy(&answer).into_owned())),
    }
}

/// Slow clients on the public listener (slowloris) are cut off after `server.read_timeout`: a
/// connection that sends nothing, one that never finishes its headers, and one that never
/// finishes its body (answered 408). Without the bound, unauthenticated clients could hold
/// connections, and the body buffers they filled, for as long as they liked.
#[tokio::test]
async fn slow_clients_are_cut_off_after_the_read_timeout() -> TestResult {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app(&format!("[server]\nread_timeout = \"1s\"\n{BOT}")).await?;
    let address = app.url.trim_start_matches("http://").to_owned();
    let mut idle = tokio::net::TcpStream::connect(&address).await?;
    let mut headers = tokio::net::TcpStream::connect(&address).await?;
    headers
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n")
        .await?;
    let mut body = tokio::net::TcpStream::connect(&address).await?;
    body.write_all(b"POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{\"obj")
        .await?;
    let within = Duration::from_secs(5);
    let (idle, headers, body) = tokio::join!(
        answer_within(&mut idle, within),
        answer_within(&mut headers, within),
        answer_within(&mut body, within),
    );
    assert!(idle?.is_some(), "an idle connection stays open");
    assert!(
        headers?.is_some(),
        "a connection that never ends its headers stays open"
    );
    let body = body?.ok_or("a request whose body never ends stays open")?;
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");
    // A client that keeps to the bound is served as before.
    let small = text_message("1", "2", "m.in.time", "hi", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&small).await?.status(), 200);
    app.stop().await
}
