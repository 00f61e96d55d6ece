//! botrelay: a durable webhook relay for Messenger bots. Meta's webhook comes in, is verified,
//! normalized and stored, acknowledged, then forwarded to the bot and fanned out to the
//! analytics sinks with retry. See ARCHITECTURE.md for the map and the invariants.
//!
//! Modules are listed in the order data flows through them. [`run`] is the one place that wires
//! them together; `main.rs` and the tests both call it.

pub mod clock;
pub mod redact;
pub mod config;
pub mod event;
pub mod ingest;
pub mod store;
pub mod dispatch;
pub mod sinks;
pub mod delivery;
pub mod admin;
pub mod telemetry;

use crate::clock::now_ms;
use crate::config::Config;
use crate::dispatch::{Dispatcher, Paused};
use crate::store::{Retention, Store};
use anyhow::Context;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// How often delivered rows, old dead letters and forgotten events are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The bound listeners `run` serves on (bound by the caller, so tests can use port 0).
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

/// Opens the configured store and runs the relay until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = match &config.store.url {
        Some(url) => {
            use secrecy::ExposeSecret;
            // The error names the database without its user and password.
            Store::open_postgres(
                url.expose_secret(),
                config.store.pool_size,
                config.store.lease,
            )
            .await
            .context("cannot open the PostgreSQL store")?
        }
        None => Store::open_sqlite(&config.store.path, config.store.max_bytes)
            .with_context(|| format!("cannot open the store at {}", config.store.path.display()))?,
    };
    let result = run_with_store(config, store.clone(), listeners, shutdown).await;
    store.close().await;
    result
}

/// Runs the relay on an already open store: serves both listeners, dispatches deliveries,
/// purges; on `shutdown` stops accepting, finishes in-flight requests and deliveries (bounded by
/// `server.shutdown_grace`) and returns.
pub async fn run_with_store(
    config: Config,
    store: Store,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sinks = sinks::Sinks::from_config(&config);
    for (name, reason) in &config.disabled_sinks {
        tracing::warn!(sink = %name, %reason, "Sink disabled");
    }
    let active_sinks: Vec<config::SinkName> =
        sinks.routes().iter().map(|route| route.name).collect();
    let active: Vec<&str> = active_sinks.iter().map(|sink| sink.as_str()).collect();
    tracing::info!(sinks = ?active, "Active sinks");
    telemetry::register_metrics(&active_sinks);
    if active.is_empty() {
        tracing::warn!("No sink is active: events are stored and acknowledged, and go nowhere");
    }
    let redactor = redact::Redactor::new(config.secrets());
    let paused = Paused::new(
        store
            .paused_users()
            .await
            .context("cannot read paused users")?
            .into_iter()
            .map(|(user, _)| user),
    );
    let client = delivery::Client::new()?;
    let grace = config.server.shutdown_grace;
    let retention = Retention {
        delivered: config.store.retention,
        dead: config.store.dead_letter_retention,
        dedupe_window: config.store.dedupe_window,
    };
    let state = ingest::AppState {
        config: std::sync::Arc::new(config),
        store: store.clone(),
        sinks: sinks.clone(),
        client: client.clone(),
        paused: paused.clone(),
    };

    let status = telemetry::SinkStatus::default();
    let stop = CancellationToken::new();
    let admin = with_request_ids(admin::router(admin::AdminState {
        config: state.config.clone(),
        store: store.clone(),
        paused: paused.clone(),
        active: active_sinks,
        redactor: redactor.clone(),
        status: status.clone(),
    }));
    let admin_token_set = state.config.admin.token.is_some();
    let read_timeout = state.config.server.read_timeout;
    let public = with_request_ids(ingest::router(state));

    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    tracing::info!(public = %public_addr, admin = %admin_addr, "Listening");
    if !admin_token_set && !admin_addr.ip().to_canonical().is_loopback() {
        tracing::warn!(
            admin = %admin_addr,
            "admin.token is not set: /admin answers only clients on this machine (not through a proxy nor from a web page); /metrics and /healthz answer everyone"
        );
    }
    let public_server = tokio::spawn(serve(listeners.public, public, read_timeout, stop.clone()));
    let admin_server = tokio::spawn(serve(listeners.admin, admin, read_timeout, stop.clone()));
    let dispatcher = Dispatcher {
        store: store.clone(),
        sinks,
        client,
        redactor,
        paused,
        status,
    };
    let dispatching = tokio::spawn(dispatcher.run(stop.clone(), grace));
    let purging = tokio::spawn(purge_loop(store, retention, stop.clone()));
    let metrics_upkeep = tokio::spawn(telemetry::metrics_upkeep(stop.clone()));

    shutdown.await;
    tracing::info!("Shutting down: no new requests; finishing in-flight work");
    stop.cancel();
    let (public_result, admin_result, _, _, _) = tokio::join!(
        drain(public_server, grace, "public"),
        drain(admin_server, grace, "admin"),
        dispatching,
        purging,
        metrics_upkeep
    );
    public_result?;
    admin_result?;
    tracing::info!("Stopped");
    Ok(())
}

