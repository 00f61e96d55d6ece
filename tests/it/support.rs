//! Test support: the relay on port 0 with a temporary store, a scriptable recording mock sink,
//! and a signed-request builder.

use botrelay::config::Config;
use botrelay::signing::sign_sha256;
use botrelay::store::Store;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub use botrelay::event::{Event, EventKind, Source};
pub use botrelay::store::DeliveryProbe;

/// How often the waits here look again.
const POLL: Duration = Duration::from_millis(20);

/// Fast retries for a sink table: tests that retry should not take seconds.
pub const FAST_RETRY: &str = "backoff = \"10ms\"\nmax_backoff = \"50ms\"\n";

/// A `[bot]` table sending to `url`, with [`FAST_RETRY`].
pub fn fast_bot(url: &str) -> String {
    format!("[bot]\nurl = \"{url}\"\n{FAST_RETRY}")
}

/// A delivery not yet done: `waiting`, `pending` or `in_flight`.
pub fn is_open(delivery: &DeliveryProbe) -> bool {
    matches!(delivery.state.as_str(), "waiting" | "pending" | "in_flight")
}

/// An event in the store's own encoding (what the `payload` column holds), to look into its
/// data the way the store keeps it.
pub fn payload(event: &Event) -> serde_json::Value {
    serde_json::to_value(event).unwrap_or_default()
}

/// Whether the store's encoding of `event` contains `text` anywhere.
pub fn stored_text_contains(event: &Event, text: &str) -> bool {
    serde_json::to_string(event).is_ok_and(|json| json.contains(text))
}

