//! HTTP delivery: the [`Request`] a sink encoder produces, the one shared reqwest client that
//! sends it, and the classification of the answer into an [`Outcome`].
//!
//! This file decides WHETHER a failure is worth retrying (transport errors, timeouts, 408, 429
//! and 5xx are; other 4xx are not) and reads `Retry-After`. WHEN to retry, and when to give up,
//! is the dispatcher's business. A sink can classify from the response body first (Graph sends
//! rate limits as HTTP 400), through the [`Classify`] hook.

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use percent_encoding::percent_decode_str;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
    USER_AGENT as USER_AGENT_HEADER,
};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use url::Url;

/// How much of a failed response body is kept for the dead-letter store (before redaction).
const EXCERPT_BYTES: usize = 512;

/// How much of an answer's body is read: enough for any error a sink sends (Graph's error
/// object, an excerpt). The rest is not read, so a sink that answers with a huge or endless
/// body costs neither memory nor the attempt's timeout.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A request to a sink, fully encoded. Pure data: no client, no clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    /// Parsed once, where the sink's settings were (an encoder clones and extends it): the
    /// client takes it as it is, without parsing a string again per attempt.
    pub url: Url,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// Worth another attempt. `after` is the sink's own `Retry-After`, when it sent one.
    Retry {
        status: Option<u16>,
        after: Option<Duration>,
        error: String,
    },
    /// Never worth another attempt.
    Permanent {
        status: Option<u16>,
        error: String,
    },
}

/// What an attempt brought back: its [`Outcome`], and the vendor's API version warning when
/// the answer carried one ([`version_warning`]), whatever the outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub outcome: Outcome,
    pub notice: Option<String>,
}

/// The headers by which a vendor says that the API version called is going away: Graph's
/// Marketing API `X-Ad-Api-Version-Warning`, and the standard `Deprecation` (RFC 9745) and
/// `Sunset` (RFC 8594); each with its name as the warning line shows it. Looked up by
/// `HeaderName`, which a lookup by `&str` parses again on every answer.
static VERSION_WARNING_HEADERS: [(HeaderName, &str); 3] = [
    (
        HeaderName::from_static("x-ad-api-version-warning"),
        "X-Ad-Api-Version-Warning",
    ),
    (HeaderName::from_static("deprecation"), "Deprecation"),
    (HeaderName::from_static("sunset"), "Sunset"),
];

/// Longest version warning kept (a vendor's header is a sentence, not a body).
const NOTICE_MAX_CHARS: usize = 300;

/// The answer's version warning headers as one line (`Deprecation: …; Sunset: …`), or `None`
/// when it carries none.
pub fn version_warning(headers: &HeaderMap) -> Option<String> {
    let mut line: Option<String> = None;
    for (name, display) in &VERSION_WARNING_HEADERS {
        let Some(value) = headers.get(name) else {
            continue;
        };
        let value = String::from_utf8_lossy(value.as_bytes());
        let value: String = value
            .chars()
            .filter(|c| !c.is_control())
            .take(NOTICE_MAX_CHARS)
            .collect();
        let line = line.get_or_insert_with(String::new);
        if !line.is_empty() {
            line.push_str("; ");
        }
        line.push_str(display);
        line.push_str(": ");
        line.push_str(value.trim());
    }
    line
}

