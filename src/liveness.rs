//! Liveness that tells the truth: whether every background loop of the relay still runs and the
//! store can still keep its promises. A loop (a sink's dispatcher loop, the purge loop, the
//! metrics upkeep, the store watch) that ends or panics while the relay is not shutting down,
//! or a store that reports a failure it cannot recover from (a failed fsync), makes the relay
//! failing: `GET /healthz` answers 503 on both listeners, and `run_with_store` drains within
//! `server.shutdown_grace` and returns an error, so that the process exits non-zero and its
//! orchestrator restarts it. A relay that only looks alive would ack webhooks it never
//! delivers.

use crate::store::Store;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// How often the store's failure state is looked at (an atomic read).
const STORE_WATCH_EVERY: Duration = Duration::from_millis(250);

/// The relay's liveness: a cheap `Clone` handle, one per relay, made by `run_with_store` (or
/// given to `run_with_liveness`) and handed to every loop it spawns.
#[derive(Clone, Default)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The first failure: what `/healthz` and the exit error say.
    failure: Mutex<Option<String>>,
    /// Cancelled on the first failure.
    failed: CancellationToken,
    /// The watched loops, by name, for the tests' fault hook.
    loops: Mutex<Vec<(String, AbortHandle)>>,
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness::default()
    }

    /// Records a failure (the first one is kept) and logs it.
    pub fn fail(&self, why: String) {
        let Ok(mut failure) = self.inner.failure.lock() else {
            return;
        };
        if failure.is_none() {
            tracing::error!(reason = %why, "The relay is failing: /healthz answers 503; it drains and exits non-zero");
            *failure = Some(why);
        }
        drop(failure);
        self.inner.failed.cancel();
    }

    /// The first failure recorded, if any.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .map(|failure| failure.clone())
            .unwrap_or_else(|_| Some("the liveness record is poisoned".into()))
    }

    /// Completes once a failure is recorded.
    pub async fn failed(&self) {
        self.inner.failed.cancelled().await;
    }

    /// Spawns `task`, a loop that must run until `stop`, and watches it: if it ends (or
    /// panics, or is aborted) before `stop` is cancelled, the relay is failing, and the
    /// failure names `name`. The returned handle completes when the loop has ended.
    pub fn spawn<F>(&self, name: String, stop: &CancellationToken, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.watch(name, stop, tokio::spawn(task))
    }

    /// Watches an already spawned loop, as [`Liveness::spawn`] does.
    pub fn watch(
        &self,
        name: String,
        stop: &CancellationToken,
        task: JoinHandle<()>,
    ) -> JoinHandle<()> {
        if let Ok(mut loops) = self.inner.loops.lock() {
            loops.push((name.clone(), task.abort_handle()));
        }
        let liveness = self.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let ended = task.await;
            if stop.is_cancelled() {
                return;
            }
            let why = match ended {
                Ok(()) => format!("the {name} ended"),
                Err(error) if error.is_panic() => format!("the {name} panicked"),
                Err(_) => format!("the {name} was cancelled"),
            };
            liveness.fail(why);
        })
    }

    /// Watches `store`'s failure state until `stop` (a loop itself, spawned through
    /// [`Liveness::spawn`] by the caller).
    pub async fn watch_store(self, store: Store, stop: CancellationToken) {
        let mut every = tokio::time::interval(STORE_WATCH_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            if let Some(error) = store.failure() {
                self.fail(format!("the store failed: {error}"));
                return;
            }
        }
    }

    /// A fault hook for tests: aborts the watched loop named `name` as if it had died; false
    /// when no loop has that name.
    #[doc(hidden)]
    pub fn abort_loop_for_test(&self, name: &str) -> bool {
        let Ok(loops) = self.inner.loops.lock() else {
            return false;
        };
        let mut found = false;
        for (_, handle) in loops.iter().filter(|(loop_name, _)| loop_name == name) {
            handle.abort();
            found = true;
        }
        found
    }
}

/// Answers `GET /healthz` with 503 and the reason while the relay is failing (a failed loop, or
/// a store failure that the watch has not picked up yet); passes every other request, and
/// `/healthz` of a live relay, to `router`.
pub fn with_liveness(router: axum::Router, liveness: Liveness, store: Store) -> axum::Router {
    use axum::response::IntoResponse;
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let failure = if request.uri().path() == "/healthz" {
                liveness.failure().or_else(|| {
                    store
                        .failure()
                        .map(|error| format!("the store failed: {error}"))
                })
            } else {
                None
            };
            async move {
                match failure {
                    Some(why) => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("failing: {why}"),
                    )
                        .into_response(),
                    None => next.run(request).await,
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loop_that_panics_or_ends_before_stop_fails_the_relay_and_one_after_does_not() {
        let stop = CancellationToken::new();
        let liveness = Liveness::new();
        let panicking = liveness.spawn("doomed loop".into(), &stop, async {
            panic!("a bug in a loop");
        });
        let _ = panicking.await;
        assert_eq!(
            liveness.failure().as_deref(),
            Some("the doomed loop panicked")
        );

        let liveness = Liveness::new();
        let _ = liveness.spawn("short loop".into(), &stop, async {}).await;
        assert_eq!(liveness.failure().as_deref(), Some("the short loop ended"));

        let liveness = Liveness::new();
        let waiting = liveness.spawn("good loop".into(), &stop, {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        stop.cancel();
        let _ = waiting.await;
        assert_eq!(liveness.failure(), None);
    }
}
