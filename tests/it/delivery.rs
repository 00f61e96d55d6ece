//! The delivery engine end to end: retry, `Retry-After`, dead letters and replay, per-user
//! order, isolation between users and between sinks, forwarding to the bot.

use crate::support::{
    APP_SECRET, DeliveryProbe, FAST_RETRY, MockSink, Reply, TestResult, assert_stays, fast_bot,
    fixture, post_signed, spawn_app, spawn_app_with_env, text_message, wait_until,
};
use botrelay::clock::now_ms;
use botrelay::signing::sign_sha256;
use botrelay::sink_name::SinkName;
use botrelay::store::{DeadLetterFilter, Store};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A `[bot]` table pointing at `bot`, with fast retries, plus `extra` keys.
fn bot_config(bot: &MockSink, extra: &str) -> String {
    format!(
        "{}timeout = \"2s\"\n{extra}",
        fast_bot(&bot.url("/webhook"))
    )
}

/// The `last_error` of the one delivery row there is.
fn only_error(deliveries: &[DeliveryProbe]) -> TestResult<String> {
    match deliveries {
        [delivery] => Ok(delivery.last_error.clone().unwrap_or_default()),
        _ => Err(format!("expected one delivery row: {deliveries:#?}").into()),
    }
}

fn verifies(received: &crate::support::Received) -> bool {
    received.header("x-hub-signature-256")
        == Some(sign_sha256(APP_SECRET.as_bytes(), &received.body).as_str())
}

#[tokio::test]
async fn bot_answering_500_500_200_gets_one_delivery_after_three_attempts() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::status(500), Reply::status(500)]);
    let app = spawn_app(&bot_config(&bot, "")).await?;
    let body = fixture("messenger/message-text-legacy-seq.json");
    assert_eq!(app.post_webhook(&body).await?.status(), 200);

    let received = bot.wait_for(3, Duration::from_secs(10)).await?;
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered" && delivery.attempts == 3,
        1,
        Duration::from_secs(5),
    )
    .await?;
    assert_stays(
        "exactly three attempts, the last one successful",
        Duration::from_millis(200),
        || bot.received().len() == 3,
    )
    .await?;
    for attempt in &received {
        assert_eq!(attempt.method, "POST");
        assert_eq!(attempt.uri, "/webhook");
        assert!(
            verifies(attempt),
            "the signature must verify with the app secret"
        );
        assert_eq!(attempt.header("content-type"), Some("application/json"));
    }
    // The body is a single-item webhook carrying the raw item byte for byte.
    let expected = concat!(
        r#"{"object":"page","entry":[{"id":"111111","time":1457764198246,"messaging":["#,
        r#"{ "sender":{ "id":"USER_ID" }, "recipient":{ "id":"PAGE_ID" }, "timestamp":1457764197627, "message":{ "mid":"mid.1457764197618:41d102a3e1ae206a38", "seq":73, "text":"hello, world!" } }"#,
        "]}]}"
    );
    assert_eq!(received[2].text(), expected);
    app.stop().await
}

/// A bot behind basic auth: the user and password in `bot.url` go out as an `Authorization`
/// header (never in the request line), and the password is redacted from what the store keeps.
#[tokio::test]
async fn a_bot_url_with_userinfo_sends_basic_auth_and_keeps_the_password_out_of_the_store()
-> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::json(
        400,
        serde_json::json!({"error": "relay:s3cretBotPass is not allowed"}),
    )]);
    let url = bot
        .url("/webhook")
        .replacen("http://", "http://relay:s3cretBotPass@", 1);
    let app = spawn_app(&format!("[bot]\nurl = \"{url}\"\n")).await?;
    let body = fixture("messenger/message-text-legacy-seq.json");
    assert_eq!(app.post_webhook(&body).await?.status(), 200);

    let received = bot.wait_for(1, Duration::from_secs(5)).await?;
    assert_eq!(received[0].uri, "/webhook");
    assert_eq!(
        received[0].header("authorization"),
        Some("Basic cmVsYXk6czNjcmV0Qm90UGFzcw==")
    );
    let deliveries = app
        .wait_for_deliveries(
            |delivery| delivery.state == "dead",
            1,
            Duration::from_secs(5),
        )
        .await?;
    let error = only_error(&deliveries)?;
    assert_eq!(
        error,
        r#"HTTP 400: {"error":"relay:[redacted] is not allowed"}"#
    );
    app.stop().await
}

