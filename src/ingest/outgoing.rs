//! The bot's sends: the only file that knows Send API and Dashbot-outgoing JSON. `POST /outgoing`
//! items (Dashbot's `{url, qs, method, json, responseBody}` or `{request, response, page_id}`)
//! become `outgoing` events; the Send API proxy (`proxy.rs`) builds its event here too
//! ([`proxied_send`]). Page tokens are dropped on receipt: never stored or logged.

use crate::event::{Event, EventData, EventId, EventKind, Outgoing, Source};
use crate::ingest::messenger::web_urls;
use crate::ingest::{BadItem, ReportItems, item_object};
use serde_json::{Map, Value};

/// Keys whose values are credentials: removed from a reported request (and never read from
/// `qs`, which is not kept at all).
pub(super) const TOKEN_KEYS: [&str; 4] = [
    "access_token",
    "appsecret_proof",
    "appsecret_time",
    "apiKey",
];

/// The field names of one of the two item shapes, for error messages.
struct Shape {
    request: &'static str,
    response: &'static str,
}

/// What `dashbot.logOutgoing(requestData, responseBody)` bots build.
const DASHBOT: Shape = Shape {
    request: "json",
    response: "responseBody",
};

/// `{request, response, page_id?}`.
const REPORT: Shape = Shape {
    request: "request",
    response: "response",
};

/// Turns a `/outgoing` body into events, one per item, or names the first bad item.
pub fn normalize(
    items: &ReportItems<'_>,
    received_at_ms: i64,
    app_id: Option<&str>,
) -> Result<Vec<Event>, BadItem> {
    items
        .iter()
        .map(|(label, raw)| {
            let fields = item_object(label, raw)?;
            report_event(&fields, received_at_ms, app_id)
                .map_err(|problem| BadItem::new(label, problem))
        })
        .collect()
}

/// One item in either shape → its event; `Err` names the bad field.
fn report_event(
    item: &Map<String, Value>,
    received_at_ms: i64,
    app_id: Option<&str>,
) -> Result<Event, String> {
    let shape = if item.contains_key("request") || item.contains_key("response") {
        &REPORT
    } else if ["json", "responseBody", "url", "uri"]
        .iter()
        .any(|key| item.contains_key(*key))
    {
        &DASHBOT
    } else {
        return Err("json is missing (or request, in the {request, response} shape)".to_owned());
    };
    let mut request = object(item, shape.request)?;
    // The credentials the bot sent with this call: dropped from the request, and masked
    // wherever Graph's answer quotes them ("Malformed access token EAA…").
    let mut credentials: Vec<String> = object_credentials(&request).collect();
    for key in TOKEN_KEYS {
        request.remove(key);
    }
    if let Some(Value::Object(qs)) = item.get("qs") {
        credentials.extend(object_credentials(qs));
    }
    for name in ["url", "uri"] {
        if let Some((_, query)) = item
            .get(name)
            .and_then(Value::as_str)
            .and_then(|url| url.split_once('?'))
        {
            credentials.extend(form_credentials(query.as_bytes()));
        }
    }
    // A send the bot could not complete at all may come without an answer.
    let mut response = match item.get(shape.response) {
        None | Some(Value::Null) => Map::new(),
        Some(_) => object(item, shape.response)?,
    };
    let redactor = crate::redact::Redactor::new(credentials);
    for value in response.values_mut() {
        redact_strings(value, &redactor);
    }

    let recipient = match request.get("recipient") {
        Some(Value::Object(recipient)) => recipient,
        None | Some(Value::Null) => return Err(format!("{}.recipient is missing", shape.request)),
        Some(_) => return Err(format!("{}.recipient must be an object", shape.request)),
    };
    let recipient_field = |name: &str| {
        id_field(recipient.get(name), || {
            format!("{}.recipient.{name}", shape.request)
        })
    };
    let response_recipient = id_field(response.get("recipient_id"), || {
        format!("{}.recipient_id", shape.response)
    })?;
    // A send by phone number or notification token names no user, and Graph answers it
    // without a recipient_id: it is recorded with no user (sinks that need one skip it).
    let user_id = recipient_field("id")?
        .or(recipient_field("user_ref")?)
        .or_else(|| response_recipient.clone());
    let message = match request.get("message") {
        None | Some(Value::Null) => Value::Null,
        Some(message @ Value::Object(_)) => message.clone(),
        Some(_) => return Err(format!("{}.message must be an object", shape.request)),
    };
    let message_id = match response.get("message_id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        None | Some(Value::Null) => None,
        Some(_) => {
            return Err(format!(
                "{}.message_id must be a non-empty string",
                shape.response
            ));
        }
    };

    let page_id = match id_field(item.get("page_id"), || "page_id".to_owned())? {
        Some(page) => Some(page),
        None => {
            let mut page = None;
            for name in ["url", "uri"] {
                match item.get(name) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(url)) => {
                        page = page_in_url(url);
                        break;
                    }
                    Some(_) => return Err(format!("{name} must be a string")),
                }
            }
            page
        }
    };
    let passed = |name: &str| item.get(name).filter(|value| !value.is_null()).cloned();

    let request = Value::Object(request);
    let response = Value::Object(response);
    let id = match &message_id {
        Some(message_id) => EventId::outgoing(message_id),
        // A refused send: no id of Graph's to share; identical reports still collapse.
        None => EventId::derive(&[
            b"outgoing-unsent",
            request.to_string().as_bytes(),
            response.to_string().as_bytes(),
        ]),
    };
    Ok(Event {
        id,
        source: Source::Outgoing,
        kind: EventKind::Outgoing,
        page_id,
        user_id: user_id.clone(),
        timestamp_ms: received_at_ms,
        data: EventData::Outgoing(Outgoing {
            succeeded: message_id.is_some(),
            message_id,
            recipient_id: response_recipient.or(user_id),
            web_urls: web_urls(&message),
            request,
            response,
            app_id: app_id.map(str::to_owned),
            from_echo: false,
            intent: passed("intent"),
            platform_user_json: passed("platformUserJson"),
        }),
        webhook: None,
    })
}