/// A response as a sink's classifier sees it.
#[derive(Debug)]
pub struct Response<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// A sink's own reading of a response; `None` falls back to [`classify_status`].
pub type Classify = fn(&Response<'_>) -> Option<Outcome>;

/// The one HTTP client, shared by every sink and the Send API proxy.
///
/// Deliveries go out on hyper's pooled client directly. Per attempt, reqwest parsed each URL
/// twice more (its redirect policy and its pending request, redirects off or not) and wrapped
/// the request and its body in layers a delivery does not use: about a tenth of the workers'
/// time in the pipeline benchmark. A destination that the environment routes through a proxy
/// (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, read as curl does) goes through
/// reqwest, which tunnels; so does the Send API proxy.
#[derive(Clone, Debug)]
pub struct Client {
    direct: Direct,
    http: reqwest::Client,
    proxies: Arc<Matcher>,
}

type Direct = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// Sent with every delivery that does not name its own (Kochava's does).
const USER_AGENT: &str = concat!("botrelay/", env!("CARGO_PKG_VERSION"));

/// How long a connection to a sink may take (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle connection to a sink is kept for the next delivery.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot set up TLS for deliveries: {0}")]
    Tls(#[from] rustls::Error),
}

impl Client {
    pub fn new() -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            // A sink that redirects a POST is misconfigured: report it instead of following.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()?;
        Ok(Client {
            direct: direct_client(tls_roots())?,
            http,
            proxies: Arc::new(Matcher::from_system()),
        })
    }

    /// The underlying client, for the Send API proxy.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends `request` within `timeout` and classifies the answer; notes its version warning.
    /// The request is taken whole: its header values and body become the HTTP request's
    /// without a copy.
    pub async fn send(&self, request: Request, timeout: Duration, classify: Classify) -> Sent {
        let mut notice = None;
        let outcome = self.attempt(request, timeout, classify, &mut notice).await;
        Sent { outcome, notice }
    }

    async fn attempt(
        &self,
        request: Request,
        timeout: Duration,
        classify: Classify,
        notice: &mut Option<String>,
    ) -> Outcome {
        let Request {
            method,
            url,
            headers,
            body,
        } = request;
        let method = match method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
        };
        let mut header_map = HeaderMap::with_capacity(headers.len() + 2);
        for (name, value) in headers {
            let (Ok(header), Ok(value)) =
                (HeaderName::try_from(name), HeaderValue::try_from(value))
            else {
                return Outcome::Permanent {
                    status: None,
                    error: format!("invalid header {name}"),
                };
            };
            header_map.append(header, value);
        }
        // Credentials in the URL go out as basic auth, never in the request line (as reqwest
        // did; a bot behind basic auth is configured that way).
        let credentials = basic_auth(&url);
        let direct_url = credentials.as_ref().map_or(&url, |(_, bare)| bare);
        // Not the URL in the error: it may carry a key (Dashbot's is in its query).
        let Ok(uri) = Uri::try_from(direct_url.as_str()) else {
            return Outcome::Permanent {
                status: None,
                error: "the sink's URL is not a valid HTTP URI".to_owned(),
            };
        };
        if self.proxies.intercept(&uri).is_some() {
            return self
                .through_proxy(method, url, header_map, body, timeout, classify, notice)
                .await;
        }
        // What reqwest sent by default, so that a sink sees the same request either way.
        if !header_map.contains_key(USER_AGENT_HEADER) {
            header_map.insert(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT));
        }
        if !header_map.contains_key(ACCEPT) {
            header_map.insert(ACCEPT, HeaderValue::from_static("*/*"));
        }
        if let Some((credentials, _)) = credentials {
            header_map.insert(AUTHORIZATION, credentials);
        }
        let mut request = hyper::Request::new(http_body_util::Full::new(body.unwrap_or_default()));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = header_map;
        let deadline = tokio::time::Instant::now() + timeout;
        let response = match tokio::time::timeout_at(deadline, self.direct.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let kind = if error.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                return retry_without_answer(failure_text(kind, &error));
            }
            Err(_) => return retry_without_answer(TIMED_OUT.to_owned()),
        };
        let (parts, mut incoming) = response.into_parts();
        let status = parts.status.as_u16();
        *notice = version_warning(&parts.headers);
        let mut body = Vec::new();
        while body.len() < MAX_ANSWER_BYTES {
            match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(chunk) = frame.into_data() {
                        let room = MAX_ANSWER_BYTES - body.len();
                        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    let reason = failure_text("response body failed", &error);
                    return cut_off(status, &parts.headers, &body, &reason);
                }
                Err(_) => return cut_off(status, &parts.headers, &body, TIMED_OUT),
            }
        }
        let response = Response {
            status,
            headers: &parts.headers,
            body: &body,
        };
        classify(&response).unwrap_or_else(|| classify_status(&response, SystemTime::now()))
    }

    /// An attempt through the proxy the environment names for its destination, on reqwest.
    #[allow(clippy::too_many_arguments)]
    async fn through_proxy(
        &self,
        method: reqwest::Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Bytes>,
        timeout: Duration,
        classify: Classify,
        notice: &mut Option<String>,
    ) -> Outcome {
        let mut builder = self
            .http
            .request(method, url)
            .timeout(timeout)
            .headers(headers);
        if let Some(body) = body {
            builder = builder.body(body);
        }
        let mut response = match builder.send().await {
            Ok(response) => response,
            Err(error) => return retry_without_answer(reqwest_failure_text(&error)),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        *notice = version_warning(&headers);
        let mut body = Vec::new();
        while body.len() < MAX_ANSWER_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ANSWER_BYTES - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(error) => {
                    return cut_off(status, &headers, &body, &reqwest_failure_text(&error));
                }
            }
        }
        let response = Response {
            status,
            headers: &headers,
            body: &body,
        };
        classify(&response).unwrap_or_else(|| classify_status(&response, SystemTime::now()))
    }
}

