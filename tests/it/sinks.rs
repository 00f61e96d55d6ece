//! The analytics sinks end to end (SPEC §4.2–4.6): real webhooks, `/outgoing` reports and
//! `/events` go through the relay and arrive, byte-exact where the contract fixes the bytes, at
//! one recording mock per sink (the bot, Kochava, Kochava SmartLink, Dashbot, and a mock Graph
//! for `page_activities` and the Conversions API). Kinds a sink skips must not arrive there.
//! Then: Graph error classes, isolation from a sink that never answers, and the real binary's
//! log, which must never contain a secret (SPEC §1).

use crate::support::{
    APP_SECRET, DeliveryProbe, FAST_RETRY, MockSink, Received, Reply, Source, TestApp, TestResult,
    assert_stays, fixture, spawn_app, start_relay, text_message, wait_until,
};
use botrelay::clock::now_ms;
use botrelay::signing::{appsecret_proof, sign_sha256};
use botrelay::store::DeadLetterFilter;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

use std::path::Path;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The Page every test event belongs to (the entry id of the webhooks).
const PAGE: &str = "104735812345678";
/// A second Page, whose token has expired (Graph answers 190 for it).
const EXPIRED_PAGE: &str = "109920387465512";
/// `[sinks.page_activities] app_id`, distinct from `messenger.app_id` on purpose.
const PA_APP_ID: &str = "2094857361029384";
const DATASET: &str = "880112233445566";
const INGEST_TOKEN: &str = "ing-BEARER-5f3a0c7e9d21b846";
const KOCHAVA_APP: &str = "kobotrelay-prod-5c2e1f";
const DASHBOT_KEY: &str = "key-DASHBOT-93d7b1f5e2c40a68";
const PAGE_TOKEN: &str = "tok-PAGE-8c1f3d5e7a9b0246";
const CAPI_TOKEN: &str = "tok-CAPI-2e4f6a8c0b1d3579";
/// Real page tokens are about 200 characters: Graph quoting one is cut short by the error
/// excerpt, and the cut token must still be masked.
const EXPIRED_PAGE_TOKEN: &str = "EAAPAGEexpiredU8JZpDE0iGXlD6gNCFbaEPFjbD0kH8Oool8DklZDOCj2ISaJiHkTj0rLGlkoMXGjtEkDnNfribxUdl7dXTPyLsxPFkThf4VucSmEHgaKwVJ7faC9qEwjky40UVsWmflzdE1F8ResqEDusTpkr0cStY4qWB8dWKnHfDNxSIvPZZ63fFKcZjR4I0b3jRtaWr4Y9OJFLJOqOAf1lLQSAJ";
const EXPIRED_CAPI_TOKEN: &str = "EAACAPIexpiredaiXnkU8Is2g8nprvDd53x83rzjZZZZGeoZDMENcKHVmDGAkJiG8XnBE3NnYJoQ9WmXeHH2fdeeTFJGvVvQe1sKhBN88hXJsi6BwhTp3Fs2QhX6KWxOiixgVoOnzyw2MzP0ZvzOMhfWuBByReQMsm9Wcz7uW9XFOGOeMVNen5n1Ae6pWzpF1qH6YytwMe4LbyoVFz8uZdZv8FuKKIBJ";
const SMARTLINK_URL: &str = "https://bot.smart.link/kobotrelay?campaign=spring";

/// PSIDs (and one plugin `user_ref`), one per scenario so that requests are easy to tell apart.
const USER_TEXT: &str = "2847519203746152";
const USER_REF: &str = "ref-7b3e91c4d2";
const USER_AD: &str = "3319846520017734";
/// The recipient in `tests/data/send-api/response.json`.
const USER_OUT: &str = "5275811702471834";
const USER_BUY: &str = "6120938475610293";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// How long a test watches for a request that must not come once everything settled.
const QUIET: Duration = Duration::from_millis(300);

/// A fixture with its placeholders replaced by realistic ids.
fn fixture_with(name: &str, replacements: &[(&str, &str)]) -> TestResult<Vec<u8>> {
    let mut text = String::from_utf8(fixture(name))?;
    for (from, to) in replacements {
        assert!(text.contains(from), "{name} has no {from}");
        text = text.replace(from, to);
    }
    Ok(text.into_bytes())
}

type RawMap = HashMap<String, Box<RawValue>>;

/// The single-item webhook bodies of SPEC §4.1 for every item of a webhook body, built from its
/// raw bytes: `{"object","entry":[{"id","time","messaging"|"standby":[<raw item>]}]}`.
fn single_item_bodies(body: &[u8]) -> TestResult<Vec<String>> {
    let top: RawMap = serde_json::from_slice(body)?;
    let object = top.get("object").ok_or("no object")?.get();
    let entries: Vec<RawMap> = serde_json::from_str(top.get("entry").ok_or("no entry")?.get())?;
    let mut bodies = Vec::new();
    for entry in entries {
        let id = entry.get("id").ok_or("no entry id")?.get();
        let time = entry
            .get("time")
            .map(|time| format!(",\"time\":{}", time.get()))
            .unwrap_or_default();
        for channel in ["messaging", "standby"] {
            if let Some(items) = entry.get(channel) {
                let items: Vec<Box<RawValue>> = serde_json::from_str(items.get())?;
                for item in items {
                    bodies.push(format!(
                        "{{\"object\":{object},\"entry\":[{{\"id\":{id}{time},\"{channel}\":[{}]}}]}}",
                        item.get()
                    ));
                }
            }
        }
    }
    Ok(bodies)
}

/// The only request in `received` that `matches`; fails (listing them all) otherwise.
fn only<'a>(
    received: &'a [Received],
    what: &str,
    matches: impl Fn(&Received) -> bool,
) -> TestResult<&'a Received> {
    let found: Vec<&Received> = received.iter().filter(|request| matches(request)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => Err(format!(
            "{what}: expected exactly one request, got {}; all received:\n{}",
            found.len(),
            describe(received)
        )
        .into()),
    }
}

