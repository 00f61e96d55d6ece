//! The admin listener (`admin.listen`): Prometheus metrics, dead letters and their replay, the
//! paused users, sink status. `/admin/*` needs `Authorization: Bearer <admin.token>` when set,
//! and answers only loopback clients when not.
//! [`AdminError`] has the one mapping to HTTP; the JSON types are public so the CLI shares them.

use crate::clock::{Millis, millis, now_ms};
use crate::config::Config;
use crate::dispatch::Paused;
use crate::redact::Redactor;
use crate::sink_name::SinkName;
use crate::store::{DeadLetter, DeadLetterFilter, SinkDepth, Store, StoreError};
use crate::telemetry;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most dead letters one listing returns, and the most ids one replay takes.
pub const MAX_LIMIT: u32 = 10_000;
/// Dead letters a listing returns when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// The longest PSID (or `user_ref`) the pause endpoints take.
const MAX_USER_LEN: usize = 256;

/// What every admin handler shares.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub store: Store,
    /// The dispatcher's view of the paused users, kept in step with the store.
    pub paused: Paused,
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

/// The body of every admin error: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

// ---------------------------------------------------------------------------------------------
// The JSON of the admin API (the CLI deserializes the same types).

/// One dead letter. Times are RFC 3339 in UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterView {
    /// The delivery id: what `ids` in a replay refers to.
    pub id: i64,
    pub event_id: String,
    pub sink: String,
    pub kind: String,
    /// The PSID (or `user_ref`); absent for page-level events.
    pub user: Option<String>,
    pub attempts: u32,
    /// The HTTP status of the last attempt; absent when no answer came (timeout, refused).
    pub last_status: Option<u16>,
    /// The last error, with a redacted excerpt of the response.
    pub last_error: Option<String>,
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
}

/// `POST /admin/dead-letters/replay`: every field narrows the selection; `{}` replays every
/// dead letter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Dead since: milliseconds since the epoch, an RFC 3339 time, or a duration ago (`"1h"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Since>,
    /// Delivery ids (at most [`MAX_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<i64>>,
}

/// A point in time as a client may give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Since {
    Millis(Millis),
    Text(String),
}

/// The answer to a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    pub replayed: usize,
    /// Matching dead letters left dead because their sink is not enabled now, by sink (absent
    /// when there are none). Requeued, they would only wait for a dispatcher that is not running.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub left_dead: BTreeMap<String, usize>,
}

/// The answer to a pause or an unpause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseState {
    pub user: String,
    pub paused: bool,
}

/// One paused user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedUser {
    pub user: String,
    pub paused_at: String,
}

/// One sink in `GET /admin/sinks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkView {
    pub sink: String,
    pub enabled: bool,
    /// Why a sink is not enabled (its table lacks credentials, or it has rows but no table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Deliveries not yet delivered: waiting for their turn, due, or scheduled for a retry.
    pub queued: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// Since this process started.
    pub last_success_at: Option<String>,
    pub last_error: Option<LastErrorView>,
}

/// The last failure of a sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastErrorView {
    pub at: String,
    pub status: Option<u16>,
    /// Redacted.
    pub message: String,
    /// True when the attempt ended in a dead letter, false when it is retried.
    pub dead: bool,
    /// `"live"`: seen by the dispatcher since this process started; `"dead_letters"`: the
    /// newest dead letter in the store (nothing failed since the start).
    pub source: String,
}

// ---------------------------------------------------------------------------------------------
// The router.

