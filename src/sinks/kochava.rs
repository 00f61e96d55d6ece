//! The `[sinks.kochava]` sink (SPEC §4.2): one Kochava server-to-server `track/json` event per
//! request, and the SmartLink impression and click pings, a delivery target of their own
//! (`kochava_smartlink`). Pure: an event in, a request out. Its table, `[sinks.kochava]`,
//! configures both, and is read and validated here too.
//!
//! Every `track/json` request carries what Kochava marks required since its December 2026
//! server-to-server rules: `User-Agent: Unknown` (there is no device user agent), a stable
//! `kochava_device_id` derived from the user, `origination_ip`, `device_ver`, `device_ua`,
//! `app_tracking_transparency` and `gdpr_privacy_consent`; with `api_key` and `auth_secret`,
//! Kochava's Install Authentication headers over the exact bytes sent.

use crate::check::{Checker, DeliveryPolicy, StringList, secret};
use crate::delivery::{Method, Outcome, Request, Response};
use crate::event::is_share_attachment;
use crate::event::{Event, EventData, EventKind, Referral};
use crate::sinks::{Disabled, EncodeError, TableSpec, event_name, require_user, seconds};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};
use sha2::Sha256;
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
        "origination_ip",
        "device_ver",
        "gdpr_privacy_consent",
        "api_key",
        "auth_secret",
        "names",
    ],
    secret_keys: &["app_id", "api_key", "auth_secret"],
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
    origination_ip: Option<String>,
    device_ver: Option<String>,
    /// A table, sent as given; from the environment, a JSON object in a string.
    gdpr_privacy_consent: Option<Value>,
    api_key: Option<String>,
    auth_secret: Option<String>,
}

/// `origination_ip` when the table sets none: the relay has no end user's address.
pub const DEFAULT_ORIGINATION_IP: &str = "0.0.0.0";
/// `device_ver` when the table sets none.
pub const DEFAULT_DEVICE_VER: &str = "Messenger-bot";
/// The `User-Agent` Kochava documents for events without a device user agent.
pub const USER_AGENT: &str = "Unknown";

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
    let gdpr_privacy_consent = consent(table.gdpr_privacy_consent, check);
    let authentication = match (secret(table.api_key), secret(table.auth_secret)) {
        (Some(api_key), Some(auth_secret)) => Some(Authentication {
            api_key,
            auth_secret,
        }),
        (None, None) => None,
        (Some(_), None) => {
            check.problem(
                "sinks.kochava.auth_secret",
                "is not set: Install Authentication needs both api_key and auth_secret",
            );
            None
        }
        (None, Some(_)) => {
            check.problem(
                "sinks.kochava.api_key",
                "is not set: Install Authentication needs both api_key and auth_secret",
            );
            None
        }
    };
    let origination_ip = table
        .origination_ip
        .unwrap_or_else(|| DEFAULT_ORIGINATION_IP.to_owned());
    if origination_ip.parse::<std::net::IpAddr>().is_err() {
        check.problem(
            "sinks.kochava.origination_ip",
            format!("`{origination_ip}` is not an IP address like \"0.0.0.0\""),
        );
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
        origination_ip,
        device_ver: table
            .device_ver
            .unwrap_or_else(|| DEFAULT_DEVICE_VER.to_owned()),
        gdpr_privacy_consent,
        authentication,
        names,
    };
    Ok(Some((kochava, smartlink)))
}

/// `gdpr_privacy_consent`: a table (sent as given), or a JSON object in a string (how the
/// environment gives it); `{"gdpr_applies": false}` when unset.
fn consent(raw: Option<Value>, check: &mut Checker) -> Map<String, Value> {
    let key = "sinks.kochava.gdpr_privacy_consent";
    match raw {
        None => Map::from_iter([("gdpr_applies".to_owned(), Value::Bool(false))]),
        Some(Value::Object(table)) => table,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(table)) => table,
            _ => {
                check.problem(
                    key,
                    "must be a table like { gdpr_applies = false } (from the environment, a JSON object like {\"gdpr_applies\": false})",
                );
                Map::new()
            }
        },
        Some(_) => {
            check.problem(key, "must be a table like { gdpr_applies = false }");
            Map::new()
        }
    }
}