/// Masks `redactor`'s secrets (and every `access_token`-like value) in each string of `value`.
fn redact_strings(value: &mut Value, redactor: &crate::redact::Redactor) {
    match value {
        Value::String(text) => *text = redactor.redact(text),
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| redact_strings(item, redactor)),
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                if TOKEN_KEYS.contains(&key.as_str()) && field.is_string() {
                    *field = Value::String(crate::redact::MASK.to_owned());
                } else {
                    redact_strings(field, redactor);
                }
            }
        }
        _ => {}
    }
}

/// A required object field, cloned.
fn object(item: &Map<String, Value>, name: &str) -> Result<Map<String, Value>, String> {
    match item.get(name) {
        Some(Value::Object(fields)) => Ok(fields.clone()),
        None | Some(Value::Null) => Err(format!("{name} is missing")),
        Some(_) => Err(format!("{name} must be an object")),
    }
}

/// An optional id: a non-empty string, or a number (ids may come as numbers).
fn id_field(
    value: Option<&Value>,
    name: impl FnOnce() -> String,
) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if !id.is_empty() => Ok(Some(id.clone())),
        Some(Value::Number(id)) => Ok(Some(id.to_string())),
        Some(_) => Err(format!("{} must be a non-empty string", name())),
    }
}

/// The page of a Send API URL: `.../<version>/<page_or_me>/messages`; `me` (or no such path)
/// gives `None`. Absolute URLs and bare paths both work; the query is ignored.
fn page_in_url(url: &str) -> Option<String> {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let path = match without_query.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, path)| path),
        None => without_query,
    };
    let segments: Vec<&str> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .collect();
    match segments.as_slice() {
        [.., page, "messages"] if *page != "me" => Some((*page).to_owned()),
        _ => None,
    }
}

/// The event for a send that went through the proxy, exactly as if the bot had POSTed
/// `{request, response, page_id}` to `/outgoing`. `request` holds the call's Send API fields
/// (see `request_fields`). `Err` says why nothing is recorded (Graph refused the send, or did
/// not say which message it sent).
pub fn proxied_send(
    request: Map<String, Value>,
    response_body: &[u8],
    page_or_me: &str,
    received_at_ms: i64,
    app_id: Option<&str>,
) -> Result<Event, String> {
    let response: Value = serde_json::from_slice(response_body)
        .map_err(|_| "Graph's answer is not JSON".to_owned())?;
    if response.get("message_id").and_then(Value::as_str).is_none() {
        return Err("Graph's answer has no message_id".to_owned());
    }
    let request = Value::Object(request);
    let mut item = Map::new();
    item.insert("request".into(), request);
    item.insert("response".into(), response);
    if page_or_me != "me" {
        item.insert("page_id".into(), Value::String(page_or_me.to_owned()));
    }
    report_event(&item, received_at_ms, app_id)
}

