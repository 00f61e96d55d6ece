//! The public listener: Meta's webhook (handshake and events), health checks, and what the bot
//! tells the relay. Raw bytes go through verify, then normalize, then the store; the 2xx is sent
//! only after the store has committed.
//!
//! [`IngestError`] and its one mapping to HTTP status live here: clients get terse bodies, the
//! log gets the detail.

pub mod messenger;
pub mod verify;

use crate::config::Config;
use crate::event::Event;
use crate::sinks::Sinks;
use crate::store::{NewEvent, Store, StoreError, now_ms};
use crate::telemetry::metric;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::Arc;

/// What every public handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub sinks: Sinks,
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
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("the store is unavailable: {0}")]
    Store(#[from] StoreError),
}

impl IngestError {
    fn status(&self) -> StatusCode {
        match self {
            IngestError::Forbidden => StatusCode::FORBIDDEN,
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::BadBody(_) | IngestError::NotJson(_) => StatusCode::BAD_REQUEST,
            IngestError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn from_body(rejection: BytesRejection, limit: usize) -> IngestError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge(limit)
        } else {
            IngestError::BadBody(rejection.body_text())
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            IngestError::Store(error) => tracing::error!(%error, "Store unavailable; answering 503"),
            IngestError::Unauthorized(_) | IngestError::Forbidden => {
                tracing::warn!(error = %self, "Request rejected")
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

/// The public router.
pub fn router(state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    Router::new()
        .route("/webhook", get(handshake).post(receive_webhook))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn handshake(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, IngestError> {
    let challenge = verify::handshake(
        state.config.messenger.verify_token.expose_secret().as_bytes(),
        query.get("hub.mode").map(String::as_str),
        query.get("hub.verify_token").map(String::as_str),
        query.get("hub.challenge").map(String::as_str),
    )
    .ok_or(IngestError::Forbidden)?;
    tracing::info!("Webhook handshake answered");
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], challenge.to_owned()).into_response())
}

async fn receive_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<&'static str, IngestError> {
    let limit = state.config.server.max_body_bytes;
    let body = body.map_err(|rejection| {
        let error = IngestError::from_body(rejection, limit);
        if matches!(error, IngestError::TooLarge(_)) {
            rejected("too_large");
        }
        error
    })?;
    let signatures = verify::SignatureHeaders {
        sha256: headers.get("x-hub-signature-256").and_then(|value| value.to_str().ok()),
        sha1: headers.get("x-hub-signature").and_then(|value| value.to_str().ok()),
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
        rejected("not_json");
        IngestError::NotJson(error.to_string())
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
pub(crate) async fn store(state: &AppState, events: Vec<Event>, now: i64) -> Result<usize, IngestError> {
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
        metrics::counter!(metric::DUPLICATES).increment(u64::try_from(report.duplicates).unwrap_or(u64::MAX));
    }
    tracing::debug!(stored = report.stored, duplicates = report.duplicates, deliveries = report.deliveries, "Stored");
    Ok(count)
}

fn rejected(reason: &'static str) {
    metrics::counter!(metric::WEBHOOK_REJECTED, "reason" => reason).increment(1);
}

async fn ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.store.is_writable(now_ms()).await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store is not writable")
    }
}
