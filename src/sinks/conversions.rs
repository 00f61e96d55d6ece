//! The `[sinks.conversions]` sink (SPEC §4.5): Meta's Conversions API for Business Messaging,
//! `POST /{dataset_id}/events`, the successor of `page_activities`. Only Meta's business
//! messaging event names are sent; others are skipped. Each item carries botrelay's own event
//! id as `event_id` (Meta does not deduplicate for business messaging; a repeated delivery keeps
//! its id) and the channel the event came on. Pure; tokens only in the query string. Its table,
//! `[sinks.conversions]`, is read and validated here too.

use crate::check::{Checker, DeliveryPolicy, secret};
use crate::delivery::{Method, Request};
use crate::event::{Event, EventData, EventKind};
use crate::sinks::graph::{self, graph_url, page_of};
use crate::sinks::{Context, Disabled, EncodeError, TableSpec, event_name, require_user, seconds};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use url::Url;

/// `[sinks.conversions]` (SPEC §4.5).
pub const SPEC: TableSpec = TableSpec {
    keys: &[
        "api_version",
        "dataset_id",
        "dataset_ids",
        "access_token",
        "page_tokens",
        "partner_agent",
        "names",
    ],
    secret_keys: &["access_token", "page_tokens"],
    kinds: &[EventKind::Revenue, EventKind::Lead, EventKind::Custom],
    delivery: DeliveryPolicy::DEFAULT,
};

/// The keys of `[sinks.conversions]` besides those every sink table takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    api_version: Option<String>,
    dataset_id: Option<String>,
    dataset_ids: Option<BTreeMap<String, String>>,
    access_token: Option<String>,
    page_tokens: Option<BTreeMap<String, String>>,
    partner_agent: Option<String>,
}

/// Validates `[sinks.conversions]`: `Ok(None)` when a problem is recorded; disabled without a
/// dataset or a token.
pub fn from_table(
    table: Table,
    names: BTreeMap<EventKind, String>,
    check: &mut Checker,
    context: &Context,
) -> Result<Option<Conversions>, Disabled> {
    let dataset_ids = table.dataset_ids.unwrap_or_default();
    let page_tokens = graph::page_tokens(table.page_tokens);
    let access_token = secret(table.access_token);
    let dataset_id = table.dataset_id.filter(|id| !id.is_empty());
    if dataset_id.is_none() && dataset_ids.is_empty() {
        return Err("sinks.conversions.dataset_id (or dataset_ids) is not set".into());
    }
    if access_token.is_none() && page_tokens.is_empty() {
        return Err("sinks.conversions.access_token (or page_tokens) is not set".into());
    }
    let api_version = graph::api_version(
        check,
        "sinks.conversions.api_version",
        table.api_version,
        DEFAULT_API_VERSION,
    );
    let Some(base_url) = context.graph_base_url else {
        return Ok(None);
    };
    Ok(Some(Conversions {
        base_url: base_url.clone(),
        api_version,
        dataset_id,
        dataset_ids,
        access_token,
        page_tokens,
        partner_agent: table.partner_agent.filter(|agent| !agent.is_empty()),
        app_secret: context.app_secret.clone(),
        names,
    }))
}

/// Graph's newest version (v27.0, 2026-11-04). Marketing API versions live about a year and do
/// not auto-upgrade, so this default moves with each release.
pub const DEFAULT_API_VERSION: &str = "v27.0";

/// `messaging_channel`: `instagram` for an event that came with `object = instagram`, else
/// `messenger` (events posted to `/events` have no webhook origin: `messenger`).
pub fn messaging_channel(event: &Event) -> &'static str {
    match &event.webhook {
        Some(origin) if origin.object == "instagram" => "instagram",
        _ => "messenger",
    }
}

/// The event names Meta accepts for business messaging.
pub const ALLOWED_EVENT_NAMES: [&str; 14] = [
    "Purchase",
    "LeadSubmitted",
    "InitiateCheckout",
    "AddToCart",
    "ViewContent",
    "OrderCreated",
    "OrderShipped",
    "OrderDelivered",
    "OrderCanceled",
    "OrderReturned",
    "CartAbandoned",
    "QualifiedLead",
    "RatingProvided",
    "ReviewProvided",
];

#[derive(Debug, Clone)]
pub struct Conversions {
    /// `graph.base_url`.
    pub base_url: Url,
    pub api_version: String,
    /// The dataset of every page not in `dataset_ids`.
    pub dataset_id: Option<String>,
    /// Page id → dataset id.
    pub dataset_ids: BTreeMap<String, String>,
    /// The token of every page not in `page_tokens`.
    pub access_token: Option<SecretString>,
    /// Page id → token.
    pub page_tokens: BTreeMap<String, SecretString>,
    pub partner_agent: Option<String>,
    /// `messenger.app_secret`, for `appsecret_proof` (none when empty).
    pub app_secret: SecretString,
    /// `[sinks.conversions.names]`: event name overrides per kind.
    pub names: BTreeMap<EventKind, String>,
}