/// Kochava's Install Authentication: the API key and the secret its token is made with.
#[derive(Debug, Clone)]
pub struct Authentication {
    pub api_key: SecretString,
    pub auth_secret: SecretString,
}

impl Authentication {
    /// `Kochava-Auth-Token`: hex HMAC-SHA256(key = api key, message = secret + hex SHA-1 of
    /// `body`), `body` being exactly the bytes sent.
    pub fn token(&self, body: &[u8]) -> String {
        let body_sha1 = hex::encode(Sha1::digest(body));
        // HMAC takes keys of any length: this cannot fail.
        let Ok(mut mac) =
            <Hmac<Sha256> as Mac>::new_from_slice(self.api_key.expose_secret().as_bytes())
        else {
            return String::new();
        };
        mac.update(self.auth_secret.expose_secret().as_bytes());
        mac.update(body_sha1.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// `kochava_device_id`: `"fbm-"` + the first 32 hex digits of HMAC-SHA256(key = app id,
/// message = page id + ":" + psid). Stable per user and page, and reveals neither. An event
/// without a page id (a custom event posted without `pageId`) uses an empty page id
/// (`":" + psid`), so the bot should post `pageId` to keep one device id per user.
pub fn device_id(app_id: &str, page_id: &str, psid: &str) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(app_id.as_bytes()) else {
        return String::new();
    };
    mac.update(page_id.as_bytes());
    mac.update(b":");
    mac.update(psid.as_bytes());
    let digest = hex::encode(mac.finalize().into_bytes());
    format!("fbm-{}", digest.get(..32).unwrap_or(&digest))
}

/// JSON text with every `/` escaped as `\/`, as Install Authentication requires. Exact: in
/// JSON text a `/` can only occur inside a string (there is no other place for it), where `\/`
/// is a valid escape of the same character; and no multi-byte UTF-8 sequence contains the byte
/// `/`.
pub fn escape_slashes(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    for &byte in json {
        if byte == b'/' {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out
}

/// A `track/json` request body, in the order of Kochava's documented example. Typed and
/// borrowed: built as a `serde_json::Value`, every key and value was an allocation of its own.
#[derive(Serialize)]
struct Track<'a> {
    action: &'static str,
    kochava_app_id: &'a str,
    kochava_device_id: String,
    data: TrackData<'a>,
}

#[derive(Serialize)]
struct TrackData<'a> {
    device_ids: DeviceIds<'a>,
    event_name: &'a str,
    event_data: &'a Map<String, Value>,
    usertime: i64,
    origination_ip: &'a str,
    device_ver: &'a str,
    device_ua: &'static str,
    app_tracking_transparency: Att,
    gdpr_privacy_consent: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct DeviceIds<'a> {
    fb_user_id: &'a str,
}

#[derive(Serialize)]
struct Att {
    att: bool,
}

/// The `track/json` events.
#[derive(Debug, Clone)]
pub struct Kochava {
    pub url: Url,
    pub app_id: SecretString,
    /// Whether `message_received` and `message_edited` carry the message text.
    pub include_text: bool,
    /// `data.origination_ip` (default `0.0.0.0`).
    pub origination_ip: String,
    /// `data.device_ver` (default `Messenger-bot`).
    pub device_ver: String,
    /// `data.gdpr_privacy_consent`, as configured (default `{"gdpr_applies": false}`).
    pub gdpr_privacy_consent: Map<String, Value>,
    /// Install Authentication, when both `api_key` and `auth_secret` are set.
    pub authentication: Option<Authentication>,
    /// `[sinks.kochava.names]`: event name overrides per kind.
    pub names: BTreeMap<EventKind, String>,
}

impl Kochava {
    /// A password in its URL, and Install Authentication's API key and secret.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = self.url.password().map(str::to_owned).into_iter().collect();
        if let Some(authentication) = &self.authentication {
            secrets.push(authentication.api_key.expose_secret().to_owned());
            secrets.push(authentication.auth_secret.expose_secret().to_owned());
        }
        secrets
    }

    /// `POST {url}`, `User-Agent: Unknown`, with `{"action": "event", "kochava_app_id",
    /// "kochava_device_id", "data": {"device_ids": {"fb_user_id"}, "event_name", "event_data",
    /// "usertime", "origination_ip", "device_ver", "device_ua": "", "app_tracking_transparency":
    /// {"att": false}, "gdpr_privacy_consent"}}`; with Install Authentication the body has every
    /// `/` escaped as `\/` and the request carries `Kochava-Api-Key` and `Kochava-Auth-Token`.
    /// Events without a user, and kinds Kochava has no event for, are skipped.
    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        let user = require_user(event)?;
        let (default_name, event_data) = self.name_and_data(event)?;
        let name = event_name(&self.names, event.kind, &default_name);
        let app_id = self.app_id.expose_secret();
        let page = event.page_id.as_deref().unwrap_or_default();
        let body = Track {
            action: "event",
            kochava_app_id: app_id,
            kochava_device_id: device_id(app_id, page, user),
            data: TrackData {
                device_ids: DeviceIds { fb_user_id: user },
                event_name: name,
                event_data: &event_data,
                usertime: seconds(event.timestamp_ms),
                origination_ip: &self.origination_ip,
                device_ver: &self.device_ver,
                device_ua: "",
                app_tracking_transparency: Att { att: false },
                gdpr_privacy_consent: &self.gdpr_privacy_consent,
            },
        };
        let mut headers = vec![
            ("content-type", "application/json".to_owned()),
            ("user-agent", USER_AGENT.to_owned()),
        ];
        let body = serde_json::to_vec(&body)
            .map_err(|error| EncodeError::Invalid(format!("cannot encode the event: {error}")))?;
        let body = match &self.authentication {
            None => body,
            Some(authentication) => {
                let body = escape_slashes(&body);
                headers.push((
                    "kochava-api-key",
                    authentication.api_key.expose_secret().to_owned(),
                ));
                headers.push(("kochava-auth-token", authentication.token(&body)));
                body
            }
        };
        Ok(Request {
            method: Method::Post,
            url: self.url.clone(),
            headers,
            body: Some(Bytes::from(body)),
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
                // A shared post (Messenger's `share`, Instagram's `ig_post`) is still a
                // message received; the flag lets a dashboard count shares.
                if attachment_types
                    .iter()
                    .any(|kind| is_share_attachment(kind))
                {
                    data.insert("shared".into(), Value::Bool(true));
                }
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
            // Off by default; sent when the sink's `kinds` lists them.
            EventData::MessageEdit {
                mid,
                num_edit,
                text,
            } => {
                put(&mut data, "mid", mid.as_deref());
                if let Some(num_edit) = num_edit {
                    data.insert("num_edit".into(), json!(num_edit));
                }
                let has_text = text.as_deref().is_some_and(|text| !text.is_empty());
                data.insert("has_text".into(), Value::Bool(has_text));
                if self.include_text {
                    put(&mut data, "text", text.as_deref());
                }
                "message_edited"
            }
            EventData::ResponseFeedback { mid, feedback } => {
                put(&mut data, "mid", mid.as_deref());
                put(&mut data, "feedback", feedback.as_deref());
                "response_feedback"
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
            url,
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
            origination_ip: DEFAULT_ORIGINATION_IP.into(),
            device_ver: DEFAULT_DEVICE_VER.into(),
            gdpr_privacy_consent: Map::from_iter([("gdpr_applies".into(), Value::Bool(false))]),
            authentication: None,
            names: BTreeMap::new(),
        })
    }

    fn authenticated() -> Result<Kochava, url::ParseError> {
        let mut sink = kochava(false)?;
        sink.authentication = Some(Authentication {
            api_key: SecretString::from("KOCHAVA-API-KEY"),
            auth_secret: SecretString::from("KOCHAVA-AUTH-SECRET"),
        });
        Ok(sink)
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
            // Instagram's `ig_post` counts as a share: `shared: true`.
            (
                "message-ig-post",
                fixture_events("message-sticker-and-ig-post")?
                    .into_iter()
                    .nth(1)
                    .ok_or("no ig_post message")?,
            ),
            // Off by default; sent when `kinds` lists them.
            (
                "message-edit",
                fixture_event("message-edits", EventKind::MessageEdit)?,
            ),
            (
                "response-feedback",
                fixture_event("response-feedback", EventKind::ResponseFeedback)?,
            ),
        ];
        for (name, event) in cases {
            assert_snapshot!(format!("kochava-{name}"), render(&sink.encode(&event)?));
        }
        Ok(())
    }

