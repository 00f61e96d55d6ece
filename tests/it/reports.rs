//! What the bot tells the relay, end to end over real HTTP: `/outgoing` (both shapes),
//! `/events`, the Send API proxy (against a mock Graph), echo/outgoing dedupe, and Dashbot's
//! pause webhook, including a pause that survives a restart of the relay on the same store.

use crate::support::{
    DeliveryProbe, Event, EventKind, FAST_RETRY, MockSink, Reply, Source, TestApp, TestResult,
    assert_stays, fast_bot, fixture, payload, spawn_app, stored_text_contains, text_message,
};
use botrelay::event::EventId;
use botrelay::signing::sign_sha1;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOKEN: &str = "ingest-test-token";
const DASHBOT_SECRET: &str = "dashbot-test-secret";
const PAGE_TOKEN: &str = "EAAB-page-token-never-stored";
const GRAPH_TIMEOUT: Duration = Duration::from_millis(300);

/// Ingest token, a bot with fast retries, Graph at `graph`, and the Dashbot pause secret.
fn config(bot: &MockSink, graph: &str) -> String {
    format!(
        "[ingest]\ntoken = \"{TOKEN}\"\n{}\
         [graph]\nbase_url = \"{graph}\"\ntimeout = \"300ms\"\n\
         [dashbot]\nsecret = \"{DASHBOT_SECRET}\"\n",
        fast_bot(&bot.url("/bot"))
    )
}

async fn app_with_bot() -> TestResult<(TestApp, MockSink)> {
    let bot = MockSink::start().await?;
    let app = spawn_app(&config(&bot, "http://127.0.0.1:9")).await?;
    Ok((app, bot))
}