#[tokio::test]
async fn standby_items_are_forwarded_under_standby() -> TestResult {
    let bot = MockSink::start().await?;
    let app = spawn_app(&bot_config(&bot, "")).await?;
    let body = fixture("messenger/standby.json");
    let sent: serde_json::Value = serde_json::from_slice(&body)?;
    let items = |channel: &str| -> usize {
        sent["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| entry[channel].as_array().map_or(0, Vec::len))
            .sum()
    };
    let (standby, messaging) = (items("standby"), items("messaging"));
    assert!(standby >= 2);
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    let received = bot
        .wait_for(standby + messaging, Duration::from_secs(10))
        .await?;
    let forwarded = |channel: &str| {
        received
            .iter()
            .filter(|request| request.json()["entry"][0][channel].is_array())
            .count()
    };
    assert_eq!(
        (forwarded("standby"), forwarded("messaging")),
        (standby, messaging)
    );
    for request in &received {
        let entry = &request.json()["entry"][0];
        assert!(
            entry["standby"].is_array() != entry["messaging"].is_array(),
            "{}",
            request.text()
        );
        assert!(verifies(request));
    }
    app.stop().await
}

#[tokio::test]
async fn retry_after_delays_the_next_attempt_and_does_not_use_an_attempt() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::status(429).with_header("retry-after", "1")]);
    // One attempt allowed: if the 429 counted, the delivery would be dead. `max_backoff` above
    // the asked second, which it caps.
    let app = spawn_app(&format!(
        "[bot]\nurl = \"{}\"\nbackoff = \"10ms\"\nmax_backoff = \"2s\"\nmax_attempts = 1\n",
        bot.url("/webhook")
    ))
    .await?;
    assert_eq!(
        app.post_webhook(&fixture("messenger/message-attachment.json"))
            .await?
            .status(),
        200
    );
    let received = bot.wait_for(2, Duration::from_secs(10)).await?;
    let gap = received[1].at.duration_since(received[0].at);
    assert!(
        gap >= Duration::from_millis(990),
        "second attempt came after {gap:?}"
    );
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered" && delivery.throttled == 1,
        1,
        Duration::from_secs(5),
    )
    .await?;
    app.stop().await
}

/// A sink that always answers `Retry-After: 0` is not retried at once forever: a wait shorter
/// than `backoff` counts as an ordinary failure, so `max_attempts` ends it.
#[tokio::test]
async fn retry_after_zero_is_an_ordinary_counted_failure() -> TestResult {
    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(503).with_header("retry-after", "0"));
    let app = spawn_app(&bot_config(&bot, "max_attempts = 3\n")).await?;
    assert_eq!(
        app.post_webhook(&fixture("messenger/message-attachment.json"))
            .await?
            .status(),
        200
    );
    app.wait_for_deliveries(
        |delivery| delivery.state == "dead" && delivery.attempts == 3 && delivery.throttled == 0,
        1,
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(bot.received().len(), 3);
    app.stop().await
}

#[tokio::test]
async fn permanent_4xx_dead_letters_at_once_and_replay_delivers_again() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::json(
        400,
        serde_json::json!({"error": "nope", "access_token": "leaked-token"}),
    )]);
    let app = spawn_app(&bot_config(&bot, "")).await?;
    assert_eq!(
        app.post_webhook(&fixture("messenger/message-reply-to.json"))
            .await?
            .status(),
        200
    );
    app.wait_for_deliveries(
        |delivery| delivery.state == "dead",
        1,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(
        bot.received().len(),
        1,
        "a permanent failure is not retried"
    );

    let letters = app.store.dead_letters(DeadLetterFilter::default()).await?;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.sink.as_str(), letter.kind.as_str(), letter.attempts),
        ("bot", "message", 1)
    );
    assert_eq!(letter.last_status, Some(400));
    let error = letter.last_error.clone().unwrap_or_default();
    assert!(error.starts_with("HTTP 400: "), "{error}");
    assert!(
        !error.contains("leaked-token"),
        "the stored excerpt is redacted: {error}"
    );

    let replayed = app
        .store
        .replay(
            DeadLetterFilter {
                sink: Some(SinkName::Bot),
                ..DeadLetterFilter::default()
            },
            &[SinkName::Bot],
            now_ms(),
        )
        .await?;
    assert_eq!(replayed.replayed, 1);
    bot.wait_for(2, Duration::from_secs(5)).await?;
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        1,
        Duration::from_secs(5),
    )
    .await?;
    app.stop().await
}

