//! The `[sinks.kochava]` sink (SPEC §4.2): one Kochava server-to-server `track/json` event per
//! request, and the SmartLink impression and click pings, a delivery target of their own
//! (`kochava_smartlink`). Pure: an event in, a request out. Its table, `[sinks.kochava]`,
//! configures both, and is read and validated here too.

use crate::check::{Checker, DeliveryPolicy, StringList, secret};
use crate::delivery::{Method, Outcome, Request, Response};
use crate::event::{Event, EventData, EventKind, Referral};
use crate::sinks::{Disabled, EncodeError, TableSpec, event_name, require_user, seconds};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use url::Url;

/// `[sinks.kochava]` (SPEC §4.2). The app id counts as a credential.
pub const SPEC: TableSpec = TableSpec {
    keys: &[
        "url",
        "app_id",
        "include_text",
        "impression_url",
        "click_url",
        "smartlink_prefix",
        "click_payloads",
        "names",
    ],
    secret_keys: &["app_id"],
    kinds: &[
        EventKind::Message,
        EventKind::Outgoing,
        EventKind::Postback,
        EventKind::Referral,
        EventKind::Optin,
        EventKind::Custom,
        EventKind::Revenue,
        EventKind::Share,
        EventKind::PageLaunch,
        EventKind::Lead,
    ],
    delivery: DeliveryPolicy::DEFAULT,
};

/// The kinds the SmartLink pings look at (most of them need no ping: [`Smartlink::wants`]).
pub const SMARTLINK_KINDS: &[EventKind] = &[
    EventKind::Outgoing,
    EventKind::Postback,
    EventKind::Referral,
    EventKind::Message,
];

/// The keys of `[sinks.kochava]` besides those every sink table takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    url: Option<String>,
    app_id: Option<String>,
    include_text: Option<bool>,
    impression_url: Option<String>,
    click_url: Option<String>,
    smartlink_prefix: Option<String>,
    click_payloads: Option<StringList>,
}

/// Validates `[sinks.kochava]`: the `track/json` events, and the SmartLink pings when
/// `impression_url` or `click_url` is set. `Ok(None)` when a problem is recorded; disabled
/// without an app id.
pub fn from_table(
    table: Table,
    names: BTreeMap<EventKind, String>,
    check: &mut Checker,
) -> Result<Option<(Kochava, Option<Smartlink>)>, Disabled> {
    let url = check.url(
        "sinks.kochava.url",
        table.url.as_deref(),
        Some("https://control.kochava.com/track/json"),
    );
    let app_id = secret(table.app_id).ok_or("sinks.kochava.app_id is not set")?;
    for (key, template) in [
        ("sinks.kochava.impression_url", &table.impression_url),
        ("sinks.kochava.click_url", &table.click_url),
    ] {
        if let Some(template) = template {
            if !template.contains("{fb_user_id}") {
                check.problem(key, "must contain the placeholder {fb_user_id}");
            }
            check.url(key, Some(&template.replace("{fb_user_id}", "x")), None);
        }
    }
    let Some(url) = url else { return Ok(None) };
    let smartlink =
        (table.impression_url.is_some() || table.click_url.is_some()).then(|| Smartlink {
            impression_url: table.impression_url,
            click_url: table.click_url,
            smartlink_prefix: table.smartlink_prefix,
            click_payloads: table
                .click_payloads
                .map(StringList::into_vec)
                .unwrap_or_default(),
        });
    let kochava = Kochava {
        url,
        app_id,
        include_text: table.include_text.unwrap_or(false),
        names,
    };
    Ok(Some((kochava, smartlink)))
}

/// The `track/json` events.
#[derive(Debug, Clone)]
pub struct Kochava {
    pub url: Url,
    pub app_id: SecretString,
    /// Whether `message_received` carries the message text.
    pub include_text: bool,
    /// `[sinks.kochava.names]`: event name overrides per kind.
    pub names: BTreeMap<EventKind, String>,
}

impl Kochava {
    /// A password in its URL.
    pub fn secrets(&self) -> Vec<String> {
        self.url.password().map(str::to_owned).into_iter().collect()
    }

