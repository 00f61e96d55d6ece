//! The admin listener (`admin.listen`): its `Router` and handlers for Prometheus metrics, dead
//! letters and their replay, the paused users, sink status and history. Who may call `/admin/*`
//! is `access.rs`'s; the JSON it speaks is `api.rs`'s, shared with the CLI's client
//! (`client.rs`); the status page (`GET /`, `/ui/*`) is `ui.rs`'s. [`AdminError`] has the one
//! mapping to HTTP.

pub mod access;
pub mod api;
pub mod client;
mod ui;

use crate::clock::now_ms;
use crate::config::Config;
use crate::redact::Redactor;
use crate::sink_name::SinkName;
use crate::store::{DeadLetter, DeadLetterFilter, SinkDepth, Store, StoreError};
use crate::telemetry;
use crate::telemetry::history;
use api::{
    BadSince, DEFAULT_LIMIT, DeadLetterView, ErrorBody, HistoryView, LastErrorView, MAX_LIMIT,
    PauseState, PausedUser, ReplayRequest, Replayed, Since, SinkHistoryView, SinkView, parse_since,
    rfc3339,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

/// The longest PSID (or `user_ref`) the pause endpoints take.
const MAX_USER_LEN: usize = 256;

/// What every admin handler shares.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub store: Store,
    /// The active sinks, in config order.
    pub active: Vec<SinkName>,
    pub redactor: Redactor,
    /// The dispatcher's record of each sink's last success and last error.
    pub status: telemetry::SinkStatus,
}

/// Everything an admin request can fail with, and the status each one maps to.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(
        "admin.token is not set, so the admin API answers only clients on this machine, not through a proxy nor from a web page; set admin.token (BOTRELAY__ADMIN__TOKEN) to use it from elsewhere"
    )]
    TokenRequired,
    #[error("unknown sink `{0}`; expected one of: {known}", known = known_sinks())]
    UnknownSink(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "sink `{sink}` is not enabled ({reason}): its dead letters stay dead until it is; enable it, then replay them"
    )]
    SinkNotEnabled { sink: &'static str, reason: String },
    #[error("no such admin endpoint")]
    NotFound,
    #[error("the store is unavailable: {0}")]
    Store(#[from] StoreError),
}

fn known_sinks() -> String {
    SinkName::ALL.map(SinkName::as_str).join(", ")
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::TokenRequired => StatusCode::FORBIDDEN,
            AdminError::UnknownSink(_) | AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound => StatusCode::NOT_FOUND,
            AdminError::SinkNotEnabled { .. } => StatusCode::CONFLICT,
            AdminError::Store(StoreError::Database(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<BadSince> for AdminError {
    fn from(error: BadSince) -> AdminError {
        AdminError::BadRequest(error.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            AdminError::Store(error) => tracing::error!(%error, "Admin request failed: store"),
            AdminError::Unauthorized => {
                tracing::warn!("Admin request rejected: missing or wrong bearer token")
            }
            AdminError::TokenRequired => tracing::warn!(
                "Admin request rejected: admin.token is not set, and it came from another machine, through a proxy or from a web page"
            ),
            _ => tracing::info!(error = %self, "Admin request rejected"),
        }
        let mut response = (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if matches!(self, AdminError::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"botrelay-admin\""),
            );
        }
        response
    }
}

// ---------------------------------------------------------------------------------------------
// The router.

/// The admin router. `/metrics` and `/healthz` are open (the listener is meant to stay on a
/// private address, and metrics carry no user ids or secrets); everything under `/admin` needs
/// the bearer token when `admin.token` is set. `/` and `/ui/*` are the status page, which
/// holds no data (it asks for the token, then calls `/admin/*` like any client).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(ui::page))
        .route("/ui/{asset}", get(ui::asset))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/dead-letters", get(list_dead_letters))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/users/{psid}/pause", post(pause))
        .route("/admin/users/{psid}/unpause", post(unpause))
        .route("/admin/paused", get(list_paused))
        .route("/admin/sinks", get(list_sinks))
        .route("/admin/sinks/history", get(sink_history))
        .fallback(|| async { AdminError::NotFound })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access::require_token,
        ))
        .with_state(state)
}

