//! botrelay: a durable webhook relay for Messenger bots. Meta's webhook comes in, is verified,
//! normalized and stored, acknowledged, then forwarded to the bot and fanned out to the
//! analytics sinks with retry. See ARCHITECTURE.md for the map and the invariants.
//!
//! Modules are listed in the order data flows through them. [`run`] is the one place that wires
//! them together; `main.rs` and the tests both call it.

pub mod clock;
pub mod redact;
pub mod sink_name;
pub mod signing;
pub mod check;
pub mod config;
pub mod event;
mod server;
pub mod ingest;
pub mod store;
pub mod dispatch;
pub mod sinks;
pub mod delivery;
pub mod admin;
pub mod telemetry;
pub mod liveness;

use crate::clock::now_ms;
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::liveness::{Liveness, with_liveness};
use crate::server::{DescriptorBudget, drain, raise_open_files_limit, serve, with_request_ids};
use crate::store::{Retention, Store};
use anyhow::Context;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
///
/// When the relay fails instead (a background loop ended or panicked, the store failed an
/// fsync: see [`liveness`]), `/healthz` answers 503, and it drains the same way and returns
/// the failure as an error, so that the process exits non-zero and is restarted.
pub async fn run_with_store(
    config: Config,
    store: Store,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_liveness(config, store, listeners, shutdown, Liveness::new()).await
}

/// [`run_with_store`] with the caller's [`Liveness`] (tests kill a loop through its fault hook).
#[doc(hidden)]
pub async fn run_with_liveness(
    config: Config,
    store: Store,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    liveness: Liveness,
) -> anyhow::Result<()> {
    let sinks = sinks::Sinks::new(&config.sinks);
    for (name, reason) in &config.disabled_sinks {
        tracing::warn!(sink = %name, %reason, "Sink disabled");
    }
    let active_sinks: Vec<sink_name::SinkName> =
        sinks.routes().iter().map(|route| route.name).collect();
    let active: Vec<&str> = active_sinks.iter().map(|sink| sink.as_str()).collect();
    tracing::info!(sinks = ?active, "Active sinks");
    for route in sinks.routes() {
        for warning in route.warnings() {
            tracing::warn!(sink = %route.name, %warning, "Sink warning");
        }
    }
    telemetry::register_metrics(&active_sinks);
    raise_open_files_limit(&DescriptorBudget {
        max_connections: config.server.max_connections,
        store_connections: if config.store.url.is_some() {
            config.store.pool_size + 1
        } else {
            0
        },
        deliveries: sinks
            .routes()
            .iter()
            .map(|route| route.delivery.concurrency)
            .sum(),
    });
    if active.is_empty() {
        tracing::warn!("No sink is active: events are stored and acknowledged, and go nowhere");
    }
    let redactor = redact::Redactor::new(config.secrets());
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
    };

    let status = telemetry::SinkStatus::default();
    let stop = CancellationToken::new();
    let admin = with_request_ids(admin::router(admin::AdminState {
        config: state.config.clone(),
        store: store.clone(),
        active: active_sinks,
        redactor: redactor.clone(),
        status: status.clone(),
    }));
    let admin = with_liveness(admin, liveness.clone(), store.clone());
    let admin_token_set = state.config.admin.token.is_some();
    let read_timeout = state.config.server.read_timeout;
    let max_connections = state.config.server.max_connections;
    let public = with_liveness(
        with_request_ids(ingest::router(state)),
        liveness.clone(),
        store.clone(),
    );

    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    tracing::info!(public = %public_addr, admin = %admin_addr, "Listening");
    if !admin_token_set && !admin_addr.ip().to_canonical().is_loopback() {
        tracing::warn!(
            admin = %admin_addr,
            "admin.token is not set: /admin answers only clients on this machine (not through a proxy nor from a web page); /metrics and /healthz answer everyone"
        );
    }
    // The listeners stop on their own token: a failing relay keeps answering for a while
    // (`/healthz` 503) after its loops stopped.
    let stop_serving = CancellationToken::new();
    let public_server = tokio::spawn(serve(
        listeners.public,
        public,
        read_timeout,
        max_connections,
        stop_serving.clone(),
    ));
    let admin_server = tokio::spawn(serve(
        listeners.admin,
        admin,
        read_timeout,
        max_connections,
        stop_serving.clone(),
    ));
    let dispatcher = Dispatcher {
        store: store.clone(),
        sinks,
        client,
        redactor,
        status,
    };
    let dispatching = tokio::spawn(dispatcher.run(stop.clone(), grace, liveness.clone()));
    let purging = liveness.spawn(
        "purge loop".into(),
        &stop,
        purge_loop(store.clone(), retention, stop.clone()),
    );
    let metrics_upkeep = liveness.spawn(
        "metrics upkeep loop".into(),
        &stop,
        telemetry::metrics_upkeep(stop.clone()),
    );
    let store_watch = liveness.spawn(
        "store watch".into(),
        &stop,
        liveness.clone().watch_store(store, stop.clone()),
    );

    let failed = tokio::select! {
        () = shutdown => None,
        () = liveness.failed() => liveness.failure(),
    };
    stop.cancel();
    let serving_grace = match &failed {
        None => {
            tracing::info!("Shutting down: no new requests; finishing in-flight work");
            stop_serving.cancel();
            grace
        }
        Some(reason) => {
            tracing::error!(
                %reason,
                "Failing: finishing in-flight work, answering /healthz 503 for half the shutdown grace, then exiting non-zero"
            );
            // Load balancers and orchestrators probing /healthz see the 503 (and stop sending
            // traffic) while the deliveries drain; the listeners drain in the other half.
            tokio::time::sleep(grace / 2).await;
            stop_serving.cancel();
            grace - grace / 2
        }
    };
    let (public_result, admin_result, _, _, _, _) = tokio::join!(
        drain(public_server, serving_grace, "public"),
        drain(admin_server, serving_grace, "admin"),
        dispatching,
        purging,
        metrics_upkeep,
        store_watch
    );
    if let Some(reason) = failed {
        anyhow::bail!("the relay failed: {reason}");
    }
    public_result?;
    admin_result?;
    tracing::info!("Stopped");
    Ok(())
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
