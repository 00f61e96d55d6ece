//! Messenger (and Instagram) webhook JSON → [`Event`]s: the only file that knows the shape of a
//! `POST /webhook` body (SPEC §2.2, §3). Pure: a verified body in, events out, no IO.
//! Each messaging item is kept byte for byte as `Box<RawValue>`; a separate `Value` view of the
//! same item is parsed only to classify it and fill the kind's fields.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::event::{
    Channel, Event, EventData, EventId, EventKind, Outgoing, Referral, Source, WebhookOrigin,
};
use crate::ingest::verify::VerifiedBody;

/// The result of normalizing one webhook body.
#[derive(Debug)]
pub struct Normalized {
    /// `object` of the body when it was a JSON object with a string `object` field.
    pub object: Option<String>,
    /// False when the JSON was not an `entry[]` batch (e.g. the App Dashboard test format
    /// `{"field": ..., "value": ...}`): acked, counted, nothing delivered.
    pub is_batch: bool,
    pub events: Vec<Event>,
    /// Parts of the batch that were tolerated but produce no event (`changes[]` items, entries
    /// without messaging/standby, non-object items).
    pub ignored: usize,
}

/// Why a verified body could not be normalized at all (→ 400).
#[derive(Debug, thiserror::Error)]
pub enum NormalizeError {
    #[error("body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
}

/// A JSON object whose values are kept raw, borrowed from the body, so that nested parts can be
/// stored verbatim (each item is copied once, into its event) and are scanned again only when
/// read.
type RawObject<'a> = BTreeMap<String, &'a RawValue>;

/// Timestamps below this are taken as seconds (10^10 ms is April 1970; 10^10 s is year 2286).
const SECONDS_LIMIT: i64 = 10_000_000_000;

/// The handover keys, in the order they are tried.
const HANDOVER_KEYS: [&str; 4] = [
    "pass_thread_control",
    "take_thread_control",
    "request_thread_control",
    "app_roles",
];

/// Keys of an echo's `message` that are Meta's annotations, not part of the Send API request.
const ECHO_ONLY_KEYS: [&str; 4] = ["is_echo", "app_id", "mid", "seq"];

/// Turns a signed webhook body into events.
///
/// Not JSON → `Err`. JSON without an `entry` array → `Ok` with `is_batch: false`. Everything
/// else is tolerated: unknown keys and kinds, `changes[]`, and malformed parts, which are counted
/// in [`Normalized::ignored`]. Items of `messaging[]` come before those of `standby[]` within an
/// entry; an echo yields its `echo` event followed by its `outgoing` event.
pub fn normalize(body: &VerifiedBody, received_at_ms: i64) -> Result<Normalized, NormalizeError> {
    let mut normalized = Normalized {
        object: None,
        is_batch: false,
        events: Vec::new(),
        ignored: 0,
    };
    // A body that is an object is read once (syntax, UTF-8 and trailing bytes checked on the
    // way); any other body is checked to be JSON at all, without building a tree.
    let Ok(top) = serde_json::from_slice::<RawObject>(body.as_bytes()) else {
        serde_json::from_slice::<&RawValue>(body.as_bytes()).map_err(NormalizeError::NotJson)?;
        return Ok(normalized);
    };
    normalized.object = top
        .get("object")
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
        .and_then(|value| match value {
            Value::String(object) => Some(object),
            _ => None,
        });
    let Some(entries) = top
        .get("entry")
        .and_then(|raw| serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok())
    else {
        return Ok(normalized);
    };
    normalized.is_batch = true;
    let object = normalized
        .object
        .clone()
        .unwrap_or_else(|| "page".to_owned());
    for entry in entries {
        normalize_entry(&object, entry, received_at_ms, &mut normalized);
    }
    Ok(normalized)
}

/// The entry-level facts every item of the entry shares.
struct EntryContext<'a> {
    object: &'a str,
    entry_id: Box<RawValue>,
    entry_time: Option<Box<RawValue>>,
    page_id: Option<String>,
    time_ms: Option<i64>,
}