/// The `Authorization` value for the user and password in `url`, if it names any, and `url`
/// without them.
fn basic_auth(url: &Url) -> Option<(HeaderValue, Url)> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |part: &str| percent_decode_str(part).decode_utf8_lossy().into_owned();
    let user = decode(url.username());
    let password = url.password().map(decode).unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::try_from(format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    let mut bare = url.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    Some((value, bare))
}

/// The roots deliveries trust, as reqwest's did: Mozilla's (webpki-roots) and the system's
/// (which `SSL_CERT_FILE` and `SSL_CERT_DIR` can name).
fn tls_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (_, unusable) = roots.add_parsable_certificates(native.certs);
    if unusable > 0 || !native.errors.is_empty() {
        tracing::debug!(
            unusable,
            errors = native.errors.len(),
            "Some of the system's root certificates could not be loaded"
        );
    }
    roots
}

/// hyper's pooled HTTP/1 client over rustls (ring), trusting `roots`.
fn direct_client(roots: rustls::RootCertStore) -> Result<Direct, ClientError> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector),
    )
}

const TIMED_OUT: &str = "timed out";

fn retry_without_answer(error: String) -> Outcome {
    Outcome::Retry {
        status: None,
        after: None,
        error,
    }
}

/// The default table: 2xx delivered; 408, 429, 5xx retried (honouring `Retry-After`); the rest
/// permanent.
pub fn classify_status(response: &Response<'_>, now: SystemTime) -> Outcome {
    let status = response.status;
    match status {
        200..=299 => Outcome::Delivered { status },
        408 | 429 | 500..=599 => Outcome::Retry {
            status: Some(status),
            after: retry_after(response.headers, now),
            error: describe(response),
        },
        _ => Outcome::Permanent {
            status: Some(status),
            error: describe(response),
        },
    }
}

/// `Retry-After` as delta-seconds or an HTTP date; a date in the past means "now".
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `HTTP <status>: <start of the body>`, for the dead-letter store (redacted by the caller).
pub fn describe(response: &Response<'_>) -> String {
    let excerpt = excerpt(response.body);
    if excerpt.is_empty() {
        format!("HTTP {}", response.status)
    } else {
        format!("HTTP {}: {excerpt}", response.status)
    }
}

/// The first bytes of a body as text, cut at a character boundary.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    text.trim().to_owned()
}

