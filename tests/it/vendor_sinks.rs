//! The sinks as the vendors accept them in December 2026, end to end over real HTTP: Kochava's
//! required fields and Install Authentication (SPEC §4.2), Dimension Labs' realtime and
//! historical endpoints (§4.3), the Conversions API's `event_id`, `messaging_channel` and
//! version warnings (§4.5), and the retired `page_activities` warning (§4.4).

use crate::support::*;
use botrelay::admin::api::SinkView;
use botrelay::clock::now_ms;
use botrelay::event::EventId;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use sha2::Sha256;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const INGEST_TOKEN: &str = "ingest-vendors-token";
const PAGE: &str = "104735812345678";
const KOCHAVA_APP: &str = "kovendors-prod-5c2e1f";
const KOCHAVA_API_KEY: &str = "ko-API-KEY-3e9f1a7c";
const KOCHAVA_AUTH_SECRET: &str = "ko-AUTH-SECRET-8b2d4f60";
const DASHBOT_KEY: &str = "key-DIMENSION-LABS-71c0";
const DATASET: &str = "880112233445566";
const CAPI_TOKEN: &str = "tok-CAPI-vendors-2e4f6a8c";
/// Fast retries for a sink table.
const FAST: &str = "backoff = \"10ms\"\nmax_backoff = \"50ms\"\n";

fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> TestResult<String> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)?;
    mac.update(message);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

/// SPEC §4.2: `"fbm-"` + the first 32 hex digits of HMAC-SHA256(app id, page + ":" + psid).
fn kochava_device_id(page: &str, psid: &str) -> TestResult<String> {
    let digest = hmac_sha256_hex(KOCHAVA_APP.as_bytes(), format!("{page}:{psid}").as_bytes())?;
    Ok(format!("fbm-{}", &digest[..32]))
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

async fn admin_sinks(app: &TestApp) -> TestResult<Vec<SinkView>> {
    let response = app
        .http
        .get(format!("{}/admin/sinks", app.admin_url))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    Ok(response.json().await?)
}

fn sink_view<'a>(views: &'a [SinkView], sink: &str) -> TestResult<&'a SinkView> {
    Ok(views
        .iter()
        .find(|view| view.sink == sink)
        .ok_or(format!("no {sink} in {views:?}"))?)
}

// ---------------------------------------------------------------------------------------------
// Kochava (SPEC §4.2).

