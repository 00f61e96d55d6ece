//! Graph API error classes (SPEC §4.6), shared by the two Graph sinks and, for its metrics, the
//! Send API proxy. Graph reports rate limits as HTTP 400, so the JSON `error.code` decides, not
//! the status. The error text names code, subcode, type and `fbtrace_id`, never the URL or token.

use crate::delivery::{Outcome, Response, retry_after};
use serde_json::Value;
use std::time::SystemTime;

/// Codes worth another attempt: unknown/service errors, rate limits, temporary blocks.
pub const TRANSIENT_CODES: [i64; 8] = [1, 2, 4, 17, 32, 341, 368, 613];

/// Codes that never succeed on retry (besides every unknown code): capability, permission
/// (200-299, which includes 230: permissions disallow the message),
/// invalid parameter, session, token, recipient.
pub fn is_permanent_code(code: i64) -> bool {
    matches!(code, 3 | 10 | 100 | 102 | 190 | 200..=299 | 551)
}

/// The parts of Graph's error envelope `{"error": {…}}` that classification and logs need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    pub code: i64,
    pub subcode: Option<i64>,
    pub error_type: Option<String>,
    pub message: Option<String>,
    pub fbtrace_id: Option<String>,
    /// `error.is_transient`, when Graph sent it.
    pub is_transient: Option<bool>,
}

/// How much of Graph's message the error text keeps.
const MESSAGE_CHARS: usize = 200;

impl GraphError {
    /// Reads the envelope; `None` when the body is not JSON or has no numeric `error.code`.
    pub fn parse(body: &[u8]) -> Option<GraphError> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let error = value.get("error")?;
        let text = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_owned);
        Some(GraphError {
            code: integer(error.get("code")?)?,
            subcode: error.get("error_subcode").and_then(integer),
            error_type: text("type"),
            message: text("message"),
            fbtrace_id: text("fbtrace_id"),
            is_transient: error.get("is_transient").and_then(Value::as_bool),
        })
    }

    /// Transient: one of [`TRANSIENT_CODES`], or `is_transient: true`.
    pub fn is_transient(&self) -> bool {
        TRANSIENT_CODES.contains(&self.code) || self.is_transient == Some(true)
    }

    /// `Graph error code 613 subcode 1234 (OAuthException) fbtrace_id Abc: <message>`.
    pub fn describe(&self) -> String {
        let mut text = format!("Graph error code {}", self.code);
        if let Some(subcode) = self.subcode {
            text.push_str(&format!(" subcode {subcode}"));
        }
        if let Some(error_type) = &self.error_type {
            text.push_str(&format!(" ({error_type})"));
        }
        if let Some(trace) = &self.fbtrace_id {
            text.push_str(&format!(" fbtrace_id {trace}"));
        }
        if let Some(message) = self
            .message
            .as_deref()
            .filter(|message| !message.is_empty())
        {
            let short: String = message.chars().take(MESSAGE_CHARS).collect();
            text.push_str(&format!(": {short}"));
        }
        text
    }
}

/// `(code, transient)` of a Graph error body, for labelling metrics (the Send API proxy).
pub fn graph_error_class(body: &[u8]) -> Option<(i64, bool)> {
    GraphError::parse(body).map(|error| (error.code, error.is_transient()))
}

/// The [`Classify`](crate::delivery::Classify) hook of the Graph sinks.
pub fn classify(response: &Response<'_>) -> Option<Outcome> {
    classify_at(response, SystemTime::now())
}

/// [`classify`] at a given time (for an HTTP-date `Retry-After`).
///
/// A 2xx is delivered. A Graph error is classified by its code whatever the status: transient
/// codes (or `is_transient: true`) are retried, keeping `Retry-After`; listed permanent codes
/// are permanent. An unlisted code is permanent too, unless the status itself is one the
/// default table retries (408, 429, 5xx). No Graph error → `None`: the status table decides.
pub fn classify_at(response: &Response<'_>, now: SystemTime) -> Option<Outcome> {
    let status = response.status;
    if (200..300).contains(&status) {
        return Some(Outcome::Delivered { status });
    }
    let error = GraphError::parse(response.body)?;
    let retryable_status = matches!(status, 408 | 429 | 500..=599);
    let retry = error.is_transient() || (!is_permanent_code(error.code) && retryable_status);
    let text = format!("HTTP {status}: {}", error.describe());
    Some(if retry {
        Outcome::Retry {
            status: Some(status),
            after: retry_after(response.headers, now),
            error: text,
        }
    } else {
        Outcome::Permanent {
            status: Some(status),
            error: text,
        }
    })
}