impl Conversions {
    /// The access token and the page tokens.
    pub fn secrets(&self) -> Vec<String> {
        self.access_token
            .iter()
            .chain(self.page_tokens.values())
            .map(|token| token.expose_secret().to_owned())
            .collect()
    }

    /// `POST {graph}/{api_version}/{dataset_id}/events?access_token=…[&appsecret_proof=…]`.
    ///
    /// revenue → `Purchase` with `custom_data {currency, value}`; lead → `LeadSubmitted`;
    /// custom events named after an allowed name pass through, with their `extraInfo` as
    /// `custom_data`. Whatever name results must be one of [`ALLOWED_EVENT_NAMES`], else the
    /// event is skipped.
    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        let user = require_user(event)?;
        let mut custom_data = Map::new();
        let default_name = match (&event.data, event.kind) {
            (EventData::Custom(custom), EventKind::Revenue) => {
                let amount = custom.amount.ok_or_else(|| {
                    EncodeError::Invalid("revenue event has no amount".to_owned())
                })?;
                custom_data.insert(
                    "currency".into(),
                    json!(custom.currency.as_deref().unwrap_or("USD")),
                );
                custom_data.insert("value".into(), json!(amount));
                "Purchase"
            }
            (EventData::Custom(_), EventKind::Lead) => "LeadSubmitted",
            (EventData::Custom(custom), _) => {
                if let Some(Value::Object(info)) = custom.extra.get("extraInfo") {
                    custom_data
                        .extend(info.iter().map(|(key, value)| (key.clone(), value.clone())));
                }
                custom.name.as_str()
            }
            _ => "",
        };
        let name = event_name(&self.names, event.kind, default_name);
        if !ALLOWED_EVENT_NAMES.contains(&name) {
            return Err(EncodeError::Skip(if name.is_empty() {
                format!("the Conversions API has no event for {}", event.kind)
            } else {
                format!("`{name}` is not a business messaging event name of the Conversions API")
            }));
        }

        let page = self.page(event)?;
        let dataset = self
            .dataset_ids
            .get(page)
            .or(self.dataset_id.as_ref())
            .ok_or_else(|| {
                EncodeError::Invalid(format!("no dataset for page {page} in sinks.conversions"))
            })?;
        let token = self
            .page_tokens
            .get(page)
            .or(self.access_token.as_ref())
            .ok_or_else(|| {
                EncodeError::Invalid(format!(
                    "no access token for page {page} in sinks.conversions"
                ))
            })?;
        let url = graph_url(
            &self.base_url,
            &[&self.api_version, dataset, "events"],
            token,
            &self.app_secret,
        )?;