/// Every request: the exact URL, `User-Agent: Unknown`, the exact body with the derived device
/// id and the configured consent; with Install Authentication, every `/` escaped and the token
/// recomputed here from the bytes received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kochava_gets_the_required_fields_and_install_authentication() -> TestResult {
    let kochava = MockSink::start().await?;
    let app = spawn_app(&format!(
        "[ingest]\ntoken = \"{INGEST_TOKEN}\"\n\
         [sinks.kochava]\nurl = \"{}\"\napp_id = \"{KOCHAVA_APP}\"\n{FAST}\
         origination_ip = \"203.0.113.7\"\n\
         gdpr_privacy_consent = {{ gdpr_applies = 1, tc_string = \"CPz/TcString\" }}\n\
         api_key = \"{KOCHAVA_API_KEY}\"\nauth_secret = \"{KOCHAVA_AUTH_SECRET}\"\n",
        kochava.url("/track/json?source=botrelay")
    ))
    .await?;
    let user = "2847519203746152";
    let timestamp = 1_764_000_000_123;
    let webhook = text_message(PAGE, user, "m_kochava-1", "see https://x.test/a", timestamp);
    assert_eq!(app.post_webhook(&webhook).await?.status(), 200);
    // A custom event without a page id: the device id is made with an empty one.
    let launch = json!({
        "name": "opened_webview", "type": "pageLaunchEvent", "userId": user,
        "extraInfo": {"url": "https://shop.test/spring/sale"}
    });
    assert_eq!(post_ingest(&app, "/events", &launch).await?.status(), 202);

    let received = kochava.wait_for(2, WAIT).await?;
    let consent = json!({"gdpr_applies": 1, "tc_string": "CPz/TcString"});
    let expected = |name: &str, device: String, data: Value, usertime: Value| {
        json!({
            "action": "event",
            "kochava_app_id": KOCHAVA_APP,
            "kochava_device_id": device,
            "data": {
                "device_ids": {"fb_user_id": user},
                "event_name": name,
                "event_data": data,
                "usertime": usertime,
                "origination_ip": "203.0.113.7",
                "device_ver": "Messenger-bot",
                "device_ua": "",
                "app_tracking_transparency": {"att": false},
                "gdpr_privacy_consent": consent,
            }
        })
    };
    for request in &received {
        assert_eq!(request.method, "POST");
        assert_eq!(request.uri, "/track/json?source=botrelay");
        assert_eq!(request.header("user-agent"), Some("Unknown"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("kochava-api-key"), Some(KOCHAVA_API_KEY));
        // Install Authentication over exactly the bytes received.
        let body_sha1 = hex::encode(Sha1::digest(&request.body));
        let token = hmac_sha256_hex(
            KOCHAVA_API_KEY.as_bytes(),
            format!("{KOCHAVA_AUTH_SECRET}{body_sha1}").as_bytes(),
        )?;
        assert_eq!(request.header("kochava-auth-token"), Some(token.as_str()));
        let text = request.text();
        assert!(text.contains(r"CPz\/TcString"), "{text}");
        assert!(!text.replace(r"\/", "").contains('/'), "{text}");
    }
    let message = received
        .iter()
        .find(|request| request.json()["data"]["event_name"] == "message_received")
        .ok_or("no message_received")?;
    assert_eq!(
        message.json(),
        expected(
            "message_received",
            kochava_device_id(PAGE, user)?,
            json!({"mid": "m_kochava-1", "has_text": true, "attachment_types": []}),
            json!(timestamp / 1000),
        )
    );
    let launched = received
        .iter()
        .find(|request| request.json()["data"]["event_name"] == "opened_webview")
        .ok_or("no opened_webview")?;
    assert!(
        launched
            .text()
            .contains(r#""url":"https:\/\/shop.test\/spring\/sale""#),
        "{}",
        launched.text()
    );
    let usertime = launched.json()["data"]["usertime"].clone();
    assert_eq!(
        launched.json(),
        expected(
            "opened_webview",
            kochava_device_id("", user)?,
            json!({"url": "https://shop.test/spring/sale"}),
            usertime,
        )
    );
    app.stop().await
}

// ---------------------------------------------------------------------------------------------
// Dimension Labs (SPEC §4.3).

/// An event whose platform timestamp is more than 24 hours old when it is sent goes to the
/// historical endpoint, with the same query and body; a fresh one to the realtime endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimension_labs_takes_old_events_on_its_historical_endpoint() -> TestResult {
    let dashbot = MockSink::start().await?;
    let app = spawn_app(&format!(
        "[sinks.dashbot]\nurl = \"{}\"\napi_key = \"{DASHBOT_KEY}\"\n{FAST}",
        dashbot.url("/track")
    ))
    .await?;
    let now = now_ms();
    let old = now - 25 * 3600 * 1000;
    let fresh = now - 3600 * 1000;
    let user_old = "3319846520017734";
    let user_fresh = "6120938475610293";
    let old_body = text_message(PAGE, user_old, "m_old-1", "from yesterday", old);
    let fresh_body = text_message(PAGE, user_fresh, "m_fresh-1", "from an hour ago", fresh);
    assert_eq!(app.post_webhook(&old_body).await?.status(), 200);
    assert_eq!(app.post_webhook(&fresh_body).await?.status(), 200);

    let received = dashbot.wait_for(2, WAIT).await?;
    let query = format!("?platform=facebook&v=11.1.0-rest&type=incoming&apiKey={DASHBOT_KEY}");
    let to = |user: &str| {
        received
            .iter()
            .find(|request| request.json()["entry"][0]["messaging"][0]["sender"]["id"] == user)
            .ok_or(format!("nothing for {user}"))
    };
    let historical = to(user_old)?;
    assert_eq!(historical.uri, format!("/trackhistorical{query}"));
    assert_eq!(
        historical.body, old_body,
        "the single-item body, byte for byte"
    );
    let realtime = to(user_fresh)?;
    assert_eq!(realtime.uri, format!("/track{query}"));
    assert_eq!(realtime.body, fresh_body);
    for request in [historical, realtime] {
        assert_eq!(request.method, "POST");
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    app.stop().await
}

// ---------------------------------------------------------------------------------------------
// The Conversions API (SPEC §4.5) and the retired page_activities (§4.4).

/// `event_id` is the relay's own event id, `messaging_channel` follows the webhook's `object`
/// (`/events` items are `messenger`); Graph's version warning headers show in `/admin/sinks`,
/// and so does the retired `page_activities` sink's warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversions_items_carry_our_event_id_and_channel_and_graph_warnings_show() -> TestResult {
    let graph = MockSink::start().await?;
    let deprecation = "@1794000000";
    let version_warning =
        "The API version v24.0 you are calling is deprecated; this call was upgraded to v25.0";
    let (warning, deprecated) = (version_warning.to_owned(), deprecation.to_owned());
    graph.decide(move |request| {
        Some(if request.uri.contains("/events?") {
            Reply::json(
                200,
                json!({"events_received": 1, "messages": [], "fbtrace_id": "AuGZ2vb0Xq1"}),
            )
            .with_header("x-ad-api-version-warning", &warning)
            .with_header("deprecation", &deprecated)
        } else {
            Reply::json(200, json!({"success": true}))
        })
    });
    let app = spawn_app(&format!(
        "[ingest]\ntoken = \"{INGEST_TOKEN}\"\n\
         [graph]\nbase_url = \"{}\"\n\
         [sinks.page_activities]\napp_id = \"2094857361029384\"\npage_tokens = {{ \"{PAGE}\" = \"tok-page\" }}\nkinds = []\n\
         [sinks.conversions]\ndataset_id = \"{DATASET}\"\naccess_token = \"{CAPI_TOKEN}\"\n{FAST}\
         kinds = [\"message\", \"revenue\"]\n[sinks.conversions.names]\nmessage = \"ViewContent\"\n",
        graph.url("")
    ))
    .await?;

    // Before any delivery: the retired sink's warning, naming its replacement.
    let views = admin_sinks(&app).await?;
    let page_activities = sink_view(&views, "page_activities")?;
    assert!(page_activities.enabled);
    assert!(
        page_activities
            .warnings
            .iter()
            .any(|warning| warning.contains("[sinks.conversions]") && warning.contains("retired")),
        "{page_activities:?}"
    );
    assert!(sink_view(&views, "conversions")?.warnings.is_empty());

    let instagram_user = "17841499887766554";
    let instagram = json!({
        "object": "instagram",
        "entry": [{"id": "17841400008460056", "time": 1_764_000_200_500_i64, "messaging": [{
            "sender": {"id": instagram_user},
            "recipient": {"id": "17841400008460056"},
            "timestamp": 1_764_000_200_100_i64,
            "message": {"mid": "aWdfZAG1faXRlbTox-vendors", "text": "Hello from Instagram"}
        }]}]
    })
    .to_string()
    .into_bytes();
    let messenger_user = "2847519203746152";
    let messenger = text_message(PAGE, messenger_user, "m_capi-1", "hello", 1_764_000_300_000);
    assert_eq!(app.post_webhook(&instagram).await?.status(), 200);
    assert_eq!(app.post_webhook(&messenger).await?.status(), 200);
    let revenue = json!({
        "name": "checkout_complete", "type": "revenueEvent", "userId": messenger_user,
        "pageId": PAGE, "amount": 57.23, "currency": "EUR", "eventId": "order-42"
    });
    assert_eq!(post_ingest(&app, "/events", &revenue).await?.status(), 202);

    let received = graph.wait_for(3, WAIT).await?;
    let uri = format!(
        "/v27.0/{DATASET}/events?access_token={CAPI_TOKEN}&appsecret_proof={}",
        botrelay::signing::appsecret_proof(APP_SECRET.as_bytes(), CAPI_TOKEN)
    );
    let item = |name: &str, user: &str| {
        received
            .iter()
            .map(Received::json)
            .find(|body| {
                body["data"][0]["event_name"] == name
                    && body["data"][0]["user_data"]["page_scoped_user_id"] == user
            })
            .ok_or(format!("no {name} for {user}"))
    };
    for request in &received {
        assert_eq!(request.uri, uri);
    }
    assert_eq!(
        item("ViewContent", instagram_user)?,
        json!({"data": [{
            "event_name": "ViewContent",
            "event_time": 1_764_000_200_i64,
            "event_id": EventId::derive(&[b"message", b"aWdfZAG1faXRlbTox-vendors"]).as_str(),
            "action_source": "business_messaging",
            "messaging_channel": "instagram",
            "user_data": {"page_id": "17841400008460056", "page_scoped_user_id": instagram_user},
        }]})
    );
    assert_eq!(
        item("ViewContent", messenger_user)?,
        json!({"data": [{
            "event_name": "ViewContent",
            "event_time": 1_764_000_300_i64,
            "event_id": EventId::derive(&[b"message", b"m_capi-1"]).as_str(),
            "action_source": "business_messaging",
            "messaging_channel": "messenger",
            "user_data": {"page_id": PAGE, "page_scoped_user_id": messenger_user},
        }]})
    );
    let purchase = item("Purchase", messenger_user)?;
    assert_eq!(purchase["data"][0]["messaging_channel"], "messenger");
    let event_id = purchase["data"][0]["event_id"]
        .as_str()
        .ok_or("no event_id")?;
    assert!(
        event_id.len() == 32 && event_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{event_id}"
    );

    // Graph's version warning: in /admin/sinks, once however many answers carried it.
    let wanted = format!("X-Ad-Api-Version-Warning: {version_warning}; Deprecation: {deprecation}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let views = admin_sinks(&app).await?;
        let conversions = sink_view(&views, "conversions")?;
        if conversions.last_success_at.is_some() && !conversions.warnings.is_empty() {
            assert_eq!(conversions.warnings, [wanted], "{conversions:?}");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no warning in {conversions:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await
}

/// `check-config` warns about an enabled `page_activities` (naming `[sinks.conversions]`) and a
/// Dimension Labs URL it cannot derive the historical endpoint from, and still exits 0.
#[tokio::test]
async fn check_config_prints_sink_warnings_and_exits_0() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("botrelay.toml");
    std::fs::write(
        &path,
        "[sinks.page_activities]\napp_id = \"1\"\npage_tokens = { \"42\" = \"tok-page-secret\" }\n\
         [sinks.dashbot]\nurl = \"https://collector.test/ingest\"\napi_key = \"dash-key\"\n",
    )?;
    let path = path.to_string_lossy().into_owned();
    let output = run_cli(
        &["--config", &path, "check-config"],
        &[
            ("BOTRELAY__MESSENGER__APP_SECRET", "s3cret-app"),
            ("BOTRELAY__MESSENGER__VERIFY_TOKEN", "verify-me"),
        ],
    )
    .await?;
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{out}{}", stderr(&output));
    let warning = |sink: &str| {
        out.lines()
            .find(|line| line.trim_start().starts_with(&format!("warning: {sink}: ")))
            .ok_or(format!("no warning for {sink}:\n{out}"))
    };
    let retired = warning("page_activities")?;
    assert!(retired.contains("[sinks.conversions]"), "{retired}");
    let historical = warning("dashbot")?;
    assert!(
        historical.contains("sinks.dashbot.historical_url"),
        "{historical}"
    );
    for secret in ["tok-page-secret", "dash-key", "s3cret-app"] {
        assert!(!out.contains(secret), "{secret} in {out}");
    }
    Ok(())
}