/// A JSON integer, or a string of digits (Graph is not always consistent).
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};
    use std::time::Duration;

    fn classify_body(status: u16, body: &str) -> Option<Outcome> {
        let headers = HeaderMap::new();
        classify_at(
            &Response {
                status,
                headers: &headers,
                body: body.as_bytes(),
            },
            SystemTime::UNIX_EPOCH,
        )
    }

    fn graph(code: i64) -> String {
        format!(
            r#"{{"error":{{"message":"m","type":"OAuthException","code":{code},"fbtrace_id":"AbC"}}}}"#
        )
    }

    fn is_retry(outcome: &Option<Outcome>) -> bool {
        matches!(outcome, Some(Outcome::Retry { .. }))
    }

    fn is_permanent(outcome: &Option<Outcome>) -> bool {
        matches!(outcome, Some(Outcome::Permanent { .. }))
    }

    #[test]
    fn classification_table() {
        for code in TRANSIENT_CODES {
            assert!(is_retry(&classify_body(400, &graph(code))), "{code} at 400");
            assert!(is_retry(&classify_body(500, &graph(code))), "{code} at 500");
        }
        for code in [3, 10, 100, 102, 190, 200, 250, 299, 230, 551] {
            assert!(
                is_permanent(&classify_body(400, &graph(code))),
                "{code} at 400"
            );
            assert!(
                is_permanent(&classify_body(500, &graph(code))),
                "{code} at 500"
            );
        }
        // Unlisted codes: permanent, unless the status is a retryable one.
        assert!(is_permanent(&classify_body(400, &graph(1609005))));
        assert!(is_retry(&classify_body(503, &graph(1609005))));
        // is_transient wins over the code.
        let flagged = r#"{"error":{"message":"(#17) User request limit reached","type":"OAuthException","is_transient":true,"code":100,"error_subcode":2446079,"fbtrace_id":"X"}}"#;
        assert!(is_retry(&classify_body(400, flagged)));
        // 2xx is delivered; no parseable Graph error falls back to the status table.
        assert_eq!(
            classify_body(200, r#"{"success":true}"#),
            Some(Outcome::Delivered { status: 200 })
        );
        assert_eq!(classify_body(500, "<html>Bad gateway</html>"), None);
        assert_eq!(classify_body(400, r#"{"error":"nope"}"#), None);
        assert_eq!(classify_body(404, ""), None);
    }

    #[test]
    fn rate_limit_at_400_is_retried_with_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("30"));
        let body = graph(613);
        let outcome = classify_at(
            &Response {
                status: 400,
                headers: &headers,
                body: body.as_bytes(),
            },
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            outcome,
            Some(Outcome::Retry {
                status: Some(400),
                after: Some(Duration::from_secs(30)),
                error: "HTTP 400: Graph error code 613 (OAuthException) fbtrace_id AbC: m".into(),
            })
        );
    }

    #[test]
    fn expired_token_is_permanent_and_described_without_the_token() {
        let body = r#"{"error":{"message":"Error validating access token: Session has expired","type":"OAuthException","code":190,"error_subcode":463,"fbtrace_id":"EJplcsCHuLu"}}"#;
        match classify_body(400, body) {
            Some(Outcome::Permanent { status, error }) => {
                assert_eq!(status, Some(400));
                assert_eq!(
                    error,
                    "HTTP 400: Graph error code 190 subcode 463 (OAuthException) fbtrace_id EJplcsCHuLu: \
                     Error validating access token: Session has expired"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn class_for_metrics() {
        assert_eq!(graph_error_class(graph(613).as_bytes()), Some((613, true)));
        assert_eq!(graph_error_class(graph(190).as_bytes()), Some((190, false)));
        assert_eq!(
            graph_error_class(br#"{"error":{"code":"4"}}"#),
            Some((4, true))
        );
        assert_eq!(graph_error_class(b"{\"recipient_id\":\"1\"}"), None);
        assert_eq!(graph_error_class(b"not json"), None);
    }

    #[test]
    fn long_messages_are_cut() {
        let body = format!(
            r#"{{"error":{{"code":100,"message":"{}"}}}}"#,
            "x".repeat(5000)
        );
        let error = GraphError::parse(body.as_bytes())
            .map(|error| error.describe())
            .unwrap_or_default();
        assert_eq!(error.len(), "Graph error code 100: ".len() + MESSAGE_CHARS);
    }
}