/// The admin router. `/metrics` and `/healthz` are open (the listener is meant to stay on a
/// private address, and metrics carry no user ids or secrets); everything under `/admin` needs
/// the bearer token when `admin.token` is set.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/dead-letters", get(list_dead_letters))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/users/{psid}/pause", post(pause))
        .route("/admin/users/{psid}/unpause", post(unpause))
        .route("/admin/paused", get(list_paused))
        .route("/admin/sinks", get(list_sinks))
        .fallback(|| async { AdminError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Both ends of an admin connection, for the rule that without a token only this machine may
/// use `/admin` (the listener puts it in each request's extensions as `ConnectInfo`).
#[derive(Debug, Clone, Copy)]
pub struct AdminPeer {
    remote: SocketAddr,
    /// The address the client connected to (not the listener's `0.0.0.0`).
    local: Option<SocketAddr>,
}

impl AdminPeer {
    /// The peer `remote` of a connection made to `local`.
    pub fn new(remote: SocketAddr, local: Option<SocketAddr>) -> AdminPeer {
        AdminPeer { remote, local }
    }

    /// A client on this machine: a loopback address, or this host's own address (a client
    /// that connects to the listener's private address comes from that address).
    fn is_this_machine(&self) -> bool {
        let remote = self.remote.ip().to_canonical();
        remote.is_loopback()
            || self
                .local
                .is_some_and(|local| local.ip().to_canonical() == remote)
    }
}

/// Refuses `/admin` and everything under it without the right bearer token (when one is set),
/// unknown paths included, so that nothing about the API is learnt without it. Without a
/// token, `/admin` answers only clients on this machine, and not through a proxy nor from a web
/// page in a browser on this machine: a listener on every interface (as in the container image)
/// must not let the network, or any web site, pause users or replay.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let protected = path == "/admin" || path.starts_with("/admin/");
    if !protected {
        return next.run(request).await;
    }
    match state.config.admin.token.as_ref() {
        Some(token) if !crate::ingest::verify::bearer_matches(token, request.headers()) => {
            return AdminError::Unauthorized.into_response();
        }
        Some(_) => {}
        None => {
            let local = request
                .extensions()
                .get::<ConnectInfo<AdminPeer>>()
                .is_some_and(|ConnectInfo(peer)| peer.is_this_machine());
            // A proxy on this machine makes every client look local; it says who they are.
            let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
                .iter()
                .any(|name| request.headers().contains_key(*name));
            // So does a browser on this machine, for any web page it shows (a cross-site POST
            // with a `text/plain` body needs no preflight); it says where the request comes
            // from. The CLI and curl send neither header; an address typed in the address bar
            // comes with `Sec-Fetch-Site: none`.
            let from_a_web_page = request.headers().contains_key(header::ORIGIN)
                || request
                    .headers()
                    .get("sec-fetch-site")
                    .is_some_and(|site| site != "none");
            if !local || forwarded || from_a_web_page {
                return AdminError::TokenRequired.into_response();
            }
        }
    }
    next.run(request).await
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
    state
        .paused
        .change(&state.store, &user, paused, now_ms())
        .await?;
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
            disabled_reason: (!enabled).then(|| disabled_reason(&state, sink)),
            queued: figures.queued,
            in_flight: figures.in_flight,
            dead: figures.dead,
            last_success_at: activity.last_success_at.map(rfc3339),
            last_error,
        });
    }
    Ok(axum::Json(views))
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

// ---------------------------------------------------------------------------------------------
// Time, as the admin API writes and reads it.

/// Milliseconds since the epoch as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(at: Millis) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// A point in time as an operator writes it: milliseconds since the epoch (`1717171717000`), a
/// duration ago (`90s`, `1h`, `3d`), or an RFC 3339 time (`2025-01-31T12:00:00Z`, an offset
/// such as `+02:00` allowed).
pub fn parse_since(text: &str, now: Millis) -> Result<Millis, AdminError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        return text
            .parse::<Millis>()
            .map_err(|_| AdminError::BadRequest(format!("since: `{text}` is too large")));
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now.saturating_sub(millis(ago)));
    }
    parse_rfc3339(text).ok_or_else(|| {
        AdminError::BadRequest(format!(
            "since: `{text}` is not a duration (\"1h\"), an RFC 3339 time (\"2025-01-31T12:00:00Z\") or milliseconds"
        ))
    })
}

