//! The `[sinks.page_activities]` sink (SPEC §4.4): Meta's Messaging Events API, `POST
//! /{app_id}/page_activities` with the Page's token, one custom event per request. Served on
//! Graph v20.0 and below only, and retired by Meta (v20.0 reached its end of life on
//! 2026-09-24): whenever it is enabled, [`RETIRED`] is said by `check-config`, the start-up log
//! and `/admin/sinks`. Pure; the page token goes only into the query string. Its table,
//! `[sinks.page_activities]`, is read and validated here too.

use crate::check::{Checker, DeliveryPolicy};
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

/// `[sinks.page_activities]` (SPEC §4.4).
pub const SPEC: TableSpec = TableSpec {
    keys: &[
        "app_id",
        "api_version",
        "page_tokens",
        "logging_target",
        "names",
    ],
    secret_keys: &["page_tokens"],
    kinds: &[EventKind::Revenue, EventKind::Lead, EventKind::Custom],
    delivery: DeliveryPolicy::DEFAULT,
};

/// The keys of `[sinks.page_activities]` besides those every sink table takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    app_id: Option<String>,
    api_version: Option<String>,
    page_tokens: Option<BTreeMap<String, String>>,
    logging_target: Option<String>,
}

/// Validates `[sinks.page_activities]`: `Ok(None)` when a problem is recorded; disabled
/// without an app id (its own or `messenger.app_id`) or a page token.
pub fn from_table(
    table: Table,
    names: BTreeMap<EventKind, String>,
    check: &mut Checker,
    context: &Context,
) -> Result<Option<PageActivities>, Disabled> {
    let app_id = table
        .app_id
        .filter(|id| !id.is_empty())
        .or_else(|| context.app_id.map(str::to_owned))
        .ok_or("sinks.page_activities.app_id (or messenger.app_id) is not set")?;
    let page_tokens = graph::page_tokens(table.page_tokens);
    if page_tokens.is_empty() {
        return Err("sinks.page_activities.page_tokens is empty".into());
    }
    let logging_target = table.logging_target.unwrap_or_else(|| "page".to_owned());
    if !matches!(
        logging_target.to_ascii_lowercase().as_str(),
        "page" | "app" | "app_and_page"
    ) {
        check.problem(
            "sinks.page_activities.logging_target",
            "must be \"page\", \"app\" or \"app_and_page\"",
        );
    }
    let api_version = graph::api_version(
        check,
        "sinks.page_activities.api_version",
        table.api_version,
        "v20.0",
    );
    let Some(base_url) = context.graph_base_url else {
        return Ok(None);
    };
    Ok(Some(PageActivities {
        base_url: base_url.clone(),
        app_id,
        api_version,
        page_tokens,
        logging_target,
        app_secret: context.app_secret.clone(),
        names,
    }))
}

/// The warning for an enabled `[sinks.page_activities]` (SPEC §4.4).
pub const RETIRED: &str = "[sinks.page_activities] uses Meta's Messaging Events API, which Meta \
    retired: it was served on Graph v20.0 and below only, and v20.0 reached its end of life on \
    2026-09-24, so Graph no longer accepts these calls. Use [sinks.conversions] (the Conversions \
    API for business messaging) instead";

#[derive(Debug, Clone)]
pub struct PageActivities {
    /// `graph.base_url`.
    pub base_url: Url,
    pub app_id: String,
    pub api_version: String,
    /// Page id → page access token.
    pub page_tokens: BTreeMap<String, SecretString>,
    pub logging_target: String,
    /// `messenger.app_secret`, for `appsecret_proof` (none when empty).
    pub app_secret: SecretString,
    /// `[sinks.page_activities.names]`: event name overrides per kind.
    pub names: BTreeMap<EventKind, String>,
}

impl PageActivities {
    /// The page tokens.
    pub fn secrets(&self) -> Vec<String> {
        self.page_tokens
            .values()
            .map(|token| token.expose_secret().to_owned())
            .collect()
    }

    /// Always [`RETIRED`]: the sink stays for relays whose `graph.base_url` points at a
    /// compatible endpoint.
    pub fn config_warnings(&self) -> Vec<String> {
        vec![RETIRED.to_owned()]
    }

