//! The bot's sends: the only file that knows Send API and Dashbot-outgoing JSON. `POST /outgoing`
//! items (Dashbot's `{url, qs, method, json, responseBody}` or `{request, response, page_id}`)
//! become `outgoing` events, and the Send API proxy forwards the bot's call to Graph verbatim
//! and records the send the same way. Page tokens are dropped on receipt: never stored or logged.

use crate::clock::now_ms;
use crate::event::{Event, EventData, EventId, EventKind, Outgoing, Source};
use crate::ingest::messenger::{from_str_lenient, web_urls};
use crate::ingest::{AppState, BadItem, IngestError, ReportItems, item_object, store};
use crate::sinks::graph_error::GraphError;
use crate::telemetry::metric;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Map, Value};

/// Keys whose values are credentials: removed from a reported request (and never read from
/// `qs`, which is not kept at all).
const TOKEN_KEYS: [&str; 4] = [
    "access_token",
    "appsecret_proof",
    "appsecret_time",
    "apiKey",
];

/// Request headers the proxy passes on to Graph.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 2] = [header::CONTENT_TYPE, header::AUTHORIZATION];

/// Graph's response headers the proxy hands back: the content type, and the rate-limit usage
/// and trace headers a bot may act on.
const FORWARDED_RESPONSE_HEADERS: [&str; 6] = [
    "content-type",
    "x-app-usage",
    "x-page-usage",
    "x-business-use-case-usage",
    "x-fb-trace-id",
    "retry-after",
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

/// A path segment of the proxy route that is safe to put into Graph's URL as it is.
fn plain_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

/// `POST /graph/{version}/{page_or_me}/messages`: forwards the bot's Send API call to
/// `{graph.base_url}/{version}/{page_or_me}/messages` with its query string (the page token
/// included) and body unchanged, answers with Graph's status, content type and body, and records
/// a successful send as an outgoing event. The query string is never logged or stored.
pub async fn proxy(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let body = body.map_err(|rejection| {
        IngestError::from_body(rejection, state.config.server.max_body_bytes)
    })?;
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let [_graph, version, page_or_me, _messages] = segments.as_slice() else {
        return Err(IngestError::BadRequest("unexpected path".to_owned()));
    };
    if !plain_segment(version) || !plain_segment(page_or_me) {
        return Err(IngestError::BadRequest(
            "version and page must be plain path segments".to_owned(),
        ));
    }
    let graph = &state.config.graph;
    let target = format!(
        "{}/{version}/{page_or_me}/messages{}",
        graph.base_url.as_str().trim_end_matches('/'),
        uri.query()
            .map(|query| format!("?{query}"))
            .unwrap_or_default(),
    );
    let mut forward = state
        .client
        .http()
        .post(target)
        .timeout(graph.timeout)
        .body(body.clone());
    for name in FORWARDED_REQUEST_HEADERS {
        if let Some(value) = headers.get(&name) {
            forward = forward.header(name, value.clone());
        }
    }
    let answer = match forward.send().await {
        Ok(answer) => answer,
        Err(error) => return Err(unreachable(error, graph.timeout)),
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let answer_body = answer
        .bytes()
        .await
        .map_err(|error| unreachable(error, graph.timeout))?;

    let outcome = if status.is_success() {
        "sent"
    } else {
        match GraphError::parse(&answer_body) {
            Some(error) => {
                // Graph may quote the token it refused ("Malformed access token EAA…"), and the
                // bot's token is not in the config: mask this request's own credentials.
                let own_secrets = request_credentials(uri.query(), &headers, &body).await;
                let described = crate::redact::Redactor::new(own_secrets).redact(&error.describe());
                tracing::info!(status = status.as_u16(), error = %described, "Graph refused a proxied send");
                if error.is_transient() {
                    "graph_error_transient"
                } else {
                    "graph_error_permanent"
                }
            }
            None => {
                tracing::info!(
                    status = status.as_u16(),
                    "Graph answered a proxied send with a non-Graph error"
                );
                "http_error"
            }
        }
    };
    metrics::counter!(metric::PROXY_REQUESTS, "outcome" => outcome).increment(1);

    if status.is_success() {
        record(&state, &uri, &headers, &body, &answer_body, page_or_me).await;
    }

    let mut response = Response::new(Body::from(answer_body));
    *response.status_mut() =
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    for name in FORWARDED_RESPONSE_HEADERS {
        for value in answer_headers.get_all(name) {
            response.headers_mut().append(name, value.clone());
        }
    }
    Ok(response)
}

/// How a proxied call's body carries its Send API fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `multipart/form-data`: an attachment sent from a file (`filedata`).
    Multipart,
}

impl BodyFormat {
    fn of(content_type: Option<&str>) -> BodyFormat {
        let media = content_type
            .and_then(|value| value.split(';').next())
            .map(|media| media.trim().to_ascii_lowercase());
        match media.as_deref() {
            Some("application/x-www-form-urlencoded") => BodyFormat::Form,
            Some("multipart/form-data") => BodyFormat::Multipart,
            _ => BodyFormat::Json,
        }
    }
}

/// The Send API fields of a proxied call, as Graph reads them: those of its query string, and
/// over them those of its body (a JSON object, form fields, or the text parts of multipart form
/// data; the file part is not read). A form or query value is JSON where it parses as JSON
/// (`recipient={"id":"…"}`), else a string. Credentials (`TOKEN_KEYS`) are left out.
async fn request_fields(
    query: Option<&str>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<Map<String, Value>, String> {
    let mut fields = form_fields(query.unwrap_or_default().as_bytes());
    match BodyFormat::of(content_type) {
        BodyFormat::Json if body.iter().all(u8::is_ascii_whitespace) => {}
        BodyFormat::Json => {
            let object: Map<String, Value> = std::str::from_utf8(body)
                .ok()
                .and_then(|text| from_str_lenient(text).ok())
                .ok_or_else(|| "the request body is not a JSON object".to_owned())?;
            fields.extend(object);
        }
        BodyFormat::Form => fields.extend(form_fields(body)),
        BodyFormat::Multipart => fields.extend(multipart_fields(content_type, body).await?),
    }
    for key in TOKEN_KEYS {
        fields.remove(key);
    }
    Ok(fields)
}

/// Form (or query string) fields, each value JSON where it parses as JSON.
fn form_fields(form: &[u8]) -> Map<String, Value> {
    url::form_urlencoded::parse(form)
        .filter(|(name, _)| !TOKEN_KEYS.contains(&name.as_ref()))
        .map(|(name, value)| {
            let value = from_str_lenient(&value).unwrap_or(Value::String(value.into_owned()));
            (name.into_owned(), value)
        })
        .collect()
}

/// The text parts of a multipart body (`recipient`, `message`, `messaging_type`, …), each value
/// JSON where it parses as JSON; parts that carry a file are skipped.
async fn multipart_fields(
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<Map<String, Value>, String> {
    Ok(multipart_text_parts(content_type, body)
        .await?
        .into_iter()
        .filter(|(name, _)| !TOKEN_KEYS.contains(&name.as_str()))
        .map(|(name, text)| {
            let value = from_str_lenient(&text).unwrap_or(Value::String(text));
            (name, value)
        })
        .collect())
}

/// The named parts of a multipart body that are not files, as text.
async fn multipart_text_parts(
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<Vec<(String, String)>, String> {
    let boundary = multer::parse_boundary(content_type.unwrap_or_default())
        .map_err(|error| format!("multipart body: {error}"))?;
    // The body is in memory already, bounded by `server.max_body_bytes`: no limit of multer's.
    let whole = futures_util::stream::iter([Ok::<Bytes, std::convert::Infallible>(body.clone())]);
    let mut multipart = multer::Multipart::new(whole, boundary);
    let mut parts = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => return Ok(parts),
            Err(error) => return Err(format!("multipart body: {error}")),
        };
        let Some(name) = field.name().map(str::to_owned) else {
            continue;
        };
        if field.file_name().is_some() {
            continue;
        }
        let text = field
            .text()
            .await
            .map_err(|error| format!("multipart field {name}: {error}"))?;
        parts.push((name, text));
    }
}

/// Records a proxied send that Graph accepted. The bot's send happened whatever the store
/// says: a failure here is logged, and Graph's answer still goes back to the bot.
async fn record(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    request_body: &Bytes,
    answer_body: &[u8],
    page_or_me: &str,
) {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    let now = now_ms();
    let event = match request_fields(uri.query(), content_type, request_body).await {
        Ok(request) => proxied_send(
            request,
            answer_body,
            page_or_me,
            now,
            state.config.messenger.app_id.as_deref(),
        ),
        Err(reason) => Err(reason),
    };
    match event {
        Ok(event) => {
            if let Err(error) = store(state, vec![event], now).await {
                tracing::error!(%error, "Proxied send succeeded but its outgoing event was not stored");
            }
        }
        Err(reason) => tracing::debug!(%reason, "Proxied send not recorded"),
    }
}

/// Maps a transport failure to a 502, logging the detail without the URL (it holds the token).
fn unreachable(error: reqwest::Error, timeout: std::time::Duration) -> IngestError {
    // A connection that could not be made in time is "cannot reach", not a slow answer.
    let timed_out = error.is_timeout() && !error.is_connect();
    let error = error.without_url();
    tracing::warn!(%error, timed_out, "Send API proxy got no answer from Graph");
    metrics::counter!(metric::PROXY_REQUESTS, "outcome" => if timed_out { "timeout" } else { "unreachable" })
        .increment(1);
    IngestError::GraphUnreachable { timed_out, timeout }
}

/// The credentials a proxied request carries (`TOKEN_KEYS` in the query or the body, JSON,
/// form or multipart, and the `Authorization` header), so that nothing logged about it can
/// repeat them.
async fn request_credentials(
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Vec<String> {
    let mut secrets: Vec<String> = form_credentials(query.unwrap_or_default().as_bytes()).collect();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    if BodyFormat::of(content_type) == BodyFormat::Multipart {
        secrets.extend(
            multipart_text_parts(content_type, body)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|(name, _)| TOKEN_KEYS.contains(&name.as_str()))
                .map(|(_, value)| value),
        );
    } else {
        let object = std::str::from_utf8(body)
            .ok()
            .and_then(|text| from_str_lenient::<Map<String, Value>>(text).ok());
        match object {
            Some(object) => secrets.extend(object_credentials(&object)),
            None => secrets.extend(form_credentials(body)),
        }
    }
    if let Some(authorization) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        secrets.extend(authorization.split_whitespace().last().map(str::to_owned));
    }
    secrets
}

/// The values of the credential keys (`TOKEN_KEYS`) in a query string or form body.
fn form_credentials(form: &[u8]) -> impl Iterator<Item = String> + '_ {
    url::form_urlencoded::parse(form)
        .filter(|(name, _)| TOKEN_KEYS.contains(&name.as_ref()))
        .map(|(_, value)| value.into_owned())
}