        let mut item = json!({
            "event_name": name,
            "event_time": seconds(event.timestamp_ms),
            "event_id": event.id.as_str(),
            "action_source": "business_messaging",
            "messaging_channel": messaging_channel(event),
            "user_data": {"page_id": page, "page_scoped_user_id": user},
        });
        if let (false, Some(fields)) = (custom_data.is_empty(), item.as_object_mut()) {
            fields.insert("custom_data".into(), Value::Object(custom_data));
        }
        let mut body = json!({ "data": [item] });
        if let (Some(agent), Some(fields)) = (&self.partner_agent, body.as_object_mut()) {
            fields.insert("partner_agent".into(), json!(agent));
        }
        Ok(Request {
            method: Method::Post,
            url,
            headers: vec![("content-type", "application/json".to_owned())],
            body: Some(Bytes::from(body.to_string())),
        })
    }

    /// The event's page; for a custom event without one, the only page the config names.
    fn page<'a>(&'a self, event: &'a Event) -> Result<&'a str, EncodeError> {
        if self.dataset_ids.is_empty() {
            page_of(event, &self.page_tokens)
        } else {
            page_of(event, &self.dataset_ids)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::appsecret_proof;
    use crate::sinks::fixtures::*;
    use crate::sinks::testing::*;
    use insta::assert_snapshot;

    fn sink() -> Result<Conversions, url::ParseError> {
        Ok(Conversions {
            base_url: Url::parse("https://graph.facebook.com")?,
            api_version: DEFAULT_API_VERSION.into(),
            dataset_id: Some("DATASET-DEFAULT".into()),
            dataset_ids: BTreeMap::new(),
            access_token: Some(SecretString::from("SYSTEM-USER-TOKEN")),
            page_tokens: BTreeMap::new(),
            partner_agent: Some("botrelay".into()),
            app_secret: SecretString::from("test_app_secret"),
            names: BTreeMap::new(),
        })
    }

    #[test]
    fn snapshots_of_every_kind() -> TestResult {
        let mut per_page = sink()?;
        per_page
            .dataset_ids
            .insert("1234567890".into(), "DATASET-PAGE".into());
        per_page
            .page_tokens
            .insert("1234567890".into(), SecretString::from("PAGE-TOKEN-1"));
        per_page.partner_agent = None;
        let cases = [
            ("revenue", sink()?, revenue()),
            (
                "lead",
                sink()?,
                custom(EventKind::Lead, "leadEvent", "signup_form", json!({})),
            ),
            (
                "custom-allowed-name",
                sink()?,
                custom(
                    EventKind::Custom,
                    "customEvent",
                    "AddToCart",
                    json!({"extraInfo": {"currency": "USD", "value": 12.5, "content_ids": ["SKI-1"]}}),
                ),
            ),
            ("revenue-per-page-dataset-and-token", per_page, revenue()),
            ("instagram-message", named_messages()?, instagram_message()?),
            (
                "messenger-message",
                named_messages()?,
                fixture_event("message-text-quick-reply", EventKind::Message)?,
            ),
        ];
        for (name, sink, event) in cases {
            assert_snapshot!(format!("conversions-{name}"), render(&sink.encode(&event)?));
        }
        Ok(())
    }

    /// A sink that sends messages too, as `ViewContent` (when `kinds` lists them).
    fn named_messages() -> Result<Conversions, url::ParseError> {
        let mut sink = sink()?;
        sink.names.insert(EventKind::Message, "ViewContent".into());
        Ok(sink)
    }

    fn instagram_message() -> Result<Event, Box<dyn std::error::Error>> {
        let mut event = fixture_event("instagram", EventKind::Message)?;
        event.user_id = Some("1784140000846".into());
        Ok(event)
    }

    #[test]
    fn event_id_is_ours_and_the_channel_follows_the_webhook_object() -> TestResult {
        let sink = named_messages()?;
        let instagram = instagram_message()?;
        let body = body_json(&sink.encode(&instagram)?);
        assert_eq!(body["data"][0]["messaging_channel"], "instagram");
        assert_eq!(body["data"][0]["event_id"], instagram.id.as_str());
        let messenger = fixture_event("message-text-quick-reply", EventKind::Message)?;
        let body = body_json(&sink.encode(&messenger)?);
        assert_eq!(body["data"][0]["messaging_channel"], "messenger");
        assert_eq!(body["data"][0]["event_id"], messenger.id.as_str());
        // `/events` items have no webhook origin.
        let body = body_json(&sink.encode(&revenue())?);
        assert_eq!(body["data"][0]["messaging_channel"], "messenger");
        assert_eq!(body["data"][0]["event_id"], revenue().id.as_str());
        Ok(())
    }

    #[test]
    fn event_time_is_in_seconds_and_the_token_is_proved() -> TestResult {
        let request = sink()?.encode(&revenue())?;
        assert_eq!(
            body_json(&request)["data"][0]["event_time"],
            json!(1_700_000_123)
        );
        let proof = appsecret_proof(b"test_app_secret", "SYSTEM-USER-TOKEN");
        assert_eq!(
            request.url.as_str(),
            format!(
                "https://graph.facebook.com/v27.0/DATASET-DEFAULT/events?access_token=SYSTEM-USER-TOKEN&appsecret_proof={proof}"
            )
        );
        Ok(())
    }

    #[test]
    fn other_custom_names_and_kinds_are_skipped() -> TestResult {
        let sink = sink()?;
        let event = custom(EventKind::Custom, "customEvent", "trackMeEvent", json!({}));
        assert!(matches!(sink.encode(&event), Err(EncodeError::Skip(_))));
        let share = custom(EventKind::Share, "shareEvent", "Lead", json!({}));
        assert!(matches!(sink.encode(&share), Err(EncodeError::Skip(_))));
        let message = fixture_event("message-text-quick-reply", EventKind::Message)?;
        assert!(matches!(sink.encode(&message), Err(EncodeError::Skip(_))));
        Ok(())
    }

    #[test]
    fn names_override_but_must_stay_allowed() -> TestResult {
        let mut sink = sink()?;
        sink.names.insert(EventKind::Lead, "QualifiedLead".into());
        sink.names
            .insert(EventKind::Revenue, "fb_mobile_purchase".into());
        let lead = custom(EventKind::Lead, "leadEvent", "x", json!({}));
        assert_eq!(
            body_json(&sink.encode(&lead)?)["data"][0]["event_name"],
            "QualifiedLead"
        );
        assert!(matches!(sink.encode(&revenue()), Err(EncodeError::Skip(_))));
        Ok(())
    }

    #[test]
    fn pages_without_dataset_or_token_are_invalid_without_leaking_tokens() -> TestResult {
        let mut sink = sink()?;
        sink.dataset_id = None;
        sink.dataset_ids.insert("555".into(), "DATASET-555".into());
        sink.dataset_ids.insert("556".into(), "DATASET-556".into());
        match sink.encode(&revenue()) {
            Err(EncodeError::Invalid(reason)) => assert!(reason.contains("1234567890"), "{reason}"),
            other => panic!("unexpected {other:?}"),
        }
        let mut no_token = self::sink()?;
        no_token.access_token = None;
        no_token
            .page_tokens
            .insert("555".into(), SecretString::from("PAGE-TOKEN-555"));
        match no_token.encode(&revenue()) {
            Err(EncodeError::Invalid(reason)) => {
                assert!(
                    reason.contains("1234567890") && !reason.contains("PAGE-TOKEN"),
                    "{reason}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        Ok(())
    }
}
