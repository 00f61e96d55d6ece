//! The whole pipeline, end to end, against a yardstick: the real `botrelay` binary with three
//! sinks (bot, Kochava, Dashbot) at one local mock that answers 200 at once, signed webhooks
//! from `BENCH_USERS` users, then a drain until the mock has every delivery; and, in the same
//! run and under the same closed-loop load, `examples/minimal_server.rs` (HMAC check and JSON
//! parse, nothing else). Both run as child processes; their CPU is read from
//! `/proc/<pid>/stat` (the whole process) and `/proc/<pid>/task/*/stat` (per thread, grouped
//! by thread name), so the load generator and the mock, which run in this process, are not
//! counted.
//!
//! Phases, each `BENCH_SECONDS` long and followed by the drain:
//! 1. closed loop, 64 connections: CPU per webhook (load and drain), acked webhooks/s, ack
//!    latency, deliveries/s during the load, drain time; the minimal server's CPU per request
//!    under the same load, measured before this phase and again after it (a shared machine's
//!    speed drifts over a run), and the ratio to the mean of the two; and, before the relay
//!    starts, the same server with `--forward` to the three sinks' places at the mock (it
//!    POSTs each webhook's body to each before answering, and stores nothing): the floor of a
//!    relay with this fan-out, its CPU per webhook, its ratio to the minimal server, and the
//!    relay's ratio to it;
//! 2. open loop at `BENCH_RATE` webhooks/s (latency from each request's scheduled send), the
//!    sinks receiving meanwhile: ack p50/p99, deliveries/s, drain time, CPU per webhook.
//!
//! Each phase also shows the bytes the relay wrote to files per webhook (`write_bytes` in
//! `/proc/<pid>/io`: the WAL, the checkpoints, the claim journal).
//! It ends with the relay's peak RSS (`VmHWM`) and the targets: CPU per webhook at most 7 times
//! the minimal server's per request; every delivery arrived within 5 s of the load's end; ack
//! p99 at most 10 ms in the open loop.
//!
//! Run: `cargo bench --bench pipeline`. `BENCH_STORE` = `sqlite` (default), `postgres` (one
//! relay) or `postgres2` (two relays on one database, the load split evenly over them, their
//! CPU summed); PostgreSQL as in the `postgres` benchmark (`BOTRELAY_BENCH_DATABASE_URL`, else
//! `BOTRELAY_TEST_DATABASE_URL`, else the local default; a fresh database, dropped afterwards;
//! without a server answering it prints one line and exits 0). `BENCH_USERS` (1000),
//! `BENCH_SECONDS` (8), `BENCH_RATE` (2000). It builds the minimal server with cargo (the
//! `bench` profile) on its first run. About `5 × BENCH_SECONDS`, plus a second of warm-up
//! before each load and the drains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    LoadResult, PgServer, SECRET, SinkMode, SinkStats, closed_loop_over, ms, open_loop_over,
    start_relay_process, start_sink, status_kib,
};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONNECTIONS: u64 = 64;
const SINKS: [&str; 3] = ["bot", "kochava", "dashbot"];
const CPU_RATIO_TARGET: f64 = 7.0;
const DRAIN_TARGET: Duration = Duration::from_secs(5);
const P99_TARGET_MS: f64 = 10.0;
/// How long a drain may take before the benchmark gives up on it.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
    Postgres2,
}