fn normalize_entry(object: &str, entry: &RawValue, received_at_ms: i64, out: &mut Normalized) {
    let Ok(mut fields) = serde_json::from_str::<RawObject>(entry.get()) else {
        out.ignored += 1;
        return;
    };
    let entry_id = fields.remove("id").unwrap_or(RawValue::NULL).to_owned();
    let entry_id_value = parse_value(&entry_id);
    let entry_time = fields.remove("time").map(RawValue::to_owned);
    let time_ms = entry_time
        .as_deref()
        .map(parse_value)
        .as_ref()
        .and_then(millis);
    let context = EntryContext {
        object,
        page_id: scalar_string(&entry_id_value),
        entry_id,
        entry_time,
        time_ms,
    };

    let mut produced_anything = false;
    for (key, channel) in [
        ("messaging", Channel::Messaging),
        ("standby", Channel::Standby),
    ] {
        let Some(raw_items) = fields.get(key) else {
            continue;
        };
        produced_anything = true;
        let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw_items.get()) else {
            out.ignored += 1;
            continue;
        };
        for raw_item in items {
            // An item whose text was cut inside a surrogate pair (`"\ud83d"`) is valid enough to
            // keep (its raw bytes go on verbatim) but not for serde_json's `Value`: read it with
            // U+FFFD in place of each unpaired half.
            match from_str_lenient::<Value>(raw_item.get()) {
                Ok(Value::Object(item)) => {
                    let raw_item = raw_item.to_owned();
                    normalize_item(&context, channel, raw_item, &item, received_at_ms, out);
                }
                _ => out.ignored += 1,
            }
        }
    }
    if let Some(changes) = fields.get("changes") {
        produced_anything = true;
        out.ignored += serde_json::from_str::<Vec<&RawValue>>(changes.get())
            .map_or(1, |changes| changes.len());
    }
    if !produced_anything {
        out.ignored += 1;
    }
}

/// `json` parsed; when that fails because a string was cut inside a surrogate pair (`"\ud83d"`,
/// as `JSON.stringify` writes a lone half: valid JSON syntax, but no Rust string), parsed with
/// U+FFFD in place of each unpaired half. Any other failure is the first parse's error.
pub(crate) fn from_str_lenient<T: serde::de::DeserializeOwned>(
    json: &str,
) -> serde_json::Result<T> {
    serde_json::from_str(json)
        .or_else(|error| serde_json::from_str(&replace_lone_surrogates(json)).map_err(|_| error))
}

/// `json` with every `\uXXXX` escape of an unpaired UTF-16 surrogate replaced by `\ufffd`.
/// `json` is valid JSON syntax, so a backslash is always an escape inside a string.
fn replace_lone_surrogates(json: &str) -> String {
    fn escaped_unit(text: &str) -> Option<u16> {
        let hex = text.strip_prefix("\\u")?.get(..4)?;
        u16::from_str_radix(hex, 16).ok()
    }
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(position) = rest.find('\\') {
        out.push_str(&rest[..position]);
        rest = &rest[position..];
        let Some(unit) = escaped_unit(rest) else {
            // Any other escape: two characters (`\\`, `\"`, `\n`, …), copied as they are.
            let end = rest
                .char_indices()
                .nth(2)
                .map_or(rest.len(), |(end, _)| end);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        };
        let paired = (0xD800..=0xDBFF).contains(&unit)
            && escaped_unit(&rest[6..]).is_some_and(|low| (0xDC00..=0xDFFF).contains(&low));
        if paired {
            out.push_str(&rest[..12]);
            rest = &rest[12..];
        } else if (0xD800..=0xDFFF).contains(&unit) {
            out.push_str("\\ufffd");
            rest = &rest[6..];
        } else {
            out.push_str(&rest[..6]);
            rest = &rest[6..];
        }
    }
    out.push_str(rest);
    out
}

/// How an item was classified: its kind and the key that decided it.
struct Classified<'a> {
    kind: EventKind,
    key: Option<&'a str>,
}

fn classify(item: &Map<String, Value>) -> Classified<'_> {
    let found = |kind: EventKind, key: &'static str| Classified {
        kind,
        key: Some(key),
    };
    if let Some(message) = item.get("message") {
        return if is_true(message.get("is_echo")) {
            found(EventKind::Echo, "message")
        } else {
            found(EventKind::Message, "message")
        };
    }
    for (key, kind) in [
        ("postback", EventKind::Postback),
        ("referral", EventKind::Referral),
        ("optin", EventKind::Optin),
        ("delivery", EventKind::Delivery),
        ("read", EventKind::Read),
        ("reaction", EventKind::Reaction),
        ("message_edit", EventKind::MessageEdit),
        ("response_feedback", EventKind::ResponseFeedback),
    ] {
        if item.contains_key(key) {
            return found(kind, key);
        }
    }
    for key in HANDOVER_KEYS {
        if item.contains_key(key) {
            return found(EventKind::Handover, key);
        }
    }
    if item.contains_key("account_linking") {
        return found(EventKind::AccountLinking, "account_linking");
    }
    for key in ["policy_enforcement", "policy-enforcement"] {
        if item.contains_key(key) {
            return found(EventKind::PolicyEnforcement, key);
        }
    }
    Classified {
        kind: EventKind::Other,
        key: item
            .keys()
            .map(String::as_str)
            .find(|key| !matches!(*key, "sender" | "recipient" | "timestamp")),
    }
}

