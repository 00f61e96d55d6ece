//! The sinks: one closed enum, one module per sink that owns its config table and its pure
//! encoder. A sink turns an [`Event`] into a [`Request`] (or declines it) and may read a failed
//! response itself (Graph's error codes).
//!
//! Each `sinks/<x>.rs` holds its table's keys and defaults ([`TableSpec`]), the raw serde
//! `Table` of its own keys, `from_table` (validation into the typed sink, which is what its
//! encoder reads), and the encoder. `config` composes them into [`Route`]s.
//!
//! No IO here and below: no client, no async, and no clock in any encoder (only the Graph
//! classifier reads it, to turn an HTTP-date `Retry-After` into a wait). `dispatch` sends.

pub mod bot;
pub mod conversions;
pub mod dashbot;
pub mod graph;
pub mod graph_error;
pub mod kochava;
pub mod page_activities;

use crate::check::DeliveryPolicy;
use crate::clock::Millis;
use crate::delivery::{Classify, Request};
use crate::event::{Event, EventData, EventKind};
use crate::sink_name::SinkName;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::sync::Arc;
use url::Url;

/// Why an encoder produced no request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Nothing for this sink to send (not an error; the delivery is marked skipped).
    #[error("skipped: {0}")]
    Skip(String),
    /// The event can never be sent to this sink: dead-lettered at once.
    #[error("{0}")]
    Invalid(String),
}

/// One sink, with the settings its encoder needs.
#[derive(Debug, Clone)]
pub enum Sink {
    Bot(bot::Bot),
    Kochava(kochava::Kochava),
    KochavaSmartlink(kochava::Smartlink),
    Dashbot(dashbot::Dashbot),
    PageActivities(page_activities::PageActivities),
    Conversions(conversions::Conversions),
}

impl Sink {
    /// `now` is the send time (Dashbot routes events older than 24 hours to its historical
    /// endpoint); no encoder reads the clock itself.
    fn encode(&self, event: &Event, now: Millis) -> Result<Request, EncodeError> {
        match self {
            Sink::Bot(bot) => bot.encode(event),
            Sink::Kochava(kochava) => kochava.encode(event),
            Sink::KochavaSmartlink(smartlink) => smartlink.encode(event),
            Sink::Dashbot(dashbot) => dashbot.encode(event, now),
            Sink::PageActivities(page_activities) => page_activities.encode(event),
            Sink::Conversions(conversions) => conversions.encode(event),
        }
    }

    /// Whether an event of an accepted kind needs a delivery at all. Pure and cheap: it runs at
    /// ingest, for every event. Only SmartLink refuses events here (most need no ping); other
    /// sinks decline in `encode`, which marks the delivery skipped.
    pub fn wants(&self, event: &Event) -> bool {
        match self {
            Sink::KochavaSmartlink(smartlink) => smartlink.wants(event),
            // The bot gets what Meta sent it, never what the bot itself reported.
            Sink::Bot(_) => event.webhook.is_some(),
            Sink::Kochava(_)
            | Sink::Dashbot(_)
            | Sink::PageActivities(_)
            | Sink::Conversions(_) => true,
        }
    }

    /// The secrets in its settings that the config's own keys do not already hold (a
    /// password in a URL, API keys, tokens), for redaction.
    pub fn secrets(&self) -> Vec<String> {
        match self {
            Sink::Bot(bot) => bot.secrets(),
            Sink::Kochava(kochava) => kochava.secrets(),
            Sink::KochavaSmartlink(_) => Vec::new(),
            Sink::Dashbot(dashbot) => dashbot.secrets(),
            Sink::PageActivities(page_activities) => page_activities.secrets(),
            Sink::Conversions(conversions) => conversions.secrets(),
        }
    }

    /// What an operator should know about this sink as configured (a retired API, a fallback
    /// the config chose): said once by `check-config`, the start-up log and `/admin/sinks`.
    pub fn config_warnings(&self) -> Vec<String> {
        match self {
            Sink::PageActivities(page_activities) => page_activities.config_warnings(),
            Sink::Dashbot(dashbot) => dashbot.config_warnings(),
            Sink::Bot(_) | Sink::Kochava(_) | Sink::KochavaSmartlink(_) | Sink::Conversions(_) => {
                Vec::new()
            }
        }
    }

    /// Whether the vendor's API version warnings in its answers (`X-Ad-Api-Version-Warning`,
    /// `Deprecation`, `Sunset`) are worth showing: Graph's (SPEC §4.5).
    pub fn heeds_version_warnings(&self) -> bool {
        matches!(self, Sink::PageActivities(_) | Sink::Conversions(_))
    }

