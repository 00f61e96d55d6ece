//! The `[sinks.dashbot]` sink (SPEC §4.3): Dashbot's REST `track` API, now run by Dimension
//! Labs (same API and payloads). Incoming webhook items go as `type=incoming` single-item
//! webhook bodies, bot sends as `type=outgoing` records, custom events as `type=event` objects.
//! The realtime endpoint takes only events less than 24 hours old: an older one (after an
//! outage, a replay) goes to `historical_url`, decided at send time from the `now` the
//! dispatcher passes in. Pure; the API key appears only in the query string. Its table,
//! `[sinks.dashbot]`, is read and validated here too.

use crate::check::{Checker, DeliveryPolicy, secret, without_userinfo};
use crate::clock::Millis;
use crate::delivery::{Method, Request};
use crate::event::{Custom, Event, EventData, EventKind, Outgoing};
use crate::sinks::bot::single_item_body;
use crate::sinks::{Disabled, EncodeError, TableSpec, event_name, require_user};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use url::Url;

/// `[sinks.dashbot]` (SPEC §4.3).
pub const SPEC: TableSpec = TableSpec {
    keys: &["url", "historical_url", "api_key", "names"],
    secret_keys: &["api_key"],
    kinds: &[
        EventKind::Message,
        EventKind::Postback,
        EventKind::Referral,
        EventKind::Optin,
        EventKind::Reaction,
        EventKind::Outgoing,
        EventKind::Custom,
        EventKind::Revenue,
        EventKind::Share,
        EventKind::PageLaunch,
        EventKind::Lead,
    ],
    delivery: DeliveryPolicy::DEFAULT,
};

/// The keys of `[sinks.dashbot]` besides those every sink table takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    url: Option<String>,
    historical_url: Option<String>,
    api_key: Option<String>,
}

/// The realtime tracker (Dimension Labs, formerly `https://tracker.dashbot.io/track`).
pub const DEFAULT_URL: &str = "https://tracker.dimensionlabs.io/track";

/// Events older than this at send time go to `historical_url` (24 hours).
pub const REALTIME_WINDOW_MS: Millis = 24 * 3600 * 1000;

/// Validates `[sinks.dashbot]`: `Ok(None)` when a problem is recorded; disabled without an API
/// key.
pub fn from_table(
    table: Table,
    names: BTreeMap<EventKind, String>,
    check: &mut Checker,
) -> Result<Option<Dashbot>, Disabled> {
    let url = check.url("sinks.dashbot.url", table.url.as_deref(), Some(DEFAULT_URL));
    let historical_url = table
        .historical_url
        .as_deref()
        .map(|text| check.url("sinks.dashbot.historical_url", Some(text), None));
    let api_key = secret(table.api_key).ok_or("sinks.dashbot.api_key is not set")?;
    let Some(url) = url else { return Ok(None) };
    let (historical_url, historical_derived) = match historical_url {
        Some(Some(historical)) => (historical, true),
        Some(None) => return Ok(None),
        None => match historical_of(&url) {
            Some(historical) => (historical, true),
            // Said by `config_warnings`: older events go to `url`, which may refuse them.
            None => (url.clone(), false),
        },
    };
    Ok(Some(Dashbot {
        url,
        historical_url,
        historical_derived,
        api_key,
        names,
    }))
}

/// `url` with its last path segment `track` replaced by `trackhistorical`; `None` when the
/// last segment is something else.
pub fn historical_of(url: &Url) -> Option<Url> {
    if url.path_segments()?.next_back()? != "track" {
        return None;
    }
    let mut historical = url.clone();
    historical
        .path_segments_mut()
        .ok()?
        .pop()
        .push("trackhistorical");
    Some(historical)
}

/// The client version tag Dashbot's REST docs use.
const VERSION: &str = "11.1.0-rest";

/// Dashbot's record of a send always names this endpoint; the real one is the bot's business.
const SEND_API_URI: &str = "https://graph.facebook.com/v2.6/me/messages";

