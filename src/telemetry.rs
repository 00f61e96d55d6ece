//! Observability in one place: tracing setup (pretty or JSON to stdout), the request span, the
//! metric names and the Prometheus recorder, the in-memory sink status, and the log writer that
//! passes every line through the [`Redactor`] before it is written.
//!
//! Logging never blocks the request and delivery paths: lines go through a bounded queue to a
//! writer thread ([`non_blocking`]); when stdout does not keep up (a stalled log collector, a
//! pipe nobody reads), lines beyond the queue are dropped, counted in
//! `botrelay_log_lines_dropped_total` and reported in a log line once a minute.
//!
//! Redaction happens twice, on purpose: the dispatcher redacts errors before they reach the
//! dead-letter store, and the log writer redacts every formatted line before it reaches stdout,
//! so a token inside a URL or an error message from a library is masked too.
//!
//! The metrics recorder and the sink status are process-wide (one relay per process): the
//! `metrics` facade has one global recorder, and tests that start many relays in one process
//! share it.

use crate::clock::{Millis, now_ms};
use crate::config::{LogConfig, LogFormat};
use crate::event::{EventKind, Source};
use crate::redact::Redactor;
use crate::sink_name::SinkName;
use crate::store::Settle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

pub mod history;

/// Metric names (SPEC §5), so that code and tests agree on them.
pub mod metric {
    pub const EVENTS_RECEIVED: &str = "botrelay_events_received_total";
    pub const DELIVERIES: &str = "botrelay_deliveries_total";
    pub const DELIVERY_SECONDS: &str = "botrelay_delivery_seconds";
    pub const QUEUE_DEPTH: &str = "botrelay_queue_depth";
    pub const DEAD_LETTERS: &str = "botrelay_dead_letters";
    pub const SINK_OUTAGE: &str = "botrelay_sink_outage";
    pub const IN_FLIGHT: &str = "botrelay_in_flight";
    pub const WEBHOOK_REJECTED: &str = "botrelay_webhook_rejected_total";
    pub const WEBHOOK_IGNORED: &str = "botrelay_webhook_ignored_total";
    pub const DUPLICATES: &str = "botrelay_duplicate_events_total";
    pub const PROXY_REQUESTS: &str = "botrelay_send_api_proxy_total";
    pub const LOG_LINES_DROPPED: &str = "botrelay_log_lines_dropped_total";

    /// The `reason` label values of [`WEBHOOK_REJECTED`]: the three signature failures, a body
    /// over `server.max_body_bytes`, and a signed body that is not JSON.
    pub const REJECTED_SIGNATURE_MISSING: &str = "signature_missing";
    pub const REJECTED_SIGNATURE_MALFORMED: &str = "signature_malformed";
    pub const REJECTED_SIGNATURE_MISMATCH: &str = "signature_mismatch";
    pub const REJECTED_TOO_LARGE: &str = "too_large";
    pub const REJECTED_NOT_JSON: &str = "not_json";
    pub const REJECTED_REASONS: [&str; 5] = [
        REJECTED_SIGNATURE_MISSING,
        REJECTED_SIGNATURE_MALFORMED,
        REJECTED_SIGNATURE_MISMATCH,
        REJECTED_TOO_LARGE,
        REJECTED_NOT_JSON,
    ];
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

/// Lines queued for stdout at most; beyond them lines are dropped (and counted), never waited
/// for. 16,384 lines of about 300 bytes: some 5 MiB at worst.
pub const LOG_QUEUE_LINES: usize = 16_384;

/// The process's count of dropped log lines (set by [`init`]).
static DROPPED_LINES: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// A writer that never blocks its caller: each line (one `write` of a [`RedactingLine`]) goes
/// into a queue of at most `lines` lines, which a thread of its own writes to `writer`. A line
/// that finds the queue full is dropped and counted ([`ErrorCounter`]). Keep the guard for the
/// life of the process: dropping it flushes the queue and stops the thread.
///
/// [`ErrorCounter`]: tracing_appender::non_blocking::ErrorCounter
pub fn non_blocking<W: Write + Send + 'static>(
    writer: W,
    lines: usize,
) -> (tracing_appender::non_blocking::NonBlocking, LogGuard) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines)
        .thread_name("botrelay-log")
        .finish(writer);
    (writer, LogGuard(Some(guard)))
}