    fn classifier(&self) -> Classify {
        match self {
            Sink::Bot(_) | Sink::Kochava(_) | Sink::Dashbot(_) => |_| None,
            Sink::KochavaSmartlink(_) => kochava::classify_ping,
            Sink::PageActivities(_) | Sink::Conversions(_) => graph_error::classify,
        }
    }
}

/// An enabled sink, as the config validated it: what it receives, how it is retried, how it
/// encodes.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: SinkName,
    pub kinds: Vec<EventKind>,
    pub delivery: DeliveryPolicy,
    sink: Sink,
}

impl Route {
    pub fn new(
        name: SinkName,
        kinds: Vec<EventKind>,
        delivery: DeliveryPolicy,
        sink: Sink,
    ) -> Route {
        Route {
            name,
            kinds,
            delivery,
            sink,
        }
    }

    /// Whether this sink gets a delivery row for `event` at all.
    pub fn accepts(&self, event: &Event) -> bool {
        if !self.kinds.contains(&event.kind) {
            return false;
        }
        // A send that Graph refused is recorded, never fanned out.
        if matches!(&event.data, EventData::Outgoing(outgoing) if !outgoing.succeeded) {
            return false;
        }
        self.sink.wants(event)
    }

    /// The request for `event`, sent at `now` (pure: `now` is passed in, never read).
    pub fn encode(&self, event: &Event, now: Millis) -> Result<Request, EncodeError> {
        self.sink.encode(event, now)
    }

    /// See [`Sink::config_warnings`].
    pub fn warnings(&self) -> Vec<String> {
        self.sink.config_warnings()
    }

    /// See [`Sink::heeds_version_warnings`].
    pub fn heeds_version_warnings(&self) -> bool {
        self.sink.heeds_version_warnings()
    }

    pub fn classifier(&self) -> Classify {
        self.sink.classifier()
    }

    pub fn secrets(&self) -> Vec<String> {
        self.sink.secrets()
    }
}

/// The enabled sinks, in config order (the bot first).
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    routes: Vec<Arc<Route>>,
}

impl Sinks {
    /// The routes the config validated (`Config::sinks`).
    pub fn new(routes: &[Route]) -> Sinks {
        let routes = routes.iter().cloned().map(Arc::new).collect();
        Sinks { routes }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn get(&self, name: SinkName) -> Option<&Arc<Route>> {
        self.routes.iter().find(|route| route.name == name)
    }

    /// The sinks that should receive `event`.
    pub fn targets(&self, event: &Event) -> Vec<SinkName> {
        self.routes
            .iter()
            .filter(|route| route.accepts(event))
            .map(|route| route.name)
            .collect()
    }
}

/// Why a sink that has a table is not enabled: it lacks a credential or its URL. Not a problem
/// with the config: the reason is logged once at start and shown by `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disabled(pub String);

impl From<&str> for Disabled {
    fn from(reason: &str) -> Disabled {
        Disabled(reason.to_owned())
    }
}

/// What a sink's table needs from the rest of the config.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// `messenger.app_secret`: the bot sink signs with it, the Graph sinks prove their tokens
    /// with it (none when empty).
    pub app_secret: &'a SecretString,
    /// `messenger.app_id`: the app of `page_activities` when its table names none.
    pub app_id: Option<&'a str>,
    /// `graph.base_url`; `None` when it is not valid (a problem names it already).
    pub graph_base_url: Option<&'a Url>,
}

/// What the config knows of a sink's table before it reads it.
#[derive(Debug)]
pub struct TableSpec {
    /// The keys of the table besides the delivery keys (`check::DELIVERY_KEYS`), in the order
    /// a problem lists them; `names` when it takes `[<table>.names]`.
    pub keys: &'static [&'static str],
    /// Those of `keys` whose values are secrets: a problem never quotes them.
    pub secret_keys: &'static [&'static str],
    /// The kinds the sink receives when its table has no `kinds` (SPEC §4).
    pub kinds: &'static [EventKind],
    /// Its delivery policy when the table sets none of the keys.
    pub delivery: DeliveryPolicy,
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the analytics encoders.

/// The event name a sink sends for `kind`: the `[sinks.<x>.names]` override, else `default`.
pub(crate) fn event_name<'a>(
    names: &'a BTreeMap<EventKind, String>,
    kind: EventKind,
    default: &'a str,
) -> &'a str {
    names.get(&kind).map_or(default, String::as_str)
}