    /// `POST {url}` with `{"action": "event", "kochava_app_id", "data": {"device_ids":
    /// {"fb_user_id"}, "event_name", "event_data", "usertime"}}`. Events without a user, and
    /// kinds Kochava has no event for, are skipped.
    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        let user = require_user(event)?;
        let (default_name, event_data) = self.name_and_data(event)?;
        let name = event_name(&self.names, event.kind, &default_name);
        let body = json!({
            "action": "event",
            "kochava_app_id": self.app_id.expose_secret(),
            "data": {
                "device_ids": {"fb_user_id": user},
                "event_name": name,
                "event_data": event_data,
                "usertime": seconds(event.timestamp_ms),
            },
        });
        Ok(Request {
            method: Method::Post,
            url: self.url.to_string(),
            headers: vec![("content-type", "application/json".to_owned())],
            body: Some(Bytes::from(body.to_string())),
        })
    }

    /// The default event name and the `event_data` of an event.
    fn name_and_data(&self, event: &Event) -> Result<(String, Map<String, Value>), EncodeError> {
        let mut data = Map::new();
        let name = match &event.data {
            EventData::Message {
                mid,
                text,
                attachment_types,
                referral,
                ..
            } => {
                put(&mut data, "mid", mid.as_deref());
                let has_text = text.as_deref().is_some_and(|text| !text.is_empty());
                data.insert("has_text".into(), Value::Bool(has_text));
                data.insert("attachment_types".into(), json!(attachment_types));
                if self.include_text {
                    put(&mut data, "text", text.as_deref());
                }
                if let Some(referral) = referral {
                    put_referral(&mut data, referral);
                }
                "message_received"
            }
            EventData::Outgoing(outgoing) => {
                put(&mut data, "mid", outgoing.message_id.as_deref());
                "message_sent"
            }
            EventData::Postback {
                title,
                payload,
                referral,
                ..
            } => {
                put(&mut data, "title", title.as_deref());
                put(&mut data, "payload", payload.as_deref());
                if let Some(referral) = referral {
                    put_referral(&mut data, referral);
                }
                "postback"
            }
            EventData::Referral(referral) => {
                put_referral(&mut data, referral);
                "referral"
            }
            EventData::Optin { ref_param, .. } => {
                put(&mut data, "ref", ref_param.as_deref());
                "optin"
            }
            EventData::Custom(custom) => {
                return Ok(match event.kind {
                    EventKind::Revenue => {
                        let amount = custom.amount.ok_or_else(|| {
                            EncodeError::Invalid("revenue event has no amount".to_owned())
                        })?;
                        data.insert("sum".into(), json!(amount));
                        put(
                            &mut data,
                            "currency",
                            Some(custom.currency.as_deref().unwrap_or("USD")),
                        );
                        put(&mut data, "id", custom.reference_number.as_deref());
                        (custom.name.clone(), data)
                    }
                    EventKind::Lead => ("lead_submitted".to_owned(), extra_data(&custom.extra)),
                    // A `referralEvent` posted to `/events`: the same event as a webhook referral.
                    EventKind::Referral => {
                        for key in ["source", "type", "ref", "ad_id"] {
                            if let Some(value) =
                                custom.extra.get(key).filter(|value| !value.is_null())
                            {
                                data.insert(key.into(), value.clone());
                            }
                        }
                        ("referral".to_owned(), data)
                    }
                    _ => (custom.name.clone(), extra_data(&custom.extra)),
                });
            }
            // Off by default (SPEC §4.2); sent when the sink's `kinds` lists them.
            EventData::Delivery { watermark, mids } => {
                if let Some(watermark) = watermark {
                    data.insert("watermark".into(), json!(watermark));
                }
                data.insert("mids".into(), json!(mids));
                "message_delivered"
            }
            EventData::Read { watermark } => {
                if let Some(watermark) = watermark {
                    data.insert("watermark".into(), json!(watermark));
                }
                "message_read"
            }
            // Any other kind goes out only under a name the config gives it.
            _ if self.names.contains_key(&event.kind) => "",
            _ => {
                return Err(EncodeError::Skip(format!(
                    "Kochava has no event for {} (name one in sinks.kochava.names)",
                    event.kind
                )));
            }
        };
        Ok((name.to_owned(), data))
    }
}

/// A custom event's own fields as `event_data`: the contents of `extraInfo` inline, any other
/// field (`sharedMessage`, `metadata`, ...) under its own name.
fn extra_data(extra: &Map<String, Value>) -> Map<String, Value> {
    let mut data = Map::new();
    for (key, value) in extra {
        match (key.as_str(), value) {
            ("extraInfo", Value::Object(info)) => {
                data.extend(info.iter().map(|(key, value)| (key.clone(), value.clone())));
            }
            _ => {
                data.insert(key.clone(), value.clone());
            }
        }
    }
    data
}

