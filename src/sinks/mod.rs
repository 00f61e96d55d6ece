//! The sinks: one closed enum, one pure encoder module per sink. A sink turns an [`Event`] into
//! a [`Request`] (or declines it) and may read a failed response itself (Graph's error codes).
//!
//! No IO here and below: no client, no async, and no clock in any encoder (only the Graph
//! classifier reads it, to turn an HTTP-date `Retry-After` into a wait). `dispatch` sends.

pub mod bot;
pub mod conversions;
pub mod dashbot;
pub mod graph_error;
pub mod kochava;
pub mod page_activities;

use crate::config::{Config, DeliveryPolicy, SinkConfig, SinkName, SinkSettings};
use crate::delivery::{Classify, Request};
use crate::event::{Event, EventData, EventKind};
use crate::ingest::verify::appsecret_proof;
use secrecy::{ExposeSecret, SecretString};
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
    fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        match self {
            Sink::Bot(bot) => bot.encode(event),
            Sink::Kochava(kochava) => kochava.encode(event),
            Sink::KochavaSmartlink(smartlink) => smartlink.encode(event),
            Sink::Dashbot(dashbot) => dashbot.encode(event),
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

    fn classifier(&self) -> Classify {
        match self {
            Sink::Bot(_) | Sink::Kochava(_) | Sink::Dashbot(_) => |_| None,
            Sink::KochavaSmartlink(_) => kochava::classify_ping,
            Sink::PageActivities(_) | Sink::Conversions(_) => graph_error::classify,
        }
    }
}

/// An enabled sink: what it receives, how it is retried, how it encodes.
#[derive(Debug)]
pub struct Route {
    pub name: SinkName,
    pub kinds: Vec<EventKind>,
    pub delivery: DeliveryPolicy,
    sink: Sink,
}

impl Route {
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

    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        self.sink.encode(event)
    }

    pub fn classifier(&self) -> Classify {
        self.sink.classifier()
    }
}

/// The enabled sinks, in config order (the bot first).
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    routes: Vec<Arc<Route>>,
}

