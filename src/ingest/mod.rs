//! The public listener: Meta's webhook (handshake and events), health checks, and what the bot
//! tells the relay (`/outgoing`, `/events`, the Send API proxy, Dashbot's pause webhook). Raw
//! bytes go through verify (or the bearer check), then normalize, then the store; the 2xx is sent
//! only after the store has committed.
//!
//! [`IngestError`] and its one mapping to HTTP status live here: clients get terse bodies, the
//! log gets the detail.

pub mod custom;
pub mod messenger;
pub mod outgoing;
pub mod proxy;
pub mod verify;

use crate::clock::now_ms;
use crate::config::Config;
use crate::delivery::Client;
use crate::event::Event;
use crate::sinks::Sinks;
use crate::store::{NewEvent, Store, StoreError};
use crate::telemetry::metric;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What every public handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub sinks: Sinks,
    /// The shared HTTP client (the Send API proxy uses it).
    pub client: Client,
}

/// Everything a public request can fail with, and the status each one maps to.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("forbidden")]
    Forbidden,
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] verify::VerifyError),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    TimedOut(BodyTimedOut),
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("the store is unavailable: {0}")]
    Store(#[from] StoreError),
    /// An optional endpoint whose config key is unset (→ 404).
    #[error("{endpoint} is disabled: `{key}` is not set")]
    Disabled {
        endpoint: &'static str,
        key: &'static str,
    },
    #[error("missing or wrong bearer token")]
    BadBearer,
    #[error("{0}")]
    BadItem(#[from] BadItem),
    #[error("{0}")]
    BadRequest(String),
    /// The Send API proxy got no answer from Graph (→ 502). Never carries the URL.
    #[error("{}", graph_failure(.timed_out, .timeout))]
    GraphUnreachable { timed_out: bool, timeout: Duration },
}

fn graph_failure(timed_out: &bool, timeout: &Duration) -> String {
    if *timed_out {
        format!(
            "Graph did not answer within {}",
            humantime::format_duration(*timeout)
        )
    } else {
        "cannot reach Graph".to_owned()
    }
}

impl IngestError {
    fn status(&self) -> StatusCode {
        match self {
            IngestError::Forbidden => StatusCode::FORBIDDEN,
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::BadBody(_)
            | IngestError::NotJson(_)
            | IngestError::BadItem(_)
            | IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Disabled { .. } => StatusCode::NOT_FOUND,
            IngestError::BadBearer => StatusCode::UNAUTHORIZED,
            IngestError::GraphUnreachable { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    fn from_body(rejection: BytesRejection, limit: usize) -> IngestError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge(limit)
        } else if let Some(BodyTimedOut(after)) = BodyTimedOut::find(&rejection) {
            IngestError::TimedOut(BodyTimedOut(*after))
        } else {
            IngestError::BadBody(rejection.body_text())
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            IngestError::Store(error) => {
                tracing::error!(%error, "Store unavailable; answering 503")
            }
            IngestError::Unauthorized(_) | IngestError::Forbidden | IngestError::BadBearer => {
                tracing::warn!(error = %self, "Request rejected")
            }
            IngestError::GraphUnreachable { .. } => {
                tracing::warn!(error = %self, "Send API proxy answering 502")
            }
            _ => tracing::info!(error = %self, "Request rejected"),
        }
        match self {
            // The handshake answers 403 with an empty body, as Meta's sample does.
            IngestError::Forbidden => status.into_response(),
            other => (
                status,
                axum::Json(serde_json::json!({ "error": other.to_string() })),
            )
                .into_response(),
        }
    }
}

/// The public router. The state is shared behind one `Arc`: axum clones it for every request,
/// and cloning and dropping each field (the store, the sinks, the client) per request was
/// about 2 % of the workers' time in a profile of the pipeline benchmark.
pub fn router(state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    let state = Arc::new(state);
    Router::new()
        .route("/webhook", get(handshake).post(receive_webhook))
        .route("/outgoing", post(receive_outgoing))
        .route("/events", post(receive_events))
        .route("/graph/{version}/{page_or_me}/messages", post(proxy::proxy))
        .route("/dashbot/pause", post(dashbot_pause))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn handshake(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, IngestError> {
    let challenge = verify::handshake(
        state
            .config
            .messenger
            .verify_token
            .expose_secret()
            .as_bytes(),
        query.get("hub.mode").map(String::as_str),
        query.get("hub.verify_token").map(String::as_str),
        query.get("hub.challenge").map(String::as_str),
    )
    .ok_or(IngestError::Forbidden)?;
    tracing::info!("Webhook handshake answered");
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        challenge.to_owned(),
    )
        .into_response())
}

async fn receive_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<&'static str, IngestError> {
    let limit = state.config.server.max_body_bytes;
    let body = body.map_err(|rejection| {
        let error = IngestError::from_body(rejection, limit);
        if matches!(error, IngestError::TooLarge(_)) {
            rejected(metric::REJECTED_TOO_LARGE);
        }
        error
    })?;
    let signatures = verify::SignatureHeaders {
        sha256: headers
            .get("x-hub-signature-256")
            .and_then(|value| value.to_str().ok()),
        sha1: headers
            .get("x-hub-signature")
            .and_then(|value| value.to_str().ok()),
    };
    let verified = verify::verify_webhook(
        state.config.messenger.app_secret.expose_secret().as_bytes(),
        state.config.messenger.accept_sha1,
        signatures,
        body,
    )
    .inspect_err(|error| rejected(error.reason()))?;
    let now = now_ms();
    let normalized = messenger::normalize(&verified, now).map_err(|error| {
        rejected(metric::REJECTED_NOT_JSON);
        let messenger::NormalizeError::NotJson(cause) = error;
        IngestError::NotJson(cause.to_string())
    })?;
    if !normalized.is_batch {
        tracing::info!(object = ?normalized.object, "Signed webhook is not an entry batch (a dashboard test?); acknowledged, nothing delivered");
        metrics::counter!(metric::WEBHOOK_IGNORED, "reason" => "not_a_batch").increment(1);
        return Ok("EVENT_RECEIVED");
    }
    if normalized.ignored > 0 {
        metrics::counter!(metric::WEBHOOK_IGNORED, "reason" => "no_messaging_item")
            .increment(u64::try_from(normalized.ignored).unwrap_or(u64::MAX));
    }
    store(&state, normalized.events, now).await?;
    Ok("EVENT_RECEIVED")
}

/// Routes each event to its sinks and stores them all in one commit.
pub(crate) async fn store(
    state: &AppState,
    events: Vec<Event>,
    now: i64,
) -> Result<usize, IngestError> {
    let count = events.len();
    for event in &events {
        metrics::counter!(metric::EVENTS_RECEIVED, "source" => event.source.as_str(), "kind" => event.kind.as_str())
            .increment(1);
    }
    let batch = events
        .into_iter()
        .map(|event| NewEvent {
            sinks: state.sinks.targets(&event),
            event,
        })
        .collect();
    let report = state.store.enqueue(batch, now).await?;
    if report.duplicates > 0 {
        metrics::counter!(metric::DUPLICATES)
            .increment(u64::try_from(report.duplicates).unwrap_or(u64::MAX));
    }
    tracing::debug!(
        stored = report.stored,
        duplicates = report.duplicates,
        deliveries = report.deliveries,
        "Stored"
    );
    Ok(count)
}

/// `POST /outgoing`: the bot reports its Send API calls (SPEC §2.3).
async fn receive_outgoing(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let body = bearer_body(&state, "/outgoing", &headers, body)?;
    let items = ReportItems::parse(&body)?;
    let now = now_ms();
    let events = outgoing::normalize(&items, now, state.config.messenger.app_id.as_deref())?;
    accepted(&state, events, now).await
}

/// `POST /events`: the bot's custom events in Dashbot's event shape (SPEC §2.4).
async fn receive_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let body = bearer_body(&state, "/events", &headers, body)?;
    let items = ReportItems::parse(&body)?;
    let now = now_ms();
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|key| {
            key.to_str().map_err(|_| {
                IngestError::BadRequest("Idempotency-Key must be visible ASCII".to_owned())
            })
        })
        .transpose()?
        .filter(|key| !key.is_empty());
    let nonce = format!("{:032x}", rand::random::<u128>());
    let keys = custom::RequestKeys {
        idempotency_key,
        nonce: &nonce,
    };
    let events = custom::normalize(&items, keys, now)?;
    accepted(&state, events, now).await
}