fn normalize_item(
    context: &EntryContext<'_>,
    channel: Channel,
    raw_item: Box<RawValue>,
    item: &Map<String, Value>,
    received_at_ms: i64,
    out: &mut Normalized,
) {
    let Classified { kind, key } = classify(item);
    let body = key.and_then(|key| item.get(key)).unwrap_or(&Value::Null);

    let user_id = match kind {
        // Echoes swap sender and recipient: the sender is the Page.
        EventKind::Echo => field_string(item.get("recipient"), "id")
            .or_else(|| field_string(item.get("recipient"), "user_ref")),
        _ => field_string(item.get("sender"), "id")
            .or_else(|| field_string(item.get("sender"), "user_ref"))
            .or_else(|| match kind {
                EventKind::Optin => field_string(Some(body), "user_ref"),
                _ => None,
            }),
    };
    let timestamp_ms = item
        .get("timestamp")
        .and_then(millis)
        .or(context.time_ms)
        .unwrap_or(received_at_ms);

    let data = event_data(kind, key.unwrap_or_default(), body);
    let mid = match &data {
        EventData::Message { mid, .. }
        | EventData::Echo { mid, .. }
        | EventData::Postback { mid, .. }
        | EventData::MessageEdit { mid, .. }
        | EventData::ResponseFeedback { mid, .. } => mid.clone().filter(|mid| !mid.is_empty()),
        _ => None,
    };
    let watermark = match &data {
        EventData::Delivery { watermark, .. } | EventData::Read { watermark } => *watermark,
        _ => None,
    };
    // An edit reuses its message's `mid`, and feedback names the bot's message: each is told
    // apart by what it adds (keyed by `mid` alone, every edit after the first would be lost).
    let qualifier = match &data {
        EventData::MessageEdit { num_edit, .. } => num_edit.map(|edit| edit.to_string()),
        EventData::ResponseFeedback { feedback, .. } => feedback.clone(),
        _ => None,
    };
    let kind_bytes = kind.as_str().as_bytes();
    let page_bytes = context.page_id.as_deref().unwrap_or_default().as_bytes();
    let user_bytes = user_id.as_deref().unwrap_or_default().as_bytes();
    let id = match (&mid, watermark) {
        (Some(mid), _) => match &qualifier {
            Some(qualifier) => EventId::derive(&[kind_bytes, mid.as_bytes(), qualifier.as_bytes()]),
            None => EventId::derive(&[kind_bytes, mid.as_bytes()]),
        },
        (None, Some(watermark)) => EventId::derive(&[
            kind_bytes,
            page_bytes,
            user_bytes,
            watermark.to_string().as_bytes(),
        ]),
        (None, None) => EventId::derive(&[
            kind_bytes,
            page_bytes,
            user_bytes,
            raw_item.get().as_bytes(),
        ]),
    };

    let outgoing = match (kind, &mid) {
        (EventKind::Echo, Some(mid)) => Some(echo_outgoing(
            mid,
            body,
            context.page_id.clone(),
            user_id.clone(),
            timestamp_ms,
        )),
        _ => None,
    };
    out.events.push(Event {
        id,
        source: Source::Webhook,
        kind,
        page_id: context.page_id.clone(),
        user_id,
        timestamp_ms,
        data,
        webhook: Some(WebhookOrigin {
            object: context.object.to_owned(),
            entry_id: context.entry_id.clone(),
            entry_time: context.entry_time.clone(),
            channel,
            item: raw_item,
        }),
    });
    out.events.extend(outgoing);
}