impl Sinks {
    pub fn from_config(config: &Config) -> Sinks {
        let routes = config
            .sinks
            .iter()
            .map(|sink_config| route(config, sink_config))
            .map(Arc::new)
            .collect();
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

fn route(config: &Config, sink_config: &SinkConfig) -> Route {
    let names = sink_config.names.clone();
    let sink = match &sink_config.settings {
        SinkSettings::Bot { url } => Sink::Bot(bot::Bot {
            url: url.clone(),
            app_secret: config.messenger.app_secret.clone(),
        }),
        SinkSettings::Kochava {
            url,
            app_id,
            include_text,
        } => Sink::Kochava(kochava::Kochava {
            url: url.clone(),
            app_id: app_id.clone(),
            include_text: *include_text,
            names,
        }),
        SinkSettings::KochavaSmartlink {
            impression_url,
            click_url,
            smartlink_prefix,
            click_payloads,
        } => Sink::KochavaSmartlink(kochava::Smartlink {
            impression_url: impression_url.clone(),
            click_url: click_url.clone(),
            smartlink_prefix: smartlink_prefix.clone(),
            click_payloads: click_payloads.clone(),
        }),
        SinkSettings::Dashbot { url, api_key } => Sink::Dashbot(dashbot::Dashbot {
            url: url.clone(),
            api_key: api_key.clone(),
            names,
        }),
        SinkSettings::PageActivities {
            app_id,
            api_version,
            page_tokens,
            logging_target,
        } => Sink::PageActivities(page_activities::PageActivities {
            base_url: config.graph.base_url.clone(),
            app_id: app_id.clone(),
            api_version: api_version.clone(),
            page_tokens: page_tokens.clone(),
            logging_target: logging_target.clone(),
            app_secret: config.messenger.app_secret.clone(),
            names,
        }),
        SinkSettings::Conversions {
            api_version,
            dataset_id,
            dataset_ids,
            access_token,
            page_tokens,
            partner_agent,
        } => Sink::Conversions(conversions::Conversions {
            base_url: config.graph.base_url.clone(),
            api_version: api_version.clone(),
            dataset_id: dataset_id.clone(),
            dataset_ids: dataset_ids.clone(),
            access_token: access_token.clone(),
            page_tokens: page_tokens.clone(),
            partner_agent: partner_agent.clone(),
            app_secret: config.messenger.app_secret.clone(),
            names,
        }),
    };
    Route {
        name: sink_config.name,
        kinds: sink_config.kinds.clone(),
        delivery: sink_config.delivery.clone(),
        sink,
    }
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

/// The page an event belongs to; when it names none (a custom event posted without `pageId`)
/// and the sink knows exactly one page, that page.
pub(crate) fn page_of<'a, V>(
    event: &'a Event,
    pages: &'a BTreeMap<String, V>,
) -> Result<&'a str, EncodeError> {
    if let Some(page) = event.page_id.as_deref().filter(|page| !page.is_empty()) {
        return Ok(page);
    }
    match pages.keys().next() {
        Some(only) if pages.len() == 1 => Ok(only),
        Some(_) => Err(EncodeError::Invalid(format!(
            "{} event has no page id and the sink serves several pages",
            event.kind
        ))),
        None => Err(EncodeError::Invalid(format!(
            "{} event has no page id",
            event.kind
        ))),
    }
}

/// `{base_url}/{segments…}?access_token=<token>[&appsecret_proof=<proof>]` for a Graph call.
/// Errors never contain the token.
pub(crate) fn graph_url(
    base_url: &Url,
    segments: &[&str],
    access_token: &SecretString,
    app_secret: &SecretString,
) -> Result<String, EncodeError> {
    let mut url = base_url.clone();
    url.path_segments_mut()
        .map_err(|()| {
            EncodeError::Invalid(format!("graph.base_url `{base_url}` cannot take a path"))
        })?
        .pop_if_empty()
        .extend(segments);
    let token = access_token.expose_secret();
    let secret = app_secret.expose_secret();
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("access_token", token);
        if !secret.is_empty() {
            query.append_pair(
                "appsecret_proof",
                &appsecret_proof(secret.as_bytes(), token),
            );
        }
    }
    Ok(url.into())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Test support for the encoder snapshots: events from the fixtures and by hand, and a
    //! readable rendering of a request.

    use super::*;
    use crate::event::{Custom, EventId, Outgoing, Source};
    use crate::ingest::messenger::normalize;
    use crate::ingest::verify::{SignatureHeaders, sign_sha256, verify_webhook};
    use bytes::Bytes;
    use serde_json::{Value, json};

    pub type TestResult = Result<(), Box<dyn std::error::Error>>;

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
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn config(sinks: &str) -> Result<Config, crate::config::ConfigError> {
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
        let sinks = Sinks::from_config(&config);
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
        let request = route.encode(&revenue())?;
        assert!(
            request.url.starts_with(
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
        let sinks = Sinks::from_config(&config("[sinks.dashbot]\napi_key = \"d\"\n")?);
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
        let sinks = Sinks::from_config(&config);
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
    fn graph_urls_carry_the_token_and_its_proof() -> TestResult {
        let url = graph_url(
            &Url::parse("https://graph.facebook.com")?,
            &["v20.0", "42", "page_activities"],
            &SecretString::from("tok en"),
            &SecretString::from("test_app_secret"),
        )?;
        let proof = appsecret_proof(b"test_app_secret", "tok en");
        assert_eq!(
            url,
            format!(
                "https://graph.facebook.com/v20.0/42/page_activities?access_token=tok+en&appsecret_proof={proof}"
            )
        );
        let without = graph_url(
            &Url::parse("http://127.0.0.1:9/")?,
            &["v23.0", "7", "events"],
            &SecretString::from("t"),
            &SecretString::from(""),
        )?;
        assert_eq!(without, "http://127.0.0.1:9/v23.0/7/events?access_token=t");
        Ok(())
    }

    #[test]
    fn seconds_truncate_milliseconds() {
        assert_eq!(seconds(1_458_692_752_478), 1_458_692_752);
        assert_eq!(seconds(999), 0);
    }
}