#[tokio::test]
async fn max_attempts_and_ttl_end_in_dead_letters() -> TestResult {
    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(503));
    let app = spawn_app(&bot_config(&bot, "max_attempts = 3\n")).await?;
    assert_eq!(
        app.post_webhook(&fixture("messenger/message-attachment.json"))
            .await?
            .status(),
        200
    );
    let deliveries = app
        .wait_for_deliveries(
            |delivery| delivery.state == "dead" && delivery.attempts == 3,
            1,
            Duration::from_secs(10),
        )
        .await?;
    let error = only_error(&deliveries)?;
    assert!(error.starts_with("gave up after 3 attempts"), "{error}");
    assert_eq!(bot.received().len(), 3);
    app.stop().await?;

    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(503));
    let app = spawn_app(&format!(
        "[bot]\nurl = \"{}\"\nbackoff = \"100ms\"\nmax_backoff = \"100ms\"\nttl = \"400ms\"\nmax_attempts = 1000\n",
        bot.url("/webhook")
    ))
    .await?;
    let started = Instant::now();
    assert_eq!(
        app.post_webhook(&fixture("messenger/message-attachment.json"))
            .await?
            .status(),
        200
    );
    let deliveries = app
        .wait_for_deliveries(
            |delivery| delivery.state == "dead",
            1,
            Duration::from_secs(10),
        )
        .await?;
    assert!(started.elapsed() < Duration::from_secs(5));
    let error = only_error(&deliveries)?;
    // Either the retry after the last 503 would fall past the ttl, or (on a slow machine) the
    // ttl ran out before the retry was claimed: both end the delivery on its ttl.
    assert!(
        error.starts_with("ttl of 400ms exceeded; last error: HTTP 503")
            || error.starts_with("ttl of 400ms ran out before this attempt; last error: HTTP 503"),
        "{error}"
    );
    app.stop().await
}

/// `concurrency` bounds the requests a sink has open at once: with the sink answering each
/// after 300 ms, no more than two of eight deliveries (eight users, so no lane holds any back)
/// are ever open together, and all eight arrive.
#[tokio::test]
async fn a_sink_never_has_more_requests_open_than_its_concurrency() -> TestResult {
    const ANSWER_AFTER: Duration = Duration::from_millis(300);
    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(200).after(ANSWER_AFTER));
    let app = spawn_app(&bot_config(&bot, "concurrency = 2\n")).await?;
    for user in 0..8 {
        let body = text_message(
            "PAGE",
            &format!("user-{user}"),
            &format!("m.open.{user}"),
            "hi",
            1_700_000_000_000,
        );
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    let received = bot.wait_for(8, Duration::from_secs(20)).await?;
    // A request is open from its arrival until its answer, ANSWER_AFTER later; the margin
    // covers the time between the mock's answer and the relay's next request.
    let open_at = |at: Instant| {
        received
            .iter()
            .filter(|other| {
                other.at <= at && at < other.at + ANSWER_AFTER - Duration::from_millis(50)
            })
            .count()
    };
    let most = received
        .iter()
        .map(|request| open_at(request.at))
        .max()
        .unwrap_or(0);
    assert!(
        most <= 2,
        "{most} requests open at once with concurrency = 2"
    );
    assert_eq!(most, 2, "the sink never had both of its requests open");
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        8,
        Duration::from_secs(20),
    )
    .await?;
    app.stop().await
}