    /// `POST {graph}/{api_version}/{app_id}/page_activities?access_token=…[&appsecret_proof=…]`.
    ///
    /// revenue → `fb_mobile_purchase` with `_valueToSum` and `fb_currency`; lead →
    /// `lead_submitted`; custom, share and page launch → the event's own name; other kinds only
    /// when `names` gives them one. A name Meta would refuse, or a page without a token, is
    /// `Invalid` (dead-lettered at once).
    pub fn encode(&self, event: &Event) -> Result<Request, EncodeError> {
        let user = require_user(event)?;
        let mut custom_event = Map::new();
        let default_name = match (&event.data, event.kind) {
            (EventData::Custom(_), EventKind::Revenue) => "fb_mobile_purchase",
            (EventData::Custom(_), EventKind::Lead) => "lead_submitted",
            (EventData::Custom(custom), _) => custom.name.as_str(),
            _ if self.names.contains_key(&event.kind) => "",
            _ => {
                return Err(EncodeError::Skip(format!(
                    "page_activities has no event for {} (name one in sinks.page_activities.names)",
                    event.kind
                )));
            }
        };
        let name = event_name(&self.names, event.kind, default_name);
        if !valid_event_name(name) {
            return Err(EncodeError::Invalid(format!(
                "event name `{name}` is not accepted by page_activities: it must match \
                 ^[0-9a-zA-Z_][0-9a-zA-Z _-]{{0,39}}$"
            )));
        }
        custom_event.insert("_eventName".into(), json!(name));
        custom_event.insert("_logTime".into(), json!(seconds(event.timestamp_ms)));
        if let (EventData::Custom(custom), EventKind::Revenue) = (&event.data, event.kind) {
            let amount = custom
                .amount
                .ok_or_else(|| EncodeError::Invalid("revenue event has no amount".to_owned()))?;
            custom_event.insert("_valueToSum".into(), json!(amount));
            custom_event.insert(
                "fb_currency".into(),
                json!(custom.currency.as_deref().unwrap_or("USD")),
            );
        }

        let page = page_of(event, &self.page_tokens)?;
        let token = self.page_tokens.get(page).ok_or_else(|| {
            EncodeError::Invalid(format!(
                "no page token for page {page} in sinks.page_activities.page_tokens"
            ))
        })?;
        let url = graph_url(
            &self.base_url,
            &[&self.api_version, &self.app_id, "page_activities"],
            token,
            &self.app_secret,
        )?;
        let body = json!({
            "custom_events": [Value::Object(custom_event)],
            "advertiser_tracking_enabled": 1,
            "application_tracking_enabled": 1,
            "page_id": page,
            "page_scoped_user_id": user,
            "logging_source": "messenger_bot",
            "logging_target": self.logging_target,
        });
        Ok(Request {
            method: Method::Post,
            url,
            headers: vec![("content-type", "application/json".to_owned())],
            body: Some(Bytes::from(body.to_string())),
        })
    }
}