/// Fields of a Dashbot event object that are ours to set, never copied from `extra`.
const OWN_FIELDS: [&str; 8] = [
    "name",
    "type",
    "userId",
    "conversationId",
    "pageId",
    "amount",
    "currency",
    "referenceNumber",
];

#[derive(Debug, Clone)]
pub struct Dashbot {
    /// The realtime endpoint.
    pub url: Url,
    /// Where events older than 24 hours at send time go.
    pub historical_url: Url,
    /// False when `historical_url` was neither set nor derivable from `url` (whose last path
    /// segment is not `track`), and is `url` itself.
    pub historical_derived: bool,
    pub api_key: SecretString,
    /// `[sinks.dashbot.names]`: overrides the `name` of `type=event` objects per kind.
    pub names: BTreeMap<EventKind, String>,
}

impl Dashbot {
    /// A password in its URLs, and the API key.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = [&self.url, &self.historical_url]
            .into_iter()
            .filter_map(|url| url.password().map(str::to_owned))
            .collect();
        secrets.push(self.api_key.expose_secret().to_owned());
        secrets
    }

    /// When `historical_url` could not be derived from `url`, that older events go to `url`.
    pub fn config_warnings(&self) -> Vec<String> {
        if self.historical_derived {
            return Vec::new();
        }
        vec![format!(
            "sinks.dashbot.historical_url is not set and sinks.dashbot.url (`{}`) does not end in \
             /track, so events older than 24 hours are sent to url itself, whose realtime \
             endpoint may refuse them; set historical_url",
            without_userinfo(self.url.as_str())
        )]
    }

    /// Whether an event is too old for the realtime endpoint when sent at `now`: its platform
    /// timestamp (or receipt time, for reports and custom events) is more than 24 hours ago.
    pub fn is_historical(event: &Event, now: Millis) -> bool {
        now.saturating_sub(event.timestamp_ms) > REALTIME_WINDOW_MS
    }

    /// `POST {url}?platform=facebook&v=11.1.0-rest&type=<t>&apiKey=<key>` (any query the
    /// configured URL has is kept), `content-type: application/json`; `historical_url` with the
    /// same query and body for an event more than 24 hours old at `now`, the send time.
    pub fn encode(&self, event: &Event, now: Millis) -> Result<Request, EncodeError> {
        let (track_type, body) = match (&event.data, &event.webhook) {
            (EventData::Custom(custom), _) => {
                ("event", event_body(self, event, custom)?.to_string())
            }
            (EventData::Outgoing(outgoing), _) => {
                ("outgoing", outgoing_body(event, outgoing).to_string())
            }
            (EventData::Echo { .. }, Some(_)) => {
                return Err(EncodeError::Skip(
                    "echoes reach Dashbot as outgoing events".to_owned(),
                ));
            }
            (_, Some(origin)) => ("incoming", single_item_body(origin)?),
            (_, None) => {
                return Err(EncodeError::Skip(format!(
                    "{} event did not come in on the webhook",
                    event.kind
                )));
            }
        };
        let mut url = if Dashbot::is_historical(event, now) {
            self.historical_url.clone()
        } else {
            self.url.clone()
        };
        url.query_pairs_mut()
            .append_pair("platform", "facebook")
            .append_pair("v", VERSION)
            .append_pair("type", track_type)
            .append_pair("apiKey", self.api_key.expose_secret());
        Ok(Request {
            method: Method::Post,
            url,
            headers: vec![("content-type", "application/json".to_owned())],
            body: Some(Bytes::from(body)),
        })
    }
}

