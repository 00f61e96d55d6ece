//! Shared benchmark harness: the relay in-process on port 0 or the real binary as a child
//! process, a local sink that answers at once (or never), signed webhook bodies, closed- and
//! open-loop load generators that report throughput and latency percentiles (HDR histograms,
//! microseconds), a process's memory from `/proc`, and a PostgreSQL server to make fresh
//! databases on.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use botrelay::config::Config;
use botrelay::signing::sign_sha256;
use botrelay::store::Store;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The allocator the `botrelay` binary uses (see `src/main.rs`), so that the relay measured
/// here runs as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub const SECRET: &str = "bench_app_secret";

/// Starts the relay on `store` with a `[bot]` sink at `bot_url` and `bot_extra` keys.
pub async fn start_relay(
    store: Store,
    bot_url: &str,
    bot_extra: &str,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let toml = format!(
        "[messenger]\napp_secret = \"{SECRET}\"\nverify_token = \"v\"\n[log]\nlevel = \"warn\"\n\
         [bot]\nurl = \"{bot_url}\"\n{bot_extra}"
    );
    let config = Config::from_sources(&toml, HashMap::new()).expect("bench config");
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", public.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(botrelay::run_with_store(
        config,
        store,
        botrelay::Listeners { public, admin },
        async move {
            let _ = stopped.await;
        },
    ));
    (url, stop)
}

/// Starts the real `botrelay` binary (cargo builds it, with the bench profile, for every bench
/// target) on `config`; returns the process and its public and admin URLs, read from its
/// "Listening" log line. `BENCH_RELAY_BIN` names another binary to run instead (a build of
/// another commit, to compare two builds under one load generator).
pub fn start_relay_process(config: &std::path::Path) -> (std::process::Child, String, String) {
    let binary = std::env::var_os("BENCH_RELAY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_botrelay").into());
    let mut child = std::process::Command::new(binary)
        .args(["--config".as_ref(), config.as_os_str()])
        .env("BOTRELAY__LOG__FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start botrelay");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut sent = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains("\"Listening\"") {
                let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let urls = (
                    format!("http://{}", entry["public"].as_str().unwrap_or_default()),
                    format!("http://{}", entry["admin"].as_str().unwrap_or_default()),
                );
                let _ = sender.send(urls);
                sent = true;
            }
        }
    });
    let (public, admin) = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay did not start");
    (child, public, admin)
}

/// A `kB` field of `/proc/<pid>/status`: `"VmRSS:"` (resident now), `"VmHWM:"` (its peak).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the local sink does with each request.
#[derive(Clone)]
pub enum SinkMode {
    /// Never answers: keeps the dispatcher parked, so an ingest benchmark measures ingest only.
    Hang,
    /// Answers 200 at once and counts; records the arrival time per `mid` when `timed`.
    Count { timed: bool },
}

#[derive(Clone, Default)]
pub struct SinkStats {
    pub received: Arc<AtomicU64>,
    pub arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    /// Requests answered per first path segment (`/bot`, `/kochava/...`: "bot", "kochava"), so
    /// that one sink stands in for several.
    pub by_path: Arc<Mutex<HashMap<String, u64>>>,
}

impl SinkStats {
    /// Requests answered whose path began with `/{segment}`.
    pub fn received_at(&self, segment: &str) -> u64 {
        self.by_path
            .lock()
            .unwrap()
            .get(segment)
            .copied()
            .unwrap_or(0)
    }
}

pub async fn start_sink(mode: SinkMode) -> (String, SinkStats) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let stats = SinkStats::default();
    let handler_stats = stats.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
        let stats = handler_stats.clone();
        let mode = mode.clone();
        async move {
            match mode {
                SinkMode::Hang => std::future::pending::<()>().await,
                SinkMode::Count { timed } => {
                    if timed {
                        let arrived = Instant::now();
                        if let Some(mid) = mid_of(&body) {
                            stats.arrivals.lock().unwrap().insert(mid, arrived);
                        }
                    }
                    let segment = uri.path().split('/').nth(1).unwrap_or_default();
                    *stats
                        .by_path
                        .lock()
                        .unwrap()
                        .entry(segment.to_owned())
                        .or_default() += 1;
                    stats.received.fetch_add(1, Ordering::Relaxed);
                }
            }
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, stats)
}