/// Keeps the log's writer thread; [`LogGuard::flush`] writes out what is queued at exit.
#[must_use = "dropping the guard stops the log's writer thread"]
pub struct LogGuard(Option<tracing_appender::non_blocking::WorkerGuard>);

impl LogGuard {
    /// Writes out the queued lines and stops the writer thread, waiting at most `within`: a
    /// stdout that stays stalled must not keep the process from exiting.
    pub fn flush(mut self, within: Duration) {
        let Some(guard) = self.0.take() else {
            return;
        };
        let (done, finished) = std::sync::mpsc::channel();
        let flushing = std::thread::Builder::new()
            .name("botrelay-log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if flushing.is_ok() {
            let _ = finished.recv_timeout(within);
        }
    }
}

/// Log lines dropped so far because stdout did not keep up.
pub fn log_lines_dropped() -> u64 {
    DROPPED_LINES.get().map_or(0, |counter| {
        u64::try_from(counter.dropped_lines()).unwrap_or(u64::MAX)
    })
}

/// Installs the global subscriber: `log.level` as an env-filter (overridden by `RUST_LOG`),
/// JSON or pretty lines on stdout, every line redacted, written through [`non_blocking`].
/// Keep the guard until the process exits, then [`LogGuard::flush`] it.
pub fn init(log: &LogConfig, redactor: Redactor) -> LogGuard {
    let (writer, guard) = non_blocking(io::stdout(), LOG_QUEUE_LINES);
    let _ = DROPPED_LINES.set(writer.error_counter());
    init_with_writer(log, redactor, writer);
    // A panic's message can quote the data it choked on: it goes through the log, and so
    // through its redaction, instead of straight to stderr.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|location| format!("{}:{}", location.file(), location.line()))
            .unwrap_or_default();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(
            panic = message,
            %location,
            "A task panicked"
        );
    }));
    guard
}

/// Like [`init`], with another writer (tests capture logs with it). A second call is a no-op.
pub fn init_with_writer<M>(log: &LogConfig, redactor: Redactor, writer: M)
where
    M: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let _ = subscriber(log, redactor, writer).try_init();
}

/// The subscriber [`init`] installs, for a scoped `tracing::subscriber::set_default` in tests.
///
/// JSON lines are flat (`timestamp`, `level`, `message`, the event's fields) and carry the
/// current span under `span`: `request_id`, `method` and `path` for a request; `event_id`,
/// `sink`, `kind` and `attempt` for a delivery attempt.
pub fn subscriber<M>(
    log: &LogConfig,
    redactor: Redactor,
    writer: M,
) -> Box<dyn Subscriber + Send + Sync>
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
        LogFormat::Pretty => Box::new(builder.compact().finish()),
    }
}

/// The span of one HTTP request (both listeners): method, path and the `x-request-id` that
/// `SetRequestIdLayer` assigned (or the caller sent). The path only: a query string may carry
/// a token.
pub fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// Upper bounds of the `botrelay_delivery_seconds` buckets: a local bot answers in
/// milliseconds, a vendor in tens or hundreds of them, a timeout after `timeout` (10 s).
pub const DELIVERY_SECONDS_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// How often histogram samples are folded in when nobody scrapes.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The Prometheus recorder, installed as the global `metrics` recorder on the first call; every
/// later call (another relay in the same test process) gets the same handle. If some other
/// recorder was installed first, the handle renders only the metric descriptions.
pub fn metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        // Fails only for an empty bucket list.
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(metric::DELIVERY_SECONDS.to_owned()), &DELIVERY_SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::warn!(%error, "Another metrics recorder is installed; /metrics will stay empty");
        }
        describe_metrics();
        handle
    })
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        metric::EVENTS_RECEIVED,
        "Events received, by source and kind (before dedupe)."
    );
    describe_counter!(
        metric::DELIVERIES,
        "Delivery attempts by sink and outcome (delivered, retried, dead, skipped)."
    );
    describe_histogram!(
        metric::DELIVERY_SECONDS,
        Unit::Seconds,
        "Duration of one delivery attempt, by sink."
    );
    describe_gauge!(
        metric::QUEUE_DEPTH,
        "Deliveries not yet delivered (waiting, due or scheduled for a retry), by sink."
    );
    describe_gauge!(
        metric::IN_FLIGHT,
        "Deliveries being attempted now, by sink."
    );
    describe_gauge!(metric::DEAD_LETTERS, "Dead letters in the store, by sink.");
    describe_gauge!(
        metric::SINK_OUTAGE,
        "1 while a sink fails as a whole (its deliveries wait, one probe at a time), else 0."
    );
    describe_counter!(
        metric::WEBHOOK_REJECTED,
        "Webhook POSTs refused, by reason."
    );
    describe_counter!(
        metric::WEBHOOK_IGNORED,
        "Signed webhook POSTs or items acknowledged without an event."
    );
    describe_counter!(
        metric::DUPLICATES,
        "Events acknowledged again within the dedupe window and not delivered again."
    );
    describe_counter!(
        metric::PROXY_REQUESTS,
        "Send API proxy requests, by outcome."
    );
    describe_counter!(
        metric::LOG_LINES_DROPPED,
        "Log lines dropped because stdout did not keep up (the log never blocks the relay)."
    );
}