/// POSTs `body` to `path` with `Authorization: Bearer <token>` when a token is given.
async fn post(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> TestResult<reqwest::Response> {
    post_text(app, path, token, &body.to_string()).await
}

/// [`post`] with the JSON as text (for JSON that `json!` cannot build).
async fn post_text(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> TestResult<reqwest::Response> {
    let mut request = app
        .http
        .post(format!("{}{path}", app.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    Ok(request.send().await?)
}

async fn pause(app: &TestApp, user: &str, paused: bool) -> TestResult<reqwest::Response> {
    let body = json!({"userId": user, "paused": paused}).to_string();
    Ok(app
        .http
        .post(format!("{}/dashbot/pause", app.url))
        .header("content-type", "application/json")
        .header(
            "x-dashbot-signature",
            sign_sha1(DASHBOT_SECRET.as_bytes(), body.as_bytes()),
        )
        .body(body)
        .send()
        .await?)
}

/// Dashbot's outgoing shape, as `dashbot.logOutgoing(requestData, responseBody)` builds it.
fn dashbot_outgoing(url: &str, user: &str, mid: &str) -> Value {
    json!({
        "url": url,
        "qs": {"access_token": PAGE_TOKEN, "appsecret_proof": "proof-never-stored"},
        "method": "POST",
        "json": {"recipient": {"id": user}, "message": {"text": "hello"}},
        "responseBody": {"recipient_id": user, "message_id": mid},
        "intent": {"name": "greeting"}
    })
}

fn report(user: &str, mid: &str, page: &str) -> Value {
    json!({
        "request": {"recipient": {"id": user}, "messaging_type": "RESPONSE", "message": {"text": "hi"}},
        "response": {"recipient_id": user, "message_id": mid},
        "page_id": page,
        "platformUserJson": {"first_name": "Ada"}
    })
}

fn echo_webhook(page: &str, user: &str, mid: &str) -> Vec<u8> {
    json!({
        "object": "page",
        "entry": [{"id": page, "time": 1_700_000_000_000_i64, "messaging": [{
            "sender": {"id": page},
            "recipient": {"id": user},
            "timestamp": 1_700_000_000_000_i64,
            "message": {"is_echo": true, "app_id": 1517776481860111_i64, "mid": mid, "text": "hi"}
        }]}]
    })
    .to_string()
    .into_bytes()
}

async fn json_body(response: reqwest::Response) -> TestResult<Value> {
    Ok(response.json().await?)
}

fn outgoing_id(mid: &str) -> String {
    EventId::outgoing(mid).to_string()
}

/// The stored event with `id`.
fn stored<'a>(events: &'a [Event], id: &str) -> TestResult<&'a Event> {
    events
        .iter()
        .find(|event| event.id.as_str() == id)
        .ok_or_else(|| format!("no event {id} stored").into())
}

/// How many times `user` is in the store's paused users.
async fn paused_count(app: &TestApp, user: &str) -> TestResult<usize> {
    let paused = app.store.paused_users().await?;
    Ok(paused.iter().filter(|(paused, _)| paused == user).count())
}

/// The bot's delivery of a message from `user`, skipped (a delivery's lane is its user).
fn skipped_for_the_bot(user: &'static str) -> impl Fn(&DeliveryProbe) -> bool {
    move |delivery| {
        delivery.sink == "bot"
            && delivery.state == "skipped"
            && delivery.user.as_deref() == Some(user)
    }
}

#[tokio::test]
async fn outgoing_takes_both_shapes_single_or_batched_and_keeps_no_token() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let single = post(
        &app,
        "/outgoing",
        Some(TOKEN),
        &dashbot_outgoing(
            "https://graph.facebook.com/v2.6/me/messages",
            "U1",
            "m_single",
        ),
    )
    .await?;
    assert_eq!(single.status(), 202);
    assert_eq!(json_body(single).await?, json!({"accepted": 1}));

    let failed = json!({
        "request": {"recipient": {"id": "U3"}, "message": {"text": "too late"}},
        "response": fixture_json("send-api/error.json")?
    });
    let batch = json!([
        report("U2", "m_report", "222"),
        dashbot_outgoing("https://graph.facebook.com/v20.0/333/messages", "U2", "m_dashbot"),
        {"uri": "https://graph.facebook.com/v20.0/444/messages", "json": {"recipient": {"id": "U4"}},
         "responseBody": fixture_json("send-api/response.json")?},
        failed,
    ]);
    let batched = post(&app, "/outgoing", Some(TOKEN), &batch).await?;
    assert_eq!(batched.status(), 202);
    assert_eq!(json_body(batched).await?, json!({"accepted": 4}));

    // The 202 came after the commit: every row is there the moment it arrives.
    assert_eq!(
        app.count_events(
            |event| event.kind == EventKind::Outgoing && event.source == Source::Outgoing
        )
        .await?,
        5
    );
    let events = app.events().await?;
    let row = |id: String| -> TestResult<(Option<String>, Option<String>, bool, bool)> {
        let event = stored(&events, &id)?;
        let data = &payload(event)["data"];
        Ok((
            event.user_id.clone(),
            event.page_id.clone(),
            data["succeeded"] == true,
            data["from_echo"] == true,
        ))
    };
    assert_eq!(
        row(outgoing_id("m_single"))?,
        (Some("U1".into()), None, true, false)
    );
    assert_eq!(
        row(outgoing_id("m_report"))?,
        (Some("U2".into()), Some("222".into()), true, false)
    );
    assert_eq!(
        row(outgoing_id("m_dashbot"))?,
        (Some("U2".into()), Some("333".into()), true, false)
    );
    let graph_mid =
        "m_qr6GPBlzTU4jqP0PBqaIoIAcfn2p3T7uiO5jm0L_PMTKMJhEIUGFkEKQBhGkpCnPXVZNsYdkN7A2Sel0dOz_Iw";
    assert_eq!(
        row(outgoing_id(graph_mid))?,
        (Some("U4".into()), Some("444".into()), true, false)
    );
    // Graph's error is recorded as a failed send, and fanned out to nobody.
    assert_eq!(
        app.count_events(|event| {
            event.user_id.as_deref() == Some("U3") && payload(event)["data"]["succeeded"] == false
        })
        .await?,
        1
    );
    assert_eq!(app.deliveries().await?.len(), 0);
    // intent and platformUserJson pass through; the page token and proof do not.
    assert_eq!(
        app.count_events(|event| payload(event)["data"]["intent"]["name"] == "greeting")
            .await?,
        2
    );
    assert_eq!(
        app.count_events(
            |event| payload(event)["data"]["platform_user_json"]["first_name"] == "Ada"
        )
        .await?,
        1
    );
    assert_eq!(
        app.count_events(|event| {
            stored_text_contains(event, PAGE_TOKEN)
                || stored_text_contains(event, "proof-never-stored")
        })
        .await?,
        0
    );
    app.stop().await
}

fn fixture_json(name: &str) -> TestResult<Value> {
    Ok(serde_json::from_slice(&fixture(name))?)
}

#[tokio::test]
async fn reports_need_the_bearer_token() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let body = report("U1", "m_1", "111");
    for path in ["/outgoing", "/events"] {
        assert_eq!(
            post(&app, path, None, &body).await?.status(),
            401,
            "{path} without a token"
        );
        assert_eq!(
            post(&app, path, Some("wrong"), &body).await?.status(),
            401,
            "{path} wrong token"
        );
        let almost = format!("{TOKEN}x");
        assert_eq!(
            post(&app, path, Some(&almost), &body).await?.status(),
            401,
            "{path} longer token"
        );
        let basic = app
            .http
            .post(format!("{}{path}", app.url))
            .header("authorization", format!("Basic {TOKEN}"))
            .body(body.to_string())
            .send()
            .await?;
        assert_eq!(basic.status(), 401, "{path} with another scheme");
    }
    assert_eq!(app.events().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn reports_and_pause_are_404_while_their_keys_are_unset() -> TestResult {
    let app = spawn_app("").await?;
    for path in ["/outgoing", "/events"] {
        let response = post(&app, path, Some(TOKEN), &report("U1", "m_1", "111")).await?;
        assert_eq!(response.status(), 404, "{path}");
        let error = json_body(response).await?;
        assert_eq!(
            error["error"],
            json!(format!("{path} is disabled: `ingest.token` is not set"))
        );
    }
    let paused = pause(&app, "U1", true).await?;
    assert_eq!(paused.status(), 404);
    assert_eq!(
        json_body(paused).await?["error"],
        json!("/dashbot/pause is disabled: `dashbot.secret` is not set")
    );
    assert_eq!(app.events().await?.len(), 0);
    assert_eq!(app.store.paused_users().await?.len(), 0);
    app.stop().await
}

/// Sends Graph accepts without a user id (by phone number) are recorded with no user; a call
/// that got no answer is a failed send; a token Graph quotes back in its error is not stored.
#[tokio::test]
async fn sends_without_a_user_id_and_quoted_tokens_are_recorded_safely() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let token = "EAABsbCS1iHgBAKZCZA4quoted0123456789";
    let batch = json!([
        {"request": {"recipient": {"phone_number": "+15555550100"}, "message": {"text": "hi"}},
         "response": {"message_id": "m_phone_1"}},
        {"json": {"recipient": {"id": "U9"}, "message": {"text": "lost"}}},
        {"uri": format!("https://graph.facebook.com/v20.0/me/messages?access_token={token}"),
         "qs": {"access_token": token},
         "json": {"recipient": {"id": "U9"}, "message": {"text": "x"}},
         "responseBody": {"error": {"code": 190, "type": "OAuthException",
                          "message": format!("Malformed access token {token}")}}},
    ]);
    let response = post(&app, "/outgoing", Some(TOKEN), &batch).await?;
    assert_eq!(response.status(), 202);
    assert_eq!(
        app.count_events(|event| event.kind == EventKind::Outgoing && event.user_id.is_none())
            .await?,
        1
    );
    assert_eq!(
        app.count_events(
            |event| event.kind == EventKind::Outgoing && event.user_id.as_deref() == Some("U9")
        )
        .await?,
        2
    );
    assert_eq!(
        app.count_events(|event| stored_text_contains(event, &token[..16]))
            .await?,
        0
    );
    assert_eq!(
        app.count_events(|event| {
            stored_text_contains(event, "Malformed access token [redacted]")
        })
        .await?,
        1
    );
    app.stop().await
}

#[tokio::test]
async fn a_bad_item_rejects_the_whole_batch_naming_the_field() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let batch = json!([
        report("U1", "m_1", "111"),
        dashbot_outgoing("https://graph.facebook.com/v2.6/me/messages", "U2", "m_2"),
        {"url": "https://graph.facebook.com/v2.6/me/messages", "json": {"recipient": "U3", "message": {"text": "x"}},
         "responseBody": {"message_id": "m_3"}},
    ]);
    let response = post(&app, "/outgoing", Some(TOKEN), &batch).await?;
    assert_eq!(response.status(), 400);
    assert_eq!(
        json_body(response).await?,
        json!({"error": "item 2: json.recipient must be an object"})
    );

    let bad_response = json!({"request": {"recipient": {"id": "U"}}, "response": "ok"});
    let response = post(&app, "/outgoing", Some(TOKEN), &bad_response).await?;
    assert_eq!(response.status(), 400);
    assert_eq!(
        json_body(response).await?,
        json!({"error": "response must be an object"})
    );

    let not_json = app
        .http
        .post(format!("{}/outgoing", app.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body("{not json")
        .send()
        .await?;
    assert_eq!(not_json.status(), 400);
    assert!(json_body(not_json).await?["error"].is_string());
    let scalar = post(&app, "/outgoing", Some(TOKEN), &json!("m_1")).await?;
    assert_eq!(scalar.status(), 400);
    assert_eq!(
        json_body(scalar).await?,
        json!({"error": "body must be a JSON object or an array of objects"})
    );
    assert_eq!(
        app.events().await?.len(),
        0,
        "nothing of a bad batch is stored"
    );
    app.stop().await
}

#[tokio::test]
async fn events_takes_every_type_and_a_retried_post_dedupes() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let body = json!([
        {"name": "trackMeEvent", "type": "customEvent", "userId": "967295313370594", "eventId": "e1",
         "extraInfo": {"start": 1500504070512_i64, "difference": 374, "end": 1500504070886_i64}},
        {"name": "purchase", "type": "revenueEvent", "userId": "U1", "amount": 57.23, "eventId": "e2",
         "referenceNumber": "order-1", "metadata": {"sku": "skis"}},
        {"name": "shared_coupon", "type": "shareEvent", "userId": "U1", "sharedMessage": {"text": "20% off"}, "eventId": "e3"},
        {"name": "opened_webview", "type": "pageLaunchEvent", "userId": "U1", "pageId": "111", "eventId": "e4",
         "extraInfo": {"url": "https://shop.test/"}},
        {"name": "ad_click", "type": "referralEvent", "userId": "U1", "ref": "spring", "source": "ADS", "eventId": "e5",
         "ad_id": "6045246247433", "referer_uri": "https://m.me/shop"},
        {"name": "lead_submitted", "type": "leadEvent", "userId": "U1", "conversationId": "c-1", "eventId": "e6"},
    ]);
    let response = post(&app, "/events", Some(TOKEN), &body).await?;
    assert_eq!(response.status(), 202);
    assert_eq!(json_body(response).await?, json!({"accepted": 6}));
    for kind in [
        "custom",
        "revenue",
        "share",
        "page_launch",
        "referral",
        "lead",
    ] {
        assert_eq!(
            app.count_events(|event| event.source == Source::Custom && event.kind.as_str() == kind)
                .await?,
            1,
            "{kind}"
        );
    }
    let revenue: Vec<(Option<f64>, Option<String>)> = app
        .events()
        .await?
        .iter()
        .filter(|event| event.kind == EventKind::Revenue)
        .map(|event| {
            let data = &payload(event)["data"];
            (
                data["amount"].as_f64(),
                data["currency"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(revenue, [(Some(57.23), Some("USD".to_owned()))]);
    assert_eq!(
        app.count_events(
            |event| event.page_id.as_deref() == Some("111") && event.kind == EventKind::PageLaunch
        )
        .await?,
        1
    );

    // The bot retries the same POST (each item has its eventId): acked again, stored once.
    let again = post(&app, "/events", Some(TOKEN), &body).await?;
    assert_eq!(again.status(), 202);
    assert_eq!(app.events().await?.len(), 6);
    app.stop().await
}

#[tokio::test]
async fn revenue_without_an_amount_is_rejected_naming_amount() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let batch = json!([
        {"name": "fine", "type": "customEvent", "userId": "U1"},
        {"name": "purchase", "type": "revenueEvent", "userId": "U1", "currency": "EUR"},
    ]);
    let response = post(&app, "/events", Some(TOKEN), &batch).await?;
    assert_eq!(response.status(), 400);
    assert_eq!(
        json_body(response).await?,
        json!({"error": "item 1: amount is missing"})
    );
    let text_amount =
        json!({"name": "purchase", "type": "revenueEvent", "userId": "U1", "amount": "12.50"});
    let response = post(&app, "/events", Some(TOKEN), &text_amount).await?;
    assert_eq!(response.status(), 400);
    assert_eq!(
        json_body(response).await?,
        json!({"error": "amount must be a number"})
    );
    assert_eq!(app.events().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn a_proxied_send_reaches_graph_verbatim_and_is_recorded() -> TestResult {
    let bot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    let graph_answer = r#"{"recipient_id":"U7","message_id":"m_proxied"}"#;
    graph.script([Reply {
        body: graph_answer.to_owned(),
        ..Reply::status(200)
            .with_header("content-type", "text/javascript; charset=UTF-8")
            .with_header("x-app-usage", r#"{"call_count":5}"#)
    }]);
    let app = spawn_app(&config(&bot, &graph.url(""))).await?;

    // Odd spacing and a slash escape: the bytes must reach Graph exactly as the bot sent them.
    let sent = r#"{ "recipient": {"id":"U7"}, "messaging_type":"RESPONSE", "message": {"text":"a\/b \u00e9"} }"#;
    let query = format!("access_token={PAGE_TOKEN}&appsecret_proof=abc123");
    let answer = app
        .http
        .post(format!("{}/graph/v20.0/111/messages?{query}", app.url))
        .header("content-type", "application/json")
        .body(sent)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"],
        "text/javascript; charset=UTF-8"
    );
    assert_eq!(answer.headers()["x-app-usage"], r#"{"call_count":5}"#);
    assert_eq!(answer.text().await?, graph_answer);

    let received = graph.received();
    let [forwarded] = received.as_slice() else {
        return Err(format!("Graph got {} requests", received.len()).into());
    };
    assert_eq!(forwarded.method, "POST");
    assert_eq!(forwarded.uri, format!("/v20.0/111/messages?{query}"));
    assert_eq!(forwarded.body, sent.as_bytes());
    assert_eq!(forwarded.header("content-type"), Some("application/json"));

    let id = outgoing_id("m_proxied");
    app.wait_for_events(
        |event| {
            event.id.as_str() == id
                && event.kind == EventKind::Outgoing
                && event.source == Source::Outgoing
                && event.user_id.as_deref() == Some("U7")
                && event.page_id.as_deref() == Some("111")
        },
        1,
        Duration::from_secs(2),
    )
    .await?;
    assert_eq!(
        app.count_events(|event| stored_text_contains(event, PAGE_TOKEN))
            .await?,
        0
    );
    app.stop().await
}

/// POSTs a Send API call with an attachment from a file through the proxy, as multipart form
/// data (`recipient`, `message`, `filedata`); returns the body sent and the answer.
async fn post_attachment(
    app: &TestApp,
    user: &str,
    message: &str,
    (file_name, file_type, file): (&str, &str, &[u8]),
) -> TestResult<(Vec<u8>, reqwest::Response)> {
    let boundary = "----botrelay7MA4YWxkTrZu0gW";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"recipient\"\r\n\r\n{{\"id\":\"{user}\"}}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{message}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"filedata\"; filename=\"{file_name}\"\r\n\
         Content-Type: {file_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let answer = app
        .http
        .post(format!(
            "{}/graph/v20.0/me/messages?access_token={PAGE_TOKEN}",
            app.url
        ))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body.clone())
        .send()
        .await?;
    Ok((body, answer))
}

/// Sends whose fields are not in a JSON body are recorded too: an attachment sent from a file
/// (multipart form data, as in Meta's `curl -F filedata=@…` example) and a call with every field
/// in the query string. The multipart body reaches Graph byte for byte.
#[tokio::test]
async fn proxied_multipart_and_query_string_sends_are_recorded() -> TestResult {
    let bot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    graph.script([
        Reply {
            body: r#"{"recipient_id":"U8","message_id":"m_upload","attachment_id":"1857777774821032"}"#
                .to_owned(),
            ..Reply::status(200)
        },
        Reply {
            body: r#"{"recipient_id":"U9","message_id":"m_query"}"#.to_owned(),
            ..Reply::status(200)
        },
    ]);
    let app = spawn_app(&config(&bot, &graph.url(""))).await?;

    let (multipart, answer) = post_attachment(
        &app,
        "U8",
        r#"{"attachment":{"type":"image","payload":{"is_reusable":true}}}"#,
        ("shirt.png", "image/png", b"PNG-BYTES"),
    )
    .await?;
    assert_eq!(answer.status(), 200);

    let query = format!(
        "recipient=%7B%22id%22%3A%22U9%22%7D&messaging_type=RESPONSE\
         &message=%7B%22text%22%3A%22hi%22%7D&access_token={PAGE_TOKEN}"
    );
    let answer = app
        .http
        .post(format!("{}/graph/v20.0/111/messages?{query}", app.url))
        .send()
        .await?;
    assert_eq!(answer.status(), 200);

    let received = graph.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].body, multipart);
    assert_eq!(received[1].uri, format!("/v20.0/111/messages?{query}"));
    for (mid, user) in [("m_upload", "U8"), ("m_query", "U9")] {
        let id = outgoing_id(mid);
        app.wait_for_events(
            |event| {
                event.id.as_str() == id
                    && event.kind == EventKind::Outgoing
                    && event.user_id.as_deref() == Some(user)
            },
            1,
            Duration::from_secs(2),
        )
        .await?;
    }
    assert_eq!(
        app.count_events(|event| {
            stored_text_contains(event, PAGE_TOKEN) || stored_text_contains(event, "PNG-BYTES")
        })
        .await?,
        0
    );
    app.stop().await
}

/// A real attachment is megabytes: with `server.max_body_bytes` raised for it, an upload of
/// 3 MiB through the proxy is recorded like any other send (no smaller limit of its own).
#[tokio::test]
async fn a_proxied_upload_of_several_megabytes_is_recorded() -> TestResult {
    let bot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    graph.script([Reply {
        body: r#"{"recipient_id":"U10","message_id":"m_big_upload"}"#.to_owned(),
        ..Reply::status(200)
    }]);
    let app = spawn_app(&format!(
        "{}[server]\nmax_body_bytes = 8388608\n",
        config(&bot, &graph.url(""))
    ))
    .await?;
    let (_, answer) = post_attachment(
        &app,
        "U10",
        r#"{"attachment":{"type":"video","payload":{}}}"#,
        ("clip.mp4", "video/mp4", &vec![b'v'; 3 * 1024 * 1024]),
    )
    .await?;
    assert_eq!(answer.status(), 200);
    let id = outgoing_id("m_big_upload");
    app.wait_for_events(
        |event| {
            event.id.as_str() == id
                && event.kind == EventKind::Outgoing
                && event.user_id.as_deref() == Some("U10")
        },
        1,
        Duration::from_secs(2),
    )
    .await?;
    app.stop().await
}

#[tokio::test]
async fn graph_errors_pass_through_the_proxy_and_record_nothing() -> TestResult {
    let bot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    let error = String::from_utf8(fixture("send-api/error.json"))?;
    graph.script([Reply {
        body: error.clone(),
        ..Reply::status(400).with_header("content-type", "application/json; charset=UTF-8")
    }]);
    let app = spawn_app(&config(&bot, &graph.url(""))).await?;
    let answer = app
        .http
        .post(format!(
            "{}/graph/v2.6/me/messages?access_token={PAGE_TOKEN}",
            app.url
        ))
        .header("content-type", "application/json")
        .body(r#"{"recipient":{"id":"U1"},"message":{"text":"hi"}}"#)
        .send()
        .await?;
    assert_eq!(answer.status(), 400);
    assert_eq!(
        answer.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    assert_eq!(answer.text().await?, error);
    assert_eq!(
        graph.received()[0].uri,
        format!("/v2.6/me/messages?access_token={PAGE_TOKEN}")
    );
    assert_eq!(app.events().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn the_proxy_answers_502_within_the_timeout_when_graph_hangs() -> TestResult {
    let bot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    graph.set_default(Reply::hang());
    let app = spawn_app(&config(&bot, &graph.url(""))).await?;
    let started = Instant::now();
    let answer = app
        .http
        .post(format!(
            "{}/graph/v20.0/111/messages?access_token={PAGE_TOKEN}",
            app.url
        ))
        .body(r#"{"recipient":{"id":"U1"},"message":{"text":"hi"}}"#)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let elapsed = started.elapsed();
    assert_eq!(answer.status(), 502);
    assert!(
        elapsed >= GRAPH_TIMEOUT - Duration::from_millis(50),
        "answered after {elapsed:?}"
    );
    // Well short of the client's own 10 s: the relay's timeout answered, on a loaded machine too.
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    let text = answer.text().await?;
    let error: Value = serde_json::from_str(&text)?;
    assert_eq!(error, json!({"error": "Graph did not answer within 300ms"}));
    assert_eq!(graph.received().len(), 1, "the call did reach Graph");
    assert_eq!(app.events().await?.len(), 0);
    app.stop().await
}

#[tokio::test]
async fn the_proxy_answers_502_when_graph_is_down() -> TestResult {
    let bot = MockSink::start().await?;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let graph = format!("http://{}", closed.local_addr()?);
    drop(closed);
    let app = spawn_app(&config(&bot, &graph)).await?;
    let answer = app
        .http
        .post(format!(
            "{}/graph/v20.0/me/messages?access_token={PAGE_TOKEN}",
            app.url
        ))
        .body(r#"{"recipient":{"id":"U1"},"message":{"text":"hi"}}"#)
        .send()
        .await?;
    // The body, not a stopwatch, tells a refused connection from a timeout (see the test above).
    assert_eq!(answer.status(), 502);
    let text = answer.text().await?;
    assert!(!text.contains(PAGE_TOKEN), "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text)?,
        json!({"error": "cannot reach Graph"})
    );
    app.stop().await
}

#[tokio::test]
async fn an_echo_and_the_report_of_its_send_are_one_outgoing_event() -> TestResult {
    let (app, bot) = app_with_bot().await?;
    // Echo first (Meta's fixture), then the bot's report of the same send.
    let echo = fixture("messenger/message-echo.json");
    assert_eq!(app.post_webhook(&echo).await?.status(), 200);
    let mid = "mid.1457764197618:41d102a3e1ae206a38";
    let reported = post(
        &app,
        "/outgoing",
        Some(TOKEN),
        &report("<PSID>", mid, "<PAGE_ID>"),
    )
    .await?;
    assert_eq!(reported.status(), 202);
    assert_eq!(json_body(reported).await?, json!({"accepted": 1}));

    // Report first, then its echo.
    let reported = post(
        &app,
        "/outgoing",
        Some(TOKEN),
        &report("U2", "m_reported_first", "111"),
    )
    .await?;
    assert_eq!(reported.status(), 202);
    let later_echo = echo_webhook("111", "U2", "m_reported_first");
    assert_eq!(app.post_webhook(&later_echo).await?.status(), 200);

    assert_eq!(
        app.count_events(|event| event.kind == EventKind::Outgoing)
            .await?,
        2
    );
    assert_eq!(
        app.count_events(|event| event.kind == EventKind::Echo)
            .await?,
        2
    );
    // Whichever arrived first is the one kept.
    let events = app.events().await?;
    let from_echo = |mid: &str| -> TestResult<bool> {
        let event = stored(&events, &outgoing_id(mid))?;
        Ok(payload(event)["data"]["from_echo"] == true)
    };
    assert!(from_echo(mid)?);
    assert!(!from_echo("m_reported_first")?);

    // The bot gets both echoes once; Meta's retry of a webhook reaches it no second time.
    bot.wait_for(2, Duration::from_secs(5)).await?;
    assert_eq!(app.post_webhook(&echo).await?.status(), 200);
    assert_eq!(app.post_webhook(&later_echo).await?.status(), 200);
    assert_stays(
        "the bot gets no echo again",
        Duration::from_millis(300),
        || bot.received().len() == 2,
    )
    .await?;
    assert_eq!(
        app.count_deliveries(|delivery| delivery.sink == "bot")
            .await?,
        2
    );
    assert_eq!(app.events().await?.len(), 4);
    app.stop().await
}

#[tokio::test]
async fn a_paused_user_is_not_forwarded_to_the_bot_until_unpaused() -> TestResult {
    let (app, bot) = app_with_bot().await?;
    let paused = pause(&app, "U1", true).await?;
    assert_eq!(paused.status(), 200);
    assert_eq!(paused.text().await?, "ok");
    assert_eq!(paused_count(&app, "U1").await?, 1);
    let stored = app.store.paused_users().await?;
    assert_eq!(
        stored
            .iter()
            .map(|(user, _)| user.as_str())
            .collect::<Vec<_>>(),
        vec!["U1"]
    );

    assert_eq!(
        app.post_webhook(&text_message("111", "U1", "m_u1_a", "hi", 1))
            .await?
            .status(),
        200
    );
    assert_eq!(
        app.post_webhook(&text_message("111", "U2", "m_u2_a", "hi", 2))
            .await?
            .status(),
        200
    );
    let received = bot.wait_for(1, Duration::from_secs(5)).await?;
    // A delivery's lane is its event's user.
    app.wait_for_deliveries(skipped_for_the_bot("U1"), 1, Duration::from_secs(5))
        .await?;
    assert_stays(
        "only U2's message reaches the bot",
        Duration::from_millis(200),
        || bot.received().len() == 1,
    )
    .await?;
    assert!(received[0].text().contains("m_u2_a"));

    let resumed = pause(&app, "U1", false).await?;
    assert_eq!(resumed.status(), 200);
    assert_eq!(app.store.paused_users().await?.len(), 0);
    assert_eq!(
        app.post_webhook(&text_message("111", "U1", "m_u1_b", "back", 3))
            .await?
            .status(),
        200
    );
    let received = bot.wait_for(2, Duration::from_secs(5)).await?;
    assert!(received[1].text().contains("m_u1_b"));
    app.stop().await
}

#[tokio::test]
async fn the_pause_webhook_checks_its_signature_and_body() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let url = format!("{}/dashbot/pause", app.url);
    let body = r#"{"userId":"U1","paused":true}"#;
    let unsigned = app.http.post(&url).body(body).send().await?;
    assert_eq!(unsigned.status(), 401);
    let wrong = app
        .http
        .post(&url)
        .header(
            "x-dashbot-signature",
            sign_sha1(b"not-the-secret", body.as_bytes()),
        )
        .body(body)
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    assert_eq!(app.store.paused_users().await?.len(), 0);

    // Dashbot's own examples sign the compact re-serialization, not the bytes sent.
    let pretty = "{\n  \"userId\": \"U9\",\n  \"paused\": true\n}";
    let compact_signed = app
        .http
        .post(&url)
        .header(
            "x-dashbot-signature",
            sign_sha1(
                DASHBOT_SECRET.as_bytes(),
                br#"{"userId":"U9","paused":true}"#,
            ),
        )
        .body(pretty)
        .send()
        .await?;
    assert_eq!(compact_signed.status(), 200);
    assert_eq!(paused_count(&app, "U9").await?, 1);

    for (bad, field) in [
        (r#"{"userId":"U1"}"#, "paused is missing"),
        (
            r#"{"userId":"U1","paused":"yes"}"#,
            "paused must be true or false",
        ),
        (r#"{"paused":true}"#, "userId is missing"),
    ] {
        let response = app
            .http
            .post(&url)
            .header(
                "x-dashbot-signature",
                sign_sha1(DASHBOT_SECRET.as_bytes(), bad.as_bytes()),
            )
            .body(bad)
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{bad}");
        assert_eq!(json_body(response).await?, json!({"error": field}));
    }
    assert_eq!(app.store.paused_users().await?.len(), 1);
    app.stop().await
}

#[tokio::test]
async fn a_pause_survives_a_restart_on_the_same_store() -> TestResult {
    let bot = MockSink::start().await?;
    let app = spawn_app(&config(&bot, "http://127.0.0.1:9")).await?;
    let body = r#"{"userId":"U1","paused":true}"#;
    let paused = app
        .http
        .post(format!("{}/dashbot/pause", app.url))
        .header(
            "x-dashbot-signature",
            sign_sha1(DASHBOT_SECRET.as_bytes(), body.as_bytes()),
        )
        .body(body)
        .send()
        .await?;
    assert_eq!(paused.status(), 200);
    // The durable row, read the way an operator's sqlite3 would.
    assert_eq!(paused_count(&app, "U1").await?, 1);

    let app = app.restart().await?;
    assert_eq!(
        app.store
            .paused_users()
            .await?
            .into_iter()
            .map(|(user, _)| user)
            .collect::<Vec<_>>(),
        vec!["U1".to_owned()]
    );
    for (user, mid) in [("U1", "m_after_restart_1"), ("U2", "m_after_restart_2")] {
        let body = text_message("111", user, mid, "hi", 1);
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    let received = bot.wait_for(1, Duration::from_secs(5)).await?;
    assert!(received[0].text().contains("m_after_restart_2"));
    app.wait_for_deliveries(skipped_for_the_bot("U1"), 1, Duration::from_secs(5))
        .await?;
    assert_stays(
        "the paused user stays paused after the restart",
        Duration::from_millis(200),
        || bot.received().len() == 1,
    )
    .await?;
    app.stop().await
}

#[tokio::test]
async fn an_echo_and_its_report_reach_each_analytics_sink_once() -> TestResult {
    let bot = MockSink::start().await?;
    let kochava = MockSink::start().await?;
    let dashbot = MockSink::start().await?;
    let app = spawn_app(&format!(
        "{}[sinks.kochava]\nurl = \"{}\"\napp_id = \"ko-app\"\n{FAST_RETRY}\
         [sinks.dashbot]\nurl = \"{}\"\napi_key = \"dash-key\"\n{FAST_RETRY}",
        config(&bot, "http://127.0.0.1:9"),
        kochava.url("/track/json"),
        dashbot.url("/track"),
    ))
    .await?;
    // Echo, then report, of one send; report, then echo, of another; and Meta's retry of the
    // first echo.
    let first = echo_webhook("111", "U1", "m_echo_first");
    assert_eq!(app.post_webhook(&first).await?.status(), 200);
    let reported = post(
        &app,
        "/outgoing",
        Some(TOKEN),
        &report("U1", "m_echo_first", "111"),
    )
    .await?;
    assert_eq!(reported.status(), 202);
    let reported = post(
        &app,
        "/outgoing",
        Some(TOKEN),
        &report("U2", "m_report_first", "111"),
    )
    .await?;
    assert_eq!(reported.status(), 202);
    let second = echo_webhook("111", "U2", "m_report_first");
    assert_eq!(app.post_webhook(&second).await?.status(), 200);
    assert_eq!(app.post_webhook(&first).await?.status(), 200);

    app.wait_until_settled(Duration::from_secs(10)).await?;
    let settled = (kochava.received().len(), dashbot.received().len());
    assert_stays(
        "no sink gets anything more",
        Duration::from_millis(200),
        || (kochava.received().len(), dashbot.received().len()) == settled,
    )
    .await?;
    let kochava_sends: Vec<String> = kochava
        .received()
        .iter()
        .filter(|request| request.json()["data"]["event_name"] == "message_sent")
        .map(|request| {
            request.json()["data"]["event_data"]["mid"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let mut sorted = kochava_sends.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["m_echo_first", "m_report_first"],
        "{kochava_sends:?}"
    );
    let dashbot_sends: Vec<String> = dashbot
        .received()
        .iter()
        .filter(|request| request.uri.contains("type=outgoing"))
        .map(|request| {
            request.json()["responseBody"]["message_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let mut sorted = dashbot_sends.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["m_echo_first", "m_report_first"],
        "{dashbot_sends:?}"
    );
    // The bot still gets each echo Meta sent once (the retry is deduplicated).
    assert_eq!(bot.received().len(), 2);
    app.stop().await
}

/// A bot that cuts its text at the Send API's 2,000 characters with `slice` may cut inside an
/// emoji, and `JSON.stringify` then writes the lone half as `"\ud83d"`: valid JSON syntax, in
/// the shapes of SPEC §2.3 and §2.4. The report is accepted (as the webhook accepts such an
/// item), with U+FFFD in place of the lone half.
#[tokio::test]
async fn reports_whose_text_was_cut_inside_an_emoji_are_accepted() -> TestResult {
    let (app, _bot) = app_with_bot().await?;
    let send = r#"{"request":{"recipient":{"id":"U1"},"message":{"text":"cut \ud83d"}},"response":{"recipient_id":"U1","message_id":"m_cut"},"page_id":"111"}"#;
    let response = post_text(&app, "/outgoing", Some(TOKEN), &format!("[{send}]")).await?;
    assert_eq!(response.status(), 202);
    assert_eq!(json_body(response).await?, json!({"accepted": 1}));
    let events = app.events().await?;
    let text =
        payload(stored(&events, &outgoing_id("m_cut"))?)["data"]["request"]["message"]["text"]
            .clone();
    assert_eq!(text, "cut \u{fffd}");

    let event = r#"{"name":"searched","type":"customEvent","userId":"U1","extraInfo":{"query":"cut \ud83d"}}"#;
    let response = post_text(&app, "/events", Some(TOKEN), event).await?;
    assert_eq!(response.status(), 202);
    assert_eq!(json_body(response).await?, json!({"accepted": 1}));
    assert_eq!(
        app.count_events(|event| event.source == Source::Custom && event.kind == EventKind::Custom)
            .await?,
        1
    );
    app.stop().await
}

/// The same cut text sent through the proxy: Graph accepts the send, so it is recorded exactly
/// as if the bot had POSTed it to `/outgoing` (SPEC §2.5).
#[tokio::test]
async fn a_proxied_send_whose_text_was_cut_inside_an_emoji_is_recorded() -> TestResult {
    let bot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    graph.script([Reply {
        body: r#"{"recipient_id":"U8","message_id":"m_proxied_cut"}"#.to_owned(),
        ..Reply::status(200).with_header("content-type", "application/json")
    }]);
    let app = spawn_app(&config(&bot, &graph.url(""))).await?;
    let sent = r#"{"recipient":{"id":"U8"},"message":{"text":"cut \ud83d"}}"#;
    let answer = app
        .http
        .post(format!(
            "{}/graph/v20.0/111/messages?access_token={PAGE_TOKEN}",
            app.url
        ))
        .header("content-type", "application/json")
        .body(sent)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    assert_eq!(graph.received()[0].body, sent.as_bytes());
    let id = outgoing_id("m_proxied_cut");
    app.wait_for_events(
        |event| {
            event.id.as_str() == id
                && event.user_id.as_deref() == Some("U8")
                && event.page_id.as_deref() == Some("111")
        },
        1,
        Duration::from_secs(2),
    )
    .await?;
    app.stop().await
}