/// Stores a whole batch in one commit, then answers 202 `{"accepted": N}`.
async fn accepted(state: &AppState, events: Vec<Event>, now: i64) -> Result<Response, IngestError> {
    let count = if events.is_empty() {
        0
    } else {
        store(state, events, now).await?
    };
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "accepted": count })),
    )
        .into_response())
}

/// The bearer check of `/outgoing` and `/events`, then the body. 404 while `ingest.token` is
/// unset: without a token anyone could inject analytics, so the endpoints stay off.
fn bearer_body(
    state: &AppState,
    endpoint: &'static str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, IngestError> {
    let token = state
        .config
        .ingest
        .token
        .as_ref()
        .ok_or(IngestError::Disabled {
            endpoint,
            key: "ingest.token",
        })?;
    if !crate::signing::bearer_matches(token, headers) {
        return Err(IngestError::BadBearer);
    }
    body.map_err(|rejection| IngestError::from_body(rejection, state.config.server.max_body_bytes))
}

/// `POST /dashbot/pause`: Dashbot's live-person takeover (SPEC §2.6). The pause is stored
/// durably first, then applied to the dispatcher's view, then acknowledged.
async fn dashbot_pause(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<&'static str, IngestError> {
    let secret = state
        .config
        .dashbot
        .secret
        .as_ref()
        .ok_or(IngestError::Disabled {
            endpoint: "/dashbot/pause",
            key: "dashbot.secret",
        })?;
    let body = body.map_err(|rejection| {
        IngestError::from_body(rejection, state.config.server.max_body_bytes)
    })?;
    verify::verify_dashbot(
        secret.expose_secret().as_bytes(),
        headers
            .get("x-dashbot-signature")
            .and_then(|value| value.to_str().ok()),
        &body,
    )?;
    let (user, paused) = pause_request(&body)?;
    state.store.set_paused(&user, paused, now_ms()).await?;
    tracing::info!(%user, paused, "Dashbot pause applied");
    Ok("ok")
}