/// Registers every series a dashboard expects at zero, so that the names are in `/metrics`
/// before the first event: the counters and the histogram of each active sink, the rejection
/// reasons, and the event kinds per source.
pub fn register_metrics(active: &[SinkName]) {
    let _ = metrics();
    let kinds_by_source = [
        (Source::Webhook, EventKind::WEBHOOK.to_vec()),
        (Source::Outgoing, vec![EventKind::Outgoing]),
        (
            Source::Custom,
            vec![
                EventKind::Custom,
                EventKind::Revenue,
                EventKind::Share,
                EventKind::PageLaunch,
                EventKind::Lead,
            ],
        ),
    ];
    for (source, kinds) in kinds_by_source {
        for kind in kinds {
            metrics::counter!(metric::EVENTS_RECEIVED, "source" => source.as_str(), "kind" => kind.as_str()).increment(0);
        }
    }
    for reason in metric::REJECTED_REASONS {
        metrics::counter!(metric::WEBHOOK_REJECTED, "reason" => reason).increment(0);
    }
    metrics::counter!(metric::LOG_LINES_DROPPED).absolute(log_lines_dropped());
    for sink in active {
        for outcome in OUTCOMES {
            metrics::counter!(metric::DELIVERIES, "sink" => sink.as_str(), "outcome" => outcome)
                .increment(0);
        }
        let _ = metrics::histogram!(metric::DELIVERY_SECONDS, "sink" => sink.as_str());
        metrics::gauge!(metric::QUEUE_DEPTH, "sink" => sink.as_str()).set(0.0);
        metrics::gauge!(metric::IN_FLIGHT, "sink" => sink.as_str()).set(0.0);
        metrics::gauge!(metric::DEAD_LETTERS, "sink" => sink.as_str()).set(0.0);
        metrics::gauge!(metric::SINK_OUTAGE, "sink" => sink.as_str()).set(0.0);
    }
}

/// The `outcome` label values of `botrelay_deliveries_total`.
pub const OUTCOMES: [&str; 4] = ["delivered", "retried", "dead", "skipped"];

/// The sinks whose queue gauges this process has set: a scrape sets them all again, so that a
/// sink whose rows are all gone (a sink not enabled, whose dead letters the purge removed)
/// reads 0 instead of its last count.
static GAUGED_SINKS: RwLock<Vec<SinkName>> = RwLock::new(Vec::new());

/// Every sink [`set_queue_gauges`] has been called for, in the order of the first call.
pub fn gauged_sinks() -> Vec<SinkName> {
    GAUGED_SINKS
        .read()
        .map(|sinks| sinks.clone())
        .unwrap_or_default()
}

/// Sets the queue gauges of one sink (from `Store::depth`, at scrape time).
pub fn set_queue_gauges(sink: SinkName, queued: u64, in_flight: u64, dead: u64) {
    if let Ok(mut sinks) = GAUGED_SINKS.write()
        && !sinks.contains(&sink)
    {
        sinks.push(sink);
    }
    // Gauges are f64; queue sizes far below 2^53 are exact.
    let as_gauge = |value: u64| value as f64;
    metrics::gauge!(metric::QUEUE_DEPTH, "sink" => sink.as_str()).set(as_gauge(queued));
    metrics::gauge!(metric::IN_FLIGHT, "sink" => sink.as_str()).set(as_gauge(in_flight));
    metrics::gauge!(metric::DEAD_LETTERS, "sink" => sink.as_str()).set(as_gauge(dead));
}

