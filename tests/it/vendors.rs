//! What the vendors' December 2026 contract changed at ingest, end to end over HTTP: `/events`
//! idempotency (SPEC §2.4), `message_edits` and `response_feedback` (§3), the Send API fields a
//! proxied call records (§2.5).

use crate::support::*;
use botrelay::signing::sign_sha256;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOKEN: &str = "ingest-token";
const WAIT: Duration = Duration::from_secs(10);

/// Fails if `happened` becomes true within `within`: a bounded wait for what must not happen.
async fn assert_stays(happened: impl Fn() -> bool, within: Duration) -> TestResult {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if happened() {
            return Err("it happened".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A relay whose bot and Dashbot sinks are mocks, with Graph at `graph`.
async fn relay(graph: &str) -> TestResult<(TestApp, MockSink, MockSink)> {
    let bot = MockSink::start().await?;
    let dashbot = MockSink::start().await?;
    let app = spawn_app(&format!(
        "[ingest]\ntoken = \"{TOKEN}\"\n\
         [graph]\nbase_url = \"{graph}\"\n\
         [bot]\nurl = \"{}\"\n\
         [sinks.dashbot]\nurl = \"{}\"\napi_key = \"dash-key\"\n",
        bot.url("/bot"),
        dashbot.url("/track")
    ))
    .await?;
    Ok((app, bot, dashbot))
}

async fn post_events(app: &TestApp, body: &Value, key: Option<&str>) -> TestResult<Value> {
    let mut request = app
        .http
        .post(format!("{}/events", app.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await?;
    assert_eq!(response.status(), 202);
    Ok(response.json().await?)
}

/// The custom events that reached Dashbot (`type=event`), by name.
fn dashbot_events(dashbot: &MockSink) -> TestResult<Vec<String>> {
    let mut names = Vec::new();
    for request in dashbot.received() {
        if request.uri.contains("type=event") {
            let body: Value = serde_json::from_slice(&request.body)?;
            names.push(body["name"].as_str().unwrap_or_default().to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Two identical purchases are two purchases; a retried POST with an `Idempotency-Key`, or an
/// item with an `eventId` posted again, is acknowledged and not delivered again.
#[tokio::test]
async fn events_are_idempotent_by_key_and_never_by_content() -> TestResult {
    let (app, _bot, dashbot) = relay("http://127.0.0.1:9").await?;
    let purchase = json!({"name": "purchase", "type": "revenueEvent", "userId": "U1", "amount": 5});
    // No key: the same purchase twice, in one request and again in another: three purchases.
    post_events(&app, &json!([purchase, purchase]), None).await?;
    post_events(&app, &purchase, None).await?;
    dashbot.wait_for(3, WAIT).await?;

    // Idempotency-Key: the bot's retry of a whole request.
    let batch = json!([
        {"name": "keyed_a", "type": "customEvent", "userId": "U1"},
        {"name": "keyed_b", "type": "customEvent", "userId": "U1"},
    ]);
    assert_eq!(
        post_events(&app, &batch, Some("req-1")).await?,
        json!({"accepted": 2})
    );
    assert_eq!(
        post_events(&app, &batch, Some("req-1")).await?,
        json!({"accepted": 2})
    );
    // eventId: the same item again in another request, under another key.
    let with_id =
        json!({"name": "with_id", "type": "customEvent", "userId": "U1", "eventId": "ev-9"});
    post_events(&app, &with_id, Some("req-2")).await?;
    post_events(&app, &json!([with_id]), None).await?;

    dashbot.wait_for(6, WAIT).await?;
    assert_stays(|| dashbot.received().len() > 6, Duration::from_millis(300)).await?;
    assert_eq!(
        dashbot_events(&dashbot)?,
        [
            "keyed_a", "keyed_b", "purchase", "purchase", "purchase", "with_id"
        ]
    );
    let stored = app.store.probe_events().await?;
    assert_eq!(stored.len(), 6, "each repeat was acknowledged, not stored");
    app.stop().await
}

fn edits_body() -> Vec<u8> {
    fixture("messenger/message-edits.json")
}

/// Every edit of a message reaches the bot (they share the message's `mid`), exactly as Meta
/// sent it and signed; Meta's retry of the batch reaches it no second time. Likewise feedback.
#[tokio::test]
async fn every_message_edit_and_feedback_reaches_the_bot_once() -> TestResult {
    let (app, bot, _dashbot) = relay("http://127.0.0.1:9").await?;
    for body in [edits_body(), fixture("messenger/response-feedback.json")] {
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
        assert_eq!(app.post_webhook(&body).await?.status(), 200, "Meta's retry");
    }
    let received = bot.wait_for(4, WAIT).await?;
    assert_stays(|| bot.received().len() > 4, Duration::from_millis(300)).await?;
    let items: Vec<Value> = received
        .iter()
        .map(|request| -> TestResult<Value> {
            let body: Value = serde_json::from_slice(&request.body)?;
            assert_eq!(
                request
                    .headers
                    .get("x-hub-signature-256")
                    .map(String::as_str),
                Some(sign_sha256(APP_SECRET.as_bytes(), &request.body).as_str())
            );
            Ok(body["entry"][0]["messaging"][0].clone())
        })
        .collect::<TestResult<_>>()?;
    let edits: Vec<(i64, &str)> = items
        .iter()
        .filter_map(|item| {
            let edit = item.get("message_edit")?;
            Some((edit["num_edit"].as_i64()?, edit["text"].as_str()?))
        })
        .collect();
    assert_eq!(edits, [(1, "See you at 7, not 6"), (2, "See you at 7:30")]);
    let feedback: Vec<&str> = items
        .iter()
        .filter_map(|item| item.get("response_feedback")?["feedback"].as_str())
        .collect();
    assert_eq!(feedback, ["Good response", "Bad response"]);
    let kinds: Vec<String> = app
        .store
        .probe_events()
        .await?
        .iter()
        .map(|event| event.kind.to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "message_edit",
            "message_edit",
            "response_feedback",
            "response_feedback"
        ]
    );
    app.stop().await
}

/// A proxied send records the Send API's fields only: a parameter of the caller's own in the
/// query string (`x=1`) does not reach Dashbot's `json`; Graph still gets the query verbatim.
#[tokio::test]
async fn a_proxied_send_records_only_send_api_fields_of_its_query() -> TestResult {
    let graph = MockSink::start().await?;
    graph.set_default(Reply::json(
        200,
        json!({"recipient_id": "U7", "message_id": "m_proxied_7"}),
    ));
    let (app, _bot, dashbot) = relay(&graph.url("")).await?;
    let query = "access_token=PAGE-TOKEN-123&x=1&debug=all&messaging_type=RESPONSE";
    let answer = app
        .http
        .post(format!("{}/graph/v27.0/me/messages?{query}", app.url))
        .header("content-type", "application/json")
        .body(r#"{"recipient":{"id":"U7"},"message":{"text":"hi"}}"#)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        graph.received()[0].uri,
        format!("/v27.0/me/messages?{query}")
    );
    let sent = dashbot.wait_for(1, WAIT).await?;
    assert!(sent[0].uri.contains("type=outgoing"), "{}", sent[0].uri);
    let body: Value = serde_json::from_slice(&sent[0].body)?;
    assert_eq!(
        body["json"],
        json!({"recipient": {"id": "U7"}, "message": {"text": "hi"}, "messaging_type": "RESPONSE"})
    );
    app.stop().await
}