    /// Install Authentication: `/` escaped in the bytes sent, the key in its header, and the
    /// token recomputed here from those bytes.
    #[test]
    fn install_authentication_signs_the_exact_bytes_sent() -> TestResult {
        let sink = authenticated()?;
        let event = custom(
            EventKind::PageLaunch,
            "pageLaunchEvent",
            "opened_webview",
            serde_json::json!({"extraInfo": {"url": "https://shop.test/a/b"}}),
        );
        let request = sink.encode(&event)?;
        assert_snapshot!("kochava-authenticated", render(&request));
        let body = request.body.clone().unwrap_or_default();
        let text = String::from_utf8(body.to_vec())?;
        assert!(text.contains(r"https:\/\/"), "{text}");
        assert!(!text.replace(r"\/", "").contains('/'), "{text}");
        // Still the same JSON.
        let plain = kochava(false)?.encode(&event)?;
        assert_eq!(body_json(&request), body_json(&plain));
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        };
        assert_eq!(
            header("kochava-api-key").as_deref(),
            Some("KOCHAVA-API-KEY")
        );
        let sha1 = hex::encode(Sha1::digest(&body));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"KOCHAVA-API-KEY")?;
        mac.update(format!("KOCHAVA-AUTH-SECRET{sha1}").as_bytes());
        assert_eq!(
            header("kochava-auth-token"),
            Some(hex::encode(mac.finalize().into_bytes()))
        );
        assert_eq!(header("user-agent").as_deref(), Some("Unknown"));
        // Without authentication: no auth headers, `/` as serde_json writes it.
        assert!(
            plain
                .headers
                .iter()
                .all(|(name, _)| !name.starts_with("kochava-"))
        );
        let plain_text = String::from_utf8(plain.body.unwrap_or_default().to_vec())?;
        assert!(plain_text.contains("https://"), "{plain_text}");
        let secrets = sink.secrets();
        assert!(secrets.contains(&"KOCHAVA-API-KEY".to_owned()));
        assert!(secrets.contains(&"KOCHAVA-AUTH-SECRET".to_owned()));
        Ok(())
    }

    /// The table's new keys: defaults, consent from a TOML table or an environment JSON
    /// string, Install Authentication only with both keys, secrets never quoted.
    #[test]
    fn the_table_reads_consent_and_authentication() -> TestResult {
        use crate::config::{Config, ConfigError};
        use crate::sinks::Sink;
        use std::collections::HashMap;
        let base = "[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n\
                    [sinks.kochava]\napp_id = \"k\"\n";
        let kochava_of = |config: &Config| {
            config.sinks.iter().find_map(|route| match &route.sink {
                Sink::Kochava(kochava) => Some(kochava.clone()),
                _ => None,
            })
        };
        let config = Config::from_sources(base, HashMap::new())?;
        let defaults = kochava_of(&config).ok_or("no kochava")?;
        assert_eq!(
            (
                defaults.origination_ip.as_str(),
                defaults.device_ver.as_str()
            ),
            ("0.0.0.0", "Messenger-bot")
        );
        assert_eq!(
            Value::Object(defaults.gdpr_privacy_consent),
            serde_json::json!({"gdpr_applies": false})
        );
        assert!(defaults.authentication.is_none());

        let table = format!(
            "{base}gdpr_privacy_consent = {{ gdpr_applies = 1, tc_string = \"T\" }}\n\
             api_key = \"ko-key\"\nauth_secret = \"ko-secret\"\n"
        );
        let config = Config::from_sources(&table, HashMap::new())?;
        let kochava = kochava_of(&config).ok_or("no kochava")?;
        assert_eq!(
            Value::Object(kochava.gdpr_privacy_consent),
            serde_json::json!({"gdpr_applies": 1, "tc_string": "T"})
        );
        assert!(kochava.authentication.is_some());
        let secrets = config.secrets();
        assert!(
            secrets.contains(&"ko-key".to_owned()) && secrets.contains(&"ko-secret".to_owned())
        );

        let from_env = HashMap::from([(
            "BOTRELAY__SINKS__KOCHAVA__GDPR_PRIVACY_CONSENT".to_owned(),
            r#"{"gdpr_applies": true, "ad_user_data": 1}"#.to_owned(),
        )]);
        let config = Config::from_sources(base, from_env)?;
        assert_eq!(
            Value::Object(
                kochava_of(&config)
                    .ok_or("no kochava")?
                    .gdpr_privacy_consent
            ),
            serde_json::json!({"gdpr_applies": true, "ad_user_data": 1})
        );

        for (extra, key) in [
            ("api_key = \"ko-key\"\n", "sinks.kochava.auth_secret"),
            ("auth_secret = \"ko-secret\"\n", "sinks.kochava.api_key"),
            (
                "gdpr_privacy_consent = \"not json\"\n",
                "sinks.kochava.gdpr_privacy_consent",
            ),
            (
                "origination_ip = \"somewhere\"\n",
                "sinks.kochava.origination_ip",
            ),
        ] {
            match Config::from_sources(&format!("{base}{extra}"), HashMap::new()) {
                Err(ConfigError::Invalid(problems)) => {
                    assert_eq!(problems.len(), 1, "{problems:?}");
                    assert_eq!(problems[0].key, key);
                    let text = problems[0].to_string();
                    assert!(
                        !text.contains("ko-key") && !text.contains("ko-secret"),
                        "{text}"
                    );
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn escaping_slashes_is_exact() -> TestResult {
        let value = serde_json::json!({"a/b": "https://x.test/é/\\/\"/", "n": [1, "/"]});
        let escaped = escape_slashes(value.to_string().as_bytes());
        assert_eq!(serde_json::from_slice::<Value>(&escaped)?, value);
        assert_eq!(escape_slashes(b"\"/\""), b"\"\\/\"".to_vec());
        Ok(())
    }

    #[test]
    fn device_id_is_stable_per_page_and_user_and_reveals_neither() -> TestResult {
        let id = device_id("kobotrelay-app-guid", "1234567890", "4455667788");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"kobotrelay-app-guid")?;
        mac.update(b"1234567890:4455667788");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(id, format!("fbm-{}", &expected[..32]));
        assert_eq!(id.len(), 36);
        assert_ne!(
            id,
            device_id("kobotrelay-app-guid", "1234567891", "4455667788")
        );
        assert_ne!(id, device_id("other-app", "1234567890", "4455667788"));
        assert!(!id.contains("4455667788") && !id.contains("1234567890"));
        // No page id: an empty one.
        let mut no_page = revenue();
        no_page.page_id = None;
        let body = body_json(&kochava(false)?.encode(&no_page)?);
        assert_eq!(
            body["kochava_device_id"],
            device_id("kobotrelay-app-guid", "", "4455667788")
        );
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
            request.url.as_str(),
            "https://bot.smart.link/click?fb_user_id=a%20b%26c%2F%C3%A9"
        );
        event.user_id = None;
        assert!(!smartlink().wants(&event));
        Ok(())
    }
}