/// `^[0-9a-zA-Z_][0-9a-zA-Z _-]{0,39}$`, Meta's rule for `_eventName`.
pub fn valid_event_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    (first.is_ascii_alphanumeric() || first == b'_')
        && name.len() <= 40
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b' ' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::appsecret_proof;
    use crate::sinks::fixtures::*;
    use crate::sinks::testing::*;
    use insta::assert_snapshot;

    fn sink() -> Result<PageActivities, url::ParseError> {
        Ok(PageActivities {
            base_url: Url::parse("https://graph.facebook.com")?,
            app_id: "1517776481860111".into(),
            api_version: "v20.0".into(),
            page_tokens: BTreeMap::from([(
                "1234567890".to_owned(),
                SecretString::from("PAGE-TOKEN-1"),
            )]),
            logging_target: "page".into(),
            app_secret: SecretString::from("test_app_secret"),
            names: BTreeMap::new(),
        })
    }

    #[test]
    fn snapshots_of_every_kind() -> TestResult {
        let sink = sink()?;
        let cases = [
            ("revenue", revenue()),
            (
                "lead",
                custom(EventKind::Lead, "leadEvent", "signup_form", json!({})),
            ),
            (
                "custom",
                custom(
                    EventKind::Custom,
                    "customEvent",
                    "added_to_cart",
                    json!({"extraInfo": {"sku": "SKI-1"}}),
                ),
            ),
        ];
        for (name, event) in cases {
            assert_snapshot!(
                format!("page-activities-{name}"),
                render(&sink.encode(&event)?)
            );
        }
        Ok(())
    }

    #[test]
    fn appsecret_proof_signs_the_page_token() -> TestResult {
        let request = sink()?.encode(&revenue())?;
        let proof = appsecret_proof(b"test_app_secret", "PAGE-TOKEN-1");
        assert!(request.url.as_str().ends_with(&format!(
            "?access_token=PAGE-TOKEN-1&appsecret_proof={proof}"
        )));
        let mut without_secret = sink()?;
        without_secret.app_secret = SecretString::from("");
        let request = without_secret.encode(&revenue())?;
        assert!(
            request.url.as_str().ends_with("?access_token=PAGE-TOKEN-1"),
            "{}",
            request.url
        );
        Ok(())
    }

    #[test]
    fn event_name_rule() {
        for good in [
            "a",
            "_x",
            "9lives",
            "lead_submitted",
            "Add to cart",
            "a-b",
            &"x".repeat(40),
        ] {
            assert!(valid_event_name(good), "{good}");
        }
        for bad in [
            "",
            " lead",
            "-x",
            "caf\u{e9}",
            "a.b",
            "a/b",
            &"x".repeat(41),
            "\u{e9}",
        ] {
            assert!(!valid_event_name(bad), "{bad}");
        }
    }

    #[test]
    fn bad_event_name_is_invalid() -> TestResult {
        let event = custom(
            EventKind::Custom,
            "customEvent",
            "checkout.done!",
            json!({}),
        );
        assert!(matches!(
            sink()?.encode(&event),
            Err(EncodeError::Invalid(_))
        ));
        let mut renamed = sink()?;
        renamed.names.insert(EventKind::Lead, "-bad".into());
        let lead = custom(EventKind::Lead, "leadEvent", "x", json!({}));
        assert!(matches!(
            renamed.encode(&lead),
            Err(EncodeError::Invalid(_))
        ));
        Ok(())
    }

    #[test]
    fn missing_page_token_is_invalid_and_names_the_page_not_a_token() -> TestResult {
        let mut event = revenue();
        event.page_id = Some("999".into());
        match sink()?.encode(&event) {
            Err(EncodeError::Invalid(reason)) => {
                assert!(reason.contains("999"), "{reason}");
                assert!(!reason.contains("PAGE-TOKEN-1"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_custom_event_without_page_uses_the_only_page() -> TestResult {
        let mut event = revenue();
        event.page_id = None;
        assert_eq!(body_json(&sink()?.encode(&event)?)["page_id"], "1234567890");
        let mut two_pages = sink()?;
        two_pages
            .page_tokens
            .insert("555".into(), SecretString::from("PAGE-TOKEN-2"));
        assert!(matches!(
            two_pages.encode(&event),
            Err(EncodeError::Invalid(_))
        ));
        Ok(())
    }

    #[test]
    fn names_override_and_unnamed_kinds_are_skipped() -> TestResult {
        let mut sink = sink()?;
        let mut message = fixture_event("message-text-quick-reply", EventKind::Message)?;
        message.page_id = Some("1234567890".into());
        assert!(matches!(sink.encode(&message), Err(EncodeError::Skip(_))));
        sink.names
            .insert(EventKind::Message, "message_received".into());
        sink.names.insert(EventKind::Revenue, "Purchase".into());
        let body = body_json(&sink.encode(&message)?);
        assert_eq!(body["custom_events"][0]["_eventName"], "message_received");
        let body = body_json(&sink.encode(&revenue())?);
        assert_eq!(body["custom_events"][0]["_eventName"], "Purchase");
        assert_eq!(body["custom_events"][0]["_valueToSum"], json!(57.23));
        Ok(())
    }
}