#[tokio::test]
async fn each_users_messages_arrive_complete_and_in_order_despite_failures() -> TestResult {
    const USERS: usize = 10;
    const MESSAGES: usize = 20;
    let bot = MockSink::start().await?;
    // About one first attempt in five fails; every retry succeeds.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let first_attempts = seen.clone();
    bot.decide(move |request| {
        let mid = request.json()["entry"][0]["messaging"][0]["message"]["mid"]
            .as_str()?
            .to_owned();
        let first = first_attempts.lock().ok()?.insert(mid.clone());
        let unlucky = mid.bytes().map(u32::from).sum::<u32>() % 5 == 0;
        (first && unlucky).then(|| Reply::status(503))
    });
    let app = spawn_app(&bot_config(&bot, "concurrency = 8\n")).await?;

    // Users post concurrently; each user's messages go one after another (order of receipt).
    let mut posting = tokio::task::JoinSet::new();
    for user in 0..USERS {
        let http = app.http.clone();
        let url = app.url.clone();
        posting.spawn(async move {
            for index in 0..MESSAGES {
                let body = text_message(
                    "PAGE",
                    &format!("user-{user}"),
                    &format!("m.{user}.{index}"),
                    "hi",
                    1_700_000_000_000 + index as i64,
                );
                let response = post_signed(&http, &url, &body).await?;
                assert_eq!(response.status(), 200);
            }
            Ok::<_, reqwest::Error>(())
        });
    }
    while let Some(result) = posting.join_next().await {
        result??;
    }
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        USERS * MESSAGES,
        Duration::from_secs(30),
    )
    .await?;

    let mut by_user: HashMap<String, Vec<usize>> = HashMap::new();
    let retried = seen.lock().map(|set| set.len()).unwrap_or(0);
    for request in bot.received() {
        let item = &request.json()["entry"][0]["messaging"][0];
        let user = item["sender"]["id"].as_str().unwrap_or_default().to_owned();
        let mid = item["message"]["mid"].as_str().unwrap_or_default();
        let index: usize = mid.rsplit('.').next().unwrap_or_default().parse()?;
        by_user.entry(user).or_default().push(index);
    }
    assert_eq!(by_user.len(), USERS);
    let mut failures = 0;
    for (user, indexes) in &by_user {
        // Attempts of one user arrive in order; a failed one is repeated before the next goes.
        let mut delivered: Vec<usize> = indexes.clone();
        delivered.dedup();
        failures += indexes.len() - delivered.len();
        assert_eq!(
            delivered,
            (0..MESSAGES).collect::<Vec<_>>(),
            "{user}: {indexes:?}"
        );
    }
    assert_eq!(retried, USERS * MESSAGES);
    assert!(
        failures > 10,
        "the test meant ~20% failed first attempts, got {failures}"
    );
    app.stop().await
}

#[tokio::test]
async fn a_failing_user_does_not_block_another_user() -> TestResult {
    let bot = MockSink::start().await?;
    bot.decide(|request| {
        (request.json()["entry"][0]["messaging"][0]["sender"]["id"] == "stuck")
            .then(|| Reply::status(500))
    });
    let app = spawn_app(&bot_config(&bot, "max_attempts = 1000\n")).await?;
    for index in 0..5 {
        let body = text_message(
            "PAGE",
            "stuck",
            &format!("m.stuck.{index}"),
            "hi",
            1_700_000_000_000,
        );
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    for index in 0..5 {
        let body = text_message(
            "PAGE",
            "fine",
            &format!("m.fine.{index}"),
            "hi",
            1_700_000_000_000,
        );
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered" && delivery.user.as_deref() == Some("fine"),
        5,
        Duration::from_secs(10),
    )
    .await?;
    // The stuck user's head keeps failing; the four behind it wait their turn.
    assert_eq!(
        app.count_deliveries(
            |delivery| delivery.user.as_deref() == Some("stuck") && delivery.state == "waiting"
        )
        .await?,
        4
    );
    app.stop().await
}

#[tokio::test]
async fn purge_drops_delivered_rows_and_forgotten_events_and_keeps_dead_letters() -> TestResult {
    let bot = MockSink::start().await?;
    bot.decide(|request| {
        (request.json()["entry"][0]["messaging"][0]["sender"]["id"] == "refused")
            .then(|| Reply::status(400))
    });
    let app = spawn_app(&bot_config(&bot, "")).await?;
    let delivered = text_message("PAGE", "fine", "m.purge.ok", "hi", 1_700_000_000_000);
    let refused = text_message("PAGE", "refused", "m.purge.dead", "hi", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&delivered).await?.status(), 200);
    assert_eq!(app.post_webhook(&refused).await?.status(), 200);
    app.wait_for_deliveries(
        |delivery| matches!(delivery.state.as_str(), "delivered" | "dead"),
        2,
        Duration::from_secs(5),
    )
    .await?;

    // Delivered rows and the dedupe memory expire at once; dead letters are kept for an hour.
    let retention = botrelay::store::Retention {
        delivered: Duration::ZERO,
        dead: Duration::from_secs(3600),
        dedupe_window: Duration::ZERO,
    };
    let purged = app.store.purge(retention, now_ms() + 1).await?;
    assert_eq!((purged.deliveries, purged.events), (1, 1));
    let deliveries = app.deliveries().await?;
    assert_eq!(
        deliveries
            .iter()
            .filter(|delivery| delivery.state == "dead")
            .count(),
        1
    );
    assert_eq!(deliveries.len(), 1);
    // The dead letter's event stays: a replay needs it.
    let events = app.events().await?;
    assert_eq!(
        events
            .iter()
            .filter(|event| event.user_id.as_deref() == Some("refused"))
            .count(),
        1
    );
    assert_eq!(events.len(), 1);

    // Past the dedupe window the same webhook counts as new and is delivered again.
    assert_eq!(app.post_webhook(&delivered).await?.status(), 200);
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        1,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(
        bot.received()
            .iter()
            .filter(|request| request.replied == 200)
            .count(),
        2
    );
    app.stop().await
}