impl Backend {
    fn from_env() -> Backend {
        match std::env::var("BENCH_STORE").as_deref() {
            Ok("postgres") => Backend::Postgres,
            Ok("postgres2") => Backend::Postgres2,
            Ok("sqlite") | Err(_) => Backend::Sqlite,
            Ok(other) => panic!("BENCH_STORE={other}: sqlite, postgres or postgres2"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite, one relay",
            Backend::Postgres => "PostgreSQL, one relay",
            Backend::Postgres2 => "PostgreSQL, two relays on one database",
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|value| *value > 0)
        .unwrap_or(default)
}

// --- CPU from /proc ---------------------------------------------------------------------------

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// A `stat` file's name (`comm`) and utime + stime, in clock ticks.
fn read_stat(path: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (proc(5)).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((text[open + 1..close].to_owned(), utime + stime))
}

/// `write_bytes` of `/proc/<pid>/io`.
fn read_write_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
}

/// CPU used so far by some processes: in all (their threads, live and exited) and per live
/// thread, in clock ticks.
#[derive(Default)]
struct Cpu {
    total: u64,
    /// Bytes the processes sent to storage (`write_bytes` in `/proc/<pid>/io`): the store's
    /// WAL, its checkpoints and the claim journal; sockets are not counted.
    written: u64,
    /// (pid, tid) → (thread name, ticks).
    threads: HashMap<(u32, u32), (String, u64)>,
}

impl Cpu {
    fn sample(pids: &[u32]) -> Cpu {
        let mut cpu = Cpu::default();
        for &pid in pids {
            cpu.total += read_stat(&format!("/proc/{pid}/stat")).map_or(0, |(_, ticks)| ticks);
            cpu.written += read_write_bytes(pid).unwrap_or(0);
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                if let Some(stat) = read_stat(&format!("/proc/{pid}/task/{tid}/stat")) {
                    cpu.threads.insert((pid, tid), stat);
                }
            }
        }
        cpu
    }

    /// Every process whose name is `postgres` (the server's backends and workers, whoever
    /// they work for): the database's side of the PostgreSQL set-ups.
    fn postgres_server() -> Cpu {
        let mut cpu = Cpu::default();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((name, ticks)) = read_stat(&format!("/proc/{pid}/stat"))
                && name == "postgres"
            {
                cpu.total += ticks;
            }
        }
        cpu
    }
}

/// What some processes spent between two samples.
struct CpuUse {
    total_ticks: u64,
    written: u64,
    /// Thread name → (threads, ticks), the threads alive at the end; ticks of threads that
    /// exited in between are in `total_ticks` only.
    groups: BTreeMap<String, (usize, u64)>,
}

impl CpuUse {
    fn between(before: &Cpu, after: &Cpu) -> CpuUse {
        let mut groups: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (key, (name, ticks)) in &after.threads {
            let earlier = before.threads.get(key).map_or(0, |(_, ticks)| *ticks);
            let group = groups.entry(name.clone()).or_default();
            group.0 += 1;
            group.1 += ticks.saturating_sub(earlier);
        }
        CpuUse {
            total_ticks: after.total.saturating_sub(before.total),
            written: after.written.saturating_sub(before.written),
            groups,
        }
    }

    /// Microseconds of CPU per item for `ticks`.
    fn micros_per(ticks: u64, items: u64, hz: u64) -> f64 {
        ticks as f64 * 1e6 / hz as f64 / items.max(1) as f64
    }
}

// --- the processes ----------------------------------------------------------------------------

/// Builds `examples/minimal_server.rs` with the profile this benchmark was built with and
/// returns its path (cargo builds only the benchmark and the `botrelay` binary for it).
fn build_minimal_server() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    // Without what cargo set for this run (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...): build
    // scripts that watch those (ring's) would otherwise be rerun, and the next `cargo bench`
    // would build them all over again.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*name);
        if set_by_cargo {
            command.env_remove(&*name);
        }
    }
    let output = command
        .args([
            "build",
            "--profile",
            "bench",
            "--example",
            "minimal_server",
            "--message-format=json-render-diagnostics",
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo to build the minimal server");
    assert!(
        output.status.success(),
        "cargo could not build examples/minimal_server.rs"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "minimal_server")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo named no minimal_server executable")
}

/// The minimal server's CPU per request under the closed loop (after a one-second warm-up),
/// and the load's figures; with `forward`, the minimal forwarder's per webhook.
async fn measure_minimal(
    executable: &PathBuf,
    forward: &[String],
    length: Duration,
    users: u64,
    hz: u64,
) -> (f64, LoadResult) {
    let (mut minimal, url) = start_minimal_server(executable, forward);
    let urls = [url];
    closed_loop_over(&urls, CONNECTIONS, Duration::from_secs(1), 0, users).await;
    let before = Cpu::sample(&[minimal.id()]);
    let load = closed_loop_over(&urls, CONNECTIONS, length, 1_000_000, users).await;
    let used = CpuUse::between(&before, &Cpu::sample(&[minimal.id()]));
    let _ = minimal.kill();
    let _ = minimal.wait();
    (
        CpuUse::micros_per(used.total_ticks, load.requests, hz),
        load,
    )
}

/// Starts the minimal server, forwarding each webhook to `forward` when that is not empty; the
/// process and its URL.
fn start_minimal_server(executable: &PathBuf, forward: &[String]) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(executable)
        .args(["--listen", "127.0.0.1:0", "--secret", SECRET])
        .args(forward.iter().flat_map(|url| ["--forward", url.as_str()]))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the minimal server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the minimal server's address");
    let address = line
        .trim()
        .strip_prefix("listening ")
        .expect("the minimal server did not start");
    (child, format!("http://{address}"))
}