/// RFC 3339 with `Z` or a numeric offset (`T` and `Z` in either case, as RFC 3339 allows).
fn parse_rfc3339(text: &str) -> Option<Millis> {
    let text = &text.to_ascii_uppercase();
    let to_millis = |time: SystemTime| {
        time.duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|elapsed| Millis::try_from(elapsed.as_millis()).ok())
    };
    if let Ok(time) = humantime::parse_rfc3339(text) {
        return to_millis(time);
    }
    // `…+02:00` / `…-05:30`: parse the local time as UTC, then remove the offset.
    let split = text
        .len()
        .checked_sub(6)
        .filter(|split| text.is_char_boundary(*split))?;
    let (local, offset) = text.split_at(split);
    let sign = match offset.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return None,
    };
    let (hours, minutes) = offset.get(1..)?.split_once(':')?;
    let two_digits = |part: &str| part.len() == 2 && part.bytes().all(|byte| byte.is_ascii_digit());
    if !two_digits(hours) || !two_digits(minutes) {
        return None;
    }
    let (hours, minutes): (i64, i64) = (hours.parse().ok()?, minutes.parse().ok()?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    let local = to_millis(humantime::parse_rfc3339(&format!("{local}Z")).ok()?)?;
    Some(local - sign * (hours * 3600 + minutes * 60) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// The admin router on the discarding store, with `admin.token` set or not.
    fn admin_router(token: Option<&str>) -> Result<Router, Box<dyn std::error::Error>> {
        let token = token.map_or(String::new(), |token| {
            format!("[admin]\ntoken = \"{token}\"\n")
        });
        let config = Config::from_sources(
            &format!("{token}[messenger]\napp_secret = \"s\"\nverify_token = \"v\"\n"),
            HashMap::new(),
        )?;
        Ok(router(AdminState {
            config: Arc::new(config),
            store: Store::discarding(),
            paused: Paused::new(Vec::new()),
            active: Vec::new(),
            redactor: Redactor::new(Vec::new()),
            status: telemetry::SinkStatus::default(),
        }))
    }

    /// The status of `GET path` from `peer`, with `headers`.
    async fn status_from(
        router: &Router,
        path: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> Result<u16, Box<dyn std::error::Error>> {
        let mut request = Request::get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(axum::body::Body::empty())?;
        request.extensions_mut().insert(ConnectInfo(AdminPeer {
            remote: peer.parse()?,
            local: Some("10.0.0.5:9091".parse()?),
        }));
        Ok(router.clone().oneshot(request).await?.status().as_u16())
    }

    /// Without `admin.token`, `/admin` answers only this machine: loopback peers (IPv4, IPv6,
    /// and IPv4 on an IPv6 socket) and a peer at the address it connected to (the listener's
    /// own private address, here 10.0.0.5); `/metrics` and `/healthz` answer everyone. With a
    /// token, the token decides wherever the client is.
    #[tokio::test]
    async fn without_a_token_the_admin_api_answers_only_this_machine()
    -> Result<(), Box<dyn std::error::Error>> {
        let open = admin_router(None)?;
        for peer in [
            "127.0.0.1:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "10.0.0.5:5000",
        ] {
            assert_eq!(
                status_from(&open, "/admin/paused", peer, &[]).await?,
                200,
                "{peer}"
            );
        }
        for peer in [
            "10.0.0.7:5000",
            "[fd00::7]:5000",
            "[::ffff:172.17.0.1]:5000",
        ] {
            for (path, status) in [
                ("/admin/paused", 403),
                ("/admin/nothing", 403),
                ("/metrics", 200),
                ("/healthz", 200),
            ] {
                assert_eq!(
                    status_from(&open, path, peer, &[]).await?,
                    status,
                    "{peer} {path}"
                );
            }
        }
        // A proxy on this machine: the client it names is not this machine.
        for forwarded in [
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
        ] {
            assert_eq!(
                status_from(&open, "/admin/paused", "127.0.0.1:5000", &[forwarded]).await?,
                403,
                "{forwarded:?}"
            );
        }
        let closed = admin_router(Some("t0ken"))?;
        for peer in ["127.0.0.1:5000", "10.0.0.7:5000"] {
            assert_eq!(
                status_from(&closed, "/admin/paused", peer, &[]).await?,
                401,
                "{peer}"
            );
            assert_eq!(
                status_from(
                    &closed,
                    "/admin/paused",
                    peer,
                    &[("authorization", "Bearer t0ken")]
                )
                .await?,
                200,
                "{peer}"
            );
        }
        Ok(())
    }

    #[test]
    fn since_takes_rfc3339_in_either_case_and_refuses_signed_offset_hours() {
        let now = 1_700_000_000_000;
        assert_eq!(
            parse_since("2024-01-01t00:00:00z", now).ok(),
            Some(1_704_067_200_000)
        );
        assert_eq!(
            parse_since("2024-01-01T02:00:00+02:00", now).ok(),
            Some(1_704_067_200_000)
        );
        for bad in [
            "2024-01-01T00:00:00+-1:00",
            "2024-01-01T00:00:00++1:00",
            "2024-01-01T00:00:00+1:000",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn since_takes_durations_rfc3339_and_millis() -> Result<(), AdminError> {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("1h", now)?, now - 3_600_000);
        assert_eq!(parse_since("90s", now)?, now - 90_000);
        assert_eq!(parse_since("1717171717000", now)?, 1_717_171_717_000);
        assert_eq!(parse_since("2024-01-01T00:00:00Z", now)?, 1_704_067_200_000);
        assert_eq!(
            parse_since("2024-01-01T00:00:00.250Z", now)?,
            1_704_067_200_250
        );
        assert_eq!(
            parse_since("2024-01-01T02:00:00+02:00", now)?,
            1_704_067_200_000
        );
        assert_eq!(
            parse_since("2023-12-31T19:00:00-05:00", now)?,
            1_704_067_200_000
        );
        for bad in [
            "",
            "yesterday",
            "2024-01-01",
            "2024-01-01T00:00:00+25:00",
            "1h ago",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn times_are_written_as_rfc3339_utc_with_millis() {
        assert_eq!(rfc3339(1_704_067_200_250), "2024-01-01T00:00:00.250Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
    }

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

    #[test]
    fn replay_requests_refuse_unknown_fields() {
        let parsed: Result<ReplayRequest, _> = serde_json::from_str(r#"{"user_id": "1"}"#);
        assert!(
            parsed.is_err(),
            "a typo must not widen the replay to every dead letter"
        );
        let parsed: Result<ReplayRequest, _> =
            serde_json::from_str(r#"{"since": 5, "ids": [1, 2]}"#);
        assert_eq!(
            parsed.ok(),
            Some(ReplayRequest {
                since: Some(Since::Millis(5)),
                ids: Some(vec![1, 2]),
                ..ReplayRequest::default()
            })
        );
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
            paused: Paused::new(Vec::new()),
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