fn describe(received: &[Received]) -> String {
    received
        .iter()
        .map(|request| format!("  {} {} {}", request.method, request.uri, request.text()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts a JSON POST: method, path and query, content type and body.
fn assert_json_post(request: &Received, uri: &str, body: &Value) {
    assert_eq!(request.method, "POST", "{}", request.uri);
    assert_eq!(request.uri, uri);
    assert_eq!(
        request.header("content-type"),
        Some("application/json"),
        "{}",
        request.uri
    );
    assert_eq!(&request.json(), body, "body of POST {}", request.uri);
}

/// POSTs JSON to `path` with the ingest bearer token.
async fn post_ingest(app: &TestApp, path: &str, body: &Value) -> TestResult<reqwest::Response> {
    Ok(app
        .http
        .post(format!("{}{path}", app.url))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {INGEST_TOKEN}"))
        .body(body.to_string())
        .send()
        .await?)
}

/// A webhook with one postback (no referral) from `user`.
fn postback_webhook(user: &str, mid: &str, title: &str, payload: &str, timestamp: i64) -> Vec<u8> {
    json!({
        "object": "page",
        "entry": [{"id": PAGE, "time": timestamp, "messaging": [{
            "sender": {"id": user},
            "recipient": {"id": PAGE},
            "timestamp": timestamp,
            "postback": {"mid": mid, "title": title, "payload": payload}
        }]}]
    })
    .to_string()
    .into_bytes()
}

fn dashbot_uri(track_type: &str) -> String {
    format!("/track?platform=facebook&v=11.1.0-rest&type={track_type}&apiKey={DASHBOT_KEY}")
}

fn page_activities_uri(token: &str) -> String {
    format!(
        "/v20.0/{PA_APP_ID}/page_activities?access_token={token}&appsecret_proof={}",
        appsecret_proof(APP_SECRET.as_bytes(), token)
    )
}

fn conversions_uri(token: &str) -> String {
    format!(
        "/v23.0/{DATASET}/events?access_token={token}&appsecret_proof={}",
        appsecret_proof(APP_SECRET.as_bytes(), token)
    )
}

/// Every event here is on [`PAGE`]; the device id and the required fields are SPEC §4.2's
/// (checked in detail by `vendor_sinks.rs`).
fn kochava_body(user: &str, name: &str, data: Value, usertime: i64) -> Value {
    json!({
        "action": "event",
        "kochava_app_id": KOCHAVA_APP,
        "kochava_device_id": botrelay::sinks::kochava::device_id(KOCHAVA_APP, PAGE, user),
        "data": {
            "device_ids": {"fb_user_id": user},
            "event_name": name,
            "event_data": data,
            "usertime": usertime,
            "origination_ip": "0.0.0.0",
            "device_ver": "Messenger-bot",
            "device_ua": "",
            "app_tracking_transparency": {"att": false},
            "gdpr_privacy_consent": {"gdpr_applies": false},
        }
    })
}

fn kochava_event_name(request: &Received) -> String {
    request.json()["data"]["event_name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn kochava_user(request: &Received) -> String {
    request.json()["data"]["device_ids"]["fb_user_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `(sink, state) → count` of the delivery rows.
async fn delivery_states(app: &TestApp) -> TestResult<BTreeMap<(String, String), i64>> {
    let mut states = BTreeMap::new();
    for delivery in app.deliveries().await? {
        *states.entry((delivery.sink, delivery.state)).or_insert(0) += 1;
    }
    Ok(states)
}

/// The count for `(sink, state)` in [`delivery_states`]' map (0 when absent).
fn count_in(states: &BTreeMap<(String, String), i64>, sink: &str, state: &str) -> i64 {
    states
        .get(&(sink.to_owned(), state.to_owned()))
        .copied()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// 1. Every input reaches exactly the sinks that should get it, in the contract's bytes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_reaches_exactly_its_sinks_in_the_contracts_bytes() -> TestResult {
    let bot = MockSink::start().await?;
    let kochava = MockSink::start().await?;
    let smartlink = MockSink::start().await?;
    let dashbot = MockSink::start().await?;
    let graph = MockSink::start().await?;
    graph.decide(|request| {
        Some(if request.uri.contains("/events?") {
            Reply::json(
                200,
                json!({"events_received": 1, "messages": [], "fbtrace_id": "AuGZ2vb0Xq1"}),
            )
        } else {
            Reply::json(200, json!({"success": true}))
        })
    });
    let config = format!(
        "[ingest]\ntoken = \"{INGEST_TOKEN}\"\n\
         [graph]\nbase_url = \"{graph}\"\n\
         [bot]\nurl = \"{bot}\"\n{FAST_RETRY}\
         [sinks.kochava]\nurl = \"{kochava}\"\napp_id = \"{KOCHAVA_APP}\"\n{FAST_RETRY}\
         impression_url = \"{impression}\"\nclick_url = \"{click}\"\n\
         smartlink_prefix = \"https://bot.smart.link/\"\nclick_payloads = [\"GET_THE_APP\"]\n\
         [sinks.dashbot]\nurl = \"{dashbot}\"\napi_key = \"{DASHBOT_KEY}\"\n{FAST_RETRY}\
         [sinks.page_activities]\napp_id = \"{PA_APP_ID}\"\npage_tokens = {{ \"{PAGE}\" = \"{PAGE_TOKEN}\" }}\n{FAST_RETRY}\
         [sinks.conversions]\napi_version = \"v23.0\"\ndataset_id = \"{DATASET}\"\n\
         access_token = \"{CAPI_TOKEN}\"\npartner_agent = \"botrelay\"\n{FAST_RETRY}",
        graph = graph.url(""),
        bot = bot.url("/webhook"),
        kochava = kochava.url("/track/json"),
        impression = smartlink
            .url("/track/impression?campaign_id=kobotrelay-smartlink&fb_user_id={fb_user_id}"),
        click = smartlink.url("/click?fb_user_id={fb_user_id}"),
        dashbot = dashbot.url("/track"),
    );
    let app = spawn_app(&config).await?;

    // --- Webhooks: a text message, a postback with a referral, an ad referral, two postbacks
    // without one (a SmartLink click payload and a plain menu payload), a delivery and a read.
    let text = fixture_with(
        "messenger/message-text-quick-reply.json",
        &[
            ("<PAGE_ID>", PAGE),
            ("<PSID>", USER_TEXT),
            ("<DEVELOPER_DEFINED_PAYLOAD>", "SIZE_M"),
        ],
    )?;
    let postback = fixture_with(
        "messenger/messaging-postbacks.json",
        &[("PAGE-ID", PAGE), ("USER-REF-ID", USER_REF)],
    )?;
    let ad_referral = fixture_with(
        "messenger/messaging-referrals-ads.json",
        &[
            ("<PAGE_ID>", PAGE),
            ("<PSID>", USER_AD),
            ("<REF_DATA_IF_SPECIFIED_IN_THE_AD>", "spring_sale_2024"),
            ("<ID_OF_THE_AD>", "23851234567890123"),
        ],
    )?;
    let click_postback = postback_webhook(
        USER_TEXT,
        "m_pb-getapp-1",
        "Get the app",
        "GET_THE_APP",
        1_700_000_100_000,
    );
    let menu_postback =
        postback_webhook(USER_TEXT, "m_pb-menu-1", "Menu", "MENU", 1_700_000_200_000);
    let delivery = fixture_with(
        "messenger/message-deliveries.json",
        &[("<PAGE_ID>", PAGE), ("<PSID>", USER_TEXT)],
    )?;
    let read = fixture_with(
        "messenger/message-reads.json",
        &[("<PAGE_ID>", PAGE), ("<PSID>", USER_TEXT)],
    )?;
    let webhooks = [
        &text,
        &postback,
        &ad_referral,
        &click_postback,
        &menu_postback,
        &delivery,
        &read,
    ];
    for body in webhooks {
        assert_eq!(app.post_webhook(body).await?.status(), 200);
    }

    // --- Outgoing: the Send API fixtures in Dashbot's shape (with the page token in `qs`), and
    // a button template with a SmartLink in the `{request, response}` shape.
    let mut send_request: Value = serde_json::from_slice(&fixture_with(
        "send-api/request.json",
        &[("{{page-scoped-id}}", USER_OUT)],
    )?)?;
    if let Some(request) = send_request.as_object_mut() {
        request.insert("messaging_type".into(), json!("RESPONSE"));
    }
    let send_response: Value = serde_json::from_slice(&fixture("send-api/response.json"))?;
    let send_mid = send_response["message_id"]
        .as_str()
        .ok_or("no message_id in response.json")?
        .to_owned();
    let button_request = json!({
        "recipient": {"id": USER_OUT},
        "messaging_type": "RESPONSE",
        "message": {"attachment": {"type": "template", "payload": {
            "template_type": "button",
            "text": "Get the app",
            "buttons": [{"type": "web_url", "url": SMARTLINK_URL, "title": "Install"}]
        }}}
    });
    let button_mid = "m_btn-Qk3v9XcT2fPz7LmN";
    let button_response = json!({"recipient_id": USER_OUT, "message_id": button_mid});
    let intent = json!({"name": "install_app", "inputs": []});
    let platform_user = json!({"first_name": "Ada", "last_name": "Lovelace"});
    let outgoing = json!([
        {
            "url": "https://graph.facebook.com/v20.0/me/messages",
            "qs": {"access_token": PAGE_TOKEN},
            "method": "POST",
            "json": send_request,
            "responseBody": send_response,
        },
        {
            "request": button_request,
            "response": button_response,
            "page_id": PAGE,
            "intent": intent,
            "platformUserJson": platform_user,
        }
    ]);
    let before_outgoing = now_ms();
    let answer = post_ingest(&app, "/outgoing", &outgoing).await?;
    let after_outgoing = now_ms();
    assert_eq!(answer.status(), 202);
    assert_eq!(answer.json::<Value>().await?, json!({"accepted": 2}));

    // --- Custom events: a revenue event, a custom event Meta's Conversions API allows by name,
    // and one it does not.
    let revenue = json!({
        "name": "checkout_complete", "type": "revenueEvent", "userId": USER_BUY, "pageId": PAGE,
        "conversationId": "conv-7", "amount": 57.23, "currency": "EUR",
        "referenceNumber": "order-42", "metadata": {"sku": "SKI-1"}
    });
    let add_to_cart = json!({
        "name": "AddToCart", "type": "customEvent", "userId": USER_BUY, "pageId": PAGE,
        "extraInfo": {"content_ids": ["SKI-1"], "value": 129.9, "currency": "EUR"}
    });
    let menu_opened = json!({
        "name": "menu_opened", "type": "customEvent", "userId": USER_BUY, "pageId": PAGE
    });
    let before_events = now_ms();
    let answer = post_ingest(&app, "/events", &json!([revenue, add_to_cart, menu_opened])).await?;
    let after_events = now_ms();
    assert_eq!(answer.status(), 202);
    assert_eq!(answer.json::<Value>().await?, json!({"accepted": 3}));

    // --- Wait for everything, then for the queues to drain, and make sure nothing else came.
    let within = Duration::from_secs(20);
    // bot: 7 webhook items; kochava: text, 4 postbacks/referrals, 2 sends, 3 custom events;
    // smartlink: 3 clicks, 1 impression; dashbot: 5 incoming, 2 outgoing, 3 events; Graph:
    // page_activities 3 (revenue, AddToCart, menu_opened), conversions 2 (revenue, AddToCart).
    let expected = [
        (&bot, 7, "bot"),
        (&kochava, 10, "kochava"),
        (&smartlink, 4, "smartlink"),
        (&dashbot, 10, "dashbot"),
        (&graph, 5, "graph"),
    ];
    for (mock, count, name) in expected {
        mock.wait_for(count, within)
            .await
            .map_err(|error| format!("{name}: {error}\n{}", describe(&mock.received())))?;
    }
    app.wait_until_settled(within).await?;
    // Nothing else comes (the asserts below say what did).
    let quiet = assert_stays("no mock gets another request", QUIET, || {
        expected
            .iter()
            .all(|(mock, count, _)| mock.received().len() == *count)
    })
    .await;
    for (mock, count, name) in expected {
        let received = mock.received();
        assert_eq!(
            received.len(),
            count,
            "{name} got other requests than expected:\n{}",
            describe(&received)
        );
        assert!(
            received.iter().all(|request| request.replied == 200),
            "{name}"
        );
    }
    let states = delivery_states(&app).await?;
    let state = |sink: &str, state: &str| count_in(&states, sink, state);
    assert_eq!(state("conversions", "skipped"), 1, "{states:?}");
    for sink in [
        "bot",
        "kochava",
        "kochava_smartlink",
        "dashbot",
        "page_activities",
        "conversions",
    ] {
        assert_eq!(state(sink, "dead"), 0, "{sink}: {states:?}");
    }
    quiet?;

    // Receipt time of reported events, in seconds (what Kochava and Graph get as a time).
    let events = app.events().await?;
    let receipt_seconds = |source: Source, lo: i64, hi: i64| -> TestResult<i64> {
        let times: std::collections::BTreeSet<i64> = events
            .iter()
            .filter(|event| event.source == source)
            .map(|event| event.timestamp_ms)
            .collect();
        assert_eq!(times.len(), 1, "one batch, one receipt time");
        let ms = times.first().copied().unwrap_or_default();
        assert!(
            (lo..=hi).contains(&ms),
            "{source:?} timestamp {ms} not in {lo}..={hi}"
        );
        Ok(ms.div_euclid(1000))
    };
    let outgoing_seconds = receipt_seconds(Source::Outgoing, before_outgoing, after_outgoing)?;
    let custom_seconds = receipt_seconds(Source::Custom, before_events, after_events)?;

    // --- The bot: every webhook item as a signed single-item webhook, nothing else.
    let bot_received = bot.received();
    let mut expected_incoming = Vec::new();
    for body in webhooks {
        let items = single_item_bodies(body)?;
        assert_eq!(items.len(), 1);
        expected_incoming.extend(items);
    }
    for expected in &expected_incoming {
        let request = only(&bot_received, "bot webhook", |request| {
            request.body == expected.as_bytes()
        })?;
        assert_eq!(
            (request.method.as_str(), request.uri.as_str()),
            ("POST", "/webhook")
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(
            request.header("x-hub-signature-256"),
            Some(sign_sha256(APP_SECRET.as_bytes(), expected.as_bytes()).as_str())
        );
    }

    // --- Kochava: one track/json event per analytics event.
    let kochava_received = kochava.received();
    let kochava_uri = "/track/json";
    let koch = |name: &str, user: &str| {
        only(
            &kochava_received,
            &format!("kochava {name} for {user}"),
            |request| kochava_event_name(request) == name && kochava_user(request) == user,
        )
    };
    assert_json_post(
        koch("message_received", USER_TEXT)?,
        kochava_uri,
        &kochava_body(
            USER_TEXT,
            "message_received",
            json!({"mid": "mid.1457764197618:41d102a3e1ae206a38", "has_text": true, "attachment_types": []}),
            1_458_692_752,
        ),
    );
    assert_json_post(
        koch("postback", USER_REF)?,
        kochava_uri,
        &kochava_body(
            USER_REF,
            "postback",
            json!({
                "title": "TITLE-FOR-THE-CTA", "payload": "USER-DEFINED-PAYLOAD",
                "source": "SHORT-URL", "type": "OPEN_THREAD", "ref": "USER-DEFINED-REFERRAL-PARAM"
            }),
            1_458_692_752,
        ),
    );
    assert_json_post(
        koch("referral", USER_AD)?,
        kochava_uri,
        &kochava_body(
            USER_AD,
            "referral",
            json!({"source": "ADS", "type": "OPEN_THREAD", "ref": "spring_sale_2024", "ad_id": "23851234567890123"}),
            1_458_692_752,
        ),
    );
    for (payload, title, usertime) in [
        ("GET_THE_APP", "Get the app", 1_700_000_100),
        ("MENU", "Menu", 1_700_000_200),
    ] {
        let request = only(
            &kochava_received,
            &format!("kochava postback {payload}"),
            |request| request.json()["data"]["event_data"]["payload"] == payload,
        )?;
        assert_json_post(
            request,
            kochava_uri,
            &kochava_body(
                USER_TEXT,
                "postback",
                json!({"title": title, "payload": payload}),
                usertime,
            ),
        );
    }
    for mid in [send_mid.as_str(), button_mid] {
        let request = only(
            &kochava_received,
            &format!("kochava message_sent {mid}"),
            |request| request.json()["data"]["event_data"]["mid"] == mid,
        )?;
        let mut expected = kochava_body(
            USER_OUT,
            "message_sent",
            json!({"mid": mid}),
            outgoing_seconds,
        );
        if mid == send_mid {
            // Reported without a page id: the device id is made with an empty one.
            expected["kochava_device_id"] = json!(botrelay::sinks::kochava::device_id(
                KOCHAVA_APP,
                "",
                USER_OUT
            ));
        }
        assert_json_post(request, kochava_uri, &expected);
    }
    assert_json_post(
        koch("checkout_complete", USER_BUY)?,
        kochava_uri,
        &kochava_body(
            USER_BUY,
            "checkout_complete",
            json!({"sum": 57.23, "currency": "EUR", "id": "order-42"}),
            custom_seconds,
        ),
    );
    assert_json_post(
        koch("AddToCart", USER_BUY)?,
        kochava_uri,
        &kochava_body(
            USER_BUY,
            "AddToCart",
            json!({"content_ids": ["SKI-1"], "value": 129.9, "currency": "EUR"}),
            custom_seconds,
        ),
    );
    assert_json_post(
        koch("menu_opened", USER_BUY)?,
        kochava_uri,
        &kochava_body(USER_BUY, "menu_opened", json!({}), custom_seconds),
    );
    // The message text never reaches Kochava without `include_text`.
    assert!(
        kochava_received
            .iter()
            .all(|request| !request.text().contains("hello, world")),
        "{}",
        describe(&kochava_received)
    );

    // --- SmartLink: a click for each referral and the listed payload, an impression for the
    // send with a SmartLink button; nothing for the plain message, menu postback or other send.
    let smartlink_received = smartlink.received();
    let mut smartlink_uris: Vec<String> = smartlink_received
        .iter()
        .map(|request| format!("{} {}", request.method, request.uri))
        .collect();
    smartlink_uris.sort();
    let mut expected_uris = vec![
        format!("GET /click?fb_user_id={USER_REF}"),
        format!("GET /click?fb_user_id={USER_AD}"),
        format!("GET /click?fb_user_id={USER_TEXT}"),
        format!("GET /track/impression?campaign_id=kobotrelay-smartlink&fb_user_id={USER_OUT}"),
    ];
    expected_uris.sort();
    assert_eq!(smartlink_uris, expected_uris);
    assert!(
        smartlink_received
            .iter()
            .all(|request| request.body.is_empty())
    );

    // --- Dashbot: incoming items as the exact single-item webhook bytes, sends as outgoing
    // records without the token, custom events as event objects.
    let dashbot_received = dashbot.received();
    // The webhooks' timestamps are long past: Dimension Labs' historical endpoint (SPEC §4.3).
    let incoming_uri = dashbot_uri("incoming").replacen("/track?", "/trackhistorical?", 1);
    // The first five webhooks; the delivery and the read (the last two) are not Dashbot kinds,
    // nor Kochava's.
    for skipped in &expected_incoming[5..] {
        assert!(
            !dashbot_received
                .iter()
                .any(|request| request.body == skipped.as_bytes())
        );
    }
    assert!(
        dashbot_received
            .iter()
            .chain(&kochava_received)
            .all(|request| !request.text().contains("watermark")),
        "a delivery or read reached an analytics sink"
    );
    for expected in &expected_incoming[..5] {
        let request = only(&dashbot_received, "dashbot incoming", |request| {
            request.body == expected.as_bytes()
        })?;
        assert_eq!(
            (request.method.as_str(), request.uri.as_str()),
            ("POST", incoming_uri.as_str())
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    let outgoing_uri = dashbot_uri("outgoing");
    let dashbot_send = |mid: &str| {
        only(
            &dashbot_received,
            &format!("dashbot outgoing {mid}"),
            |request| request.json()["responseBody"]["message_id"] == mid,
        )
    };
    assert_json_post(
        dashbot_send(&send_mid)?,
        &outgoing_uri,
        &json!({
            "qs": {"access_token": ""},
            "uri": "https://graph.facebook.com/v2.6/me/messages",
            "method": "POST",
            "json": {"recipient": {"id": USER_OUT}, "messaging_type": "RESPONSE", "message": {"text": "Hello!"}},
            "responseBody": {"recipient_id": USER_OUT, "message_id": send_mid},
        }),
    );
    assert_json_post(
        dashbot_send(button_mid)?,
        &outgoing_uri,
        &json!({
            "qs": {"access_token": ""},
            "uri": "https://graph.facebook.com/v2.6/me/messages",
            "method": "POST",
            "json": button_request,
            "responseBody": {"recipient_id": USER_OUT, "message_id": button_mid},
            "intent": intent,
            "platformUserJson": platform_user,
        }),
    );
    let event_uri = dashbot_uri("event");
    let dashbot_event = |name: &str| {
        only(
            &dashbot_received,
            &format!("dashbot event {name}"),
            |request| request.json()["name"] == name,
        )
    };
    assert_json_post(
        dashbot_event("checkout_complete")?,
        &event_uri,
        &json!({
            "name": "checkout_complete", "type": "revenueEvent", "userId": USER_BUY,
            "conversationId": "conv-7", "amount": 57.23, "currency": "EUR",
            "referenceNumber": "order-42", "metadata": {"sku": "SKI-1"}
        }),
    );
    assert_json_post(
        dashbot_event("AddToCart")?,
        &event_uri,
        &json!({
            "name": "AddToCart", "type": "customEvent", "userId": USER_BUY,
            "extraInfo": {"content_ids": ["SKI-1"], "value": 129.9, "currency": "EUR"}
        }),
    );
    assert_json_post(
        dashbot_event("menu_opened")?,
        &event_uri,
        &json!({"name": "menu_opened", "type": "customEvent", "userId": USER_BUY}),
    );
    for request in &dashbot_received {
        assert!(!request.text().contains(PAGE_TOKEN), "{}", request.text());
    }

    // --- Graph: page_activities for revenue and both custom events; the Conversions API for
    // revenue and the allowed name only.
    let graph_received = graph.received();
    let page_activity = |name: &str| {
        only(
            &graph_received,
            &format!("page_activities {name}"),
            |request| {
                request.uri.contains("/page_activities?")
                    && request.json()["custom_events"][0]["_eventName"] == name
            },
        )
    };
    let page_activities_body = |custom_event: Value| {
        json!({
            "custom_events": [custom_event],
            "advertiser_tracking_enabled": 1,
            "application_tracking_enabled": 1,
            "page_id": PAGE,
            "page_scoped_user_id": USER_BUY,
            "logging_source": "messenger_bot",
            "logging_target": "page",
        })
    };
    let pa_uri = page_activities_uri(PAGE_TOKEN);
    assert_json_post(
        page_activity("fb_mobile_purchase")?,
        &pa_uri,
        &page_activities_body(json!({
            "_eventName": "fb_mobile_purchase", "_logTime": custom_seconds,
            "_valueToSum": 57.23, "fb_currency": "EUR"
        })),
    );
    for name in ["AddToCart", "menu_opened"] {
        assert_json_post(
            page_activity(name)?,
            &pa_uri,
            &page_activities_body(json!({"_eventName": name, "_logTime": custom_seconds})),
        );
    }
    let conversion = |name: &str| {
        only(&graph_received, &format!("conversions {name}"), |request| {
            request.uri.contains("/events?") && request.json()["data"][0]["event_name"] == name
        })
    };
    let conversions_body = |name: &str, custom_data: Value| {
        // `event_id` is the relay's own (random for `/events` items without a key).
        let event_id = conversion(name).map_or(Value::Null, |request| {
            request.json()["data"][0]["event_id"].clone()
        });
        assert!(
            event_id.as_str().is_some_and(|id| id.len() == 32),
            "{event_id}"
        );
        json!({
            "data": [{
                "event_name": name,
                "event_time": custom_seconds,
                "event_id": event_id,
                "action_source": "business_messaging",
                "messaging_channel": "messenger",
                "user_data": {"page_id": PAGE, "page_scoped_user_id": USER_BUY},
                "custom_data": custom_data,
            }],
            "partner_agent": "botrelay",
        })
    };
    let capi_uri = conversions_uri(CAPI_TOKEN);
    assert_json_post(
        conversion("Purchase")?,
        &capi_uri,
        &conversions_body("Purchase", json!({"currency": "EUR", "value": 57.23})),
    );
    assert_json_post(
        conversion("AddToCart")?,
        &capi_uri,
        &conversions_body(
            "AddToCart",
            json!({"content_ids": ["SKI-1"], "value": 129.9, "currency": "EUR"}),
        ),
    );
    app.stop().await
}

// ---------------------------------------------------------------------------------------------
// 2. Graph error classes: 613 is retried, 190 is dead at once, and no token is kept.

/// Graph's error envelope.
fn graph_error(code: i64, message: &str, trace: &str) -> Value {
    json!({"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": trace}})
}

/// The `access_token` of a request's query.
fn query_token(uri: &str) -> String {
    uri.split(['?', '&'])
        .find_map(|pair| pair.strip_prefix("access_token="))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_rate_limits_are_retried_and_token_errors_dead_letter_without_the_token() -> TestResult
{
    const RETRIED: &str = "7301928465019283";
    const EXPIRED: &str = "7301928465019284";
    let graph = MockSink::start().await?;
    // The first attempt for RETRIED is rate-limited (HTTP 400, code 613); EXPIRED's page token
    // has expired: Graph answers 190 and, as it does for a malformed token, names the token.
    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counting = attempts.clone();
    graph.decide(move |request| {
        let body = request.json();
        let user = body["page_scoped_user_id"]
            .as_str()
            .or_else(|| body["data"][0]["user_data"]["page_scoped_user_id"].as_str())?
            .to_owned();
        let sink = if request.uri.contains("/page_activities?") {
            "pa"
        } else {
            "capi"
        };
        let attempt = {
            let mut attempts = counting.lock().ok()?;
            let count = attempts.entry(format!("{sink}/{user}")).or_default();
            *count += 1;
            *count
        };
        Some(match (user.as_str(), attempt) {
            (RETRIED, 1) => Reply::json(
                400,
                graph_error(
                    613,
                    "Calls to this api have exceeded the rate limit.",
                    "AZrT613xQ",
                ),
            ),
            (EXPIRED, _) => Reply::json(
                400,
                graph_error(
                    190,
                    &format!("Malformed access token {}", query_token(&request.uri)),
                    "Bq3kTrace190",
                ),
            ),
            _ if sink == "pa" => Reply::json(200, json!({"success": true})),
            _ => Reply::json(
                200,
                json!({"events_received": 1, "fbtrace_id": "AuGZ2vb0Xq1"}),
            ),
        })
    });
    let config = format!(
        "[ingest]\ntoken = \"{INGEST_TOKEN}\"\n\
         [graph]\nbase_url = \"{}\"\n\
         [sinks.page_activities]\napp_id = \"{PA_APP_ID}\"\n\
         page_tokens = {{ \"{PAGE}\" = \"{PAGE_TOKEN}\", \"{EXPIRED_PAGE}\" = \"{EXPIRED_PAGE_TOKEN}\" }}\n{FAST_RETRY}\
         [sinks.conversions]\napi_version = \"v23.0\"\ndataset_id = \"{DATASET}\"\n\
         page_tokens = {{ \"{PAGE}\" = \"{CAPI_TOKEN}\", \"{EXPIRED_PAGE}\" = \"{EXPIRED_CAPI_TOKEN}\" }}\n{FAST_RETRY}",
        graph.url("")
    );
    let app = spawn_app(&config).await?;
    let purchase = |user: &str, page: &str| {
        json!({"name": "checkout_complete", "type": "revenueEvent", "userId": user, "pageId": page,
               "amount": 19.99, "currency": "USD", "referenceNumber": format!("order-{user}")})
    };
    let answer = post_ingest(
        &app,
        "/events",
        &json!([purchase(RETRIED, PAGE), purchase(EXPIRED, EXPIRED_PAGE)]),
    )
    .await?;
    assert_eq!(answer.status(), 202);

    let within = Duration::from_secs(15);
    let graph_sink_of = |user: &'static str, state: &'static str, attempts: u32| {
        move |delivery: &DeliveryProbe| {
            ["page_activities", "conversions"].contains(&delivery.sink.as_str())
                && delivery.user.as_deref() == Some(user)
                && delivery.state == state
                && delivery.attempts == attempts
        }
    };
    app.wait_for_deliveries(graph_sink_of(RETRIED, "delivered", 2), 2, within)
        .await?;
    app.wait_for_deliveries(graph_sink_of(EXPIRED, "dead", 1), 2, within)
        .await?;
    app.wait_until_settled(within).await?;
    // No attempt comes after the last settled one (the asserts below count them).
    let settled = graph.received().len();
    let quiet = assert_stays("Graph gets no further request", QUIET, || {
        graph.received().len() == settled
    })
    .await;

    // Exactly: two attempts per sink for the rate-limited event, one for the expired token.
    let received = graph.received();
    let per_key = attempts.lock().map(|map| map.clone()).unwrap_or_default();
    let expected: HashMap<String, usize> = [
        (format!("pa/{RETRIED}"), 2),
        (format!("capi/{RETRIED}"), 2),
        (format!("pa/{EXPIRED}"), 1),
        (format!("capi/{EXPIRED}"), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(per_key, expected, "{}", describe(&received));
    assert_eq!(received.len(), 6);
    quiet?;
    // The retry is the same request again.
    for (uri, token) in [
        (page_activities_uri(PAGE_TOKEN), PAGE_TOKEN),
        (conversions_uri(CAPI_TOKEN), CAPI_TOKEN),
    ] {
        let same: Vec<&Received> = received
            .iter()
            .filter(|request| request.uri == uri)
            .collect();
        assert_eq!(same.len(), 2, "{token}: {}", describe(&received));
        assert_eq!((same[0].replied, same[1].replied), (400, 200));
        assert_eq!(same[0].body, same[1].body);
    }
    for uri in [
        page_activities_uri(EXPIRED_PAGE_TOKEN),
        conversions_uri(EXPIRED_CAPI_TOKEN),
    ] {
        only(&received, &uri, |request| request.uri == uri)?;
    }

    // The dead letters: one per Graph sink, last status 400, the Graph error described with
    // its code and fbtrace_id, and no token or proof anywhere.
    let secrets = [
        PAGE_TOKEN.to_owned(),
        CAPI_TOKEN.to_owned(),
        EXPIRED_PAGE_TOKEN.to_owned(),
        EXPIRED_CAPI_TOKEN.to_owned(),
        appsecret_proof(APP_SECRET.as_bytes(), EXPIRED_PAGE_TOKEN),
        appsecret_proof(APP_SECRET.as_bytes(), EXPIRED_CAPI_TOKEN),
        APP_SECRET.to_owned(),
    ];
    let mut letters = app.store.dead_letters(DeadLetterFilter::default()).await?;
    letters.sort_by(|a, b| a.sink.cmp(&b.sink));
    let sinks: Vec<&str> = letters.iter().map(|letter| letter.sink.as_str()).collect();
    assert_eq!(sinks, vec!["conversions", "page_activities"]);
    for letter in &letters {
        assert_eq!(letter.kind, "revenue");
        assert_eq!(letter.user.as_deref(), Some(EXPIRED));
        assert_eq!(letter.attempts, 1);
        assert_eq!(letter.last_status, Some(400));
        let error = letter.last_error.clone().unwrap_or_default();
        assert!(error.contains("190"), "{error}");
        assert!(error.contains("Bq3kTrace190"), "fbtrace_id kept: {error}");
        for secret in &secrets {
            // Not even the start of one (Graph's message is cut at 200 characters).
            let start = &secret[..secret.len().min(16)];
            assert!(
                !error.contains(start),
                "dead letter holds {start}…: {error}"
            );
        }
    }
    let stored_errors: Vec<String> = app
        .deliveries()
        .await?
        .into_iter()
        .map(|delivery| delivery.last_error.unwrap_or_default())
        .collect();
    for error in &stored_errors {
        for secret in &secrets {
            let start = &secret[..secret.len().min(16)];
            assert!(
                !error.contains(start),
                "deliveries.last_error holds {start}…: {error}"
            );
        }
    }
    // Nor is any token anywhere in the store's files.
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", app.store_path.display());
        let bytes = std::fs::read(&path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{path} holds {secret}");
        }
    }
    app.stop().await
}

/// A SmartLink click URL answers a click with a redirect to the app's store page; the relay
/// does not follow it, and the ping counts as delivered (SPEC §4.2: "a click is a GET of
/// `click_url`"). A 404 from it is still final, after `SUSPECT_ATTEMPTS` tries (a 404 may be
/// a redeploy: SPEC §4, "Outages are not dead letters").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smartlink_click_answered_with_a_redirect_is_delivered() -> TestResult {
    const REDIRECTED: &str = "7301928465019301";
    const MISSING: &str = "7301928465019302";
    let smartlink = MockSink::start().await?;
    let kochava = MockSink::start().await?;
    smartlink.decide(|request| {
        Some(if request.uri.ends_with(MISSING) {
            Reply::status(404)
        } else {
            Reply::status(302).with_header("location", "https://apps.apple.com/app/id1234567890")
        })
    });
    let config = format!(
        "[sinks.kochava]\nurl = \"{kochava}\"\napp_id = \"{KOCHAVA_APP}\"\n\
         click_url = \"{click}\"\nclick_payloads = [\"GET_THE_APP\"]\n{FAST_RETRY}",
        kochava = kochava.url("/track/json"),
        click = smartlink.url("/click?fb_user_id={fb_user_id}"),
    );
    let app = spawn_app(&config).await?;
    for (user, mid) in [(REDIRECTED, "m_click-302"), (MISSING, "m_click-404")] {
        let body = postback_webhook(user, mid, "Get the app", "GET_THE_APP", 1_700_000_000_000);
        assert_eq!(app.post_webhook(&body).await?.status(), 200);
    }
    let within = Duration::from_secs(15);
    app.wait_until_settled(within).await?;
    let states = delivery_states(&app).await?;
    let state = |sink: &str, state: &str| count_in(&states, sink, state);
    assert_eq!(state("kochava_smartlink", "delivered"), 1, "{states:?}");
    assert_eq!(state("kochava_smartlink", "dead"), 1, "{states:?}");
    assert_eq!(
        app.count_deliveries(|delivery| delivery.sink == "kochava_smartlink"
            && delivery.state == "delivered"
            && delivery.user.as_deref() == Some(REDIRECTED)
            && delivery.attempts == 1
            && delivery.last_status == Some(302))
            .await?,
        1
    );
    // One GET for the redirect, which was not followed; the 404, tried until it is final.
    let mut uris: Vec<String> = smartlink
        .received()
        .iter()
        .map(|request| format!("{} {}", request.method, request.uri))
        .collect();
    uris.sort();
    assert_eq!(
        uris,
        [
            format!("GET /click?fb_user_id={REDIRECTED}"),
            format!("GET /click?fb_user_id={MISSING}"),
            format!("GET /click?fb_user_id={MISSING}"),
            format!("GET /click?fb_user_id={MISSING}"),
        ]
    );
    app.stop().await
}

/// Deliveries and reads are off for Kochava by default (SPEC §4.2); a `kinds` list that names
/// them turns them on, under their default names or those of `[sinks.kochava.names]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kochava_sends_deliveries_and_reads_when_its_kinds_list_them() -> TestResult {
    const USER: &str = "7301928465019377";
    let kochava = MockSink::start().await?;
    let config = format!(
        "[sinks.kochava]\nurl = \"{kochava}\"\napp_id = \"{KOCHAVA_APP}\"\n\
         kinds = [\"message\", \"delivery\", \"read\"]\n{FAST_RETRY}[sinks.kochava.names]\nread = \"message_seen\"\n",
        kochava = kochava.url("/track/json"),
    );
    let app = spawn_app(&config).await?;
    for name in [
        "messenger/message-deliveries.json",
        "messenger/message-reads.json",
    ] {
        let body = fixture_with(name, &[("<PAGE_ID>", PAGE), ("<PSID>", USER)])?;
        assert_eq!(app.post_webhook(&body).await?.status(), 200, "{name}");
    }
    app.wait_until_settled(Duration::from_secs(15)).await?;
    let received = kochava.received();
    let delivered = only(&received, "delivery", |request| {
        kochava_event_name(request) == "message_delivered"
    })?;
    assert_json_post(
        delivered,
        "/track/json",
        &kochava_body(
            USER,
            "message_delivered",
            json!({"watermark": 1_458_668_856_253_i64, "mids": ["mid.1458668856218:ed81099e15d3f4f233"]}),
            1_458_668_856,
        ),
    );
    let read = only(&received, "read", |request| {
        kochava_event_name(request) == "message_seen"
    })?;
    assert_json_post(
        read,
        "/track/json",
        &kochava_body(
            USER,
            "message_seen",
            json!({"watermark": 1_458_668_856_253_i64}),
            1_458_668_856,
        ),
    );
    assert_eq!(received.len(), 2, "{}", describe(&received));
    app.stop().await
}

// ---------------------------------------------------------------------------------------------
// 3. A sink that never answers holds up no other sink.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_never_answers_holds_up_no_other_sink() -> TestResult {
    const USERS: usize = 50;
    let bot = MockSink::start().await?;
    let kochava = MockSink::start().await?;
    let dashbot = MockSink::start().await?;
    dashbot.set_default(Reply::hang());
    let app = spawn_app(&format!(
        "[bot]\nurl = \"{}\"\n{FAST_RETRY}\
         [sinks.kochava]\nurl = \"{}\"\napp_id = \"{KOCHAVA_APP}\"\n{FAST_RETRY}\
         [sinks.dashbot]\nurl = \"{}\"\napi_key = \"{DASHBOT_KEY}\"\ntimeout = \"30s\"\n{FAST_RETRY}",
        bot.url("/webhook"),
        kochava.url("/track/json"),
        dashbot.url("/track"),
    ))
    .await?;

    let user = |index: usize| format!("81{:014}", 4_000_000_000 + index);
    let started = Instant::now();
    let mut posting = tokio::task::JoinSet::new();
    for index in 0..USERS {
        let http = app.http.clone();
        let url = format!("{}/webhook", app.url);
        let body = text_message(
            PAGE,
            &user(index),
            &format!("m_iso-{index}"),
            "hi",
            1_700_000_000_000 + i64::try_from(index)?,
        );
        posting.spawn(async move {
            http.post(url)
                .header("content-type", "application/json")
                .header(
                    "x-hub-signature-256",
                    sign_sha256(APP_SECRET.as_bytes(), &body),
                )
                .body(body)
                .send()
                .await
                .map(|response| response.status().as_u16())
        });
    }
    while let Some(status) = posting.join_next().await {
        assert_eq!(status??, 200);
    }
    let acked = started.elapsed();
    // Dashbot is being tried, and hangs.
    dashbot.wait_for(1, Duration::from_secs(5)).await?;
    let within = Duration::from_secs(5);
    let bot_received = bot.wait_for(USERS, within).await?;
    let kochava_received = kochava.wait_for(USERS, within).await?;
    let arrived = started.elapsed();
    println!(
        "isolation: {USERS} webhooks acked in {acked:?}, all at bot and Kochava after {arrived:?}"
    );
    assert!(arrived < acked + within, "took {arrived:?}");

    let bot_users: std::collections::BTreeSet<String> = bot_received
        .iter()
        .filter_map(|request| {
            request.json()["entry"][0]["messaging"][0]["sender"]["id"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let kochava_users: std::collections::BTreeSet<String> =
        kochava_received.iter().map(kochava_user).collect();
    let all: std::collections::BTreeSet<String> = (0..USERS).map(user).collect();
    assert_eq!(bot_users, all);
    assert_eq!(kochava_users, all);
    let hanging = dashbot.received();
    assert!(hanging.iter().all(|request| request.replied == 0));
    assert_eq!(
        app.count_deliveries(|delivery| delivery.sink == "dashbot" && delivery.state == "delivered")
            .await?,
        0
    );
    app.stop().await
}

// ---------------------------------------------------------------------------------------------
// 4. No secret in any log line of the real binary, at `trace`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_log_line() -> TestResult {
    const APP_SECRET_L: &str = "sec-APP-4b1e9f07c3d2a865";
    const VERIFY_L: &str = "vt-VERIFY-71c0e3a95fd4b268";
    const ADMIN_L: &str = "adm-BEARER-0e8c6a4f2d9b7153";
    const BOT_TOKEN: &str = "tok-BOT-SEND-6a2c8e0f4b7d1935";
    let bot_proof = appsecret_proof(APP_SECRET_L.as_bytes(), BOT_TOKEN);
    let secrets: Vec<(&str, String)> = vec![
        ("app secret", APP_SECRET_L.to_owned()),
        ("verify token", VERIFY_L.to_owned()),
        ("page token", PAGE_TOKEN.to_owned()),
        ("CAPI token", CAPI_TOKEN.to_owned()),
        ("Dashbot api key", DASHBOT_KEY.to_owned()),
        ("ingest token", INGEST_TOKEN.to_owned()),
        ("admin token", ADMIN_L.to_owned()),
        ("bot's access_token", BOT_TOKEN.to_owned()),
        ("bot's appsecret_proof", bot_proof.clone()),
        (
            "page_activities appsecret_proof",
            appsecret_proof(APP_SECRET_L.as_bytes(), PAGE_TOKEN),
        ),
        (
            "conversions appsecret_proof",
            appsecret_proof(APP_SECRET_L.as_bytes(), CAPI_TOKEN),
        ),
    ];

    let bot = MockSink::start().await?;
    let kochava = MockSink::start().await?;
    let dashbot = MockSink::start().await?;
    // Dashbot refuses the key, and names it in its answer.
    dashbot.decide(|request| {
        let key = request
            .uri
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("apiKey="))
            .unwrap_or_default()
            .to_owned();
        Some(Reply::json(
            400,
            json!({"error": format!("Invalid apiKey {key}"), "apiKey": key}),
        ))
    });
    // Graph answers 190 to everything, naming the token as it does for a malformed one.
    let graph = MockSink::start().await?;
    graph.decide(|request| {
        Some(Reply::json(
            400,
            graph_error(
                190,
                &format!("Malformed access token {}", query_token(&request.uri)),
                "LgTrace190xZ",
            ),
        ))
    });

    let dir = tempfile::tempdir()?;
    let store = dir.path().join("botrelay.db");
    let config = dir.path().join("botrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_L}\"\n\
             [log]\nformat = \"json\"\nlevel = \"trace\"\n\
             [messenger]\napp_id = \"1517776481860111\"\n\
             [ingest]\ntoken = \"{INGEST_TOKEN}\"\n\
             [graph]\nbase_url = \"{graph}\"\ntimeout = \"5s\"\n\
             [store]\npath = \"{store}\"\n\
             [bot]\nurl = \"{bot}\"\n{FAST_RETRY}\
             [sinks.kochava]\nurl = \"{kochava}\"\napp_id = \"{KOCHAVA_APP}\"\n\
             click_url = \"{click}\"\n{FAST_RETRY}\
             [sinks.dashbot]\nurl = \"{dashbot}\"\napi_key = \"{DASHBOT_KEY}\"\n{FAST_RETRY}\
             [sinks.page_activities]\napp_id = \"{PA_APP_ID}\"\npage_tokens = {{ \"{PAGE}\" = \"{PAGE_TOKEN}\" }}\n{FAST_RETRY}\
             [sinks.conversions]\ndataset_id = \"{DATASET}\"\naccess_token = \"{CAPI_TOKEN}\"\n{FAST_RETRY}",
            graph = graph.url(""),
            store = store.display(),
            bot = bot.url("/webhook"),
            kochava = kochava.url("/track/json"),
            click = kochava.url("/click?fb_user_id={fb_user_id}"),
            dashbot = dashbot.url("/track"),
        ),
    )?;
    let mut relay = start_relay(
        &["--config".as_ref(), config.as_os_str()],
        &[
            ("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET_L),
            ("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_L),
        ],
    )
    .await?;
    let (url, admin_url) = (relay.url.clone(), relay.admin_url.clone());
    let http = reqwest::Client::new();

    // Meta's handshake, with the verify token in the query.
    let handshake = http
        .get(format!(
            "{url}/webhook?hub.mode=subscribe&hub.verify_token={VERIFY_L}&hub.challenge=1158201444"
        ))
        .send()
        .await?;
    assert_eq!(handshake.status(), 200);
    assert_eq!(handshake.text().await?, "1158201444");

    // Signed webhooks: a text message, a postback with a referral, an ad referral.
    let signed = |body: Vec<u8>| {
        let signature = sign_sha256(APP_SECRET_L.as_bytes(), &body);
        http.post(format!("{url}/webhook"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
    };
    let webhooks = [
        text_message(
            PAGE,
            USER_TEXT,
            "m_log-text-1",
            "my secret plan",
            1_700_000_000_000,
        ),
        fixture_with(
            "messenger/messaging-postbacks.json",
            &[("PAGE-ID", PAGE), ("USER-REF-ID", USER_REF)],
        )?,
        fixture_with(
            "messenger/messaging-referrals-ads.json",
            &[("<PAGE_ID>", PAGE), ("<PSID>", USER_AD)],
        )?,
    ];
    for body in webhooks {
        assert_eq!(signed(body).await?.status(), 200);
    }
    // A webhook signed with the wrong secret.
    let forged = text_message(PAGE, USER_TEXT, "m_log-forged", "hi", 1_700_000_000_000);
    let rejected = http
        .post(format!("{url}/webhook"))
        .header(
            "x-hub-signature-256",
            sign_sha256(b"not-the-app-secret", &forged),
        )
        .body(forged)
        .send()
        .await?;
    assert_eq!(rejected.status(), 401);

    // /outgoing with the bot's page token in `qs`, once good and once with a bad item.
    let ingest = |path: &str, body: Value| {
        http.post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {INGEST_TOKEN}"))
            .body(body.to_string())
            .send()
    };
    let good = json!({
        "url": "https://graph.facebook.com/v20.0/me/messages",
        "qs": {"access_token": BOT_TOKEN, "appsecret_proof": bot_proof},
        "method": "POST",
        "json": {"recipient": {"id": USER_OUT}, "message": {"text": "Hello!"}},
        "responseBody": {"recipient_id": USER_OUT, "message_id": "m_log-sent-1"}
    });
    assert_eq!(ingest("/outgoing", good).await?.status(), 202);
    let bad = json!({
        "url": "https://graph.facebook.com/v20.0/me/messages",
        "qs": {"access_token": BOT_TOKEN},
        "json": {"message": {"text": "no recipient"}},
        "responseBody": {"message_id": "m_log-sent-2"}
    });
    assert_eq!(ingest("/outgoing", bad).await?.status(), 400);
    // A revenue event for the Graph sinks (which answer 190).
    let revenue = json!({"name": "checkout_complete", "type": "revenueEvent", "userId": USER_BUY,
                         "pageId": PAGE, "amount": 57.23, "currency": "EUR"});
    assert_eq!(ingest("/events", revenue).await?.status(), 202);

    // A proxied send with the bot's token, which Graph refuses with 190.
    let proxied = http
        .post(format!(
            "{url}/graph/v20.0/me/messages?access_token={BOT_TOKEN}&appsecret_proof={bot_proof}"
        ))
        .header("content-type", "application/json")
        .body(json!({"recipient": {"id": USER_OUT}, "message": {"text": "Hello!"}}).to_string())
        .send()
        .await?;
    assert_eq!(proxied.status(), 400);

    // Everything settles: Graph got the proxied send and one call per Graph sink; Dashbot got
    // the three incoming items, the send and the event, each refused for good.
    let within = Duration::from_secs(20);
    graph.wait_for(3, within).await?;
    dashbot.wait_for(5, within).await?;
    bot.wait_for(3, within).await?;
    // The relay runs in its own process and holds the store: this is what an operator sees
    // with the `sqlite3` CLI on the file meanwhile, the README's own query ("Reading the
    // store"), kept here on purpose as the one test that reads the file directly.
    let open_rows = |store: &Path| -> TestResult<i64> {
        let db = rusqlite::Connection::open_with_flags(
            store,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let mut by_state =
            db.prepare("SELECT sink, state, COUNT(*) FROM deliveries GROUP BY sink, state;")?;
        let rows = by_state.query_map([], |row| {
            Ok((row.get::<_, String>(1)?, row.get::<_, i64>(2)?))
        })?;
        let mut open = 0;
        for row in rows {
            let (state, count) = row?;
            if matches!(state.as_str(), "waiting" | "pending" | "in_flight") {
                open += count;
            }
        }
        Ok(open)
    };
    wait_until("no delivery is open, read with sqlite3", within, || {
        open_rows(&store).is_ok_and(|open| open == 0)
    })
    .await?;
    let dead_letters = http
        .get(format!("{admin_url}/admin/dead-letters"))
        .header("authorization", format!("Bearer {ADMIN_L}"))
        .send()
        .await?;
    assert_eq!(dead_letters.status(), 200);
    let dead_letters = dead_letters.text().await?;
    for (name, secret) in &secrets {
        assert!(
            !dead_letters.contains(secret.as_str()),
            "/admin/dead-letters shows the {name}"
        );
    }

    // SIGTERM, and the whole output.
    let status = relay.terminate(Duration::from_secs(20)).await?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let lines = relay.log();
    let log = lines.join("\n");
    println!("log capture: {} lines, {} bytes", lines.len(), log.len());
    assert!(lines.len() > 20, "the log is nearly empty:\n{log}");
    assert!(
        log.contains("Delivery failed"),
        "no failed delivery was logged"
    );
    assert!(
        log.contains("LgTrace190xZ"),
        "Graph's fbtrace_id is logged (SPEC §4.6)"
    );
    let mut leaks = Vec::new();
    for (name, secret) in &secrets {
        let leaking: Vec<&String> = lines
            .iter()
            .filter(|line| line.contains(secret.as_str()))
            .collect();
        if !leaking.is_empty() {
            let sample: String = leaking[0].chars().take(600).collect();
            leaks.push(format!(
                "the {name} `{secret}` is in {} log line(s), e.g.:\n  {sample}",
                leaking.len()
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the log:\n{}",
        leaks.join("\n")
    );
    Ok(())
}