fn mid_of(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\"mid\":\"")? + 7;
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_owned())
}

/// A realistic one-message webhook (about 400 bytes) for user `n % users`, signed.
pub fn signed_message(n: u64, users: u64) -> (Vec<u8>, String, String) {
    let mid = format!("m_bench_{n}");
    let body = format!(
        concat!(
            r#"{{"object":"page","entry":[{{"id":"106120894276430","time":1700000000000,"messaging":[{{"#,
            r#""sender":{{"id":"{user}"}},"recipient":{{"id":"106120894276430"}},"timestamp":1700000000000,"#,
            r#""message":{{"mid":"{mid}","text":"hello from the benchmark, caf\u00e9 https:\/\/example.com\/x","#,
            r#""quick_reply":{{"payload":"BENCH_PAYLOAD"}}}}}}]}}]}}"#
        ),
        user = 2_290_000_000_000_000u64 + n % users,
        mid = mid,
    );
    let signature = sign_sha256(SECRET.as_bytes(), body.as_bytes());
    (body.into_bytes(), signature, mid)
}

pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    /// When each `mid` was acknowledged (open loop with `record_acks`).
    pub acks: HashMap<String, (Instant, Instant)>,
}

impl LoadResult {
    fn empty() -> LoadResult {
        LoadResult {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new(3).unwrap(),
            acks: HashMap::new(),
        }
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn summary(&self) -> String {
        format!(
            "{:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} requests, {} errors)",
            self.rate(),
            ms(self.latency.value_at_quantile(0.50)),
            ms(self.latency.value_at_quantile(0.99)),
            ms(self.latency.max()),
            self.requests,
            self.errors
        )
    }
}

pub fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap()
}

/// `connections` workers, each sending the next request as soon as the last was answered.
pub async fn closed_loop(
    url: &str,
    connections: u64,
    duration: Duration,
    first_id: u64,
) -> LoadResult {
    closed_loop_over(&[url.to_owned()], connections, duration, first_id, USERS).await
}

/// How many users the webhooks of [`closed_loop`] and [`open_loop`] come from.
pub const USERS: u64 = 1000;

/// [`closed_loop`] against several relays: worker `i` sends to `urls[i % urls.len()]`, so the
/// same generator loads one relay or spreads evenly over several; webhooks from `users` users.
pub async fn closed_loop_over(
    urls: &[String],
    connections: u64,
    duration: Duration,
    first_id: u64,
    users: u64,
) -> LoadResult {
    let client = client();
    let next = Arc::new(AtomicU64::new(first_id));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let url = &urls[worker as usize % urls.len()];
        let (client, next, stop, url) = (
            client.clone(),
            next.clone(),
            stop.clone(),
            format!("{url}/webhook"),
        );
        workers.spawn(async move {
            let mut latency = Histogram::<u64>::new(3).unwrap();
            let (mut requests, mut errors) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let (body, signature, _) =
                    signed_message(next.fetch_add(1, Ordering::Relaxed), users);
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("x-hub-signature-256", signature)
                    .body(body)
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status() == 200 => {
                        let _ = response.bytes().await;
                        latency.record(sent.elapsed().as_micros() as u64).unwrap();
                        requests += 1;
                    }
                    _ => errors += 1,
                }
            }
            (latency, requests, errors)
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut result = LoadResult::empty();
    while let Some(worker) = workers.join_next().await {
        let (latency, requests, errors) = worker.unwrap();
        result.latency.add(latency).unwrap();
        result.requests += requests;
        result.errors += errors;
    }
    result.elapsed = started.elapsed();
    result
}

/// Requests at a fixed `rate` for `duration`; latency is measured from each request's
/// scheduled time, so a stall is not hidden by the generator waiting (no coordinated omission).
pub async fn open_loop(
    url: &str,
    rate: u64,
    duration: Duration,
    first_id: u64,
    record_acks: bool,
) -> LoadResult {
    open_loop_over(
        &[url.to_owned()],
        rate,
        duration,
        first_id,
        USERS,
        record_acks,
    )
    .await
}

