//! Serving a `Router` on a listener: hyper's HTTP/1 accept loop with a bound on slow clients
//! (`server.read_timeout` for headers and for bodies) and on connections served at once
//! (`server.max_connections`), the open-files limit those bounds must fit under, request ids
//! and a 500 for a panicking handler, and the graceful drain at shutdown. Only `lib.rs` uses it; it re-exports
//! [`BodyTimedOut`], the error a body read fails with at the deadline (ingest answers it 408).

use crate::admin::access::AdminPeer;
use crate::ingest::BodyTimedOut;
use crate::telemetry;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Lets a listener finish its in-flight requests, for at most `grace`: a client that never
/// completes its request (half sent, or held by a stalled proxy) must not keep the relay from
/// stopping. Connections still open then are dropped with the runtime; nothing they carried
/// was acknowledged.
pub(crate) async fn drain(
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
pub(crate) fn with_request_ids(router: axum::Router) -> axum::Router {
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
///
/// At most `max_connections` connections are served at once: each holds a permit, and while
/// none is free the loop does not call `accept`, so further clients wait in the kernel's accept
/// queue (the listen backlog) and cost the relay neither memory nor a file descriptor.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    read_timeout: Duration,
    max_connections: usize,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed.
                Err(_) => break,
            },
        };
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
        let peer = AdminPeer::new(remote, stream.local_addr().ok());
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
            drop(permit);
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// Descriptors the relay keeps for itself beyond its connections: stdio, the runtime's epoll
/// and wake-up descriptors, the store's files and connections (SQLite: the database, its WAL
/// and shared memory per connection, the lock, the syncer's WAL handle), DNS lookups.
const DESCRIPTOR_RESERVE: u64 = 64;

/// What the relay's descriptors are spent on, at most, for [`raise_open_files_limit`].
pub(crate) struct DescriptorBudget {
    /// `server.max_connections`: each listener serves this many at once.
    pub max_connections: usize,
    /// The store's own connections (PostgreSQL's pool plus its LISTEN connection; 0 for SQLite,
    /// whose few files are in the reserve).
    pub store_connections: usize,
    /// The sinks' concurrency, summed: one outbound connection per attempt in flight.
    pub deliveries: usize,
}

impl DescriptorBudget {
    /// Two listeners' connections, one outbound Graph connection per public connection (the
    /// Send API proxy), the deliveries, the store and the reserve.
    pub(crate) fn needed(&self) -> u64 {
        let count = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
        count(self.max_connections)
            .saturating_mul(3)
            .saturating_add(count(self.store_connections))
            .saturating_add(count(self.deliveries))
            .saturating_add(DESCRIPTOR_RESERVE)
    }
}

/// Raises the process's open-files soft limit to its hard limit, logs both, and warns when the
/// connections the relay may hold at once (`budget`) do not fit under it: then a burst of
/// clients could take the descriptors that deliveries and the store need. Returns the soft
/// limit in force.
pub(crate) fn raise_open_files_limit(budget: &DescriptorBudget) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "Cannot read the open-files limit");
            return None;
        }
    };
    let raised = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "Cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    let needed = budget.needed();
    tracing::info!(soft = raised, hard, was = soft, needed, "Open-files limit");
    if needed > raised {
        tracing::warn!(
            limit = raised,
            needed,
            max_connections = budget.max_connections,
            "The open-files limit may not hold 2 listeners × server.max_connections, the Send API proxy's calls, the sinks' concurrency and the store: lower server.max_connections or raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=)"
        );
    }
    Some(raised)
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
