//! `POST /events` bodies → events: the bot's custom events in Dashbot's event shape (`name`,
//! `type`, `userId`, the type's own fields), one object or an array (SPEC §2.4). Pure.
//!
//! Idempotency (SPEC §2.4): an item's `eventId`, or else the request's `Idempotency-Key` plus
//! the item's index, decides its event id, so a retried POST is a duplicate. An item with
//! neither is never collapsed with another: two identical purchases are two purchases (its id
//! comes from the request's own nonce).

use crate::event::{Custom, Event, EventData, EventId, EventKind, Source};
use crate::ingest::{BadItem, ReportItems, item_object};
use serde_json::{Map, Value};

/// Fields every type shares, or that have their own place in [`Custom`]; the rest of an item
/// (the type's own fields, as posted) goes to `Custom::extra`.
const COMMON_FIELDS: [&str; 6] = [
    "name",
    "type",
    "userId",
    "conversationId",
    "pageId",
    "eventId",
];
const REVENUE_FIELDS: [&str; 3] = ["amount", "currency", "referenceNumber"];

/// The accepted `type`s and their kinds. A `referralEvent` is kind `referral` (so sinks'
/// `kinds` lists treat it like a webhook referral) with `Custom` data (so its name,
/// conversation and fields are kept, and Dashbot gets it back as the event it was).
const TYPES: [(&str, EventKind); 6] = [
    ("customEvent", EventKind::Custom),
    ("revenueEvent", EventKind::Revenue),
    ("shareEvent", EventKind::Share),
    ("pageLaunchEvent", EventKind::PageLaunch),
    ("referralEvent", EventKind::Referral),
    ("leadEvent", EventKind::Lead),
];

/// What makes one `/events` request's items idempotent, or unique.
#[derive(Debug, Clone, Copy)]
pub struct RequestKeys<'a> {
    /// The request's `Idempotency-Key` header.
    pub idempotency_key: Option<&'a str>,
    /// Unique per request (random): the id of an item with no key of its own.
    pub nonce: &'a str,
}

/// Turns a `/events` body into events, one per item, or names the first bad item.
pub fn normalize(
    items: &ReportItems<'_>,
    keys: RequestKeys<'_>,
    received_at_ms: i64,
) -> Result<Vec<Event>, BadItem> {
    items
        .iter()
        .enumerate()
        .map(|(index, (label, raw))| {
            let fields = item_object(label, raw)?;
            let id =
                event_id(&fields, keys, index).map_err(|problem| BadItem::new(label, problem))?;
            custom_event(&fields, id, received_at_ms)
                .map_err(|problem| BadItem::new(label, problem))
        })
        .collect()
}

/// `eventId`, else `Idempotency-Key` + index, else the request's nonce + index.
fn event_id(
    item: &Map<String, Value>,
    keys: RequestKeys<'_>,
    index: usize,
) -> Result<EventId, String> {
    let index = index.to_string();
    Ok(
        match (string_field(item, "eventId")?, keys.idempotency_key) {
            (Some(event_id), _) => EventId::derive(&[b"custom", b"eventId", event_id.as_bytes()]),
            (None, Some(key)) => EventId::derive(&[
                b"custom",
                b"Idempotency-Key",
                key.as_bytes(),
                index.as_bytes(),
            ]),
            (None, None) => {
                EventId::derive(&[b"custom", b"nonce", keys.nonce.as_bytes(), index.as_bytes()])
            }
        },
    )
}