/// The string values of the credential keys (`TOKEN_KEYS`) among a JSON object's own fields.
fn object_credentials(object: &Map<String, Value>) -> impl Iterator<Item = String> + '_ {
    TOKEN_KEYS
        .iter()
        .filter_map(|key| object.get(*key)?.as_str().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_proxied_request_s_credentials_are_found_in_query_header_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_static("Bearer EAAheader"),
        );
        let json_body = Bytes::from_static(
            br#"{"recipient":{"id":"1"},"access_token":"EAAjson","appsecret_proof":"proof1"}"#,
        );
        assert_eq!(
            request_credentials(Some("access_token=EAAquery&x=1"), &headers, &json_body).await,
            ["EAAquery", "EAAjson", "proof1", "EAAheader"]
        );
        let form_body =
            Bytes::from_static(b"recipient=%7B%22id%22%3A%221%22%7D&access_token=EAA%2Bform");
        assert_eq!(
            request_credentials(None, &HeaderMap::new(), &form_body).await,
            ["EAA+form"]
        );
        let mut multipart_headers = HeaderMap::new();
        multipart_headers.insert(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        let multipart_body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\nEAAmultipart\r\n--XyZ--\r\n",
        );
        assert_eq!(
            request_credentials(None, &multipart_headers, &multipart_body).await,
            ["EAAmultipart"]
        );
        // A text cut inside an emoji (`\ud83d`) does not hide the body's token.
        let cut_body =
            Bytes::from_static(br#"{"access_token":"EAAcut","message":{"text":"cut \ud83d"}}"#);
        assert_eq!(
            request_credentials(None, &HeaderMap::new(), &cut_body).await,
            ["EAAcut"]
        );
        assert!(
            request_credentials(
                None,
                &HeaderMap::new(),
                &Bytes::from_static(br#"{"message":{}}"#)
            )
            .await
            .is_empty()
        );
    }

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

    /// Graph reads a send's fields from a JSON body, form fields, the text parts of multipart
    /// form data (an attachment sent from a file), or the query string; never the credentials.
    #[tokio::test]
    async fn a_proxied_calls_fields_come_from_its_query_and_any_body_format() -> TestResult {
        let json = Bytes::from_static(br#"{"recipient":{"id":"U1"},"message":{"text":"hi"}}"#);
        let fields =
            request_fields(Some("access_token=SECRET"), Some("application/json"), &json).await?;
        assert_eq!(
            Value::Object(fields),
            serde_json::json!({"recipient": {"id": "U1"}, "message": {"text": "hi"}})
        );

        let form = Bytes::from_static(b"recipient=%7B%22id%22%3A%22U2%22%7D&message=%7B%22text%22%3A%22yo%22%7D&access_token=SECRET");
        let fields = request_fields(None, Some("application/x-www-form-urlencoded"), &form).await?;
        let event = proxied_send(fields, br#"{"message_id":"m_10"}"#, "me", 5, None)?;
        assert_eq!(event.user_id.as_deref(), Some("U2"));
        assert_eq!(event.page_id, None);
        assert!(!serde_json::to_string(&event)?.contains("SECRET"));

        let query = "recipient=%7B%22id%22%3A%22U3%22%7D&messaging_type=RESPONSE&message=%7B%22text%22%3A%22q%22%7D&access_token=SECRET&appsecret_proof=PROOF";
        let fields = request_fields(Some(query), None, &Bytes::new()).await?;
        assert_eq!(
            Value::Object(fields),
            serde_json::json!({"recipient": {"id": "U3"}, "messaging_type": "RESPONSE", "message": {"text": "q"}})
        );

        let multipart = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"recipient\"\r\n\r\n{\"id\":\"U4\"}\r\n\
              --XyZ\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{\"attachment\":{\"type\":\"image\",\"payload\":{\"is_reusable\":true}}}\r\n\
              --XyZ\r\nContent-Disposition: form-data; name=\"filedata\"; filename=\"shirt.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n\
              --XyZ--\r\n",
        );
        let fields = request_fields(
            Some("access_token=SECRET"),
            Some("multipart/form-data; boundary=XyZ"),
            &multipart,
        )
        .await?;
        assert_eq!(
            Value::Object(fields),
            serde_json::json!({"recipient": {"id": "U4"}, "message": {"attachment": {"type": "image", "payload": {"is_reusable": true}}}})
        );
        assert!(
            request_fields(None, Some("application/json"), &Bytes::from_static(b"[1]"))
                .await
                .is_err()
        );
        Ok(())
    }

    /// A text cut inside an emoji (`\ud83d`, as `JSON.stringify` writes a lone half) in a form
    /// field, a multipart part or the query string still gives the send's fields, read with
    /// U+FFFD in its place, as in a JSON body.
    #[tokio::test]
    async fn a_proxied_call_s_cut_text_is_read_in_every_body_format() -> TestResult {
        let expected =
            serde_json::json!({"recipient": {"id": "U5"}, "message": {"text": "cut \u{fffd}"}});
        let form = Bytes::from_static(
            b"recipient=%7B%22id%22%3A%22U5%22%7D&message=%7B%22text%22%3A%22cut%20%5Cud83d%22%7D",
        );
        let fields = request_fields(None, Some("application/x-www-form-urlencoded"), &form).await?;
        assert_eq!(Value::Object(fields), expected);
        let query =
            "recipient=%7B%22id%22%3A%22U5%22%7D&message=%7B%22text%22%3A%22cut%20%5Cud83d%22%7D";
        let fields = request_fields(Some(query), None, &Bytes::new()).await?;
        assert_eq!(Value::Object(fields), expected);
        let multipart = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"recipient\"\r\n\r\n{\"id\":\"U5\"}\r\n\
              --XyZ\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{\"text\":\"cut \\ud83d\"}\r\n\
              --XyZ--\r\n",
        );
        let fields =
            request_fields(None, Some("multipart/form-data; boundary=XyZ"), &multipart).await?;
        assert_eq!(Value::Object(fields), expected);
        Ok(())
    }

    #[test]
    fn only_plain_segments_are_forwarded() {
        assert!(plain_segment("v20.0") && plain_segment("me") && plain_segment("1234"));
        assert!(!plain_segment("..") && !plain_segment("") && !plain_segment("a%2Fb"));
    }
}