/// Lets a listener finish its in-flight requests, for at most `grace`: a client that never
/// completes its request (half sent, or held by a stalled proxy) must not keep the relay from
/// stopping. Connections still open then are dropped with the runtime; nothing they carried
/// was acknowledged.
async fn drain(
    mut server: tokio::task::JoinHandle<()>,
    grace: Duration,
    listener: &'static str,
) -> anyhow::Result<()> {
    match tokio::time::timeout(grace, &mut server).await {
        Ok(finished) => finished.with_context(|| format!("{listener} listener task failed")),
        Err(_) => {
            tracing::warn!(
                listener,
                "Grace period over; requests still unfinished are dropped unanswered"
            );
            server.abort();
            Ok(())
        }
    }
}

/// Gives every request an `x-request-id` (kept when the caller sent one), echoes it in the
/// response, and runs the request in a span that carries it (`telemetry::request_span`). A
/// handler that panics (a bug) answers 500 with a JSON error rather than dropping the
/// connection; the panic itself is logged by the panic hook.
fn with_request_ids(router: axum::Router) -> axum::Router {
    router
        .layer(CatchPanicLayer::custom(panicked))
        .layer(TraceLayer::new_for_http().make_span_with(telemetry::request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Serves `router` on `listener` until `stop`, then lets the requests in flight finish, as
/// `axum::serve` with its graceful shutdown does, and bounds how long a client may take, which
/// `axum::serve` does not: a request's headers (and the next request on an idle connection) must
/// arrive within `read_timeout`, and its body within `read_timeout` of its headers
/// ([`ReadDeadline`]). So a slow client (slowloris) cannot hold a connection, and the body
/// buffer it fills, for as long as it likes. Each request carries its connection's
/// `ConnectInfo<AdminPeer>`, which the admin API's rule without a token reads.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    read_timeout: Duration,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, remote) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
        };
        let peer = admin::AdminPeer::new(remote, stream.local_addr().ok());
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |request: axum::http::Request<hyper::body::Incoming>| {
                let mut request = request
                    .map(|body| axum::body::Body::new(ReadDeadline::new(body, read_timeout)));
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        );
        let connection = connections.watch(http.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(service),
        ));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Connection closed with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// As `axum::serve` does: a connection the peer gave up on before it was accepted is nothing;
/// anything else (out of file descriptors) is logged, and accepting pauses for a second.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "Cannot accept a connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
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

/// A request body that must arrive whole by a deadline: once it passes, reading fails with
/// [`BodyTimedOut`]. The timer is armed only when a read has to wait: most bodies arrive with
/// their headers, and take no timer at all.
struct ReadDeadline<B> {
    body: B,
    /// `read_timeout` after the headers.
    due: tokio::time::Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
}

impl<B> ReadDeadline<B> {
    fn new(body: B, timeout: Duration) -> ReadDeadline<B> {
        ReadDeadline {
            body,
            due: tokio::time::Instant::now() + timeout,
            timer: None,
            timeout,
        }
    }
}

impl<B> http_body::Body for ReadDeadline<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let due = this.due;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(serde_json::json!({"error": "internal error"})),
    )
        .into_response()
}

async fn purge_loop(store: Store, retention: Retention, stop: CancellationToken) {
    loop {
        // A large purge (the first after a long stop, or after `retention` was shortened)
        // takes many writes; a shutdown does not wait for it: each write is whole, and the
        // next start purges the rest.
        let purged = tokio::select! {
            () = stop.cancelled() => return,
            purged = store.purge(retention, now_ms()) => purged,
        };
        match purged {
            Ok(purged) if purged.deliveries + purged.events > 0 => {
                tracing::info!(
                    deliveries = purged.deliveries,
                    events = purged.events,
                    "Purged old rows"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "Purge failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PURGE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// A handler that panics answers 500 with a JSON error (and its request id); the server
    /// does not just drop the connection.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_a_json_error()
    -> Result<(), Box<dyn std::error::Error>> {
        async fn boom() -> &'static str {
            panic!("a bug")
        }
        let router = with_request_ids(axum::Router::new().route("/boom", axum::routing::get(boom)));
        let response = router
            .oneshot(axum::http::Request::get("/boom").body(axum::body::Body::empty())?)
            .await?;
        assert_eq!(response.status(), 500);
        assert!(response.headers().contains_key("x-request-id"));
        let body = axum::body::to_bytes(response.into_body(), 1024).await?;
        assert_eq!(&body[..], br#"{"error":"internal error"}"#);
        Ok(())
    }
}