/// An answer whose body stalled past the timeout or broke off after its status. A 2xx is
/// delivered: the sink has the event, and sending it again would deliver it twice. Anything
/// else is retried with its status, whatever the status table says: the body a sink's
/// classifier reads (a Graph rate limit comes as HTTP 400 with its code in the body) is
/// incomplete, so the answer cannot be known to be final.
fn cut_off(status: u16, headers: &HeaderMap, body: &[u8], reason: &str) -> Outcome {
    if (200..300).contains(&status) {
        tracing::debug!(
            status,
            error = reason,
            "The sink's answer ended before its body did"
        );
        return Outcome::Delivered { status };
    }
    let response = Response {
        status,
        headers,
        body,
    };
    Outcome::Retry {
        status: Some(status),
        after: retry_after(headers, SystemTime::now()),
        error: format!("{} (the answer was cut off: {reason})", describe(&response)),
    }
}

/// What went wrong with a request through reqwest, without its URL: reqwest's messages name
/// the URL, which may carry a token.
fn reqwest_failure_text(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        TIMED_OUT
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    failure_text(kind, error)
}

/// `kind`, and the innermost cause of `error` when it has one. Only that cause is kept: an
/// outer message may name the URL, which may carry a token; the innermost (an I/O or TLS
/// error, a parse failure) does not.
fn failure_text(kind: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    if std::ptr::addr_eq(cause, error) {
        kind.to_owned()
    } else {
        format!("{kind}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(
        status: u16,
        headers: &[(&'static str, &str)],
        body: &'static [u8],
    ) -> (HeaderMap, u16, &'static [u8]) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                map.insert(*name, value);
            }
        }
        (map, status, body)
    }

    fn classify(status: u16, headers: &[(&'static str, &str)], body: &'static [u8]) -> Outcome {
        let (headers, status, body) = response(status, headers, body);
        classify_status(
            &Response {
                status,
                headers: &headers,
                body,
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn version_warnings_are_read_from_the_headers() {
        let (headers, _, _) = response(
            200,
            &[
                ("sunset", "Tue, 23 Feb 2027 00:00:00 GMT"),
                (
                    "x-ad-api-version-warning",
                    "The call was made to v24.0, which is deprecated; it was upgraded to v25.0",
                ),
            ],
            b"",
        );
        assert_eq!(
            version_warning(&headers).as_deref(),
            Some(
                "X-Ad-Api-Version-Warning: The call was made to v24.0, which is deprecated; it was upgraded to v25.0; Sunset: Tue, 23 Feb 2027 00:00:00 GMT"
            )
        );
        let (none, _, _) = response(200, &[("x-fb-trace-id", "x")], b"");
        assert_eq!(version_warning(&none), None);
        let (long, _, _) = response(200, &[("deprecation", &"d".repeat(1000))], b"");
        assert_eq!(
            version_warning(&long).map(|text| text.len()),
            Some("Deprecation: ".len() + NOTICE_MAX_CHARS)
        );
    }

    #[test]
    fn status_table() {
        for status in [200, 201, 204, 299] {
            assert_eq!(classify(status, &[], b""), Outcome::Delivered { status });
        }
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(
                    classify(status, &[], b""),
                    Outcome::Retry { after: None, .. }
                ),
                "{status}"
            );
        }
        for status in [300, 301, 400, 401, 403, 404, 410, 422] {
            assert!(
                matches!(classify(status, &[], b""), Outcome::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(
            classify(429, &[("retry-after", "7")], b""),
            Outcome::Retry {
                status: Some(429),
                after: Some(Duration::from_secs(7)),
                error: "HTTP 429".into()
            }
        );
        let (headers, ..) = response(
            503,
            &[("retry-after", "Thu, 01 Jan 1970 00:01:40 GMT")],
            b"",
        );
        assert_eq!(
            retry_after(&headers, SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(100))
        );
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(retry_after(&headers, later), Some(Duration::ZERO));
        let (garbage, ..) = response(503, &[("retry-after", "soon")], b"");
        assert_eq!(retry_after(&garbage, later), None);
    }

    #[test]
    fn describe_keeps_a_bounded_excerpt() {
        let long: &'static [u8] = Box::leak(vec![b'x'; 4000].into_boxed_slice());
        match classify(400, &[], long) {
            Outcome::Permanent { error, .. } => {
                assert_eq!(error.len(), "HTTP 400: ".len() + EXCERPT_BYTES)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