/// `GET /metrics`: refreshes the queue gauges from the store, then renders every metric. A
/// sink once shown keeps its gauges, at 0 once its rows are gone.
async fn render_metrics(State(state): State<AdminState>) -> Response {
    match state.store.depth().await {
        Ok(depth) => {
            let shown_before = telemetry::gauged_sinks();
            for sink in sinks_to_show(&state.active, &shown_before, &depth) {
                let figures = depth.get(&sink).cloned().unwrap_or_default();
                telemetry::set_queue_gauges(sink, figures.queued, figures.in_flight, figures.dead);
            }
        }
        Err(error) => tracing::warn!(%error, "Cannot read queue depths for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::metrics().render(),
    )
        .into_response()
}

/// The query of `GET /admin/dead-letters`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    sink: Option<String>,
    user: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /admin/dead-letters?sink=&user=&since=&limit=&after=`: the oldest first; `after` (the
/// last id of the previous page) pages on.
async fn list_dead_letters(
    State(state): State<AdminState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<axum::Json<Vec<DeadLetterView>>, AdminError> {
    let Query(query) = query.map_err(|rejection| AdminError::BadRequest(rejection.body_text()))?;
    let now = now_ms();
    let limit = match query.limit.as_deref().filter(|limit| !limit.is_empty()) {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                AdminError::BadRequest(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            })?,
    };
    let filter = DeadLetterFilter {
        sink: parse_sink(query.sink.as_deref())?,
        user: non_empty(query.user),
        since: query
            .since
            .as_deref()
            .filter(|since| !since.is_empty())
            .map(|since| parse_since(since, now))
            .transpose()?,
        ids: None,
        after: match query.after.as_deref().filter(|after| !after.is_empty()) {
            None => None,
            Some(text) => Some(text.parse::<i64>().ok().filter(|id| *id >= 0).ok_or_else(
                || AdminError::BadRequest("after must be a dead letter's id".into()),
            )?),
        },
        limit: Some(limit),
        newest_first: false,
    };
    let letters = state.store.dead_letters(filter).await?;
    Ok(axum::Json(
        letters
            .into_iter()
            .map(|letter| view_dead_letter(letter, &state.redactor))
            .collect(),
    ))
}

fn view_dead_letter(letter: DeadLetter, redactor: &Redactor) -> DeadLetterView {
    DeadLetterView {
        id: letter.id,
        event_id: letter.event_id,
        sink: letter.sink,
        kind: letter.kind,
        user: letter.user,
        attempts: letter.attempts,
        last_status: letter.last_status,
        // Stored redacted already; masked again with this process's secrets for good measure.
        last_error: letter.last_error.map(|error| redactor.redact(&error)),
        first_attempt_at: letter.first_attempt_at.map(rfc3339),
        last_attempt_at: letter.last_attempt_at.map(rfc3339),
    }
}

/// `POST /admin/dead-letters/replay`: requeues the matching dead letters (each rejoins its
/// user's lane at its original place) and answers `{"replayed": N}`.
async fn replay(
    State(state): State<AdminState>,
    body: Bytes,
) -> Result<axum::Json<Replayed>, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AdminError::BadRequest(
            "the body must be a JSON object such as {\"sink\": \"bot\"}; send {} to replay every dead letter".into(),
        ));
    }
    let request: ReplayRequest = serde_json::from_slice(&body)
        .map_err(|error| AdminError::BadRequest(format!("invalid replay request: {error}")))?;
    let now = now_ms();
    if request
        .ids
        .as_ref()
        .is_some_and(|ids| ids.len() > MAX_LIMIT as usize)
    {
        return Err(AdminError::BadRequest(format!(
            "at most {MAX_LIMIT} ids per replay"
        )));
    }
    // An empty filter would widen the replay to everything: a caller's unset variable, not a
    // wish (`{}` says "everything" on purpose).
    for (field, empty) in [
        ("sink", request.sink.as_deref() == Some("")),
        ("user", request.user.as_deref() == Some("")),
        (
            "since",
            matches!(&request.since, Some(Since::Text(text)) if text.is_empty()),
        ),
    ] {
        if empty {
            return Err(AdminError::BadRequest(format!(
                "{field} is empty: leave it out to replay regardless of it"
            )));
        }
    }
    let sink = parse_sink(request.sink.as_deref())?;
    if let Some(sink) = sink.filter(|sink| !state.active.contains(sink)) {
        return Err(AdminError::SinkNotEnabled {
            sink: sink.as_str(),
            reason: disabled_reason(&state, sink),
        });
    }
    let filter = DeadLetterFilter {
        sink,
        user: non_empty(request.user),
        since: match request.since {
            None => None,
            Some(Since::Millis(at)) => Some(at),
            Some(Since::Text(text)) => Some(parse_since(&text, now)?),
        },
        ids: request.ids,
        after: None,
        limit: None,
        newest_first: false,
    };
    let outcome = state.store.replay(filter, &state.active, now).await?;
    tracing::info!(
        replayed = outcome.replayed,
        sink = sink.map(SinkName::as_str),
        "Dead letters replayed through the admin API"
    );
    if !outcome.left_dead.is_empty() {
        tracing::warn!(
            left_dead = ?outcome.left_dead,
            "Dead letters of sinks that are not enabled were left dead"
        );
    }
    Ok(axum::Json(Replayed {
        replayed: outcome.replayed,
        left_dead: outcome.left_dead,
    }))
}

/// `POST /admin/users/{psid}/pause`: nothing from this user reaches the bot until unpaused.
async fn pause(
    State(state): State<AdminState>,
    Path(psid): Path<String>,
) -> Result<axum::Json<PauseState>, AdminError> {
    set_paused(&state, psid, true).await
}

/// `POST /admin/users/{psid}/unpause`.
async fn unpause(
    State(state): State<AdminState>,
    Path(psid): Path<String>,
) -> Result<axum::Json<PauseState>, AdminError> {
    set_paused(&state, psid, false).await
}

/// Stores the pause durably first, then applies it to the dispatcher's view (as Dashbot's pause
/// webhook does), then answers.
async fn set_paused(
    state: &AdminState,
    user: String,
    paused: bool,
) -> Result<axum::Json<PauseState>, AdminError> {
    if user.trim().is_empty() || user.len() > MAX_USER_LEN || user.chars().any(char::is_control) {
        return Err(AdminError::BadRequest(format!(
            "the user must be a PSID of 1 to {MAX_USER_LEN} characters"
        )));
    }
    state.store.set_paused(&user, paused, now_ms()).await?;
    tracing::info!(paused, "Pause state set through the admin API");
    Ok(axum::Json(PauseState { user, paused }))
}

/// `GET /admin/paused`: the paused users, longest paused first.
async fn list_paused(
    State(state): State<AdminState>,
) -> Result<axum::Json<Vec<PausedUser>>, AdminError> {
    let users = state.store.paused_users().await?;
    Ok(axum::Json(
        users
            .into_iter()
            .map(|(user, at)| PausedUser {
                user,
                paused_at: rfc3339(at),
            })
            .collect(),
    ))
}

/// `GET /admin/sinks`: the active sinks in config order, then the disabled ones, then any sink
/// that still has rows in the store but no table in the config.
async fn list_sinks(
    State(state): State<AdminState>,
) -> Result<axum::Json<Vec<SinkView>>, AdminError> {
    let depth = state.store.depth().await?;
    let disabled_order: Vec<SinkName> = state
        .config
        .disabled_sinks
        .iter()
        .map(|(name, _)| *name)
        .collect();
    let mut views = Vec::new();
    for sink in sinks_to_show(&state.active, &disabled_order, &depth) {
        let figures = depth.get(&sink).cloned().unwrap_or_default();
        let enabled = state.active.contains(&sink);
        let activity = state.status.get(sink);
        let last_error = match activity.last_error {
            Some(error) => Some(LastErrorView {
                at: rfc3339(error.at),
                status: error.status,
                message: state.redactor.redact(&error.message),
                dead: error.dead,
                source: "live".into(),
            }),
            None if figures.dead > 0 => newest_dead_letter(&state, sink).await?,
            None => None,
        };
        views.push(SinkView {
            sink: sink.as_str().to_owned(),
            enabled,
            state: if activity.outage_since.is_some() {
                "outage"
            } else {
                "ok"
            }
            .to_owned(),
            outage_since: activity.outage_since.map(rfc3339),
            queue_depth: figures.queued,
            in_flight: figures.in_flight,
            dead: figures.dead,
            last_success_at: activity.last_success_at.map(rfc3339),
            last_error,
            warnings: warnings(&state, sink, enabled, &activity.warnings),
        });
    }
    Ok(axum::Json(views))
}

/// `GET /admin/sinks/history`: each active sink's last hour, minute by minute, as this relay
/// process saw it (the dispatcher feeds it; nothing is stored).
async fn sink_history(State(state): State<AdminState>) -> axum::Json<HistoryView> {
    let now = now_ms();
    let history = state.status.history();
    let sinks = state
        .active
        .iter()
        .map(|sink| {
            let hour = history.last_hour(*sink, now);
            SinkHistoryView {
                sink: sink.as_str().to_owned(),
                delivered: hour.delivered,
                retried: hour.retried,
                dead: hour.dead,
                skipped: hour.skipped,
                p50_ms: hour.p50_ms,
                p99_ms: hour.p99_ms,
            }
        })
        .collect();
    axum::Json(HistoryView {
        now: rfc3339(now),
        start: rfc3339(history::first_minute(now)),
        step_seconds: 60,
        sinks,
    })
}

/// What `/admin/sinks` lists under `warnings`: why the sink is not enabled, or what its config
/// warns of (a retired API, a fallback), then the vendor's latest API version warnings.
fn warnings(state: &AdminState, sink: SinkName, enabled: bool, seen: &[String]) -> Vec<String> {
    let mut warnings = if enabled {
        state
            .config
            .sinks
            .iter()
            .filter(|route| route.name == sink)
            .flat_map(|route| route.warnings())
            .collect()
    } else {
        vec![disabled_reason(state, sink)]
    };
    warnings.extend(seen.iter().map(|warning| state.redactor.redact(warning)));
    warnings
}

/// Why `sink`, not active, is not enabled.
fn disabled_reason(state: &AdminState, sink: SinkName) -> String {
    state
        .config
        .disabled_sinks
        .iter()
        .find(|(name, _)| *name == sink)
        .map_or_else(
            || "no table in the config; rows left from an earlier run".to_owned(),
            |(_, reason)| reason.clone(),
        )
}

/// Active sinks in order, then `also` in order, then any other sink with rows in the store.
fn sinks_to_show(
    active: &[SinkName],
    also: &[SinkName],
    depth: &HashMap<SinkName, SinkDepth>,
) -> Vec<SinkName> {
    let mut sinks: Vec<SinkName> = Vec::new();
    let leftovers = SinkName::ALL
        .into_iter()
        .filter(|sink| depth.contains_key(sink));
    for sink in active.iter().chain(also).copied().chain(leftovers) {
        if !sinks.contains(&sink) {
            sinks.push(sink);
        }
    }
    sinks
}

/// The newest dead letter of `sink`, as its last error when nothing failed since the start.
async fn newest_dead_letter(
    state: &AdminState,
    sink: SinkName,
) -> Result<Option<LastErrorView>, AdminError> {
    let newest = state
        .store
        .dead_letters(DeadLetterFilter {
            sink: Some(sink),
            limit: Some(1),
            newest_first: true,
            ..DeadLetterFilter::default()
        })
        .await?;
    Ok(newest.into_iter().next().map(|letter| LastErrorView {
        at: rfc3339(letter.last_attempt_at.unwrap_or(letter.dead_at)),
        status: letter.last_status,
        message: state
            .redactor
            .redact(letter.last_error.as_deref().unwrap_or_default()),
        dead: true,
        source: "dead_letters".into(),
    }))
}

fn parse_sink(sink: Option<&str>) -> Result<Option<SinkName>, AdminError> {
    match sink.filter(|sink| !sink.is_empty()) {
        None => Ok(None),
        Some(name) => SinkName::parse(name)
            .map(Some)
            .ok_or_else(|| AdminError::UnknownSink(name.to_owned())),
    }
}

fn non_empty(text: Option<String>) -> Option<String> {
    text.filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    #[test]
    fn unknown_sinks_are_named_with_the_known_ones() {
        let error = parse_sink(Some("kochavaa"))
            .err()
            .map(|error| error.to_string());
        assert_eq!(
            error.as_deref(),
            Some(
                "unknown sink `kochavaa`; expected one of: bot, kochava, kochava_smartlink, dashbot, page_activities, conversions"
            )
        );
        assert!(matches!(parse_sink(Some("")), Ok(None)));
        assert!(matches!(
            parse_sink(Some("dashbot")),
            Ok(Some(SinkName::Dashbot))
        ));
    }
    /// The gauges of a sink that is not enabled (its table is gone) follow the store: once the
    /// purge removes its last dead letters, `/metrics` says 0, not the count of the last scrape
    /// that still saw them (until the next restart).
    #[tokio::test]
    async fn the_gauges_of_a_sink_not_enabled_fall_to_zero_when_its_rows_are_purged()
    -> Result<(), Box<dyn std::error::Error>> {
        use crate::event::EventKind;
        use crate::store::{NewEvent, Retention, Settle};
        telemetry::register_metrics(&[]);
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(&dir.path().join("store.db"), None)?;
        let sink = SinkName::PageActivities;
        let now = now_ms();
        let event = crate::sinks::testing::custom(
            EventKind::Lead,
            "leadEvent",
            "lead_submitted",
            serde_json::json!({}),
        );
        store
            .enqueue(
                vec![NewEvent {
                    event,
                    sinks: vec![sink],
                }],
                now,
            )
            .await?;
        let claimed = store.claim(sink, 1, now, Duration::from_secs(60)).await?;
        let dead = Settle::Dead {
            status: Some(400),
            error: "HTTP 400".into(),
            attempted: true,
        };
        for delivery in &claimed.deliveries {
            store.settle(delivery, dead.clone(), now).await?;
        }
        let config = Config::from_sources(
            "[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n",
            HashMap::new(),
        )?;
        let router = router(AdminState {
            config: Arc::new(config),
            store: store.clone(),
            active: Vec::new(),
            redactor: Redactor::new(Vec::new()),
            status: telemetry::SinkStatus::default(),
        });
        let dead_letters = |router: Router| async move {
            let response = router
                .oneshot(Request::get("/metrics").body(axum::body::Body::empty())?)
                .await?;
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
            Ok::<String, Box<dyn std::error::Error>>(
                String::from_utf8_lossy(&body)
                    .lines()
                    .find_map(|line| {
                        line.strip_prefix("botrelay_dead_letters{sink=\"page_activities\"} ")
                            .map(str::to_owned)
                    })
                    .unwrap_or_default(),
            )
        };
        assert_eq!(dead_letters(router.clone()).await?, "1");

        let retention = Retention {
            delivered: Duration::ZERO,
            dead: Duration::ZERO,
            dedupe_window: Duration::ZERO,
        };
        let purged = store.purge(retention, now + 1).await?;
        assert_eq!(purged.deliveries, 1);
        assert_eq!(dead_letters(router).await?, "0");
        Ok(())
    }

    #[test]
    fn sinks_are_shown_active_first_then_disabled_then_leftovers() {
        let depth: HashMap<SinkName, SinkDepth> = [
            (SinkName::Conversions, SinkDepth::default()),
            (SinkName::Bot, SinkDepth::default()),
        ]
        .into();
        assert_eq!(
            sinks_to_show(
                &[SinkName::Bot, SinkName::Kochava],
                &[SinkName::Dashbot],
                &depth
            ),
            vec![
                SinkName::Bot,
                SinkName::Kochava,
                SinkName::Dashbot,
                SinkName::Conversions
            ]
        );
    }
}