#[tokio::test]
async fn shutdown_lets_an_attempt_in_flight_finish_within_the_grace_period() -> TestResult {
    let bot = MockSink::start().await?;
    // The bot takes 500 ms to answer; the grace period (2 s in tests) is longer.
    bot.script([Reply::status(200).after(Duration::from_millis(500))]);
    let app = spawn_app(&bot_config(&bot, "")).await?;
    let body = text_message("PAGE", "U1", "m_in_flight", "hello", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    bot.wait_for(1, Duration::from_secs(5)).await?;

    // Stop while the bot is still answering: the attempt finishes and is recorded.
    let app = app.restart().await?;
    assert_eq!(
        app.count_deliveries(|delivery| delivery.state == "delivered" && delivery.attempts == 1)
            .await?,
        1,
        "the attempt in flight at shutdown finished and was settled"
    );
    assert_stays(
        "nothing is sent again after the restart",
        Duration::from_millis(300),
        || bot.received().len() == 1,
    )
    .await?;
    app.stop().await
}

#[tokio::test]
async fn an_attempt_cut_off_by_the_grace_period_is_sent_again_after_restart() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::hang()]);
    let app = spawn_app_with_env(
        &bot_config(&bot, ""),
        &[("BOTRELAY__SERVER__SHUTDOWN_GRACE", "200ms")],
    )
    .await?;
    let body = text_message("PAGE", "U1", "m_cut_off", "hello", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    bot.wait_for(1, Duration::from_secs(5)).await?;

    let stopping = Instant::now();
    let app = app.restart().await?;
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?}, beyond its 200 ms grace",
        stopping.elapsed()
    );
    // The new relay releases the old lease at once and sends the event again.
    let received = bot.wait_for(2, Duration::from_secs(5)).await?;
    assert_eq!(received[0].body, received[1].body);
    app.wait_for_deliveries(
        |delivery| delivery.state == "delivered",
        1,
        Duration::from_secs(5),
    )
    .await?;
    app.stop().await
}

/// SIGTERM is bounded by `server.shutdown_grace` on both listeners too: a client that sent half
/// a request (a stalled proxy, a slow or vanished client) and never finishes it does not keep
/// the relay from stopping until the orchestrator kills it.
#[tokio::test]
async fn shutdown_does_not_wait_past_the_grace_period_for_a_half_sent_request() -> TestResult {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with_env("", &[("BOTRELAY__SERVER__SHUTDOWN_GRACE", "300ms")]).await?;
    let public = app.url.trim_start_matches("http://").to_owned();
    let admin = app.admin_url.trim_start_matches("http://").to_owned();
    // Headers cut off on the public listener; a body cut off on each listener.
    let mut stalled = Vec::new();
    for (address, bytes) in [
        (&public, &b"POST /webhook HTTP/1.1\r\nHost: relay\r\n"[..]),
        (
            &public,
            &b"POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{\"object\":"[..],
        ),
        (
            &admin,
            &b"POST /admin/dead-letters/replay HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{"[..],
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(address.as_str()).await?;
        stream.write_all(bytes).await?;
        stalled.push(stream);
    }
    // Both listeners accept in order: once a later connection is answered on each, the relay
    // holds the stalled ones.
    for url in [&app.url, &app.admin_url] {
        app.http.get(format!("{url}/healthz")).send().await?;
    }

    let stopping = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(5), app.stop()).await;
    let waited = stopping.elapsed();
    drop(stalled);
    assert!(
        stopped.is_ok(),
        "the relay was still stopping after {waited:?} (grace 300 ms)"
    );
    stopped??;
    assert!(waited < Duration::from_secs(2), "shutdown took {waited:?}");
    Ok(())
}