/// [`open_loop`] against several relays: request `i` goes to `urls[i % urls.len()]`; webhooks
/// from `users` users.
pub async fn open_loop_over(
    urls: &[String],
    rate: u64,
    duration: Duration,
    first_id: u64,
    users: u64,
    record_acks: bool,
) -> LoadResult {
    let client = client();
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for index in 0..total {
        let scheduled = started + interval.mul_f64(index as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let url = &urls[index as usize % urls.len()];
        let (client, url) = (client.clone(), format!("{url}/webhook"));
        let (body, signature, mid) = signed_message(first_id + index, users);
        requests.spawn(async move {
            let response = client
                .post(&url)
                .header("x-hub-signature-256", signature)
                .body(body)
                .send()
                .await;
            let ok = matches!(&response, Ok(response) if response.status() == 200);
            if let Ok(response) = response {
                let _ = response.bytes().await;
            }
            (ok, scheduled, Instant::now(), mid)
        });
    }
    let mut result = LoadResult::empty();
    while let Some(request) = requests.join_next().await {
        let (ok, scheduled, acked, mid) = request.unwrap();
        if ok {
            result.requests += 1;
            result
                .latency
                .record(acked.duration_since(scheduled).as_micros() as u64)
                .unwrap();
            if record_acks {
                result.acks.insert(mid, (scheduled, acked));
            }
        } else {
            result.errors += 1;
        }
    }
    result.elapsed = started.elapsed();
    result
}

/// Stores `events` one-message webhooks from `users` users, each with a delivery to the bot, as
/// ingest would (verified, normalized), in enqueues of 500: a backlog for the fan-out to drain.
pub async fn preload(store: &Store, events: u64, users: u64) {
    use botrelay::clock::now_ms;
    use botrelay::ingest::messenger::normalize;
    use botrelay::ingest::verify::{SignatureHeaders, verify_webhook};
    use botrelay::sink_name::SinkName;
    use botrelay::store::NewEvent;
    for chunk_start in (0..events).step_by(500) {
        let batch = (chunk_start..(chunk_start + 500).min(events))
            .map(|n| {
                let (body, signature, _) = signed_message(n, users);
                let headers = SignatureHeaders {
                    sha256: Some(&signature),
                    sha1: None,
                };
                let verified =
                    verify_webhook(SECRET.as_bytes(), false, headers, body.into()).unwrap();
                let mut normalized = normalize(&verified, now_ms()).unwrap();
                NewEvent {
                    event: normalized.events.remove(0),
                    sinks: vec![SinkName::Bot],
                }
            })
            .collect();
        store.enqueue(batch, now_ms()).await.unwrap();
    }
}

/// The PostgreSQL server the benchmarks use when no URL is set.
pub const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A PostgreSQL server for the benchmarks: where to connect as its administrator, to create a
/// fresh database per set-up and drop it afterwards. The server is
/// `BOTRELAY_BENCH_DATABASE_URL`, else `BOTRELAY_TEST_DATABASE_URL`, else [`PG_DEFAULT_URL`]
/// (a user that may create databases).
pub struct PgServer {
    pub admin: tokio_postgres::Client,
    pub url: url::Url,
}

impl PgServer {
    /// Connects, or says in one line why not.
    pub async fn connect() -> Result<PgServer, String> {
        let admin_url = std::env::var("BOTRELAY_BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("BOTRELAY_TEST_DATABASE_URL"))
            .unwrap_or_else(|_| PG_DEFAULT_URL.into());
        let url = url::Url::parse(&admin_url).map_err(|error| format!("bad URL: {error}"))?;
        let mut shown = url.clone();
        let _ = shown.set_password(None);
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&admin_url, tokio_postgres::NoTls),
        )
        .await;
        match connected {
            Ok(Ok((admin, connection))) => {
                tokio::spawn(connection);
                Ok(PgServer { admin, url })
            }
            Ok(Err(error)) => Err(format!("no PostgreSQL at {shown} ({error})")),
            Err(_) => Err(format!("no PostgreSQL at {shown} (timed out)")),
        }
    }

    pub async fn version(&self) -> String {
        self.admin
            .query_one("SHOW server_version", &[])
            .await
            .and_then(|row| row.try_get(0))
            .unwrap_or_default()
    }

    /// A new, empty database; its URL and name.
    pub async fn create(&self) -> (String, String) {
        let name = format!("botrelay_bench_{:016x}", rand::random::<u64>());
        self.admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut url = self.url.clone();
        url.set_path(&name);
        (url.to_string(), name)
    }

    pub async fn drop_database(&self, name: &str) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}