/// The relay's config: the three sinks at `mock` (distinct paths), the store per `store_keys`.
fn relay_config(mock: &str, store_keys: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [messenger]\napp_secret = \"{SECRET}\"\nverify_token = \"v\"\n\
         [store]\n{store_keys}\n\
         [bot]\nurl = \"{mock}/bot\"\n\
         [sinks.kochava]\nurl = \"{mock}/kochava/track/json\"\napp_id = \"kobench-app\"\n\
         [sinks.dashbot]\nurl = \"{mock}/dashbot/track\"\napi_key = \"bench-dashbot-key\"\n"
    )
}

/// The relay processes of a set-up and what to remove afterwards.
struct Relays {
    children: Vec<Child>,
    urls: Vec<String>,
    database: Option<String>,
    _dir: tempfile::TempDir,
}

impl Relays {
    async fn start(backend: Backend, mock: &str, server: Option<&PgServer>) -> Relays {
        let dir = tempfile::tempdir().unwrap();
        let (store_keys, database, count) = match (backend, server) {
            (Backend::Sqlite, _) | (_, None) => (
                format!("path = \"{}\"", dir.path().join("bench.db").display()),
                None,
                1,
            ),
            (_, Some(server)) => {
                let (url, name) = server.create().await;
                let count = if backend == Backend::Postgres2 { 2 } else { 1 };
                (format!("url = \"{url}\""), Some(name), count)
            }
        };
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, relay_config(mock, &store_keys)).unwrap();
        let (mut children, mut urls) = (Vec::new(), Vec::new());
        for _ in 0..count {
            let (child, url, _admin) = start_relay_process(&config);
            children.push(child);
            urls.push(url);
        }
        Relays {
            children,
            urls,
            database,
            _dir: dir,
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    async fn stop(mut self, server: Option<&PgServer>) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let (Some(name), Some(server)) = (&self.database, server) {
            server.drop_database(name).await;
        }
    }
}

// --- a phase ----------------------------------------------------------------------------------

fn received(mock: &SinkStats) -> [u64; 3] {
    SINKS.map(|sink| mock.received_at(sink))
}

