//! Observability in one place: tracing setup (pretty or JSON to stdout), the metric names, and
//! the [`Redactor`] that keeps secrets out of every log line and every stored error.
//!
//! Redaction happens twice, on purpose: the dispatcher redacts errors before they reach the
//! dead-letter store, and the log writer redacts every formatted line before it reaches stdout,
//! so a token inside a URL or an error message from a library is masked too.

use crate::config::{LogConfig, LogFormat};
use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Metric names (SPEC §5), so that code and tests agree on them.
pub mod metric {
    pub const EVENTS_RECEIVED: &str = "botrelay_events_received_total";
    pub const DELIVERIES: &str = "botrelay_deliveries_total";
    pub const DELIVERY_SECONDS: &str = "botrelay_delivery_seconds";
    pub const QUEUE_DEPTH: &str = "botrelay_queue_depth";
    pub const DEAD_LETTERS: &str = "botrelay_dead_letters";
    pub const WEBHOOK_REJECTED: &str = "botrelay_webhook_rejected_total";
    pub const WEBHOOK_IGNORED: &str = "botrelay_webhook_ignored_total";
    pub const DUPLICATES: &str = "botrelay_duplicate_events_total";
    pub const PROXY_REQUESTS: &str = "botrelay_send_api_proxy_total";
}

const MASK: &str = "[redacted]";

/// Query and JSON keys whose values are always secret, whatever the config says.
const SECRET_KEYS: [&str; 5] = ["access_token", "apiKey", "api_key", "appsecret_proof", "verify_token"];

/// Masks secrets in text: every configured secret value, and the value of every secret key in a
/// query string (`access_token=…`) or JSON (`"access_token":"…"`).
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    pub fn new(mut secrets: Vec<String>) -> Redactor {
        // Very short values would mask ordinary words; config secrets are never that short in
        // practice, and the key patterns below still catch tokens in URLs.
        secrets.retain(|secret| secret.len() >= 4);
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Redactor {
            secrets: Arc::new(secrets),
        }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.secrets.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        for key in SECRET_KEYS {
            out = mask_after(&out, &format!("{key}="), |c| matches!(c, '&' | '"' | '\'' | ' ' | '\n' | '\\' | '<' | '>' | ')'));
            out = mask_after(&out, &format!("\"{key}\":\""), |c| c == '"' || c == '\\');
            out = mask_after(&out, &format!("\\\"{key}\\\":\\\""), |c| c == '\\' || c == '"');
        }
        out
    }
}

/// Replaces what follows each `marker` up to the first `end` character with the mask.
fn mask_after(text: &str, marker: &str, end: impl Fn(char) -> bool) -> String {
    if !text.contains(marker) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(position) = rest.find(marker) {
        let value_start = position + marker.len();
        out.push_str(&rest[..value_start]);
        let value = &rest[value_start..];
        let value_len = value.find(&end).unwrap_or(value.len());
        if value_len > 0 && &value[..value_len] != MASK {
            out.push_str(MASK);
        } else {
            out.push_str(&value[..value_len]);
        }
        rest = &value[value_len..];
    }
    out.push_str(rest);
    out
}

/// A `MakeWriter` that redacts each formatted line before it reaches the inner writer.
#[derive(Clone)]
pub struct RedactingWriter<W> {
    inner: W,
    redactor: Redactor,
}

impl<W> RedactingWriter<W> {
    pub fn new(inner: W, redactor: Redactor) -> Self {
        RedactingWriter { inner, redactor }
    }
}

pub struct RedactingLine<W: Write> {
    inner: W,
    redactor: Redactor,
    buffer: Vec<u8>,
}

impl<W: Write> Write for RedactingLine<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let line = self.redactor.redact(&String::from_utf8_lossy(&self.buffer));
        self.buffer.clear();
        self.inner.write_all(line.as_bytes())?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for RedactingLine<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl<'a, M> MakeWriter<'a> for RedactingWriter<M>
where
    M: MakeWriter<'a>,
{
    type Writer = RedactingLine<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingLine {
            inner: self.inner.make_writer(),
            redactor: self.redactor.clone(),
            buffer: Vec::new(),
        }
    }
}

/// Installs the global subscriber: `log.level` as an env-filter (overridden by `RUST_LOG`),
/// JSON or pretty lines on stdout, every line redacted.
pub fn init(log: &LogConfig, redactor: Redactor) {
    init_with_writer(log, redactor, io::stdout);
}

/// Like [`init`], with another writer (tests capture logs with it). A second call is a no-op.
pub fn init_with_writer<M>(log: &LogConfig, redactor: Redactor, writer: M)
where
    M: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|filter| EnvFilter::try_new(filter).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let format = log.format.unwrap_or(if io::stdout().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let writer = RedactingWriter::new(writer, redactor);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_secrets_are_masked_anywhere() {
        let redactor = Redactor::new(vec!["s3cr3t-app".into(), "page-token-1".into(), "ab".into()]);
        assert_eq!(
            redactor.redact("failed with s3cr3t-app and page-token-1 (ab)"),
            "failed with [redacted] and [redacted] (ab)"
        );
    }

    #[test]
    fn secret_keys_in_urls_and_json_are_masked() {
        let redactor = Redactor::default();
        assert_eq!(
            redactor.redact("POST https://graph.facebook.com/v20.0/1/page_activities?access_token=EAAB123&appsecret_proof=abc failed"),
            "POST https://graph.facebook.com/v20.0/1/page_activities?access_token=[redacted]&appsecret_proof=[redacted] failed"
        );
        assert_eq!(
            redactor.redact(r#"{"qs":{"access_token":"EAAB"},"url":"https://t/track?apiKey=k1&type=incoming"}"#),
            r#"{"qs":{"access_token":"[redacted]"},"url":"https://t/track?apiKey=[redacted]&type=incoming"}"#
        );
        assert_eq!(redactor.redact(r#"{\"access_token\":\"EAAB\"}"#), r#"{\"access_token\":\"[redacted]\"}"#);
        assert_eq!(redactor.redact("access_token=&x=1"), "access_token=&x=1");
    }

    #[test]
    fn writer_redacts_each_line() -> io::Result<()> {
        let redactor = Redactor::new(vec!["hunter22".into()]);
        let mut line = RedactingLine {
            inner: Vec::new(),
            redactor,
            buffer: Vec::new(),
        };
        line.write_all(b"password hunter22\n")?;
        line.flush()?;
        assert_eq!(String::from_utf8_lossy(&line.inner), "password [redacted]\n");
        Ok(())
    }
}