/// What `dashbot.logOutgoing(requestData, responseBody)` sends, without the page token.
fn outgoing_body(event: &Event, outgoing: &Outgoing) -> Value {
    let response_field = |name: &str| {
        outgoing
            .response
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let recipient_id = outgoing
        .recipient_id
        .clone()
        .or_else(|| response_field("recipient_id"))
        .or_else(|| event.user_id.clone());
    let message_id = outgoing
        .message_id
        .clone()
        .or_else(|| response_field("message_id"));
    let mut body = json!({
        "qs": {"access_token": ""},
        "uri": SEND_API_URI,
        "method": "POST",
        "json": outgoing.request,
        "responseBody": {"recipient_id": recipient_id, "message_id": message_id},
    });
    if let Some(fields) = body.as_object_mut() {
        if let Some(intent) = &outgoing.intent {
            fields.insert("intent".into(), intent.clone());
        }
        if let Some(user) = &outgoing.platform_user_json {
            fields.insert("platformUserJson".into(), user.clone());
        }
    }
    body
}

/// The Dashbot event object: `{name, type, userId, conversationId?, …the type's own fields}`.
fn event_body(dashbot: &Dashbot, event: &Event, custom: &Custom) -> Result<Value, EncodeError> {
    let user = require_user(event)?;
    // Dashbot has no lead type: a lead is a custom event.
    let event_type = match custom.event_type.as_str() {
        "leadEvent" => "customEvent",
        other => other,
    };
    let mut body = Map::new();
    body.insert(
        "name".into(),
        json!(event_name(&dashbot.names, event.kind, &custom.name)),
    );
    body.insert("type".into(), json!(event_type));
    body.insert("userId".into(), json!(user));
    if let Some(conversation) = &custom.conversation_id {
        body.insert("conversationId".into(), json!(conversation));
    }
    if event.kind == EventKind::Revenue || custom.event_type == "revenueEvent" {
        let amount = custom
            .amount
            .ok_or_else(|| EncodeError::Invalid("revenue event has no amount".to_owned()))?;
        body.insert("amount".into(), json!(amount));
        body.insert(
            "currency".into(),
            json!(custom.currency.as_deref().unwrap_or("USD")),
        );
        if let Some(reference) = &custom.reference_number {
            body.insert("referenceNumber".into(), json!(reference));
        }
    }
    for (key, value) in &custom.extra {
        if !OWN_FIELDS.contains(&key.as_str()) {
            body.insert(key.clone(), value.clone());
        }
    }
    Ok(Value::Object(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::fixtures::*;
    use crate::sinks::testing::*;
    use insta::assert_snapshot;

    fn dashbot(url: &str) -> Result<Dashbot, Box<dyn std::error::Error>> {
        let url = Url::parse(url)?;
        Ok(Dashbot {
            historical_url: historical_of(&url).ok_or("no historical URL")?,
            historical_derived: true,
            url,
            api_key: SecretString::from("DASHBOT-API-KEY"),
            names: BTreeMap::new(),
        })
    }

    #[test]
    fn snapshots_of_every_kind() -> TestResult {
        let sink = dashbot("https://tracker.dimensionlabs.io/track")?;
        let cases = [
            (
                "incoming-message",
                fixture_event("message-text-quick-reply", EventKind::Message)?,
            ),
            (
                "incoming-postback",
                fixture_event("messaging-postbacks", EventKind::Postback)?,
            ),
            (
                "incoming-referral",
                fixture_event("messaging-referrals-shortlink", EventKind::Referral)?,
            ),
            (
                "incoming-optin",
                fixture_event("messaging-optins-plugin", EventKind::Optin)?,
            ),
            (
                "incoming-reaction",
                fixture_event("message-reactions", EventKind::Reaction)?,
            ),
            ("outgoing", outgoing()),
            (
                "outgoing-from-echo",
                fixture_event("message-echo", EventKind::Outgoing)?,
            ),
            (
                "event-custom",
                custom(
                    EventKind::Custom,
                    "customEvent",
                    "trackMeEvent",
                    json!({"extraInfo": {"start": 1500504070512_i64, "difference": 374, "end": 1500504070886_i64}}),
                ),
            ),
            ("event-revenue", revenue()),
            (
                "event-share",
                custom(
                    EventKind::Share,
                    "shareEvent",
                    "shared_coupon",
                    json!({"sharedMessage": {"text": "20% off"}}),
                ),
            ),
            (
                "event-page-launch",
                custom(
                    EventKind::PageLaunch,
                    "pageLaunchEvent",
                    "opened_webview",
                    json!({"extraInfo": {"url": "https://shop.test/"}}),
                ),
            ),
            (
                "event-referral",
                custom(
                    EventKind::Referral,
                    "referralEvent",
                    "ad_click",
                    json!({"ref": "spring", "source": "ADS", "ad_id": "6045246247433"}),
                ),
            ),
            (
                "event-lead",
                custom(EventKind::Lead, "leadEvent", "lead_submitted", json!({})),
            ),
            // Off by default; sent as incoming when `kinds` lists them.
            (
                "incoming-message-edit",
                fixture_event("message-edits", EventKind::MessageEdit)?,
            ),
            (
                "incoming-response-feedback",
                fixture_event("response-feedback", EventKind::ResponseFeedback)?,
            ),
        ];
        for (name, event) in cases {
            // Sent as soon as it came: the realtime endpoint.
            let now = event.timestamp_ms;
            assert_snapshot!(
                format!("dashbot-{name}"),
                render(&sink.encode(&event, now)?)
            );
        }
        Ok(())
    }

    /// Older than 24 hours at send time: the historical endpoint, same query and body.
    #[test]
    fn events_older_than_a_day_at_send_time_go_to_the_historical_url() -> TestResult {
        let sink = dashbot("https://dashbot.test/api/track?region=eu")?;
        assert_eq!(
            sink.historical_url.as_str(),
            "https://dashbot.test/api/trackhistorical?region=eu"
        );
        for event in [
            fixture_event("message-text-quick-reply", EventKind::Message)?,
            outgoing(),
            revenue(),
        ] {
            let fresh = sink.encode(&event, event.timestamp_ms + REALTIME_WINDOW_MS)?;
            let old = sink.encode(&event, event.timestamp_ms + REALTIME_WINDOW_MS + 1)?;
            assert!(
                fresh.url.as_str().starts_with(
                    "https://dashbot.test/api/track?region=eu&platform=facebook&v=11.1.0-rest&type="
                ),
                "{}",
                fresh.url
            );
            assert_eq!(
                old.url.as_str(),
                fresh
                    .url
                    .as_str()
                    .replace("/api/track?", "/api/trackhistorical?")
            );
            assert_eq!(old.body, fresh.body);
            assert_eq!(old.headers, fresh.headers);
        }
        Ok(())
    }

    #[test]
    fn historical_url_is_derived_set_or_warned_about() -> TestResult {
        let table = |url: Option<&str>, historical: Option<&str>| Table {
            url: url.map(str::to_owned),
            historical_url: historical.map(str::to_owned),
            api_key: Some("k".into()),
        };
        let mut check = Checker::default();
        let default = from_table(table(None, None), BTreeMap::new(), &mut check)
            .ok()
            .flatten()
            .ok_or("not enabled")?;
        assert_eq!(default.url.as_str(), DEFAULT_URL);
        assert_eq!(
            default.historical_url.as_str(),
            "https://tracker.dimensionlabs.io/trackhistorical"
        );
        assert!(default.config_warnings().is_empty());
        let set = from_table(
            table(Some("https://a.test/in"), Some("https://b.test/old")),
            BTreeMap::new(),
            &mut check,
        )
        .ok()
        .flatten()
        .ok_or("not enabled")?;
        assert_eq!(set.historical_url.as_str(), "https://b.test/old");
        assert!(set.config_warnings().is_empty());
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        let fallback = from_table(
            table(Some("https://u:pw@a.test/in"), None),
            BTreeMap::new(),
            &mut check,
        )
        .ok()
        .flatten()
        .ok_or("not enabled")?;
        assert_eq!(fallback.historical_url, fallback.url);
        let warnings = fallback.config_warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("sinks.dashbot.historical_url") && !warnings[0].contains("pw"),
            "{warnings:?}"
        );
        assert!(fallback.secrets().contains(&"pw".to_owned()));
        let bad = from_table(table(None, Some("not a url")), BTreeMap::new(), &mut check);
        assert!(matches!(bad, Ok(None)));
        assert_eq!(check.problems.len(), 1);
        assert_eq!(check.problems[0].key, "sinks.dashbot.historical_url");
        Ok(())
    }

    #[test]
    fn incoming_is_the_bot_sinks_single_item_body_byte_for_byte() -> TestResult {
        let event = fixture_event("message-reactions", EventKind::Reaction)?;
        let request =
            dashbot("https://tracker.dashbot.io/track")?.encode(&event, event.timestamp_ms)?;
        let origin = event.webhook.as_ref().ok_or("no origin")?;
        assert_eq!(
            request.body.as_deref(),
            Some(single_item_body(origin)?.as_bytes())
        );
        // Meta's escapes survive: the emoji is still `\u2764\ufe0f`.
        let raw = String::from_utf8_lossy(request.body.as_deref().unwrap_or_default()).into_owned();
        assert!(raw.contains(r#""emoji": "\u2764\ufe0f""#), "{raw}");
        Ok(())
    }

    #[test]
    fn api_key_only_in_the_query_and_the_configured_query_is_kept() -> TestResult {
        let sink = dashbot("https://dashbot.test/track?region=eu")?;
        for event in [
            fixture_event("message-text-quick-reply", EventKind::Message)?,
            outgoing(),
            revenue(),
        ] {
            let request = sink.encode(&event, event.timestamp_ms)?;
            let url = request.url.clone();
            let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            assert_eq!(pairs[0], ("region".into(), "eu".into()));
            assert!(pairs.contains(&("apiKey".into(), "DASHBOT-API-KEY".into())));
            assert!(pairs.contains(&("platform".into(), "facebook".into())));
            assert!(pairs.contains(&("v".into(), "11.1.0-rest".into())));
            let body =
                String::from_utf8_lossy(request.body.as_deref().unwrap_or_default()).into_owned();
            assert!(!body.contains("DASHBOT-API-KEY"));
            assert!(
                request
                    .headers
                    .iter()
                    .all(|(_, value)| !value.contains("DASHBOT-API-KEY"))
            );
        }
        Ok(())
    }

    #[test]
    fn outgoing_access_token_is_always_empty() -> TestResult {
        let sink = dashbot("https://tracker.dashbot.io/track")?;
        for event in [
            outgoing(),
            fixture_event("message-echo", EventKind::Outgoing)?,
        ] {
            let body = body_json(&sink.encode(&event, event.timestamp_ms)?);
            assert_eq!(body["qs"], json!({"access_token": ""}));
            assert_eq!(body["method"], "POST");
        }
        Ok(())
    }

    #[test]
    fn names_override_event_names_and_echoes_or_foreign_events_are_skipped() -> TestResult {
        let mut sink = dashbot("https://tracker.dashbot.io/track")?;
        sink.names.insert(EventKind::Revenue, "purchase".into());
        let now = revenue().timestamp_ms;
        assert_eq!(
            body_json(&sink.encode(&revenue(), now)?)["name"],
            "purchase"
        );
        let echo = fixture_event("message-echo", EventKind::Echo)?;
        assert!(matches!(sink.encode(&echo, now), Err(EncodeError::Skip(_))));
        let mut anonymous = revenue();
        anonymous.user_id = None;
        assert!(matches!(
            sink.encode(&anonymous, now),
            Err(EncodeError::Skip(_))
        ));
        Ok(())
    }
}