/// Waits until every sink has received `expected` more than `before`; how long that took, or
/// `None` past [`DRAIN_LIMIT`].
async fn drain(mock: &SinkStats, before: [u64; 3], expected: u64) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let now = received(mock);
        if (0..SINKS.len()).all(|sink| now[sink] - before[sink] >= expected) {
            return Some(started.elapsed());
        }
        if started.elapsed() > DRAIN_LIMIT {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One load phase against the relays and its drain.
struct Phase {
    load: LoadResult,
    /// Deliveries (all three sinks) per second while the load ran.
    delivery_rate: f64,
    /// Their share of what the acked webhooks call for.
    delivered_during_load: f64,
    drain: Option<Duration>,
    cpu: CpuUse,
    postgres: Option<u64>,
}

async fn run_phase<F>(relays: &Relays, mock: &SinkStats, postgres: bool, load: F) -> Phase
where
    F: std::future::Future<Output = LoadResult>,
{
    let pids = relays.pids();
    let before = received(mock);
    let (cpu_before, pg_before) = (Cpu::sample(&pids), postgres.then(Cpu::postgres_server));
    let load = load.await;
    let at_end = received(mock);
    let delivered: u64 = (0..SINKS.len()).map(|s| at_end[s] - before[s]).sum();
    let drain = drain(mock, before, load.requests).await;
    let (cpu_after, pg_after) = (Cpu::sample(&pids), postgres.then(Cpu::postgres_server));
    Phase {
        delivery_rate: delivered as f64 / load.elapsed.as_secs_f64(),
        delivered_during_load: delivered as f64 / (load.requests.max(1) * 3) as f64,
        drain,
        cpu: CpuUse::between(&cpu_before, &cpu_after),
        postgres: pg_before
            .zip(pg_after)
            .map(|(before, after)| after.total.saturating_sub(before.total)),
        load,
    }
}

// --- the report -------------------------------------------------------------------------------

fn row(label: &str, closed: String, open: String) {
    println!("  {label:<34} {closed:>20} {open:>20}");
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn drain_text(drain: Option<Duration>) -> String {
    drain.map_or(format!("> {} s", DRAIN_LIMIT.as_secs()), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

fn main() {
    let backend = Backend::from_env();
    let users = env_u64("BENCH_USERS", 1000);
    let seconds = env_u64("BENCH_SECONDS", 8);
    let rate = env_u64("BENCH_RATE", 2000);
    let hz = clock_ticks_per_second();
    let minimal_server = build_minimal_server();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let server = if backend == Backend::Sqlite {
            None
        } else {
            match PgServer::connect().await {
                Ok(server) => Some(server),
                Err(reason) => {
                    println!("pipeline benchmark on PostgreSQL skipped: {reason}");
                    return;
                }
            }
        };
        let phase_length = Duration::from_secs(seconds);
        let started = Instant::now();
        let store = match &server {
            Some(server) => format!("{} (server {})", backend.describe(), server.version().await),
            None => backend.describe().to_owned(),
        };
        println!(
            "botrelay pipeline benchmark: {store}; {users} users, {seconds} s phases, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("  sinks bot, kochava, dashbot at one local mock answering 200 at once; CPU from /proc of the child processes only");

        // The yardstick, under the same closed loop: once before the relay's phases and once
        // between them, since a shared machine's speed drifts over a run; the ratio uses the
        // mean of the two.
        let (minimal_before, minimal_load) =
            measure_minimal(&minimal_server, &[], phase_length, users, hz).await;
        println!(
            "minimal server (HMAC + JSON parse), closed loop {CONNECTIONS} connections: {}",
            minimal_load.summary()
        );
        println!("  CPU {minimal_before:.1} µs per request");

        // The relay: a warm-up and its drain, then the two phases.
        let (mock_url, mock) = start_sink(SinkMode::Count { timed: false }).await;
        let mock_base = mock_url.trim_end_matches("/webhook").to_owned();
        // The floor of this fan-out, before the relay starts: the minimal server forwarding
        // each webhook to the three sinks' places at the mock (under a path of its own, so
        // that the relay's counts there stay apart) before it answers.
        let forward = SINKS.map(|sink| format!("{mock_base}/floor/{sink}"));
        let (floor_us, floor_load) =
            measure_minimal(&minimal_server, &forward, phase_length, users, hz).await;
        let relays = Relays::start(backend, &mock_base, server.as_ref()).await;
        let postgres = server.is_some();
        let warm_up = run_phase(&relays, &mock, postgres, closed_loop_over(
            &relays.urls, CONNECTIONS, Duration::from_secs(1), 0, users,
        ))
        .await;
        assert!(warm_up.drain.is_some(), "the warm-up's deliveries did not all arrive");
        let closed = run_phase(&relays, &mock, postgres, closed_loop_over(
            &relays.urls, CONNECTIONS, phase_length, 10_000_000, users,
        ))
        .await;
        let (minimal_after, _) =
            measure_minimal(&minimal_server, &[], phase_length, users, hz).await;
        let minimal_us = (minimal_before + minimal_after) / 2.0;
        let open = run_phase(&relays, &mock, postgres, open_loop_over(
            &relays.urls, rate, phase_length, 20_000_000, users, false,
        ))
        .await;
        let peak_rss: Vec<String> = relays
            .pids()
            .iter()
            .map(|pid| format!("{:.1}", status_kib(*pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0))
            .collect();
        relays.stop(server.as_ref()).await;

        println!(
            "relay ({} process{}):{:>31} {:>20}",
            peak_rss.len(),
            if peak_rss.len() > 1 { "es" } else { "" },
            format!("closed loop, {CONNECTIONS} conn"),
            format!("open loop, {rate}/s")
        );
        let both = [&closed, &open];
        let each = |f: &dyn Fn(&Phase) -> String| (f(both[0]), f(both[1]));
        let show = |label: &str, f: &dyn Fn(&Phase) -> String| {
            let (c, o) = each(f);
            row(label, c, o);
        };
        show("acked webhooks/s", &|p| format!("{:.0}", p.load.rate()));
        show("ack p50 / p99 (ms)", &|p| {
            format!(
                "{:.2} / {:.2}",
                ms(p.load.latency.value_at_quantile(0.50)),
                ms(p.load.latency.value_at_quantile(0.99))
            )
        });
        show("acked / errors", &|p| format!("{} / {}", p.load.requests, p.load.errors));
        show("deliveries/s during load (3 sinks)", &|p| format!("{:.0}", p.delivery_rate));
        show("delivered by the load's end", &|p| {
            format!("{:.0} %", p.delivered_during_load * 100.0)
        });
        show("drain after the load", &|p| drain_text(p.drain));
        show("CPU µs/webhook (process)", &|p| {
            format!("{:.1}", CpuUse::micros_per(p.cpu.total_ticks, p.load.requests, hz))
        });
        let mut names: Vec<&String> = closed.cpu.groups.keys().collect();
        for name in open.cpu.groups.keys() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let (c, o) = each(&|p: &Phase| {
                p.cpu.groups.get(name).map_or("-".into(), |(threads, ticks)| {
                    format!("{:.1} ({threads})", CpuUse::micros_per(*ticks, p.load.requests, hz))
                })
            });
            row(&format!("  thread {name} (n)"), c, o);
        }
        show("  threads exited meanwhile", &|p| {
            let live: u64 = p.cpu.groups.values().map(|(_, ticks)| ticks).sum();
            format!(
                "{:.1}",
                CpuUse::micros_per(p.cpu.total_ticks.saturating_sub(live), p.load.requests, hz)
            )
        });
        if postgres {
            show("PostgreSQL server µs/webhook", &|p| {
                format!("{:.1}", CpuUse::micros_per(p.postgres.unwrap_or(0), p.load.requests, hz))
            });
        }
        let relay_us = CpuUse::micros_per(closed.cpu.total_ticks, closed.load.requests, hz);
        let ratio = relay_us / minimal_us.max(f64::MIN_POSITIVE);
        show("CPU vs the minimal server", &|p| {
            format!(
                "{:.1} ×",
                CpuUse::micros_per(p.cpu.total_ticks, p.load.requests, hz)
                    / minimal_us.max(f64::MIN_POSITIVE)
            )
        });
        show("written to files (KiB/webhook)", &|p| {
            format!("{:.2}", p.cpu.written as f64 / 1024.0 / p.load.requests.max(1) as f64)
        });
        row("peak RSS (MiB)", peak_rss.join(" + "), String::new());

        println!(
            "minimal server: {minimal_before:.1} µs per request before the relay's closed loop, \
             {minimal_after:.1} µs after it; the ratios use the mean, {minimal_us:.1} µs"
        );
        println!(
            "minimal forwarder (the same, plus a POST of the body to each of the 3 sinks before \
             answering; nothing stored), closed loop {CONNECTIONS} connections: {}",
            floor_load.summary()
        );
        if floor_load.errors > 0 {
            println!(
                "  some forwards failed ({} webhooks answered 502): this floor is not valid",
                floor_load.errors
            );
        }
        println!(
            "  CPU {floor_us:.1} µs per webhook: {:.1}× the minimal server; the relay's closed \
             loop is {:.1}× this floor",
            floor_us / minimal_us.max(f64::MIN_POSITIVE),
            relay_us / floor_us.max(f64::MIN_POSITIVE)
        );
        println!("targets:");
        println!(
            "  CPU per webhook ≤ {CPU_RATIO_TARGET}× the minimal server's per request (closed loop): {ratio:.1}× ({relay_us:.1} / {minimal_us:.1} µs) {}",
            verdict(ratio <= CPU_RATIO_TARGET)
        );
        for (name, phase) in [("closed loop", &closed), ("open loop", &open)] {
            println!(
                "  drain < {} s after the {name}: {} {}",
                DRAIN_TARGET.as_secs(),
                drain_text(phase.drain),
                verdict(phase.drain.is_some_and(|d| d < DRAIN_TARGET))
            );
        }
        let p99 = ms(open.load.latency.value_at_quantile(0.99));
        println!(
            "  ack p99 ≤ {P99_TARGET_MS} ms at {rate} webhooks/s, open loop, fan-out on: {p99:.2} ms {}",
            verdict(p99 <= P99_TARGET_MS && open.load.errors == 0)
        );
        println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    });
}