/// Dropped log lines are reported in the log at most this often.
const DROPPED_LINES_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Folds histogram samples into their buckets every few seconds until `stop`, so that memory
/// stays bounded when nobody scrapes `/metrics`; brings `botrelay_log_lines_dropped_total` up
/// to date, and once a minute logs how many lines were dropped since the last report.
pub async fn metrics_upkeep(stop: CancellationToken) {
    let handle = metrics();
    let mut reported = log_lines_dropped();
    let mut reported_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(METRICS_UPKEEP_EVERY) => handle.run_upkeep(),
        }
        let dropped = log_lines_dropped();
        metrics::counter!(metric::LOG_LINES_DROPPED).absolute(dropped);
        if dropped > reported && reported_at.elapsed() >= DROPPED_LINES_REPORT_EVERY {
            tracing::warn!(
                dropped = dropped - reported,
                total = dropped,
                "Log lines were dropped: stdout did not keep up (the log never blocks the relay)"
            );
            reported = dropped;
            reported_at = tokio::time::Instant::now();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sink status: when each sink last succeeded and last failed, since the process started.

/// The last failed attempt of a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    pub at: Millis,
    pub status: Option<u16>,
    /// Redacted by the dispatcher before it is recorded.
    pub message: String,
    /// True when the attempt ended in a dead letter, false when it will be retried.
    pub dead: bool,
}

/// What is known of one sink's recent attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkActivity {
    pub last_success_at: Option<Millis>,
    pub last_error: Option<LastError>,
    /// When the sink's current outage began, as this relay's dispatcher sees it.
    pub outage_since: Option<Millis>,
    /// The vendor's latest distinct API version warnings (newest last, at most
    /// [`WARNINGS_KEPT`]), from its answers' headers.
    pub warnings: Vec<String>,
    /// When a version warning of this sink was last logged.
    pub warning_logged_at: Option<Millis>,
}

/// How many distinct version warnings are kept per sink.
pub const WARNINGS_KEPT: usize = 3;

/// A sink's version warnings are logged at most once in this long.
pub const WARNING_LOG_EVERY: Millis = 3600 * 1000;

/// The in-memory record of each sink's last success and last error, fed by the dispatcher
/// (one call per settled attempt) and read by `GET /admin/sinks`. A cheap `Clone` handle: one
/// per relay, made in `run_with_store`.
#[derive(Debug, Clone, Default)]
pub struct SinkStatus {
    by_sink: Arc<RwLock<HashMap<SinkName, SinkActivity>>>,
    /// The last hour, minute by minute, for the status page.
    history: history::History,
}

/// Longest error message kept per sink.
const LAST_ERROR_MAX_CHARS: usize = 500;

impl SinkStatus {
    /// Records how an attempt ended, now.
    pub fn record(&self, sink: SinkName, settle: &Settle) {
        self.record_at(sink, settle, now_ms());
    }

    /// Records how an attempt ended at `at`, and counts it in the sink's history. Skipped
    /// deliveries made no attempt: counted, but not recorded as a success or an error.
    pub fn record_at(&self, sink: SinkName, settle: &Settle, at: Millis) {
        self.history.count(sink, history::Counted::of(settle), at);
        let Ok(mut by_sink) = self.by_sink.write() else {
            return;
        };
        let activity = by_sink.entry(sink).or_default();
        match settle {
            Settle::Delivered { .. } => activity.last_success_at = Some(at),
            Settle::Retry { status, error, .. } | Settle::Dead { status, error, .. } => {
                activity.last_error = Some(LastError {
                    at,
                    status: *status,
                    message: error.chars().take(LAST_ERROR_MAX_CHARS).collect(),
                    dead: matches!(settle, Settle::Dead { .. }),
                });
            }
            Settle::Skipped { .. } => {}
        }
    }

    /// Records that `sink`'s outage began at `since`, or (`None`) ended.
    pub fn set_outage(&self, sink: SinkName, since: Option<Millis>) {
        if let Ok(mut by_sink) = self.by_sink.write() {
            by_sink.entry(sink).or_default().outage_since = since;
        }
        metrics::gauge!(metric::SINK_OUTAGE, "sink" => sink.as_str()).set(if since.is_some() {
            1.0
        } else {
            0.0
        });
    }