fn custom_event(
    item: &Map<String, Value>,
    id: EventId,
    received_at_ms: i64,
) -> Result<Event, String> {
    let event_type = match item.get("type") {
        Some(Value::String(event_type)) => event_type.as_str(),
        None | Some(Value::Null) => return Err("type is missing".to_owned()),
        Some(_) => return Err("type must be a string".to_owned()),
    };
    let kind = TYPES
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, kind)| *kind)
        .ok_or_else(|| {
            let names: Vec<&str> = TYPES.iter().map(|(name, _)| *name).collect();
            format!("type must be one of {}", names.join(", "))
        })?;
    let user_id = string_field(item, "userId")?.ok_or("userId is missing")?;
    // Dashbot's own helpers send revenue, share and page launch events without a name.
    let name = match item.get("name") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        None | Some(Value::Null) if kind != EventKind::Custom => kind.as_str().to_owned(),
        None | Some(Value::Null) => return Err("name is missing".to_owned()),
        Some(_) => return Err("name must be a non-empty string".to_owned()),
    };
    check_own_fields(item, kind)?;

    let is_revenue = kind == EventKind::Revenue;
    let (amount, currency, reference_number) = if is_revenue {
        let amount = match item.get("amount") {
            Some(Value::Number(amount)) => amount
                .as_f64()
                .filter(|amount| amount.is_finite())
                .ok_or("amount must be a finite number")?,
            None | Some(Value::Null) => return Err("amount is missing".to_owned()),
            Some(_) => return Err("amount must be a number".to_owned()),
        };
        let currency = match item.get("currency") {
            Some(Value::String(currency)) if !currency.is_empty() => currency.clone(),
            None | Some(Value::Null) => "USD".to_owned(),
            Some(_) => return Err("currency must be a non-empty string".to_owned()),
        };
        (
            Some(amount),
            Some(currency),
            string_field(item, "referenceNumber")?,
        )
    } else {
        (None, None, None)
    };
    let extra = item
        .iter()
        .filter(|(key, _)| {
            let own = COMMON_FIELDS.contains(&key.as_str())
                || (is_revenue && REVENUE_FIELDS.contains(&key.as_str()));
            !own
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    Ok(Event {
        id,
        source: Source::Custom,
        kind,
        page_id: string_field(item, "pageId")?,
        user_id: Some(user_id),
        timestamp_ms: received_at_ms,
        data: EventData::Custom(Custom {
            name,
            event_type: event_type.to_owned(),
            conversation_id: string_field(item, "conversationId")?,
            amount,
            currency,
            reference_number,
            extra,
        }),
        webhook: None,
    })
}

/// The documented own fields must have their documented JSON types when present.
fn check_own_fields(item: &Map<String, Value>, kind: EventKind) -> Result<(), String> {
    let objects: &[&str] = match kind {
        EventKind::Custom | EventKind::PageLaunch => &["extraInfo"],
        EventKind::Revenue => &["metadata"],
        EventKind::Share => &["sharedMessage"],
        _ => &[],
    };
    for name in objects {
        if !matches!(item.get(*name), None | Some(Value::Null | Value::Object(_))) {
            return Err(format!("{name} must be an object"));
        }
    }
    if kind == EventKind::Referral {
        for name in ["ref", "source", "ad_id", "referer_uri"] {
            string_field(item, name)?;
        }
    }
    Ok(())
}

/// An optional string field; numbers are taken as their decimal text (ids may be numbers).
fn string_field(item: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match item.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if !text.is_empty() => Ok(Some(text.clone())),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(format!("{name} must be a non-empty string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: &str) -> Result<Vec<Event>, BadItem> {
        let items = ReportItems::parse(body.as_bytes())
            .map_err(|error| BadItem::new(None, error.to_string()))?;
        normalize(
            &items,
            RequestKeys {
                idempotency_key: None,
                nonce: "test",
            },
            7,
        )
    }

    fn custom(event: &Event) -> Option<&Custom> {
        match &event.data {
            EventData::Custom(custom) => Some(custom),
            _ => None,
        }
    }

    #[test]
    fn every_type_maps_to_its_kind() -> Result<(), Box<dyn std::error::Error>> {
        let body = json!([
            {"name": "trackMeEvent", "type": "customEvent", "userId": "U", "extraInfo": {"a": 1}},
            {"name": "bought", "type": "revenueEvent", "userId": "U", "amount": 9.5, "referenceNumber": 77, "metadata": {"sku": "x"}},
            {"type": "shareEvent", "userId": "U", "sharedMessage": {"text": "t"}},
            {"name": "opened", "type": "pageLaunchEvent", "userId": "U", "pageId": "111"},
            {"name": "ad", "type": "referralEvent", "userId": 12, "ref": "spring", "source": "ADS", "ad_id": "6045"},
            {"name": "lead", "type": "leadEvent", "userId": "U", "conversationId": "c1"}
        ])
        .to_string();
        let events = parse(&body)?;
        let kinds: Vec<EventKind> = events.iter().map(|event| event.kind).collect();
        use EventKind::*;
        assert_eq!(
            kinds,
            vec![Custom, Revenue, Share, PageLaunch, Referral, Lead]
        );
        assert!(
            events
                .iter()
                .all(|event| event.source == Source::Custom && event.timestamp_ms == 7)
        );
        let revenue = custom(&events[1]).ok_or("custom data")?;
        assert_eq!(revenue.amount, Some(9.5));
        assert_eq!(revenue.currency.as_deref(), Some("USD"));
        assert_eq!(revenue.reference_number.as_deref(), Some("77"));
        assert_eq!(revenue.extra.get("metadata"), Some(&json!({"sku": "x"})));
        assert!(!revenue.extra.contains_key("amount"));
        assert_eq!(
            custom(&events[2]).map(|share| share.name.as_str()),
            Some("share")
        );
        assert_eq!(events[3].page_id.as_deref(), Some("111"));
        let referral = custom(&events[4]).ok_or("custom data")?;
        assert_eq!(referral.event_type, "referralEvent");
        assert_eq!(referral.extra.get("ref"), Some(&json!("spring")));
        assert_eq!(events[4].user_id.as_deref(), Some("12"));
        assert_eq!(
            custom(&events[5]).and_then(|lead| lead.conversation_id.as_deref()),
            Some("c1")
        );
        Ok(())
    }

    fn parse_with(body: &str, key: Option<&str>, nonce: &str) -> Result<Vec<Event>, BadItem> {
        let items = ReportItems::parse(body.as_bytes())
            .map_err(|error| BadItem::new(None, error.to_string()))?;
        normalize(
            &items,
            RequestKeys {
                idempotency_key: key,
                nonce,
            },
            1_700_000_000_000,
        )
    }

    #[test]
    fn ids_come_from_event_id_or_the_idempotency_key_and_never_from_the_content()
    -> Result<(), BadItem> {
        let item = r#"{"name":"n","type":"customEvent","userId":"U"}"#;
        let pair = format!("[{item}, {item}]");
        // No key: identical items, in one request or in two, are different events.
        let once = parse_with(&pair, None, "request-1")?;
        assert_ne!(once[0].id, once[1].id);
        let twice = parse_with(&pair, None, "request-2")?;
        assert_ne!(once[0].id, twice[0].id);
        // Idempotency-Key: the same request again is the same events, item by item.
        let keyed = parse_with(&pair, Some("k-1"), "request-3")?;
        let retried = parse_with(&pair, Some("k-1"), "request-4")?;
        assert_ne!(keyed[0].id, keyed[1].id);
        assert_eq!(
            (&keyed[0].id, &keyed[1].id),
            (&retried[0].id, &retried[1].id)
        );
        assert_ne!(keyed[0].id, parse_with(&pair, Some("k-2"), "r")?[0].id);
        // eventId: wins over the key and the position, and is not one of the event's fields.
        let with_id = r#"{"name":"n","type":"customEvent","userId":"U","eventId":"order-7"}"#;
        let first = parse_with(with_id, Some("k-1"), "r1")?;
        let moved = parse_with(&format!("[{item}, {with_id}]"), None, "r2")?;
        assert_eq!(first[0].id, moved[1].id);
        assert!(custom(&first[0]).is_some_and(|custom| !custom.extra.contains_key("eventId")));
        Ok(())
    }

    #[test]
    fn an_event_id_must_be_a_non_empty_string() {
        for item in [
            r#"{"name":"n","type":"customEvent","userId":"U","eventId":["x"]}"#,
            r#"{"name":"n","type":"customEvent","userId":"U","eventId":""}"#,
        ] {
            let expected = "eventId must be a non-empty string";
            let error = parse_with(item, None, "r")
                .err()
                .map(|error| error.to_string());
            assert!(
                error
                    .as_deref()
                    .is_some_and(|error| error.contains(expected)),
                "{item}: {error:?}"
            );
        }
    }

    /// `1e400` is JSON syntax but no f64: the 400 names the field, not "must be a JSON object"
    /// (the item is one).
    #[test]
    fn a_number_out_of_range_is_named_with_its_field() {
        for (body, expected) in [
            (
                r#"{"name":"n","type":"revenueEvent","userId":"U","amount":1e400}"#,
                "amount cannot be read: number out of range",
            ),
            (
                r#"[{"name":"n","type":"customEvent","userId":"U","extraInfo":{"big":-1e999}}]"#,
                "item 0: extraInfo cannot be read: number out of range",
            ),
        ] {
            assert_eq!(
                parse(body).err().map(|error| error.to_string()).as_deref(),
                Some(expected),
                "{body}"
            );
        }
    }

    #[test]
    fn bad_items_are_named_with_their_field() {
        let cases = [
            (
                r#"{"name":"n","type":"revenueEvent","userId":"U"}"#,
                "amount is missing",
            ),
            (
                r#"{"name":"n","type":"revenueEvent","userId":"U","amount":"9"}"#,
                "amount must be a number",
            ),
            (
                r#"[{"name":"n","type":"customEvent","userId":"U"},{"name":"n","type":"customEvent"}]"#,
                "item 1: userId is missing",
            ),
            (r#"{"type":"customEvent","userId":"U"}"#, "name is missing"),
            (r#"{"name":"n","userId":"U"}"#, "type is missing"),
            (
                r#"{"name":"n","type":"customEvent","userId":"U","extraInfo":[1]}"#,
                "extraInfo must be an object",
            ),
            (
                r#"{"name":"n","type":"revenueEvent","userId":"U","amount":1,"currency":5}"#,
                "currency must be a non-empty string",
            ),
            (
                r#"{"name":"n","type":"referralEvent","userId":"U","ref":{}}"#,
                "ref must be a non-empty string",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                parse(body).err().map(|error| error.to_string()).as_deref(),
                Some(expected),
                "{body}"
            );
        }
        let unknown = parse(r#"{"name":"n","type":"bogus","userId":"U"}"#)
            .err()
            .map(|error| error.to_string());
        assert!(
            unknown.is_some_and(|message| message.starts_with("type must be one of customEvent"))
        );
    }
}