/// The kind's fields. `body` is the value under the key that decided the kind.
fn event_data(kind: EventKind, key: &str, body: &Value) -> EventData {
    let text = |name: &str| field_string(Some(body), name);
    match kind {
        EventKind::Message => EventData::Message {
            mid: text("mid"),
            text: text("text"),
            quick_reply_payload: field_string(body.get("quick_reply"), "payload"),
            attachment_types: body
                .get("attachments")
                .and_then(Value::as_array)
                .map(|attachments| {
                    attachments
                        .iter()
                        .filter_map(|attachment| field_string(Some(attachment), "type"))
                        .collect()
                })
                .unwrap_or_default(),
            reply_to_mid: field_string(body.get("reply_to"), "mid"),
            referral: body.get("referral").and_then(referral),
        },
        EventKind::Echo => EventData::Echo {
            mid: text("mid"),
            app_id: text("app_id"),
            metadata: text("metadata"),
        },
        EventKind::Postback => EventData::Postback {
            mid: text("mid"),
            title: text("title"),
            payload: text("payload"),
            referral: body.get("referral").and_then(referral),
        },
        EventKind::Referral => EventData::Referral(referral(body).unwrap_or_default()),
        EventKind::Optin => EventData::Optin {
            ref_param: text("ref"),
            optin_type: text("type"),
            payload: text("payload"),
            user_ref: text("user_ref"),
        },
        EventKind::Delivery => EventData::Delivery {
            watermark: body.get("watermark").and_then(integer),
            mids: body
                .get("mids")
                .and_then(Value::as_array)
                .map(|mids| mids.iter().filter_map(scalar_string).collect())
                .unwrap_or_default(),
        },
        EventKind::Read => EventData::Read {
            watermark: body.get("watermark").and_then(integer),
        },
        EventKind::Reaction => EventData::Reaction {
            mid: text("mid"),
            reaction: text("reaction"),
            emoji: text("emoji"),
            action: text("action"),
        },
        EventKind::Handover => EventData::Handover {
            action: key.to_owned(),
            new_owner_app_id: text("new_owner_app_id"),
            previous_owner_app_id: text("previous_owner_app_id"),
            requested_owner_app_id: text("requested_owner_app_id"),
            metadata: text("metadata"),
        },
        // `authorization_code` stays in the raw item only: it is a credential.
        EventKind::AccountLinking => EventData::AccountLinking {
            status: text("status"),
        },
        EventKind::PolicyEnforcement => EventData::PolicyEnforcement {
            action: text("action"),
            reason: text("reason"),
        },
        EventKind::MessageEdit => EventData::MessageEdit {
            mid: text("mid"),
            num_edit: body.get("num_edit").and_then(integer),
            text: text("text"),
        },
        EventKind::ResponseFeedback => EventData::ResponseFeedback {
            mid: text("mid"),
            feedback: text("feedback"),
        },
        _ => EventData::Other {
            key: (!key.is_empty()).then(|| key.to_owned()),
        },
    }
}

/// The analytics side of an echo: the send it reports, as if the bot had POSTed it.
fn echo_outgoing(
    mid: &str,
    message: &Value,
    page_id: Option<String>,
    psid: Option<String>,
    timestamp_ms: i64,
) -> Event {
    let request_message: Map<String, Value> = message
        .as_object()
        .map(|fields| {
            fields
                .iter()
                .filter(|(key, _)| !ECHO_ONLY_KEYS.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    Event {
        id: EventId::outgoing(mid),
        source: Source::Outgoing,
        kind: EventKind::Outgoing,
        page_id,
        user_id: psid.clone(),
        timestamp_ms,
        data: EventData::Outgoing(Outgoing {
            message_id: Some(mid.to_owned()),
            recipient_id: psid.clone(),
            request: json!({"recipient": {"id": psid}, "message": request_message}),
            response: json!({"recipient_id": psid, "message_id": mid}),
            app_id: field_string(Some(message), "app_id"),
            from_echo: true,
            succeeded: true,
            web_urls: web_urls(message),
            intent: None,
            platform_user_json: None,
        }),
        webhook: None,
    }
}

/// The `url` of every `"type": "web_url"` button (or `default_action`) anywhere in the payload
/// of a Send API `message.attachment`, or of each `attachments[]` item as echoes carry them.
/// In order of appearance, each URL once.
pub fn web_urls(message: &Value) -> Vec<String> {
    let mut urls = Vec::new();
    if let Some(payload) = message.get("attachment").and_then(|a| a.get("payload")) {
        collect_web_urls(payload, 0, &mut urls);
    }
    for attachment in message
        .get("attachments")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(payload) = attachment.get("payload") {
            collect_web_urls(payload, 0, &mut urls);
        }
    }
    urls
}

/// Deeper than any template Meta defines; bounds the recursion for values built elsewhere.
const MAX_DEPTH: usize = 32;

fn collect_web_urls(value: &Value, depth: usize, urls: &mut Vec<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    match value {
        Value::Object(fields) => {
            let is_web_url = fields.get("type").and_then(Value::as_str) == Some("web_url");
            if let (true, Some(url)) = (is_web_url, fields.get("url").and_then(Value::as_str))
                && !urls.iter().any(|seen| seen == url)
            {
                urls.push(url.to_owned());
            }
            for nested in fields.values() {
                collect_web_urls(nested, depth + 1, urls);
            }
        }
        Value::Array(items) => {
            for nested in items {
                collect_web_urls(nested, depth + 1, urls);
            }
        }
        _ => {}
    }
}

fn referral(value: &Value) -> Option<Referral> {
    value.as_object()?;
    let text = |name: &str| field_string(Some(value), name);
    Some(Referral {
        source: text("source"),
        referral_type: text("type"),
        ref_param: text("ref"),
        ad_id: text("ad_id"),
        referer_uri: text("referer_uri"),
    })
}

fn parse_value(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

/// `value[name]` as a string, when it is a string or a number (ids come as either).
fn field_string(value: Option<&Value>, name: &str) -> Option<String> {
    value
        .and_then(|value| value.get(name))
        .and_then(scalar_string)
}

fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// An integer given as a JSON number or as a string of digits.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            text.parse().ok()
        }
        _ => None,
    }
}