/// A large purge (the first after `retention` was shortened to free a full store, or after a
/// long stop) does not hold up SIGTERM: the purge stops between two of its writes.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_large_purge_to_finish() -> TestResult {
    const ROWS: i64 = 300_000;
    let app = spawn_app_with_env("", &[("BOTRELAY__SERVER__SHUTDOWN_GRACE", "100ms")]).await?;
    // Rows written while no relay runs: delivered long ago, all of it past `retention` and
    // `dedupe_window` (fabricated in bulk with SQL: the store API has no way to backdate).
    let app = app
        .restart_with(|store_path| {
            let connection = rusqlite::Connection::open(store_path)?;
            connection.execute_batch(&format!(
                "BEGIN;
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
                 INSERT INTO events (id, source, kind, timestamp_ms, received_at, payload)
                 SELECT 'old-' || i, 'webhook', 'message', 0, i, '{{}}' FROM n;
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
                 INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
                 SELECT 'old-' || i, 'bot', 'u' || (i % 1000), 'delivered', i, i, i FROM n;
                 COMMIT;"
            ))?;
            Ok(())
        })
        .await?;
    // The purge runs as the relay starts; the relay is stopped as soon as it answers (its
    // readiness write queues behind the purge's first write).
    app.wait_until_ready(Duration::from_secs(5)).await?;
    let stopping = Instant::now();
    let dir = app.stop_keeping_files().await?;
    let waited = stopping.elapsed();
    assert!(
        waited < Duration::from_millis(1000),
        "shutdown waited {waited:?} for the purge (grace 100 ms)"
    );
    let store = Store::open_sqlite(&dir.path().join("botrelay.db"), None)?;
    let left = store.probe_deliveries().await?.len();
    store.close().await;
    assert!(
        left > 0,
        "the purge finished before the stop: make it larger"
    );
    Ok(())
}

/// A dead letter replayed (through the admin API) after its event left the dedupe window still
/// reaches the bot: the purge that runs meanwhile keeps the event of an open delivery.
#[tokio::test]
async fn a_replayed_dead_letter_survives_the_next_purge_and_is_delivered() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::status(400)]);
    let config = format!(
        "[bot]\nurl = \"{}\"\nbackoff = \"100ms\"\nmax_backoff = \"100ms\"\nmax_attempts = 1000\ntimeout = \"2s\"\n",
        bot.url("/webhook")
    );
    let app = spawn_app(&config).await?;
    let body = text_message(
        "PAGE",
        "u-replay",
        "m.review.replay",
        "hi",
        1_700_000_000_000,
    );
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    app.wait_for_deliveries(
        |delivery| delivery.state == "dead",
        1,
        Duration::from_secs(5),
    )
    .await?;
    // The bot is still flaky when the operator replays; the minute's purge runs meanwhile
    // (its cut falls after the event's receipt and no later than the replay, as when a
    // letter older than the 7-day window is replayed and the purge runs a minute later).
    bot.set_default(Reply::status(503));
    let dead_seen_at = now_ms();
    wait_until(
        "the clock moves past the receipt",
        Duration::from_secs(1),
        || now_ms() > dead_seen_at,
    )
    .await?;
    let replayed_at = now_ms();
    let replayed: serde_json::Value = app
        .http
        .post(format!("{}/admin/dead-letters/replay", app.admin_url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(replayed, serde_json::json!({"replayed": 1}));
    bot.wait_for(2, Duration::from_secs(5)).await?;
    let retention = botrelay::store::Retention {
        delivered: Duration::from_secs(3600),
        dead: Duration::from_secs(3600),
        dedupe_window: Duration::ZERO,
    };
    app.store.purge(retention, replayed_at).await?;
    bot.set_default(Reply::status(200));
    let outcome = app
        .wait_for_deliveries(
            |delivery| delivery.state == "delivered",
            1,
            Duration::from_secs(5),
        )
        .await;
    let row: Vec<(String, Option<String>)> = app
        .deliveries()
        .await?
        .into_iter()
        .map(|delivery| (delivery.state, delivery.last_error))
        .collect();
    assert!(outcome.is_ok(), "replayed delivery lost: {row:?}");
    app.stop().await
}

/// A delivery that waited behind its lane's head until its ttl ran out is a dead letter
/// without an attempt: the bot never gets a message older than its ttl.
#[tokio::test]
async fn a_delivery_past_its_ttl_behind_a_stuck_head_is_dead_without_an_attempt() -> TestResult {
    let bot = MockSink::start().await?;
    bot.script([Reply::hang()]);
    let app = spawn_app(&format!(
        "[bot]\nurl = \"{}\"\ntimeout = \"600ms\"\nttl = \"300ms\"\n",
        bot.url("/webhook")
    ))
    .await?;
    for mid in ["m.ttl.1", "m.ttl.2"] {
        let body = text_message("PAGE", "u-ttl", mid, "hi", 1_700_000_000_000);
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    let errors: Vec<String> = app
        .wait_for_deliveries(
            |delivery| delivery.state == "dead",
            2,
            Duration::from_secs(5),
        )
        .await?
        .into_iter()
        .map(|delivery| delivery.last_error.unwrap_or_default())
        .collect();
    assert!(
        errors[0].starts_with("ttl of 300ms exceeded; last error: "),
        "{errors:?}"
    );
    assert_eq!(errors[1], "ttl of 300ms ran out before this attempt");
    // The operator's listing shows that the second was never sent: no attempt, no attempt time.
    let letters: Vec<botrelay::admin::api::DeadLetterView> = app
        .http
        .get(format!("{}/admin/dead-letters", app.admin_url))
        .send()
        .await?
        .json()
        .await?;
    let attempts: Vec<(u32, bool, bool)> = letters
        .iter()
        .map(|letter| {
            (
                letter.attempts,
                letter.first_attempt_at.is_some(),
                letter.last_attempt_at.is_some(),
            )
        })
        .collect();
    assert_eq!(attempts, [(1, true, true), (0, false, false)]);
    let received = bot.received();
    assert_eq!(received.len(), 1, "only the head was attempted");
    assert!(String::from_utf8_lossy(&received[0].body).contains("m.ttl.1"));
    app.stop().await
}

/// A sink that answers 200 with an endless body: the relay reads only the start of an answer,
/// so the attempt counts as delivered at once instead of running into its timeout (and the
/// body never fills the relay's memory).
#[tokio::test]
async fn an_answer_with_an_endless_body_is_read_only_in_part() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/webhook", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                // 16 KiB chunks, about 16 MB/s, until the relay hangs up.
                let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
    });
    let app = spawn_app(&format!("{}timeout = \"1s\"\n", fast_bot(&url))).await?;
    let body = text_message("PAGE", "u-endless", "m.endless", "hi", 1_700_000_000_000);
    assert_eq!(app.post_webhook(&body).await?.status(), 200);
    app.wait_for_deliveries(
        |delivery| {
            delivery.state == "delivered"
                && delivery.attempts == 1
                && delivery.last_status == Some(200)
        },
        1,
        Duration::from_secs(10),
    )
    .await?;
    app.stop().await
}