fn put(data: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        data.insert(key.to_owned(), Value::String(value.to_owned()));
    }
}

/// `source`, `type`, `ref`, `ad_id`: those the referral has.
fn put_referral(data: &mut Map<String, Value>, referral: &Referral) {
    put(data, "source", referral.source.as_deref());
    put(data, "type", referral.referral_type.as_deref());
    put(data, "ref", referral.ref_param.as_deref());
    put(data, "ad_id", referral.ad_id.as_deref());
}

/// The SmartLink pings: GETs of URL templates with `{fb_user_id}`.
#[derive(Debug, Clone)]
pub struct Smartlink {
    /// Pinged for an outgoing message with a `web_url` under `smartlink_prefix`.
    pub impression_url: Option<String>,
    /// Pinged for a postback whose payload is in `click_payloads`, and for a referral (on its
    /// own, or carried by a message or postback).
    pub click_url: Option<String>,
    /// No prefix (or an empty one): any `web_url` counts.
    pub smartlink_prefix: Option<String>,
    pub click_payloads: Vec<String>,
}

impl Smartlink {
    /// Whether `event` calls for a ping: decided at ingest, so that other events get no
    /// delivery row for this sink at all.
    pub fn wants(&self, event: &Event) -> bool {
        require_user(event).is_ok() && self.template(event).is_some()
    }

    /// `GET` of the impression or click URL with `{fb_user_id}` replaced (percent-encoded).
    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        let template = self.template(event).ok_or_else(|| {
            EncodeError::Skip(format!("no SmartLink ping for this {} event", event.kind))
        })?;
        let user = require_user(event)?;
        let url = Url::parse(&template.replace("{fb_user_id}", &percent_encode(user))).map_err(
            |error| EncodeError::Invalid(format!("SmartLink URL is not a URL: {error}")),
        )?;
        Ok(Request {
            method: Method::Get,
            url: url.into(),
            headers: Vec::new(),
            body: None,
        })
    }

    /// The template to ping for `event`, if any.
    fn template(&self, event: &Event) -> Option<&str> {
        let click = self.click_url.as_deref();
        match &event.data {
            EventData::Outgoing(outgoing) => {
                let prefix = self.smartlink_prefix.as_deref().unwrap_or_default();
                let matches = outgoing.web_urls.iter().any(|url| url.starts_with(prefix));
                self.impression_url.as_deref().filter(|_| matches)
            }
            EventData::Postback {
                payload, referral, ..
            } => {
                let listed = payload
                    .as_ref()
                    .is_some_and(|payload| self.click_payloads.contains(payload));
                click.filter(|_| listed || referral.is_some())
            }
            EventData::Message { referral, .. } => click.filter(|_| referral.is_some()),
            EventData::Referral(_) => click,
            // A `referralEvent` posted to `/events`.
            _ if event.kind == EventKind::Referral => click,
            _ => None,
        }
    }
}