/// A positive timestamp in milliseconds; values that look like seconds are scaled.
fn millis(value: &Value) -> Option<i64> {
    integer(value).filter(|&t| t > 0).map(|t| {
        if t < SECONDS_LIMIT {
            t.saturating_mul(1000)
        } else {
            t
        }
    })
}

fn is_true(value: Option<&Value>) -> bool {
    matches!(value, Some(Value::Bool(true))) || value.and_then(Value::as_str) == Some("true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::verify::{SignatureHeaders, verify_webhook};
    use crate::signing::sign_sha256;
    use bytes::Bytes;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const SECRET: &[u8] = b"test_app_secret";
    const RECEIVED_AT: i64 = 1_700_000_000_000;

    fn verified(body: &[u8]) -> Result<VerifiedBody, Box<dyn std::error::Error>> {
        let header = sign_sha256(SECRET, body);
        let headers = SignatureHeaders {
            sha256: Some(&header),
            sha1: None,
        };
        Ok(verify_webhook(
            SECRET,
            false,
            headers,
            Bytes::from(body.to_vec()),
        )?)
    }

    fn fixture(name: &str) -> Result<String, Box<dyn std::error::Error>> {
        let path = format!(
            "{}/tests/data/messenger/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        Ok(std::fs::read_to_string(path)?)
    }

    fn normalize_text(text: &str) -> Result<Normalized, Box<dyn std::error::Error>> {
        Ok(normalize(&verified(text.as_bytes())?, RECEIVED_AT)?)
    }

    /// Normalizes a fixture, checks the invariants every body must keep, and snapshots the result.
    fn check(name: &str) -> TestResult {
        let body = fixture(name)?;
        let normalized = normalize_text(&body)?;
        for event in &normalized.events {
            match (&event.source, &event.webhook) {
                (Source::Webhook, Some(origin)) => {
                    assert!(
                        body.contains(origin.item.get()),
                        "{name}: item not verbatim"
                    );
                    assert!(body.contains(origin.entry_id.get()), "{name}: entry id");
                }
                (Source::Outgoing, None) => assert_eq!(event.kind, EventKind::Outgoing),
                _ => panic!("{name}: webhook origin does not match the source"),
            }
        }
        let again = normalize_text(&body)?;
        let ids = |n: &Normalized| n.events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(&normalized),
            ids(&again),
            "{name}: ids are not deterministic"
        );

        let snapshot = format!(
            "object: {:?}\nis_batch: {}\nignored: {}\nevents: {}\n",
            normalized.object,
            normalized.is_batch,
            normalized.ignored,
            serde_json::to_string_pretty(&normalized.events)?
        );
        insta::assert_snapshot!(name, snapshot);
        Ok(())
    }

    #[test]
    fn lone_surrogate_escapes_become_replacement_characters() {
        assert_eq!(
            replace_lone_surrogates(
                r#"{"a":"cut \ud83d","b":"\ud83d\ude00 \u00e9 \\ud83d \udc00x \"\n"}"#
            ),
            r#"{"a":"cut \ufffd","b":"\ud83d\ude00 \u00e9 \\ud83d \ufffdx \"\n"}"#
        );
        assert_eq!(replace_lone_surrogates("plain é"), "plain é");
    }

    /// A message whose text was cut inside an emoji is stored and forwarded, not dropped.
    #[test]
    fn an_item_with_a_lone_surrogate_is_kept_with_its_raw_bytes() -> TestResult {
        let body = br#"{"object":"page","entry":[{"id":"111","time":1700000000000,"messaging":[{"sender":{"id":"U1"},"recipient":{"id":"111"},"timestamp":1700000000000,"message":{"mid":"m.cut","text":"cut \ud83d"}}]}]}"#;
        let normalized = normalize(&verified(body)?, RECEIVED_AT)?;
        assert_eq!(normalized.ignored, 0);
        let [event] = normalized.events.as_slice() else {
            return Err(format!("{} events", normalized.events.len()).into());
        };
        assert_eq!(event.kind, EventKind::Message);
        let raw = event
            .webhook
            .as_ref()
            .map(|webhook| webhook.item.get().to_owned());
        assert!(raw.is_some_and(|raw| raw.contains(r"cut \ud83d")));
        match &event.data {
            EventData::Message { text, .. } => assert_eq!(text.as_deref(), Some("cut \u{fffd}")),
            other => return Err(format!("{other:?}").into()),
        }
        Ok(())
    }

    /// Two edits of one message are two events (an edit reuses the message's `mid`), and so are
    /// two different feedbacks on one bot message; Meta's retry of either is the same event.
    #[test]
    fn edits_and_feedback_are_keyed_by_what_they_add_to_the_mid() -> TestResult {
        for name in ["message-edits", "response-feedback"] {
            let body = fixture(name)?;
            let events = normalize(&verified(body.as_bytes())?, 1)?.events;
            assert_eq!(events.len(), 2, "{name}");
            assert_ne!(events[0].id, events[1].id, "{name}");
            let again = normalize(&verified(body.as_bytes())?, 2)?.events;
            assert_eq!(
                events[0].id, again[0].id,
                "{name}: a retry is the same event"
            );
        }
        Ok(())
    }

    /// One snapshot test per payload file: `test_name => "file-name"`.
    macro_rules! snapshot_cases {
        ($($test:ident => $file:literal,)*) => {
            $(
                #[test]
                fn $test() -> TestResult {
                    check($file)
                }
            )*
            const SNAPSHOT_FILES: &[&str] = &[$($file),*];
        };
    }

    snapshot_cases! {
        // The fixtures from Meta's documentation.
        message_attachment => "message-attachment",
        message_deliveries => "message-deliveries",
        message_echo => "message-echo",
        message_reactions => "message-reactions",
        message_reads => "message-reads",
        message_reply_to => "message-reply-to",
        message_text_legacy_seq => "message-text-legacy-seq",
        message_text_quick_reply => "message-text-quick-reply",
        messaging_account_linking => "messaging-account-linking",
        messaging_handovers_pass_thread_control => "messaging-handovers-pass-thread-control",
        messaging_optins_notification_messages => "messaging-optins-notification-messages",
        messaging_optins_plugin => "messaging-optins-plugin",
        messaging_postbacks => "messaging-postbacks",
        messaging_referrals_ads => "messaging-referrals-ads",
        messaging_referrals_shortlink => "messaging-referrals-shortlink",
        // Synthetic payloads for the shapes the documentation fixtures lack.
        batch_multi_entry => "batch-multi-entry",
        batch_tolerated_parts => "batch-tolerated-parts",
        standby => "standby",
        handovers_app_roles => "handovers-app-roles",
        handovers_take_request => "handovers-take-request",
        policy_enforcement_underscore => "policy-enforcement-underscore",
        policy_enforcement_hyphen => "policy-enforcement-hyphen",
        referrals_chat_plugin => "referrals-chat-plugin",
        instagram => "instagram",
        numeric_ids => "numeric-ids",
        dashboard_test_format => "dashboard-test-format",
        unknown_kind => "unknown-kind",
        optins_checkbox_no_sender => "optins-checkbox-no-sender",
        message_ad_referral => "message-ad-referral",
        message_edits => "message-edits",
        response_feedback => "response-feedback",
        message_sticker_and_ig_post => "message-sticker-and-ig-post",
    }

    #[test]
    fn every_payload_file_has_a_snapshot_case() -> TestResult {
        let dir = format!("{}/tests/data/messenger", env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json") {
                files.push(stem.to_owned());
            }
        }
        files.sort();
        let mut cases: Vec<String> = SNAPSHOT_FILES.iter().map(|f| f.to_string()).collect();
        cases.sort();
        assert_eq!(files, cases);
        Ok(())
    }

    /// The text between `"messaging": [` and the closing `]` of a one-item pretty-printed fixture.
    fn only_item(body: &str) -> Option<&str> {
        let start = body.find("\"messaging\": [")? + "\"messaging\": [".len();
        let end = start + body[start..].find("\n      ]")?;
        Some(body[start..end].trim())
    }

    #[test]
    fn raw_item_is_the_exact_substring_with_its_escapes() -> TestResult {
        for (name, escape, time) in [
            ("message-reactions", r"\u2764\ufe0f", "1458668856463"),
            (
                "referrals-chat-plugin",
                r"https:\/\/www.example.com\/pricing",
                "1458692752478",
            ),
        ] {
            let body = fixture(name)?;
            let expected = only_item(&body).ok_or("fixture layout")?;
            assert!(expected.contains(escape), "{name}");
            let normalized = normalize_text(&body)?;
            let origin = normalized.events[0].webhook.as_ref().ok_or("no origin")?;
            assert_eq!(origin.item.get(), expected, "{name}");
            assert_eq!(origin.entry_id.get(), "\"<PAGE_ID>\"");
            assert_eq!(origin.entry_time.as_deref().map(RawValue::get), Some(time));
        }
        Ok(())
    }

    #[test]
    fn numeric_entry_id_and_time_stay_verbatim() -> TestResult {
        let normalized = normalize_text(&fixture("numeric-ids")?)?;
        let origin = normalized.events[0].webhook.as_ref().ok_or("no origin")?;
        assert_eq!(origin.entry_id.get(), "1134713619900975");
        assert_eq!(
            origin.entry_time.as_deref().map(RawValue::get),
            Some("1492414608")
        );
        assert_eq!(
            normalized.events[0].page_id.as_deref(),
            Some("1134713619900975")
        );
        assert_eq!(
            normalized.events[0].user_id.as_deref(),
            Some("1412611362105802")
        );
        Ok(())
    }

    #[test]
    fn echo_yields_the_echo_and_its_outgoing_send() -> TestResult {
        let normalized = normalize_text(&fixture("message-echo")?)?;
        let [echo, outgoing] = normalized.events.as_slice() else {
            return Err(format!("expected two events, got {}", normalized.events.len()).into());
        };
        let mid = "mid.1457764197618:41d102a3e1ae206a38";
        assert_eq!(echo.kind, EventKind::Echo);
        assert_eq!(echo.source, Source::Webhook);
        assert_eq!(echo.id, EventId::derive(&[b"echo", mid.as_bytes()]));
        assert_eq!(echo.user_id.as_deref(), Some("<PSID>"));
        assert_eq!(outgoing.kind, EventKind::Outgoing);
        assert_eq!(outgoing.source, Source::Outgoing);
        assert_eq!(outgoing.id, EventId::outgoing(mid));
        assert!(outgoing.webhook.is_none());
        assert_eq!(outgoing.user_id, echo.user_id);
        assert_eq!(outgoing.page_id, echo.page_id);
        assert_eq!(outgoing.timestamp_ms, echo.timestamp_ms);
        let EventData::Outgoing(send) = &outgoing.data else {
            return Err("outgoing data".into());
        };
        assert_eq!(send.app_id.as_deref(), Some("1517776481860111"));
        assert_eq!(
            send.request,
            json!({"recipient": {"id": "<PSID>"}, "message": {
                "metadata": "<DEVELOPER_DEFINED_METADATA_STRING>", "text": "hello, world!"}})
        );
        assert_eq!(
            send.response,
            json!({"recipient_id": "<PSID>", "message_id": mid})
        );
        assert!(send.from_echo && send.succeeded);
        Ok(())
    }

    #[test]
    fn echo_without_mid_has_no_outgoing_event() -> TestResult {
        let body = r#"{"object":"page","entry":[{"id":"1","time":1458692752478,"messaging":[{"sender":{"id":"1"},"recipient":{"id":"2"},"timestamp":1458692752478,"message":{"is_echo":true,"app_id":5,"text":"x"}}]}]}"#;
        let normalized = normalize_text(body)?;
        assert_eq!(normalized.events.len(), 1);
        assert_eq!(normalized.events[0].kind, EventKind::Echo);
        Ok(())
    }

    #[test]
    fn standby_echo_reports_the_web_url_button() -> TestResult {
        let normalized = normalize_text(&fixture("standby")?)?;
        let kinds: Vec<_> = normalized
            .events
            .iter()
            .map(|e| (e.kind, e.webhook.as_ref().map(|w| w.channel)))
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Message, Some(Channel::Messaging)),
                (EventKind::Echo, Some(Channel::Standby)),
                (EventKind::Outgoing, None),
                (EventKind::Postback, Some(Channel::Standby)),
            ]
        );
        let EventData::Outgoing(send) = &normalized.events[2].data else {
            return Err("outgoing data".into());
        };
        assert_eq!(
            send.web_urls,
            ["https://shop.example.com/open?utm_source=messenger"]
        );
        let EventData::Postback { payload, title, .. } = &normalized.events[3].data else {
            return Err("postback data".into());
        };
        assert_eq!(
            (payload.as_deref(), title.as_deref()),
            (None, Some("Talk to us"))
        );
        Ok(())
    }

    #[test]
    fn web_urls_walks_buttons_elements_and_default_actions() {
        let message = json!({"attachment": {"type": "template", "payload": {
            "template_type": "generic",
            "elements": [
                {"title": "a", "default_action": {"type": "web_url", "url": "https://a.example/d"},
                 "buttons": [{"type": "web_url", "url": "https://a.example/1", "title": "1"},
                             {"type": "postback", "url": "https://not.example", "payload": "P"}]},
                {"title": "b", "buttons": [{"type": "web_url", "url": "https://a.example/1"},
                                           {"type": "web_url", "url": "https://b.example/2"}]}
            ],
            "buttons": [{"type": "web_url", "url": "https://c.example/3"}]
        }}});
        assert_eq!(
            web_urls(&message),
            [
                "https://a.example/d",
                "https://a.example/1",
                "https://b.example/2",
                "https://c.example/3"
            ]
        );
        assert!(web_urls(&json!({"text": "hi", "quick_replies": []})).is_empty());
        assert!(web_urls(&Value::Null).is_empty());
    }

    #[test]
    fn ids_follow_the_spec_rules() -> TestResult {
        let normalized = normalize_text(&fixture("message-text-quick-reply")?)?;
        assert_eq!(
            normalized.events[0].id,
            EventId::derive(&[b"message", b"mid.1457764197618:41d102a3e1ae206a38"])
        );
        let normalized = normalize_text(&fixture("message-deliveries")?)?;
        assert_eq!(
            normalized.events[0].id,
            EventId::derive(&[b"delivery", b"<PAGE_ID>", b"<PSID>", b"1458668856253"])
        );
        // A watermark as a string and as a number give the same read id.
        let numeric = normalize_text(&fixture("numeric-ids")?)?;
        let delivery = &numeric.events[3];
        assert_eq!(delivery.kind, EventKind::Delivery);
        assert_eq!(
            delivery.id,
            EventId::derive(&[
                b"delivery",
                b"1134713619900975",
                b"1412611362105802",
                b"1492414609500"
            ])
        );
        let reaction = normalize_text(&fixture("message-reactions")?)?;
        let item = reaction.events[0]
            .webhook
            .as_ref()
            .ok_or("origin")?
            .item
            .get();
        assert_eq!(
            reaction.events[0].id,
            EventId::derive(&[b"reaction", b"<PAGE_ID>", b"<PSID>", item.as_bytes()])
        );
        Ok(())
    }

    #[test]
    fn timestamps_fall_back_from_item_to_entry_to_receipt() -> TestResult {
        // "TIMESTAMP" is not a number: the entry time is used.
        let optin = normalize_text(&fixture("messaging-optins-notification-messages")?)?;
        assert_eq!(optin.events[0].timestamp_ms, 1458692752478);
        // No item timestamp, entry time in seconds.
        let numeric = normalize_text(&fixture("numeric-ids")?)?;
        assert_eq!(numeric.events[1].timestamp_ms, 1492414609500);
        assert_eq!(numeric.events[3].timestamp_ms, 1492414608000);
        assert_eq!(numeric.events[4].timestamp_ms, 1492414610000);
        let bare = r#"{"object":"page","entry":[{"id":"1","messaging":[{"sender":{"id":"2"},"read":{"watermark":5}}]}]}"#;
        assert_eq!(normalize_text(bare)?.events[0].timestamp_ms, RECEIVED_AT);
        Ok(())
    }

    #[test]
    fn account_linking_keeps_the_authorization_code_out_of_the_data() -> TestResult {
        let normalized = normalize_text(&fixture("messaging-account-linking")?)?;
        let data = serde_json::to_string(&normalized.events[0].data)?;
        assert!(!data.contains("PASS_THROUGH_AUTHORIZATION_CODE"), "{data}");
        assert_eq!(
            normalized.events[0].data,
            EventData::AccountLinking {
                status: Some("linked".into())
            }
        );
        Ok(())
    }

    #[test]
    fn non_json_is_an_error() -> TestResult {
        for body in [
            &b"not json"[..],
            b"",
            b"{\"object\":\"page\"",
            b"{} trailing",
            b"\"\xff\"",
        ] {
            let result = normalize(&verified(body)?, RECEIVED_AT);
            assert!(
                matches!(result, Err(NormalizeError::NotJson(_))),
                "{body:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn json_without_an_entry_array_is_not_a_batch() -> TestResult {
        for body in [
            r#"{"field":"messages","value":{}}"#,
            r#"[{"object":"page","entry":[]}]"#,
            r#""page""#,
            "null",
            r#"{"object":"page","entry":{"id":"1"}}"#,
            r#"{"object":7,"entry":null}"#,
        ] {
            let normalized = normalize_text(body)?;
            assert!(!normalized.is_batch, "{body}");
            assert!(normalized.events.is_empty(), "{body}");
        }
        let empty = normalize_text(r#"{"object":"page","entry":[]}"#)?;
        assert!(empty.is_batch && empty.events.is_empty());
        assert_eq!(empty.object.as_deref(), Some("page"));
        Ok(())
    }

    #[test]
    fn missing_object_defaults_to_page_in_the_origin() -> TestResult {
        let body = r#"{"entry":[{"id":"1","messaging":[{"sender":{"id":"2"},"timestamp":1458692752478,"message":{"mid":"m"}}]}]}"#;
        let normalized = normalize_text(body)?;
        assert_eq!(normalized.object, None);
        let origin = normalized.events[0].webhook.as_ref().ok_or("origin")?;
        assert_eq!(origin.object, "page");
        assert!(origin.entry_time.is_none());
        Ok(())
    }
}