/// A sink that answers every request with `head` (status line, headers, the start of a body
/// that `content-length` says is longer), then, as `close` says, hangs up or holds the
/// connection open. Returns its URL and the count of requests it got.
async fn sink_with_a_short_body(
    head: &'static str,
    close: bool,
) -> TestResult<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/webhook", listener.local_addr()?);
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                if socket.read(&mut request).await.unwrap_or(0) == 0 {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                if socket.write_all(head.as_bytes()).await.is_err() || close {
                    return;
                }
                std::future::pending::<()>().await;
            });
        }
    });
    Ok((url, requests))
}

/// An answer whose body stalls past the timeout or breaks off after its status: a 200 is
/// delivered (sent once, not again on every retry); anything else is retried with its status
/// (the body that would decide is incomplete), here up to `max_attempts = 2`.
#[tokio::test]
async fn an_answer_whose_body_stalls_or_breaks_off_counts_by_its_status() -> TestResult {
    use std::sync::atomic::Ordering;
    let cases = [
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\nEVENT_RECEIVED",
            false,
            "delivered",
            200,
        ),
        (
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 64\r\n\r\n{\"error\":\"bad",
            true,
            "dead",
            400,
        ),
    ];
    for (head, close, state, status) in cases {
        let attempts = if status == 200 { 1 } else { 2 };
        let (url, requests) = sink_with_a_short_body(head, close).await?;
        let app = spawn_app(&format!(
            "{}timeout = \"300ms\"\nmax_attempts = 2\n",
            fast_bot(&url)
        ))
        .await?;
        let body = text_message("PAGE", "u-short", "m.short", "hi", 1_700_000_000_000);
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
        app.wait_for_deliveries(
            |delivery| {
                delivery.state == state
                    && delivery.attempts == attempts
                    && delivery.last_status == Some(status)
            },
            1,
            Duration::from_secs(10),
        )
        .await?;
        assert_eq!(requests.load(Ordering::SeqCst), attempts as usize, "{head}");
        app.stop().await?;
    }
    Ok(())
}