/// The values of the credential keys (`TOKEN_KEYS`) in a query string or form body.
pub(super) fn form_credentials(form: &[u8]) -> impl Iterator<Item = String> + '_ {
    url::form_urlencoded::parse(form)
        .filter(|(name, _)| TOKEN_KEYS.contains(&name.as_ref()))
        .map(|(_, value)| value.into_owned())
}

/// The string values of the credential keys (`TOKEN_KEYS`) among a JSON object's own fields.
pub(super) fn object_credentials(object: &Map<String, Value>) -> impl Iterator<Item = String> + '_ {
    TOKEN_KEYS
        .iter()
        .filter_map(|key| object.get(*key)?.as_str().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn one(body: &Value) -> Result<Vec<Event>, BadItem> {
        let bytes = body.to_string();
        let items = ReportItems::parse(bytes.as_bytes())
            .map_err(|error| BadItem::new(None, error.to_string()))?;
        normalize(&items, 1_700_000_000_000, Some("42"))
    }

    fn outgoing(event: &Event) -> Option<&Outgoing> {
        match &event.data {
            EventData::Outgoing(outgoing) => Some(outgoing),
            _ => None,
        }
    }

    #[test]
    fn dashbot_shape_drops_the_token_and_takes_the_page_from_the_url() -> TestResult {
        let events = one(&json!({
            "url": "https://graph.facebook.com/v20.0/111/messages",
            "qs": {"access_token": "PAGE-TOKEN"},
            "method": "POST",
            "json": {"recipient": {"id": "U1"}, "message": {"text": "hi"}, "access_token": "PAGE-TOKEN"},
            "responseBody": {"recipient_id": "U1", "message_id": "m_1"},
            "intent": {"name": "greet"},
            "platformUserJson": {"first_name": "A"}
        }))?;
        let [event] = events.as_slice() else {
            return Err("one event".into());
        };
        assert_eq!(event.id, EventId::outgoing("m_1"));
        assert_eq!(
            (event.source, event.kind),
            (Source::Outgoing, EventKind::Outgoing)
        );
        assert_eq!(event.page_id.as_deref(), Some("111"));
        assert_eq!(event.user_id.as_deref(), Some("U1"));
        assert_eq!(event.timestamp_ms, 1_700_000_000_000);
        let sent = outgoing(event).ok_or("outgoing data")?;
        assert!(sent.succeeded && !sent.from_echo);
        assert_eq!(sent.app_id.as_deref(), Some("42"));
        assert_eq!(sent.intent, Some(json!({"name": "greet"})));
        assert_eq!(sent.platform_user_json, Some(json!({"first_name": "A"})));
        assert!(!serde_json::to_string(event)?.contains("PAGE-TOKEN"));
        Ok(())
    }

    #[test]
    fn report_shape_with_page_id_and_web_urls() -> TestResult {
        let events = one(&json!([{
            "request": {"recipient": {"id": 5}, "message": {"attachment": {"type": "template", "payload": {
                "template_type": "button", "text": "t",
                "buttons": [{"type": "web_url", "url": "https://smart.link/x", "title": "Go"}]}}}},
            "response": {"message_id": "m_2"},
            "page_id": 222
        }]))?;
        let [event] = events.as_slice() else {
            return Err("one event".into());
        };
        assert_eq!(event.page_id.as_deref(), Some("222"));
        assert_eq!(event.user_id.as_deref(), Some("5"));
        let sent = outgoing(event).ok_or("outgoing data")?;
        assert_eq!(sent.web_urls, vec!["https://smart.link/x".to_owned()]);
        assert_eq!(sent.recipient_id.as_deref(), Some("5"));
        Ok(())
    }

    #[test]
    fn a_graph_error_is_a_failed_send_with_a_stable_id() -> TestResult {
        let body = json!({
            "uri": "https://graph.facebook.com/v2.6/me/messages",
            "json": {"recipient": {"id": "U1"}, "message": {"text": "hi"}},
            "responseBody": {"error": {"code": 551, "message": "This person isn't available"}}
        });
        let first = one(&body)?;
        let again = one(&body)?;
        let [event] = first.as_slice() else {
            return Err("one event".into());
        };
        assert_eq!(event.page_id, None);
        assert!(!outgoing(event).ok_or("outgoing data")?.succeeded);
        assert_eq!(Some(&event.id), again.first().map(|event| &event.id));
        Ok(())
    }

    #[test]
    fn a_send_to_a_phone_number_is_recorded_without_a_user() -> TestResult {
        let events = one(&json!({
            "request": {"recipient": {"phone_number": "+15555550100"}, "message": {"text": "hi"}},
            "response": {"message_id": "m_phone_1"}
        }))?;
        assert_eq!(events[0].user_id, None);
        assert_eq!(events[0].id, EventId::outgoing("m_phone_1"));
        // A call that got no answer at all is a failed send.
        let unanswered =
            one(&json!({"json": {"recipient": {"id": "U"}, "message": {"text": "x"}}}))?;
        assert!(matches!(&unanswered[0].data, EventData::Outgoing(sent) if !sent.succeeded));
        Ok(())
    }

    #[test]
    fn a_token_that_graph_quotes_back_is_not_kept() -> TestResult {
        let token = "EAABsbCS1iHgBAKZCZA4token1234567890";
        let events = one(&json!({
            "uri": format!("https://graph.facebook.com/v20.0/me/messages?access_token={token}"),
            "qs": {"access_token": token},
            "json": {"recipient": {"id": "U"}, "message": {"text": "x"}, "appsecret_proof": "pr00f-value"},
            "responseBody": {"error": {"code": 190, "message": format!("Malformed access token {token}"),
                             "access_token": "other"}}
        }))?;
        let stored = serde_json::to_string(&events[0])?;
        for secret in [token, "pr00f-value", "other"] {
            assert!(!stored.contains(secret), "{secret} kept: {stored}");
        }
        assert!(
            stored.contains("Malformed access token [redacted]"),
            "{stored}"
        );
        Ok(())
    }

    #[test]
    fn bad_items_are_named_with_their_field() {
        let cases = [
            (
                json!([{"json": {"recipient": {"id": "U"}}, "responseBody": {}}, {"json": {"recipient": "U"}, "responseBody": {}}]),
                "item 1: json.recipient must be an object",
            ),
            (
                json!({"json": {"message": {}}, "responseBody": {}}),
                "json.recipient is missing",
            ),
            (
                json!({"request": {"recipient": {"id": "U"}}, "response": []}),
                "response must be an object",
            ),
            (
                json!({"request": {"recipient": {"id": "U"}}, "response": {"message_id": 7}}),
                "response.message_id must be a non-empty string",
            ),
            (
                json!({"url": 3, "json": {"recipient": {"id": "U"}}, "responseBody": {}}),
                "url must be a string",
            ),
            (
                json!({"text": "hi"}),
                "json is missing (or request, in the {request, response} shape)",
            ),
            (json!([1]), "item 0: must be a JSON object"),
        ];
        for (body, expected) in cases {
            assert_eq!(
                one(&body).err().map(|error| error.to_string()).as_deref(),
                Some(expected),
                "{body}"
            );
        }
    }

    #[test]
    fn pages_in_send_api_urls() {
        assert_eq!(
            page_in_url("https://graph.facebook.com/v20.0/111/messages?access_token=x").as_deref(),
            Some("111")
        );
        assert_eq!(page_in_url("/v2.6/me/messages"), None);
        assert_eq!(
            page_in_url("https://graph.facebook.com/v2.6/me/messages"),
            None
        );
        assert_eq!(page_in_url("https://graph.facebook.com/"), None);
        assert_eq!(page_in_url("v20.0/222/messages").as_deref(), Some("222"));
    }

    fn json_object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(object) => object,
            _ => Map::new(),
        }
    }

    #[test]
    fn proxied_sends_are_recorded_only_when_graph_gave_a_message_id() -> TestResult {
        let request =
            json_object(serde_json::json!({"recipient": {"id": "U1"}, "message": {"text": "hi"}}));
        let event = proxied_send(
            request.clone(),
            br#"{"recipient_id":"U1","message_id":"m_9"}"#,
            "333",
            5,
            None,
        )?;
        assert_eq!(event.id, EventId::outgoing("m_9"));
        assert_eq!(event.page_id.as_deref(), Some("333"));
        assert!(proxied_send(request, br#"{"error":{"code":190}}"#, "333", 5, None).is_err());
        Ok(())
    }
}