/// `{"userId": "<psid>", "paused": true|false}`.
fn pause_request(body: &[u8]) -> Result<(String, bool), IngestError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|error| IngestError::NotJson(error.to_string()))?;
    let bad = |message: &str| IngestError::BadItem(BadItem::new(None, message));
    let fields = value
        .as_object()
        .ok_or_else(|| bad("body must be a JSON object"))?;
    let user = match fields.get("userId") {
        Some(Value::String(user)) if !user.is_empty() => user.clone(),
        Some(Value::Number(user)) => user.to_string(),
        None | Some(Value::Null) => return Err(bad("userId is missing")),
        Some(_) => return Err(bad("userId must be a non-empty string")),
    };
    let paused = match fields.get("paused") {
        Some(Value::Bool(paused)) => *paused,
        None | Some(Value::Null) => return Err(bad("paused is missing")),
        Some(_) => return Err(bad("paused must be true or false")),
    };
    Ok((user, paused))
}

/// One part of a `/outgoing` or `/events` body that is not what the endpoint takes (→ 400).
/// Names the item (its index in an array body, from 0) and the field, never a value: values may
/// be tokens or message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BadItem {
    /// `None` when the body was a single object.
    pub item: Option<usize>,
    pub problem: String,
}

impl BadItem {
    pub fn new(item: Option<usize>, problem: impl Into<String>) -> BadItem {
        BadItem {
            item,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for BadItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some(index) => write!(f, "item {index}: {}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

/// A report body: one JSON object or an array of them, each item kept as its raw bytes.
#[derive(Debug)]
pub struct ReportItems<'a> {
    items: Vec<&'a RawValue>,
    is_array: bool,
}

impl<'a> ReportItems<'a> {
    /// Splits the body into items; not JSON, or JSON that is neither an object nor an array,
    /// is refused whole.
    pub fn parse(body: &'a [u8]) -> Result<ReportItems<'a>, IngestError> {
        let whole: &RawValue = serde_json::from_slice(body)
            .map_err(|error| IngestError::NotJson(error.to_string()))?;
        let text = whole.get().trim_start();
        if text.starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(text)
                .map_err(|error| IngestError::NotJson(error.to_string()))?;
            Ok(ReportItems {
                items,
                is_array: true,
            })
        } else if text.starts_with('{') {
            Ok(ReportItems {
                items: vec![whole],
                is_array: false,
            })
        } else {
            Err(BadItem::new(None, "body must be a JSON object or an array of objects").into())
        }
    }

    /// Each item with its label for errors (its index when the body was an array).
    pub fn iter(&self) -> impl Iterator<Item = (Option<usize>, &'a RawValue)> + '_ {
        self.items
            .iter()
            .enumerate()
            .map(|(index, item)| (self.is_array.then_some(index), *item))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Parses one item as a JSON object, or names it as the bad part.
pub(crate) fn item_object(
    label: Option<usize>,
    raw: &RawValue,
) -> Result<serde_json::Map<String, Value>, BadItem> {
    match messenger::from_str_lenient::<Value>(raw.get()) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(BadItem::new(label, "must be a JSON object")),
        Err(error) => Err(BadItem::new(label, unreadable(raw, &error))),
    }
}

/// Why an item that is valid JSON syntax (the body was checked) cannot be read, naming the
/// field that holds the part serde_json cannot hold (a number out of f64's range, nesting past
/// its depth limit).
fn unreadable(raw: &RawValue, error: &serde_json::Error) -> String {
    let message = error.to_string();
    let reason = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(reason, _)| reason);
    serde_json::from_str::<std::collections::BTreeMap<String, Box<RawValue>>>(raw.get())
        .ok()
        .and_then(|fields| {
            fields
                .into_iter()
                .find(|(_, value)| messenger::from_str_lenient::<Value>(value.get()).is_err())
        })
        .map_or_else(
            || "must be a JSON object".to_owned(),
            |(name, _)| format!("{name} cannot be read: {reason}"),
        )
}

fn rejected(reason: &'static str) {
    metrics::counter!(metric::WEBHOOK_REJECTED, "reason" => reason).increment(1);
}

async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.store.is_writable(now_ms()).await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store is not writable")
    }
}

/// Reading a request body failed because it did not arrive whole within `server.read_timeout`
/// of its request's headers.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyTimedOut(pub Duration);

impl BodyTimedOut {
    /// The `BodyTimedOut` somewhere in `error`'s chain of sources (a failed body read).
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTimedOut> {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(timed_out) = error.downcast_ref::<BodyTimedOut>() {
                return Some(timed_out);
            }
            cause = error.source();
        }
        None
    }
}
