//! The Send API proxy, `POST /graph/{version}/{page_or_me}/messages`: forwards the bot's call
//! to Graph verbatim (query string, page token and body unchanged), hands back Graph's status,
//! headers and body, and records a successful send as an outgoing event built by
//! `outgoing.rs`. The token is never stored or logged.

use crate::clock::now_ms;
use crate::ingest::messenger::from_str_lenient;
use crate::ingest::outgoing::{TOKEN_KEYS, form_credentials, object_credentials, proxied_send};
use crate::ingest::{AppState, IngestError, store};
use crate::sinks::graph_error::GraphError;
use crate::telemetry::metric;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Map, Value};
use std::sync::Arc;

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
    State(state): State<Arc<AppState>>,
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

/// The Send API's request fields: the only query parameters a proxied call's recorded request
/// takes (anything else in its query string, `?debug=1` or a cache buster, is the caller's and
/// none of the send's).
const SEND_API_FIELDS: [&str; 7] = [
    "recipient",
    "message",
    "messaging_type",
    "tag",
    "sender_action",
    "notification_type",
    "persona_id",
];

/// The Send API fields of a proxied call, as Graph reads them: those of its query string (the
/// [`SEND_API_FIELDS`] only), and over them those of its body (a JSON object, form fields, or the text parts of multipart form
/// data; the file part is not read). A form or query value is JSON where it parses as JSON
/// (`recipient={"id":"…"}`), else a string. Credentials (`TOKEN_KEYS`) are left out.
async fn request_fields(
    query: Option<&str>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<Map<String, Value>, String> {
    let mut fields = form_fields(query.unwrap_or_default().as_bytes());
    fields.retain(|name, _| SEND_API_FIELDS.contains(&name.as_str()));
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

#[cfg(test)]
mod tests {
    use super::*;

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

        let query = "recipient=%7B%22id%22%3A%22U3%22%7D&messaging_type=RESPONSE&message=%7B%22text%22%3A%22q%22%7D&access_token=SECRET&appsecret_proof=PROOF&x=1&debug=all";
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