    /// Records a vendor's API version warning (`delivery::version_warning`) seen at `now`:
    /// kept among the sink's latest distinct warnings for `/admin/sinks`, and logged at most
    /// once per [`WARNING_LOG_EVERY`] per sink.
    pub fn warn(&self, sink: SinkName, warning: &str, now: Millis) {
        let log = {
            let Ok(mut by_sink) = self.by_sink.write() else {
                return;
            };
            let activity = by_sink.entry(sink).or_default();
            activity.warnings.retain(|kept| kept != warning);
            activity.warnings.push(warning.to_owned());
            let excess = activity.warnings.len().saturating_sub(WARNINGS_KEPT);
            activity.warnings.drain(..excess);
            let due = activity
                .warning_logged_at
                .is_none_or(|at| now - at >= WARNING_LOG_EVERY);
            if due {
                activity.warning_logged_at = Some(now);
            }
            due
        };
        if log {
            tracing::warn!(
                sink = %sink,
                %warning,
                "The sink's API version is going away (logged at most once an hour)"
            );
        }
    }

    /// Each sink's last hour: outcomes and delivery times per minute.
    pub fn history(&self) -> &history::History {
        &self.history
    }

    pub fn get(&self, sink: SinkName) -> SinkActivity {
        self.by_sink
            .read()
            .ok()
            .and_then(|by_sink| by_sink.get(&sink).cloned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if let Ok(mut buffer) = self.0.lock() {
                buffer.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;

        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    #[test]
    fn json_log_lines_are_redacted_through_the_real_subscriber()
    -> Result<(), Box<dyn std::error::Error>> {
        let capture = Capture::default();
        let log = LogConfig {
            format: Some(LogFormat::Json),
            level: "info".into(),
        };
        let redactor = Redactor::new(vec!["the-app-secret".into(), "dash-api-key".into()]);
        tracing::subscriber::with_default(subscriber(&log, redactor, capture.clone()), || {
            let span =
                tracing::info_span!("delivery", event_id = "e1", sink = "dashbot", attempt = 2);
            let _entered = span.enter();
            let url = "https://tracker.dashbot.io/track?platform=facebook&apiKey=dash-api-key&type=incoming";
            tracing::warn!(%url, error = "signature made with the-app-secret refused", "Delivery failed");
            tracing::warn!(
                "GET https://graph.facebook.com/v20.0/me?access_token=EAABxyz&appsecret_proof=0f1e failed"
            );
        });
        let text = String::from_utf8(capture.0.lock().map_err(|_| "poisoned")?.clone())?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), 2, "{text}");
        for secret in ["the-app-secret", "dash-api-key", "EAABxyz", "0f1e"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(lines[0]["message"], "Delivery failed");
        assert_eq!(
            lines[0]["url"],
            "https://tracker.dashbot.io/track?platform=facebook&apiKey=[redacted]&type=incoming"
        );
        assert_eq!(lines[0]["error"], "signature made with [redacted] refused");
        assert_eq!(lines[0]["span"]["event_id"], "e1");
        assert_eq!(lines[0]["span"]["attempt"], 2);
        assert!(
            lines[1]["message"]
                .as_str()
                .is_some_and(|m| m.contains("access_token=[redacted]&appsecret_proof=[redacted]"))
        );
        Ok(())
    }

    /// An outage shows in the status (for `/admin/sinks`) and in `botrelay_sink_outage`.
    #[test]
    fn an_outage_is_in_the_status_and_the_gauge() {
        let handle = metrics();
        let status = SinkStatus::default();
        let gauge = |value: &str| {
            format!(
                "{}{{sink=\"page_activities\"}} {value}",
                metric::SINK_OUTAGE
            )
        };
        status.set_outage(SinkName::PageActivities, Some(1_000));
        assert_eq!(
            status.get(SinkName::PageActivities).outage_since,
            Some(1_000)
        );
        assert!(handle.render().contains(&gauge("1")), "{}", handle.render());
        status.set_outage(SinkName::PageActivities, None);
        assert_eq!(status.get(SinkName::PageActivities).outage_since, None);
        assert!(handle.render().contains(&gauge("0")));
    }

    /// A stdout nobody reads: every write waits until the test opens the gate.
    #[derive(Clone, Default)]
    struct Stalled {
        gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        written: Capture,
    }

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let (open, opened) = &*self.gate;
            let mut open = open.lock().map_err(|_| io::Error::other("poisoned"))?;
            while !*open {
                open = opened
                    .wait(open)
                    .map_err(|_| io::Error::other("poisoned"))?;
            }
            self.written.write(bytes)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// With stdout stalled, logging returns at once: lines beyond the queue are dropped and
    /// counted, never waited for; once stdout moves again the queued lines come out whole and
    /// redacted.
    #[test]
    fn a_stalled_stdout_never_blocks_logging() -> Result<(), Box<dyn std::error::Error>> {
        const QUEUE: usize = 64;
        const LINES: usize = 5_000;
        let stalled = Stalled::default();
        let (writer, guard) = non_blocking(stalled.clone(), QUEUE);
        let dropped = writer.error_counter();
        let log = LogConfig {
            format: Some(LogFormat::Json),
            level: "info".into(),
        };
        let redactor = Redactor::new(vec!["the-app-secret".into()]);
        let started = std::time::Instant::now();
        tracing::subscriber::with_default(subscriber(&log, redactor, writer), || {
            for line in 0..LINES {
                tracing::info!(
                    line,
                    "Webhook acked with the-app-secret {}",
                    "x".repeat(200)
                );
            }
        });
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "logging waited for stdout: {took:?}"
        );
        // The writer thread holds one line, the queue QUEUE more; the rest were dropped.
        let lost = dropped.dropped_lines();
        assert!(lost >= LINES - QUEUE - 1, "only {lost} lines dropped");
        assert!(stalled.written.0.lock().map_err(|_| "poisoned")?.is_empty());

        let (open, opened) = &*stalled.gate;
        *open.lock().map_err(|_| "poisoned")? = true;
        opened.notify_all();
        guard.flush(Duration::from_secs(5));
        let text = String::from_utf8(stalled.written.0.lock().map_err(|_| "poisoned")?.clone())?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), LINES - lost, "{text}");
        assert!(!text.contains("the-app-secret"));
        assert!(
            lines[0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("[redacted]"))
        );
        Ok(())
    }

    #[test]
    fn sink_status_keeps_the_last_success_and_the_last_error() {
        let status = SinkStatus::default();
        assert_eq!(status.get(SinkName::Bot), SinkActivity::default());
        status.record_at(SinkName::Bot, &Settle::Delivered { status: 200 }, 10);
        status.record_at(
            SinkName::Bot,
            &Settle::Skipped {
                reason: "paused".into(),
            },
            11,
        );
        status.record_at(
            SinkName::Bot,
            &Settle::Retry {
                due_at: 99,
                counted: true,
                status: Some(503),
                error: "HTTP 503".into(),
            },
            12,
        );
        status.record_at(
            SinkName::Bot,
            &Settle::Dead {
                status: None,
                error: "x".repeat(900),
                attempted: true,
            },
            13,
        );
        let bot = status.get(SinkName::Bot);
        assert_eq!(bot.last_success_at, Some(10));
        let last = bot.last_error.unwrap_or_else(|| panic!("no last error"));
        assert_eq!(
            (last.at, last.status, last.dead, last.message.len()),
            (13, None, true, LAST_ERROR_MAX_CHARS)
        );
        assert_eq!(status.get(SinkName::Kochava), SinkActivity::default());
    }

    #[test]
    fn version_warnings_are_kept_distinct_and_logged_once_an_hour() {
        let status = SinkStatus::default();
        status.warn(SinkName::Conversions, "Sunset: a", 1_000);
        status.warn(SinkName::Conversions, "Sunset: a", 2_000);
        let activity = status.get(SinkName::Conversions);
        assert_eq!(activity.warnings, ["Sunset: a"]);
        assert_eq!(activity.warning_logged_at, Some(1_000));
        for (text, at) in [("b", 3_000), ("c", 4_000), ("d", 5_000), ("b", 6_000)] {
            status.warn(SinkName::Conversions, text, at);
        }
        let activity = status.get(SinkName::Conversions);
        assert_eq!(activity.warnings, ["c", "d", "b"]);
        assert_eq!(activity.warning_logged_at, Some(1_000));
        status.warn(SinkName::Conversions, "e", 1_000 + WARNING_LOG_EVERY);
        assert_eq!(
            status.get(SinkName::Conversions).warning_logged_at,
            Some(1_000 + WARNING_LOG_EVERY)
        );
        assert!(status.get(SinkName::PageActivities).warnings.is_empty());
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
        assert_eq!(
            String::from_utf8_lossy(&line.inner),
            "password [redacted]\n"
        );
        Ok(())
    }
}