/// Graph sends its rate limits as HTTP 400 with `error.code` 4/17/613 (SPEC §4.6: the code
/// decides, not the status). When such an answer's body breaks off, the code cannot be read:
/// the delivery is retried, not dead-lettered as a plain 400 would be.
#[tokio::test]
async fn a_graph_rate_limit_whose_body_breaks_off_is_retried_not_dead() -> TestResult {
    use std::sync::atomic::Ordering;
    let (url, requests) = sink_with_a_short_body(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n\
         {\"error\":{\"message\":\"(#613) Calls to this api have exceeded the rate limit.\",\
         \"type\":\"OAuthException\",\"code\":613,\"fbtrace_id\":\"AbC",
        true,
    )
    .await?;
    let graph = url.trim_end_matches("/webhook");
    let app = spawn_app(&format!(
        "[ingest]\ntoken = \"ing\"\n[graph]\nbase_url = \"{graph}\"\n\
         [sinks.conversions]\ndataset_id = \"880112233445566\"\naccess_token = \"tok\"\n\
         timeout = \"300ms\"\n{FAST_RETRY}"
    ))
    .await?;
    let answer = app
        .http
        .post(format!("{}/events", app.url))
        .header("content-type", "application/json")
        .header("authorization", "Bearer ing")
        .body(
            r#"{"name":"checkout","type":"revenueEvent","userId":"u-rl","pageId":"104735812345678","amount":1.5}"#,
        )
        .send()
        .await?;
    assert_eq!(answer.status(), 202);
    // Not `?`: the assert below says what happened when the retry never came.
    let _ = wait_until("a second attempt", Duration::from_secs(5), || {
        requests.load(Ordering::SeqCst) >= 2
    })
    .await;
    let dead = app
        .count_deliveries(|delivery| delivery.state == "dead")
        .await?;
    let sent = requests.load(Ordering::SeqCst);
    app.stop().await?;
    assert!(
        sent >= 2 && dead == 0,
        "a transient Graph rate limit (code 613 at HTTP 400) with a cut body was sent {sent} time(s) and dead-lettered ({dead} dead)"
    );
    Ok(())
}

/// A delivery its sink would skip is skipped, never dead-lettered, even when it waited past
/// its ttl behind its lane's head: it was never to be sent (SPEC §4.5, the Conversions API
/// skips custom events not named after one of Meta's names), so it is no failure to alert on.
#[tokio::test]
async fn a_delivery_its_sink_skips_is_skipped_even_past_its_ttl() -> TestResult {
    const USER: &str = "u-ttl-skip";
    let graph = MockSink::start().await?;
    graph.script([Reply::hang()]);
    let app = spawn_app(&format!(
        "[ingest]\ntoken = \"ing-BEARER-ttl-skip-0123\"\n[graph]\nbase_url = \"{}\"\n\
         [sinks.conversions]\ndataset_id = \"880112233445566\"\n\
         access_token = \"tok-CAPI-ttl-skip-0123\"\ntimeout = \"600ms\"\nttl = \"300ms\"\n",
        graph.url("")
    ))
    .await?;
    let events = serde_json::json!([
        {"name": "checkout_complete", "type": "revenueEvent", "userId": USER,
         "pageId": "104735812345678", "amount": 9.5},
        {"name": "menu_opened", "type": "customEvent", "userId": USER,
         "pageId": "104735812345678"},
    ]);
    let answer = app
        .http
        .post(format!("{}/events", app.url))
        .header("authorization", "Bearer ing-BEARER-ttl-skip-0123")
        .header("content-type", "application/json")
        .body(events.to_string())
        .send()
        .await?;
    assert_eq!(answer.status(), 202);
    let deliveries = app
        .wait_for_deliveries(
            |delivery| matches!(delivery.state.as_str(), "dead" | "skipped"),
            2,
            Duration::from_secs(5),
        )
        .await?;
    let kinds: HashMap<String, String> = app
        .events()
        .await?
        .into_iter()
        .map(|event| (event.id.to_string(), event.kind.to_string()))
        .collect();
    let states: Vec<(String, String)> = deliveries
        .into_iter()
        .map(|delivery| {
            let kind = kinds.get(&delivery.event_id).cloned().unwrap_or_default();
            (kind, delivery.state)
        })
        .collect();
    assert_eq!(
        states,
        [
            ("revenue".to_owned(), "dead".to_owned()),
            ("custom".to_owned(), "skipped".to_owned()),
        ]
    );
    assert_eq!(graph.received().len(), 1, "only the purchase was attempted");
    app.stop().await
}
