//! The `[bot]` sink: each webhook item is POSTed to the bot's own webhook URL as a webhook body
//! of its own, signed like Meta signs (SPEC §4.1), so the bot's existing verification passes.
//!
//! Pure: the raw item goes out byte for byte, and the signature covers exactly the bytes sent.
//! Its table, `[bot]`, is read and validated here too.

use crate::check::{Checker, DeliveryPolicy};
use crate::delivery::{Method, Request};
use crate::event::{Event, EventKind, WebhookOrigin};
use crate::signing::sign_sha256;
use crate::sinks::{Context, Disabled, EncodeError, TableSpec};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::time::Duration;
use url::Url;

/// `[bot]`: its URL; every webhook kind (SPEC §4.1); retried for an hour, not three days.
pub const SPEC: TableSpec = TableSpec {
    keys: &["url"],
    secret_keys: &[],
    kinds: &EventKind::WEBHOOK,
    delivery: DeliveryPolicy {
        ttl: Duration::from_secs(3600),
        ..DeliveryPolicy::DEFAULT
    },
};

/// The keys of `[bot]` besides those every sink table takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Bot {
    pub url: Url,
    pub app_secret: SecretString,
}

/// Validates `[bot]`: `Ok(None)` when a problem is recorded; disabled without a URL.
pub fn from_table(
    table: Table,
    check: &mut Checker,
    context: &Context,
) -> Result<Option<Bot>, Disabled> {
    let Some(url) = check.url("bot.url", table.url.as_deref(), None) else {
        if table.url.is_none() {
            return Err("bot.url is not set".into());
        }
        return Ok(None);
    };
    Ok(Some(Bot {
        url,
        app_secret: context.app_secret.clone(),
    }))
}

impl Bot {
    /// A password in its URL (`https://user:password@bot.example/webhook`).
    pub fn secrets(&self) -> Vec<String> {
        self.url.password().map(str::to_owned).into_iter().collect()
    }

    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        let origin = event.webhook.as_ref().ok_or_else(|| {
            EncodeError::Skip(format!("{} did not come in on the webhook", event.kind))
        })?;
        let body = single_item_body(origin)?;
        let signature = sign_sha256(self.app_secret.expose_secret().as_bytes(), body.as_bytes());
        Ok(Request {
            method: Method::Post,
            url: self.url.clone(),
            headers: vec![
                ("content-type", "application/json".to_owned()),
                ("x-hub-signature-256", signature),
                ("x-botrelay-event-id", event.id.to_string()),
            ],
            body: Some(Bytes::from(body)),
        })
    }
}

/// The single-item webhook body of SPEC §4.1: `{"object", "entry": [{"id", "time"?,
/// "messaging"|"standby": [<raw item>]}]}`, with the raw item's bytes verbatim. Also what the
/// Dashbot sink sends as `type=incoming`.
pub(crate) fn single_item_body(origin: &WebhookOrigin) -> Result<String, EncodeError> {
    let object = serde_json::to_string(&origin.object)
        .map_err(|error| EncodeError::Invalid(error.to_string()))?;
    let (id, item, channel) = (
        origin.entry_id.get(),
        origin.item.get(),
        origin.channel.as_str(),
    );
    let time = origin
        .entry_time
        .as_deref()
        .map(serde_json::value::RawValue::get);
    // Built in one buffer: this runs for every delivery to the bot and to Dashbot.
    let mut body =
        String::with_capacity(64 + object.len() + id.len() + time.map_or(0, str::len) + item.len());
    body.push_str("{\"object\":");
    body.push_str(&object);
    body.push_str(",\"entry\":[{\"id\":");
    body.push_str(id);
    if let Some(time) = time {
        body.push_str(",\"time\":");
        body.push_str(time);
    }
    body.push_str(",\"");
    body.push_str(channel);
    body.push_str("\":[");
    body.push_str(item);
    body.push_str("]}]}");
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Channel, EventData, EventId, EventKind, Source};
    use serde_json::value::RawValue;

    fn event(channel: Channel, item: &str, time: Option<&str>) -> Result<Event, serde_json::Error> {
        Ok(Event {
            id: EventId::derive(&[b"t"]),
            source: Source::Webhook,
            kind: EventKind::Message,
            page_id: Some("111".into()),
            user_id: Some("U".into()),
            timestamp_ms: 1,
            data: EventData::Other { key: None },
            webhook: Some(WebhookOrigin {
                object: "page".into(),
                entry_id: RawValue::from_string("\"111\"".into())?,
                entry_time: time.map(|t| RawValue::from_string(t.into())).transpose()?,
                channel,
                item: RawValue::from_string(item.into())?,
            }),
        })
    }

    #[test]
    fn body_is_a_single_item_webhook_signed_over_the_exact_bytes()
    -> Result<(), Box<dyn std::error::Error>> {
        let bot = Bot {
            url: Url::parse("http://bot.test/webhook")?,
            app_secret: SecretString::from("test_app_secret"),
        };
        let item = r#"{ "sender":{"id":"U"}, "message":{"text":"caf\u00e9 https:\/\/x"} }"#;
        let request = bot.encode(&event(Channel::Standby, item, Some("1457764198246"))?)?;
        let body = request.body.clone().unwrap_or_default();
        let expected = format!(
            "{{\"object\":\"page\",\"entry\":[{{\"id\":\"111\",\"time\":1457764198246,\"standby\":[{item}]}}]}}"
        );
        assert_eq!(std::str::from_utf8(&body)?, expected);
        let signature = request
            .headers
            .iter()
            .find(|(name, _)| *name == "x-hub-signature-256")
            .map(|(_, value)| value.clone());
        assert_eq!(
            signature,
            Some(sign_sha256(b"test_app_secret", expected.as_bytes()))
        );
        assert_eq!(request.url.as_str(), "http://bot.test/webhook");
        assert_eq!(request.method, Method::Post);
        Ok(())
    }

    #[test]
    fn events_from_elsewhere_are_skipped() -> Result<(), Box<dyn std::error::Error>> {
        let bot = Bot {
            url: Url::parse("http://bot.test/")?,
            app_secret: SecretString::from("s"),
        };
        let mut outgoing = event(Channel::Messaging, "{}", None)?;
        outgoing.webhook = None;
        assert!(matches!(bot.encode(&outgoing), Err(EncodeError::Skip(_))));
        Ok(())
    }
}