/// The SmartLink route's reading of a response: a ping is recorded once Kochava answers, and a
/// click-tracking URL answers a click with a redirect to the app's store page (302), which the
/// relay does not follow. So 3xx is delivered too; everything else goes to the status table.
pub fn classify_ping(response: &Response<'_>) -> Option<Outcome> {
    (200..400)
        .contains(&response.status)
        .then_some(Outcome::Delivered {
            status: response.status,
        })
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so that the id is safe in a
/// path segment as well as in a query.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::fixtures::*;
    use crate::sinks::testing::*;
    use insta::assert_snapshot;

    fn kochava(include_text: bool) -> Result<Kochava, url::ParseError> {
        Ok(Kochava {
            url: Url::parse("https://control.kochava.com/track/json")?,
            app_id: SecretString::from("kobotrelay-app-guid"),
            include_text,
            names: BTreeMap::new(),
        })
    }

    fn smartlink() -> Smartlink {
        Smartlink {
            impression_url: Some("https://imp.control.kochava.com/track/impression?campaign_id=koapp&fb_user_id={fb_user_id}".into()),
            click_url: Some("https://bot.smart.link/click?fb_user_id={fb_user_id}".into()),
            smartlink_prefix: Some("https://bot.smart.link/".into()),
            click_payloads: vec!["GET_THE_APP".into()],
        }
    }

    #[test]
    fn snapshots_of_every_kind() -> TestResult {
        let sink = kochava(false)?;
        let cases = [
            (
                "message",
                fixture_event("message-text-quick-reply", EventKind::Message)?,
            ),
            (
                "message-attachment",
                fixture_event("message-attachment", EventKind::Message)?,
            ),
            (
                "message-with-referral",
                fixture_event("message-ad-referral", EventKind::Message)?,
            ),
            ("outgoing", outgoing()),
            (
                "outgoing-from-echo",
                fixture_event("message-echo", EventKind::Outgoing)?,
            ),
            (
                "postback-with-referral",
                fixture_event("messaging-postbacks", EventKind::Postback)?,
            ),
            (
                "referral",
                fixture_event("messaging-referrals-ads", EventKind::Referral)?,
            ),
            (
                "optin",
                fixture_event("messaging-optins-plugin", EventKind::Optin)?,
            ),
            (
                "custom",
                custom(
                    EventKind::Custom,
                    "customEvent",
                    "trackMeEvent",
                    serde_json::json!({"extraInfo": {"start": 1500504070512_i64, "difference": 374}}),
                ),
            ),
            (
                "share",
                custom(
                    EventKind::Share,
                    "shareEvent",
                    "shared_coupon",
                    serde_json::json!({"sharedMessage": {"text": "20% off"}}),
                ),
            ),
            (
                "page-launch",
                custom(
                    EventKind::PageLaunch,
                    "pageLaunchEvent",
                    "opened_webview",
                    serde_json::json!({"extraInfo": {"url": "https://shop.test/"}}),
                ),
            ),
            // Off by default; sent when `kinds` lists them.
            (
                "delivery",
                fixture_event("message-deliveries", EventKind::Delivery)?,
            ),
            ("read", fixture_event("message-reads", EventKind::Read)?),
            ("revenue", revenue()),
            (
                "lead",
                custom(
                    EventKind::Lead,
                    "leadEvent",
                    "signup_form",
                    serde_json::json!({}),
                ),
            ),
        ];
        for (name, event) in cases {
            assert_snapshot!(format!("kochava-{name}"), render(&sink.encode(&event)?));
        }
        Ok(())
    }

    /// A kind with no Kochava event of its own goes out only under a name from the config.
    #[test]
    fn other_kinds_are_sent_only_when_named() -> TestResult {
        let reaction = fixture_event("message-reactions", EventKind::Reaction)?;
        let unnamed = kochava(false)?.encode(&reaction);
        assert!(
            matches!(&unnamed, Err(EncodeError::Skip(reason)) if reason.contains("sinks.kochava.names")),
            "{unnamed:?}"
        );
        let mut named = kochava(false)?;
        named
            .names
            .insert(EventKind::Reaction, "message_reacted".into());
        named.names.insert(EventKind::Delivery, "delivered".into());
        let body = body_json(&named.encode(&reaction)?);
        assert_eq!(body["data"]["event_name"], "message_reacted");
        assert_eq!(body["data"]["event_data"], serde_json::json!({}));
        let delivery = fixture_event("message-deliveries", EventKind::Delivery)?;
        assert_eq!(
            body_json(&named.encode(&delivery)?)["data"]["event_name"],
            "delivered"
        );
        Ok(())
    }

    #[test]
    fn usertime_is_in_seconds() -> TestResult {
        let event = fixture_event("message-text-quick-reply", EventKind::Message)?;
        assert_eq!(event.timestamp_ms, 1_458_692_752_478);
        let body = body_json(&kochava(false)?.encode(&event)?);
        assert_eq!(body["data"]["usertime"], serde_json::json!(1_458_692_752));
        Ok(())
    }

    #[test]
    fn message_text_only_when_included() -> TestResult {
        let event = fixture_event("message-text-quick-reply", EventKind::Message)?;
        let without = kochava(false)?.encode(&event)?;
        let raw = String::from_utf8_lossy(without.body.as_deref().unwrap_or_default()).into_owned();
        assert!(!raw.contains("hello, world"), "{raw}");
        assert_eq!(
            body_json(&without)["data"]["event_data"]["has_text"],
            Value::Bool(true)
        );
        let with = body_json(&kochava(true)?.encode(&event)?);
        assert_eq!(with["data"]["event_data"]["text"], "hello, world!");
        Ok(())
    }

    #[test]
    fn names_override_the_default_per_kind() -> TestResult {
        let mut sink = kochava(false)?;
        sink.names.insert(EventKind::Revenue, "Purchase".into());
        sink.names.insert(EventKind::Message, "inbound".into());
        assert_eq!(
            body_json(&sink.encode(&revenue())?)["data"]["event_name"],
            "Purchase"
        );
        let message = fixture_event("message-text-quick-reply", EventKind::Message)?;
        assert_eq!(
            body_json(&sink.encode(&message)?)["data"]["event_name"],
            "inbound"
        );
        let postback = fixture_event("messaging-postbacks", EventKind::Postback)?;
        assert_eq!(
            body_json(&sink.encode(&postback)?)["data"]["event_name"],
            "postback"
        );
        Ok(())
    }

    #[test]
    fn events_without_a_user_or_an_event_are_skipped() -> TestResult {
        let sink = kochava(false)?;
        let app_roles = fixture_event("handovers-app-roles", EventKind::Handover)?;
        assert!(matches!(sink.encode(&app_roles), Err(EncodeError::Skip(_))));
        let reaction = fixture_event("message-reactions", EventKind::Reaction)?;
        assert!(matches!(sink.encode(&reaction), Err(EncodeError::Skip(_))));
        let mut anonymous = revenue();
        anonymous.user_id = None;
        assert!(matches!(sink.encode(&anonymous), Err(EncodeError::Skip(_))));
        Ok(())
    }

    #[test]
    fn smartlink_snapshots() -> TestResult {
        let sink = smartlink();
        let cases = [
            ("impression", outgoing()),
            (
                "click-postback-with-referral",
                fixture_event("messaging-postbacks", EventKind::Postback)?,
            ),
            (
                "click-referral",
                fixture_event("messaging-referrals-ads", EventKind::Referral)?,
            ),
        ];
        for (name, event) in cases {
            assert!(sink.wants(&event), "{name}");
            assert_snapshot!(format!("smartlink-{name}"), render(&sink.encode(&event)?));
        }
        Ok(())
    }

    #[test]
    fn smartlink_pings_only_where_the_spec_says() -> TestResult {
        let mut sink = smartlink();
        // Outgoing: only with a web_url under the prefix; any web_url without a prefix.
        let mut other_link = outgoing();
        if let EventData::Outgoing(sent) = &mut other_link.data {
            sent.web_urls = vec!["https://elsewhere.test/".into()];
        }
        assert!(sink.wants(&outgoing()));
        assert!(!sink.wants(&other_link));
        let echo = fixture_event("message-echo", EventKind::Outgoing)?;
        assert!(!sink.wants(&echo), "an echo without web_url buttons");
        // Postbacks: a listed payload, or a referral.
        let mut postback = fixture_event("messaging-postbacks", EventKind::Postback)?;
        if let EventData::Postback {
            payload, referral, ..
        } = &mut postback.data
        {
            *referral = None;
            *payload = Some("GET_THE_APP".into());
        }
        assert!(sink.wants(&postback));
        if let EventData::Postback { payload, .. } = &mut postback.data {
            *payload = Some("MENU".into());
        }
        assert!(!sink.wants(&postback));
        assert!(matches!(sink.encode(&postback), Err(EncodeError::Skip(_))));
        // Messages: only with a referral.
        assert!(!sink.wants(&fixture_event(
            "message-text-quick-reply",
            EventKind::Message
        )?));
        assert!(sink.wants(&fixture_event("message-ad-referral", EventKind::Message)?));
        // A referralEvent posted to /events.
        assert!(sink.wants(&custom(
            EventKind::Referral,
            "referralEvent",
            "ref",
            serde_json::json!({})
        )));

        sink.smartlink_prefix = None;
        assert!(sink.wants(&other_link));
        sink.impression_url = None;
        assert!(!sink.wants(&outgoing()));
        sink.click_url = None;
        assert!(!sink.wants(&fixture_event(
            "messaging-referrals-ads",
            EventKind::Referral
        )?));
        Ok(())
    }

    #[test]
    fn smartlink_user_id_is_percent_encoded() -> TestResult {
        let mut event = fixture_event("messaging-referrals-ads", EventKind::Referral)?;
        event.user_id = Some("a b&c/é".into());
        let request = smartlink().encode(&event)?;
        assert_eq!(
            request.url,
            "https://bot.smart.link/click?fb_user_id=a%20b%26c%2F%C3%A9"
        );
        event.user_id = None;
        assert!(!smartlink().wants(&event));
        Ok(())
    }
}