/// Waits until `done` is true, or fails after `within` naming `what`.
pub async fn wait_until(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> TestResult {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("not within {within:?}: {what}").into());
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// A negative assertion: `holds` stays true for all of `during` (looked at every few ms), for
/// what must NOT happen (a request sent again, a retry that should not come). Fails as soon as
/// it turns false.
pub async fn assert_stays(
    what: &str,
    during: Duration,
    mut holds: impl FnMut() -> bool,
) -> TestResult {
    let until = Instant::now() + during;
    loop {
        if !holds() {
            return Err(format!("no longer true: {what}").into());
        }
        if Instant::now() >= until {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until exactly `expected` delivery rows of `store` match `matches`, or fails after
/// `within`; returns every delivery row as it was then. For a store the test opened itself,
/// such as a PostgreSQL database that relay processes share.
pub async fn wait_for_store_deliveries(
    store: &Store,
    matches: impl Fn(&DeliveryProbe) -> bool,
    expected: usize,
    within: Duration,
) -> TestResult<Vec<DeliveryProbe>> {
    let deadline = Instant::now() + within;
    loop {
        let deliveries = store.probe_deliveries().await?;
        let count = deliveries.iter().filter(|d| matches(d)).count();
        if count == expected {
            return Ok(deliveries);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{count} deliveries match, expected {expected}, after {within:?}: {deliveries:#?}"
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

pub const APP_SECRET: &str = "test_app_secret";
pub const VERIFY_TOKEN: &str = "test_verify_token";

pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("fixture {}: {error}", path.display()))
}

/// A running relay.
pub struct TestApp {
    pub url: String,
    pub admin_url: String,
    pub store_path: PathBuf,
    pub store: Store,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// What it was started with, so that `restart` can start it again on the same store.
    extra: String,
    env: HashMap<String, String>,
    dir: Option<tempfile::TempDir>,
}

/// The `botrelay` binary as a command, without anything from the caller's environment that
/// would change its config or its log (`BOTRELAY*`, `RUST_LOG`): a developer's exported
/// `BOTRELAY__LOG__FORMAT=pretty` must not change what a test reads.
pub fn relay_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_botrelay"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BOTRELAY") {
            command.env_remove(name);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

/// Runs `botrelay args…` with a clean `BOTRELAY*` environment plus `env`, in an empty working
/// directory, off the runtime's thread (which may be serving the relay it talks to).
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> TestResult<std::process::Output> {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    let dir = tempfile::tempdir()?;
    let output = tokio::task::spawn_blocking(move || {
        relay_command()
            .args(&args)
            .envs(env)
            .current_dir(dir.path())
            .output()
    })
    .await??;
    Ok(output)
}

pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Sends SIGTERM to a child process (what `docker stop` and Kubernetes send).
pub fn terminate(child: &std::process::Child) -> TestResult {
    let pid = i32::try_from(child.id())?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    Ok(())
}

/// Starts the relay with `[messenger]` secrets set and `extra` TOML appended.
pub async fn spawn_app(extra: &str) -> TestResult<TestApp> {
    spawn_app_with_env(extra, &[]).await
}

pub async fn spawn_app_with_env(extra: &str, env: &[(&str, &str)]) -> TestResult<TestApp> {
    let mut environment: HashMap<String, String> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    environment
        .entry("BOTRELAY__SERVER__SHUTDOWN_GRACE".into())
        .or_insert("2s".into());
    start(tempfile::tempdir()?, extra.to_owned(), environment).await
}

/// Starts a relay whose store lives in `dir`.
async fn start(
    dir: tempfile::TempDir,
    extra: String,
    env: HashMap<String, String>,
) -> TestResult<TestApp> {
    let store_path = dir.path().join("botrelay.db");
    let toml = format!(
        "[messenger]\napp_secret = \"{APP_SECRET}\"\nverify_token = \"{VERIFY_TOKEN}\"\napp_id = \"1517776481860111\"\n\
         [store]\npath = \"{}\"\n{extra}",
        store_path.display()
    );
    let config = Config::from_sources(&toml, env.clone())?;
    let store = Store::open_sqlite(&config.store.path, config.store.max_bytes)?;
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", public.local_addr()?);
    let admin_url = format!("http://{}", admin.local_addr()?);
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(botrelay::run_with_store(
        config,
        store.clone(),
        botrelay::Listeners { public, admin },
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(TestApp {
        url,
        admin_url,
        store_path,
        store,
        http: reqwest::Client::new(),
        shutdown: Some(shutdown),
        task: Some(task),
        extra,
        env,
        dir: Some(dir),
    })
}

impl TestApp {
    /// POSTs `body` to /webhook signed with the test app secret.
    pub async fn post_webhook(&self, body: &[u8]) -> TestResult<reqwest::Response> {
        Ok(post_signed(&self.http, &self.url, body).await?)
    }

    /// Every delivery row, oldest first (through the store API, not the file).
    pub async fn deliveries(&self) -> TestResult<Vec<DeliveryProbe>> {
        Ok(self.store.probe_deliveries().await?)
    }

    /// Every stored event, in the order of receipt.
    pub async fn events(&self) -> TestResult<Vec<Event>> {
        Ok(self.store.probe_events().await?)
    }

    /// How many delivery rows match `matches` now.
    pub async fn count_deliveries(
        &self,
        matches: impl Fn(&DeliveryProbe) -> bool,
    ) -> TestResult<usize> {
        Ok(self
            .deliveries()
            .await?
            .iter()
            .filter(|d| matches(d))
            .count())
    }

    /// How many stored events match `matches` now.
    pub async fn count_events(&self, matches: impl Fn(&Event) -> bool) -> TestResult<usize> {
        Ok(self.events().await?.iter().filter(|e| matches(e)).count())
    }

    /// Waits until exactly `expected` delivery rows match `matches`, or fails after `within`;
    /// returns every delivery row as it was then.
    pub async fn wait_for_deliveries(
        &self,
        matches: impl Fn(&DeliveryProbe) -> bool,
        expected: usize,
        within: Duration,
    ) -> TestResult<Vec<DeliveryProbe>> {
        wait_for_store_deliveries(&self.store, matches, expected, within).await
    }

    /// Waits until exactly `expected` stored events match `matches`, or fails after `within`.
    pub async fn wait_for_events(
        &self,
        matches: impl Fn(&Event) -> bool,
        expected: usize,
        within: Duration,
    ) -> TestResult<Vec<Event>> {
        let deadline = Instant::now() + within;
        loop {
            let events = self.events().await?;
            let count = events.iter().filter(|e| matches(e)).count();
            if count == expected {
                return Ok(events);
            }
            if Instant::now() > deadline {
                return Err(
                    format!("{count} events match, expected {expected}, after {within:?}").into(),
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no delivery is open (`waiting`, `pending` or `in_flight`).
    pub async fn wait_until_settled(&self, within: Duration) -> TestResult<Vec<DeliveryProbe>> {
        self.wait_for_deliveries(is_open, 0, within).await
    }

    /// Waits until the relay answers `GET /readyz` with 200 (it serves, and its store writes).
    pub async fn wait_until_ready(&self, within: Duration) -> TestResult {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.http.get(format!("{}/readyz", self.url)).send().await;
            if ready.is_ok_and(|answer| answer.status() == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the relay was not ready within {within:?}").into());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the relay gracefully and waits for it.
    pub async fn stop(mut self) -> TestResult {
        self.stop_in_place().await
    }

    /// Stops the relay gracefully and starts a new one on the same store file and config.
    pub async fn restart(self) -> TestResult<TestApp> {
        self.restart_with(|_| Ok(())).await
    }

    /// Stops the relay gracefully, runs `between` on the store file while no relay holds it,
    /// and starts a new one on the same store file and config.
    pub async fn restart_with(
        mut self,
        between: impl FnOnce(&Path) -> TestResult,
    ) -> TestResult<TestApp> {
        self.stop_in_place().await?;
        let dir = self.dir.take().ok_or("the store directory is gone")?;
        let (extra, env) = (
            std::mem::take(&mut self.extra),
            std::mem::take(&mut self.env),
        );
        // Releases the file lock before the new relay opens the file.
        self.store.close().await;
        drop(self);
        between(&dir.path().join("botrelay.db"))?;
        start(dir, extra, env).await
    }

    /// Stops the relay gracefully and releases its store; returns its directory (the store
    /// file is `botrelay.db` in it), kept for as long as the caller holds it, for a look at
    /// what the relay left through `Store::open_sqlite`.
    pub async fn stop_keeping_files(mut self) -> TestResult<tempfile::TempDir> {
        self.stop_in_place().await?;
        self.store.close().await;
        Ok(self.dir.take().ok_or("the store directory is gone")?)
    }

    async fn stop_in_place(&mut self) -> TestResult {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The text of a relay's `/metrics`, from its admin listener at `admin_url`.
pub async fn metrics_text(http: &reqwest::Client, admin_url: &str) -> TestResult<String> {
    Ok(http
        .get(format!("{admin_url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// A loopback address where nothing listens (connection refused), for a mock to take later.
pub async fn refused_address() -> TestResult<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

/// One request a mock sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// The status the mock answered with (0 when it never answered).
    pub replied: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a mock answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Never answer (the relay's timeout must fire).
    pub hang: bool,
    /// Answer only after this long.
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            hang: false,
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
            hang: false,
            delay: Duration::ZERO,
        }
    }

    pub fn hang() -> Reply {
        Reply {
            hang: true,
            ..Reply::status(200)
        }
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }
}

type Decide = Arc<dyn Fn(&Received) -> Option<Reply> + Send + Sync>;

#[derive(Default)]
struct MockState {
    received: Vec<Received>,
    /// Connections a TLS mock has accepted (handshakes).
    connections: usize,
    script: VecDeque<Reply>,
    default: Option<Reply>,
    decide: Option<Decide>,
}

/// A recording HTTP server whose answers a test scripts: first the queued replies in order,
/// then the `decide` function, then the default (200).
#[derive(Clone)]
pub struct MockSink {
    pub addr: SocketAddr,
    state: Arc<Mutex<MockState>>,
    arrived: Arc<Notify>,
}

impl MockSink {
    pub async fn start() -> TestResult<MockSink> {
        MockSink::start_at("127.0.0.1:0".parse()?).await
    }

    /// A mock on `addr`: an address a test reserved with [`refused_address`], so that the
    /// relay first finds nothing there (connection refused) and then this mock.
    pub async fn start_at(addr: SocketAddr) -> TestResult<MockSink> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let (mock, app) = MockSink::serving(listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(mock)
    }

    /// A mock at `addr` and the router that answers for it.
    fn serving(addr: SocketAddr) -> (MockSink, axum::Router) {
        let mock = MockSink {
            addr,
            state: Arc::new(Mutex::new(MockState::default())),
            arrived: Arc::new(Notify::new()),
        };
        let handler_mock = mock.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let mock = handler_mock.clone();
            async move { mock.handle(request).await }
        });
        (mock, app)
    }

    /// A mock that speaks HTTPS, with the certificate in `tests/data/tls/sink.pem` (for
    /// `127.0.0.1` and `localhost`, issued by the test CA in `tests/data/tls/ca.pem`).
    pub async fn start_tls() -> TestResult<MockSink> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let tls = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
        let chain =
            CertificateDer::pem_file_iter(tls.join("sink.pem"))?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(tls.join("sink.key"))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (mock, app) = MockSink::serving(listener.local_addr()?);
        let counted = mock.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if let Ok(mut state) = counted.state.lock() {
                    state.connections += 1;
                }
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(
                        tower::ServiceExt::map_request(
                            app,
                            |request: axum::http::Request<hyper::body::Incoming>| {
                                request.map(axum::body::Body::new)
                            },
                        ),
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(mock)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many connections a mock started with [`MockSink::start_tls`] has accepted.
    pub fn connections(&self) -> usize {
        self.state.lock().map_or(0, |state| state.connections)
    }

    /// The URL of `path` on a mock started with [`MockSink::start_tls`].
    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Queues replies for the next requests, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        if let Ok(mut state) = self.state.lock() {
            state.script.extend(replies);
        }
    }

    /// The reply once the script is used up.
    pub fn set_default(&self, reply: Reply) {
        if let Ok(mut state) = self.state.lock() {
            state.default = Some(reply);
        }
    }

    /// Decides each reply from the request (after the script; `None` falls to the default).
    pub fn decide(&self, decide: impl Fn(&Received) -> Option<Reply> + Send + Sync + 'static) {
        if let Ok(mut state) = self.state.lock() {
            state.decide = Some(Arc::new(decide));
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .lock()
            .map(|state| state.received.clone())
            .unwrap_or_default()
    }

    /// Waits until at least `count` requests arrived; returns them all.
    pub async fn wait_for(&self, count: usize, within: Duration) -> TestResult<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.arrived.notified();
            let received = self.received();
            if received.len() >= count {
                return Ok(received);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "mock got {} requests, expected {count}",
                    self.received().len()
                )
                .into());
            }
        }
    }

    async fn handle(&self, request: axum::extract::Request) -> axum::response::Response {
        use axum::response::IntoResponse;
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let received = Received {
            method: parts.method.to_string(),
            uri: parts
                .uri
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default(),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.to_string(),
                        value.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            at: Instant::now(),
            replied: 0,
        };
        let mut received = received;
        let reply = {
            let Ok(mut state) = self.state.lock() else {
                return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
            };
            let reply = state
                .script
                .pop_front()
                .or_else(|| state.decide.as_ref().and_then(|decide| decide(&received)))
                .or_else(|| state.default.clone())
                .unwrap_or_else(|| Reply::status(200));
            received.replied = if reply.hang { 0 } else { reply.status };
            state.received.push(received);
            reply
        };
        self.arrived.notify_waiters();
        if reply.hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(reply.delay).await;
        let mut response = (
            axum::http::StatusCode::from_u16(reply.status)
                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
            reply.body,
        )
            .into_response();
        for (name, value) in reply.headers {
            if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// A one-message webhook body for `user` with a unique `mid`.
pub fn text_message(page: &str, user: &str, mid: &str, text: &str, timestamp: i64) -> Vec<u8> {
    serde_json::json!({
        "object": "page",
        "entry": [{
            "id": page,
            "time": timestamp,
            "messaging": [{
                "sender": {"id": user},
                "recipient": {"id": page},
                "timestamp": timestamp,
                "message": {"mid": mid, "text": text}
            }]
        }]
    })
    .to_string()
    .into_bytes()
}

/// POSTs `body` to `{url}/webhook` signed with the test app secret (usable from spawned tasks).
pub async fn post_signed(
    http: &reqwest::Client,
    url: &str,
    body: &[u8],
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{url}/webhook"))
        .header("content-type", "application/json")
        .header(
            "x-hub-signature-256",
            sign_sha256(APP_SECRET.as_bytes(), body),
        )
        .body(body.to_vec())
        .send()
        .await
}

/// The real `botrelay` binary running in a child process, its log (stdout and stderr, line by
/// line) collected as it comes; killed on drop if it is still running.
pub struct RelayProcess {
    pub child: std::process::Child,
    /// `http://` + the public listener's address, from its `Listening` log line.
    pub url: String,
    /// `http://` + the admin listener's address.
    pub admin_url: String,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    _cwd: tempfile::TempDir,
}

/// Starts `botrelay args…` (see [`relay_command`]) with `env` and a JSON log, in an empty
/// working directory (no `config/botrelay.toml` but the one `args` name), and waits until
/// it logs `Listening` (ready: both listeners bound, the store open), or fails when it exits
/// first or after 30 s.
pub async fn start_relay(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> TestResult<RelayProcess> {
    use std::process::Stdio;
    let cwd = tempfile::tempdir()?;
    let mut command = relay_command();
    command
        .args(args)
        .current_dir(cwd.path())
        .env("BOTRELAY__LOG__FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn()?;
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let readers = vec![
        collect_lines(stdout, lines.clone()),
        collect_lines(stderr, lines.clone()),
    ];
    let mut relay = RelayProcess {
        child,
        url: String::new(),
        admin_url: String::new(),
        lines,
        readers,
        _cwd: cwd,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listening = relay.log().iter().find_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            (entry["message"] == "Listening").then(|| {
                (
                    entry["public"].as_str().unwrap_or_default().to_owned(),
                    entry["admin"].as_str().unwrap_or_default().to_owned(),
                )
            })
        });
        if let Some((public, admin)) = listening {
            relay.url = format!("http://{public}");
            relay.admin_url = format!("http://{admin}");
            return Ok(relay);
        }
        if let Some(status) = relay.child.try_wait()? {
            return Err(format!(
                "the relay exited ({status}) before listening:\n{}",
                relay.log().join("\n")
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err("the relay did not log `Listening` within 30s".into());
        }
        tokio::time::sleep(POLL).await;
    }
}

impl RelayProcess {
    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// The log lines up to and including `Listening`, parsed (a line that is not JSON fails).
    pub fn start_up_log(&self) -> TestResult<Vec<serde_json::Value>> {
        let mut start_up = Vec::new();
        for line in self.log() {
            let entry: serde_json::Value = serde_json::from_str(&line)
                .map_err(|_| format!("the relay's log is not JSON: {line}"))?;
            let listening = entry["message"] == "Listening";
            start_up.push(entry);
            if listening {
                break;
            }
        }
        Ok(start_up)
    }

    /// SIGTERM, then waits for the exit (and the whole log) for up to `within`.
    pub async fn terminate(&mut self, within: Duration) -> TestResult<std::process::ExitStatus> {
        terminate(&self.child)?;
        self.wait_exit(within).await
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) -> TestResult<std::process::ExitStatus> {
        self.child.kill()?;
        let status = self.child.wait()?;
        self.join_readers();
        Ok(status)
    }

    pub async fn wait_exit(&mut self, within: Duration) -> TestResult<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                return Err(format!("the relay did not exit within {within:?}").into());
            }
            tokio::time::sleep(POLL).await;
        };
        self.join_readers();
        Ok(status)
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Collects every line of `stream` into `lines`.
fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut lines) = lines.lock() {
                lines.push(line);
            }
        }
    })
}