/// Milliseconds since the epoch → whole seconds (Kochava `usertime`, CAPI `event_time`).
pub(crate) fn seconds(timestamp_ms: i64) -> i64 {
    timestamp_ms.div_euclid(1000)
}

/// The user an analytics event is about; events without one (page-level) are skipped.
pub(crate) fn require_user(event: &Event) -> Result<&str, EncodeError> {
    event
        .user_id
        .as_deref()
        .filter(|user| !user.is_empty())
        .ok_or_else(|| EncodeError::Skip(format!("{} event has no user", event.kind)))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Test support for the encoder snapshots and other modules' tests: events made by hand,
    //! and a readable rendering of a request. (Events from the webhook fixtures, which need
    //! `ingest`, are in `fixtures`, private to the sinks.)

    use super::*;
    use crate::event::{Custom, EventId, Source};
    use serde_json::{Value, json};

    pub type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// An event as `POST /events` would store it.
    pub fn custom(kind: EventKind, event_type: &str, name: &str, extra: Value) -> Event {
        let extra = match extra {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        Event {
            id: EventId::derive(&[b"custom", name.as_bytes()]),
            source: Source::Custom,
            kind,
            page_id: Some("1234567890".into()),
            user_id: Some("4455667788".into()),
            timestamp_ms: 1_700_000_123_456,
            data: EventData::Custom(Custom {
                name: name.into(),
                event_type: event_type.into(),
                conversation_id: None,
                amount: None,
                currency: None,
                reference_number: None,
                extra,
            }),
            webhook: None,
        }
    }

    /// A revenue event of 57.23 EUR, reference `order-42`.
    pub fn revenue() -> Event {
        let mut event = custom(
            EventKind::Revenue,
            "revenueEvent",
            "checkout_complete",
            json!({"metadata": {"sku": "SKI-1"}}),
        );
        if let EventData::Custom(custom) = &mut event.data {
            custom.amount = Some(57.23);
            custom.currency = Some("EUR".into());
            custom.reference_number = Some("order-42".into());
            custom.conversation_id = Some("conv-7".into());
        }
        event
    }

    /// Method and URL, headers, then the body (pretty-printed when it is JSON).
    pub fn render(request: &Request) -> String {
        let mut out = format!("{} {}\n", request.method.as_str(), request.url);
        for (name, value) in &request.headers {
            out.push_str(&format!("{name}: {value}\n"));
        }
        if let Some(body) = &request.body {
            out.push('\n');
            match serde_json::from_slice::<Value>(body) {
                Ok(json) => out.push_str(&serde_json::to_string_pretty(&json).unwrap_or_default()),
                Err(_) => out.push_str(&String::from_utf8_lossy(body)),
            }
            out.push('\n');
        }
        out
    }

    /// The body of a request as JSON (`Null` when there is none or it is not JSON).
    pub fn body_json(request: &Request) -> Value {
        request
            .body
            .as_ref()
            .and_then(|body| serde_json::from_slice(body).ok())
            .unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod fixtures {
    //! Events as ingest makes them, for the encoder tests: from the webhook fixtures, and a bot
    //! send as `/outgoing` reports it.

    use super::*;
    use crate::event::{EventId, Outgoing, Source};
    use crate::ingest::messenger::normalize;
    use crate::ingest::verify::{SignatureHeaders, verify_webhook};
    use crate::signing::sign_sha256;
    use bytes::Bytes;
    use serde_json::json;

    /// The events of `tests/data/messenger/<name>.json`, normalized as ingest does.
    pub fn fixture_events(name: &str) -> Result<Vec<Event>, Box<dyn std::error::Error>> {
        let path = format!(
            "{}/tests/data/messenger/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let body = std::fs::read(path)?;
        let header = sign_sha256(b"secret", &body);
        let headers = SignatureHeaders {
            sha256: Some(&header),
            sha1: None,
        };
        let verified = verify_webhook(b"secret", false, headers, Bytes::from(body))?;
        Ok(normalize(&verified, 1_700_000_000_000)?.events)
    }

    /// The first event of `kind` in a fixture.
    pub fn fixture_event(name: &str, kind: EventKind) -> Result<Event, Box<dyn std::error::Error>> {
        fixture_events(name)?
            .into_iter()
            .find(|event| event.kind == kind)
            .ok_or_else(|| format!("no {kind} event in {name}").into())
    }

    /// A bot send reported through `/outgoing`, with a `web_url` button.
    pub fn outgoing() -> Event {
        let request = json!({
            "recipient": {"id": "4455667788"},
            "messaging_type": "RESPONSE",
            "message": {"attachment": {"type": "template", "payload": {
                "template_type": "button",
                "text": "Get the app",
                "buttons": [{"type": "web_url", "url": "https://bot.smart.link/abc?x=1", "title": "Install"}]
            }}}
        });
        Event {
            id: EventId::outgoing("m_sent-1"),
            source: Source::Outgoing,
            kind: EventKind::Outgoing,
            page_id: Some("1234567890".into()),
            user_id: Some("4455667788".into()),
            timestamp_ms: 1_700_000_123_456,
            data: EventData::Outgoing(Outgoing {
                message_id: Some("m_sent-1".into()),
                recipient_id: Some("4455667788".into()),
                web_urls: crate::ingest::messenger::web_urls(&request["message"]),
                request,
                response: json!({"recipient_id": "4455667788", "message_id": "m_sent-1"}),
                app_id: None,
                from_echo: false,
                succeeded: true,
                intent: Some(json!({"name": "install_app", "inputs": []})),
                platform_user_json: Some(json!({"first_name": "Ada"})),
            }),
            webhook: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::testing::*;
    use super::*;
    use crate::config::{Config, ConfigError};
    use serde_json::json;
    use std::collections::HashMap;

    fn config(sinks: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n[graph]\nbase_url = \"http://graph.test/mock\"\n{sinks}"
        );
        Config::from_sources(&text, HashMap::new())
    }

    #[test]
    fn every_analytics_sink_is_routed() -> TestResult {
        let config = config(
            "[sinks.kochava]\napp_id = \"k\"\nclick_url = \"https://c.test/{fb_user_id}\"\n\
             [sinks.dashbot]\napi_key = \"d\"\n\
             [sinks.page_activities]\napp_id = \"1\"\npage_tokens = { \"1234567890\" = \"t\" }\n\
             [sinks.conversions]\ndataset_id = \"9\"\naccess_token = \"t\"\n",
        )?;
        let sinks = Sinks::new(&config.sinks);
        let names: Vec<SinkName> = sinks.routes().iter().map(|route| route.name).collect();
        for name in [
            SinkName::Kochava,
            SinkName::KochavaSmartlink,
            SinkName::Dashbot,
            SinkName::PageActivities,
            SinkName::Conversions,
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        // The graph base URL (with its path) comes from [graph].
        let route = sinks.get(SinkName::PageActivities).ok_or("no route")?;
        let request = route.encode(&revenue(), 1_700_000_200_000)?;
        assert!(
            request.url.as_str().starts_with(
                "http://graph.test/mock/v20.0/1/page_activities?access_token=t&appsecret_proof="
            ),
            "{}",
            request.url
        );
        Ok(())
    }

    /// SPEC §4.3: custom events go to Dashbot as `type=event`; `POST /events` takes them all,
    /// `leadEvent` included (§2.4), so each reaches Dashbot without a `kinds` list.
    #[test]
    fn every_custom_event_reaches_dashbot_by_default() -> TestResult {
        let sinks = Sinks::new(&config("[sinks.dashbot]\napi_key = \"d\"\n")?.sinks);
        let events = [
            custom(EventKind::Custom, "customEvent", "trackMeEvent", json!({})),
            revenue(),
            custom(EventKind::Share, "shareEvent", "shared", json!({})),
            custom(
                EventKind::PageLaunch,
                "pageLaunchEvent",
                "opened",
                json!({}),
            ),
            custom(EventKind::Referral, "referralEvent", "ad", json!({})),
            custom(EventKind::Lead, "leadEvent", "lead_submitted", json!({})),
        ];
        for event in events {
            assert_eq!(
                sinks.targets(&event),
                vec![SinkName::Dashbot],
                "{}",
                event.kind
            );
        }
        Ok(())
    }

    #[test]
    fn smartlink_refuses_events_that_need_no_ping() -> TestResult {
        let config = config(
            "[sinks.kochava]\napp_id = \"k\"\nclick_url = \"https://c.test/{fb_user_id}\"\n",
        )?;
        let sinks = Sinks::new(&config.sinks);
        let message = fixture_event("message-text-quick-reply", EventKind::Message)?;
        let with_referral = fixture_event("message-ad-referral", EventKind::Message)?;
        assert_eq!(sinks.targets(&message), vec![SinkName::Kochava]);
        assert_eq!(
            sinks.targets(&with_referral),
            vec![SinkName::Kochava, SinkName::KochavaSmartlink]
        );
        Ok(())
    }

    #[test]
    fn seconds_truncate_milliseconds() {
        assert_eq!(seconds(1_458_692_752_478), 1_458_692_752);
        assert_eq!(seconds(999), 0);
    }
}
