//! Soak: the real `botrelay` binary for N minutes of signed webhooks while its two sinks (the
//! bot and Kochava, at one local mock) fail on a schedule, then a drain. Prints what was acked,
//! delivered, lost, duplicated and dead-lettered, the relay's RSS (min/max, from
//! `/proc/<pid>/status`) and the ack latency percentiles. The drain lasts until the bot has
//! every acked message and Kochava as many events. Loopback only, bounded in time.
//!
//! `cargo bench --bench soak -- --minutes 30 [--rate 200] [--users 200] [--phase 20]`
//!
//! The schedule cycles, one phase each (`--phase` seconds): answering 200, refusing connections
//! (the mock stops listening), 503, hanging (never answering), 401, and 200 again. Every failure
//! phase is a whole-sink failure: what the relay must hold without dead-lettering (its `ttl` is
//! far longer than a phase). "lost" counts acknowledged webhooks that never reached the bot;
//! "duplicated" counts mids the bot answered 200 more than once (at-least-once allows a few,
//! after a hang whose answer came too late).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botrelay::signing::sign_sha256;
use common::{start_relay_process, status_kib};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "soak_app_secret";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Ok = 0,
    Refuse = 1,
    Unavailable = 2,
    Hang = 3,
    Unauthorized = 4,
}

const SCHEDULE: [Phase; 6] = [
    Phase::Ok,
    Phase::Refuse,
    Phase::Unavailable,
    Phase::Hang,
    Phase::Unauthorized,
    Phase::Ok,
];

struct Options {
    minutes: f64,
    rate: u64,
    users: u64,
    phase: Duration,
}

fn options() -> Options {
    let mut options = Options {
        minutes: 1.0,
        rate: 200,
        users: 200,
        phase: Duration::from_secs(20),
    };
    let args: Vec<String> = std::env::args().collect();
    let mut index = 1;
    while index < args.len() {
        let value = args.get(index + 1).cloned().unwrap_or_default();
        match args[index].as_str() {
            "--minutes" => options.minutes = value.parse().expect("--minutes N"),
            "--rate" => options.rate = value.parse().expect("--rate N"),
            "--users" => options.users = value.parse().expect("--users N"),
            "--phase" => options.phase = Duration::from_secs(value.parse().expect("--phase S")),
            // `cargo bench` passes `--bench`; anything else is ignored.
            _ => {
                index += 1;
                continue;
            }
        }
        index += 2;
    }
    options
}

/// What the mock sinks saw: per bot mid, how many times it answered 200.
#[derive(Default)]
struct Seen {
    bot_ok: HashMap<String, u32>,
    kochava_ok: u64,
}

/// The mock behind both sinks: answers per the current phase; in `Refuse` it stops listening.
async fn run_mock(addr: SocketAddr, phase: Arc<AtomicU8>, seen: Arc<Mutex<Seen>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        while phase.load(Ordering::Relaxed) == Phase::Refuse as u8 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    if phase.load(Ordering::Relaxed) == Phase::Refuse as u8 { break; }
                    continue;
                }
            };
            let Ok((mut stream, _)) = accepted else {
                continue;
            };
            let (phase, seen) = (phase.clone(), seen.clone());
            tokio::spawn(async move {
                // One request per connection is enough for the relay's client: it reconnects.
                let mut buffer = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                let body_start = loop {
                    let Ok(read) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                    if let Some(end) = find(&buffer, b"\r\n\r\n") {
                        break end + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buffer[..body_start]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or(0);
                while buffer.len() < body_start + length {
                    let Ok(read) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                }
                let status = match phase.load(Ordering::Relaxed) {
                    p if p == Phase::Unavailable as u8 => 503,
                    p if p == Phase::Unauthorized as u8 => 401,
                    p if p == Phase::Hang as u8 => {
                        // Hold the connection past the relay's timeout, then drop it.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        return;
                    }
                    _ => 200,
                };
                if status == 200 {
                    let body = String::from_utf8_lossy(&buffer[body_start..]).into_owned();
                    let mut seen = seen.lock().unwrap();
                    if head.starts_with("post /bot") {
                        if let Some(mid) = between(&body, "\"mid\":\"", "\"") {
                            *seen.bot_ok.entry(mid).or_default() += 1;
                        }
                    } else {
                        seen.kochava_ok += 1;
                    }
                }
                let reason = match status {
                    200 => "OK",
                    401 => "Unauthorized",
                    _ => "Service Unavailable",
                };
                let answer = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(text[from..to].to_owned())
}

fn webhook(n: u64, users: u64) -> (Vec<u8>, String, String) {
    let mid = format!("m_soak_{n}");
    let body = format!(
        r#"{{"object":"page","entry":[{{"id":"106120894276430","time":1700000000000,"messaging":[{{"sender":{{"id":"{user}"}},"recipient":{{"id":"106120894276430"}},"timestamp":1700000000000,"message":{{"mid":"{mid}","text":"soak"}}}}]}}]}}"#,
        user = 2_290_000_000_000_000u64 + n % users,
    );
    let signature = sign_sha256(SECRET.as_bytes(), body.as_bytes());
    (body.into_bytes(), signature, mid)
}

#[tokio::main]
async fn main() {
    let options = options();
    let dir = tempfile::tempdir().expect("temp dir");
    let mock_addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let phase = Arc::new(AtomicU8::new(Phase::Ok as u8));
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(run_mock(mock_addr, phase.clone(), seen.clone()));
    let config = dir.path().join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [messenger]\napp_secret = \"{SECRET}\"\nverify_token = \"v\"\n\
             [store]\npath = \"{}\"\n\
             [bot]\nurl = \"http://{mock_addr}/bot\"\ntimeout = \"2s\"\nbackoff = \"200ms\"\nmax_backoff = \"5s\"\nttl = \"1h\"\n\
             [sinks.kochava]\nurl = \"http://{mock_addr}/track/json\"\napp_id = \"kosoak-app\"\ntimeout = \"2s\"\nbackoff = \"200ms\"\nmax_backoff = \"5s\"\n",
            dir.path().join("soak.db").display()
        ),
    )
    .unwrap();
    let (mut relay, url, admin) = start_relay_process(&config);
    let pid = relay.id();
    let duration = Duration::from_secs_f64(options.minutes * 60.0);
    println!(
        "soak: {:.1} min at {} webhooks/s from {} users; sinks fail on a schedule of {:?}, {} s each",
        options.minutes,
        options.rate,
        options.users,
        SCHEDULE,
        options.phase.as_secs()
    );

    // The schedule and the RSS sampler.
    let started = Instant::now();
    let rss: Arc<Mutex<Vec<u64>>> = Arc::default();
    let sampler = {
        let (rss, phase) = (rss.clone(), phase.clone());
        let phase_length = options.phase;
        tokio::spawn(async move {
            loop {
                let elapsed = started.elapsed();
                let step = (elapsed.as_secs_f64() / phase_length.as_secs_f64()) as usize;
                phase.store(SCHEDULE[step % SCHEDULE.len()] as u8, Ordering::Relaxed);
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    rss.lock().unwrap().push(kib);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The load: open loop, latency from each request's scheduled time.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let interval = Duration::from_secs_f64(1.0 / options.rate as f64);
    let total = (options.rate as f64 * duration.as_secs_f64()) as u64;
    let mut latency = Histogram::<u64>::new(3).unwrap();
    let mut acked: Vec<String> = Vec::with_capacity(total as usize);
    let mut refused = 0u64;
    let mut requests = tokio::task::JoinSet::new();
    let mut last_report = Instant::now();
    let mut count = |(ok, took, mid): (bool, Duration, String)| {
        if ok {
            latency.record(took.as_micros() as u64).unwrap();
            acked.push(mid);
        } else {
            refused += 1;
        }
    };
    for n in 0..total {
        let scheduled = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, target) = (client.clone(), format!("{url}/webhook"));
        let (body, signature, mid) = webhook(n, options.users);
        requests.spawn(async move {
            let response = client
                .post(&target)
                .header("x-hub-signature-256", signature)
                .body(body)
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            let ok = matches!(&response, Ok(response) if response.status() == 200);
            (ok, scheduled.elapsed(), mid)
        });
        while let Some(done) = requests.try_join_next() {
            count(done.unwrap());
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            let rss = rss.lock().unwrap().last().copied().unwrap_or(0);
            println!(
                "  {:>5.1} min: rss {} MiB",
                started.elapsed().as_secs_f64() / 60.0,
                rss / 1024,
            );
            let _ = std::io::stdout().flush();
        }
    }
    while let Some(done) = requests.join_next().await {
        count(done.unwrap());
    }
    let load_ended = Instant::now();
    sampler.abort();
    phase.store(Phase::Ok as u8, Ordering::Relaxed);

    // The drain: every acked webhook reaches the bot, and Kochava has as many events (one per
    // message), or 5 minutes pass.
    let drain_deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (delivered, kochava) = {
            let seen = seen.lock().unwrap();
            let delivered = acked
                .iter()
                .filter(|mid| seen.bot_ok.contains_key(*mid))
                .count();
            (delivered, seen.kochava_ok)
        };
        let drained = delivered == acked.len() && kochava >= acked.len() as u64;
        if drained || Instant::now() > drain_deadline {
            break;
        }
        if let Some(kib) = status_kib(pid, "VmRSS:") {
            rss.lock().unwrap().push(kib);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = load_ended.elapsed();
    let sinks: serde_json::Value = client
        .get(format!("{admin}/admin/sinks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or_default();
    let dead: u64 = sinks
        .as_array()
        .map(|sinks| sinks.iter().filter_map(|sink| sink["dead"].as_u64()).sum())
        .unwrap_or(0);
    let _ = relay.kill();
    let _ = relay.wait();

    let seen = seen.lock().unwrap();
    let delivered = acked
        .iter()
        .filter(|mid| seen.bot_ok.contains_key(*mid))
        .count();
    let duplicated = seen.bot_ok.values().filter(|count| **count > 1).count();
    let rss = rss.lock().unwrap();
    let (rss_min, rss_max) = (
        rss.iter().min().copied().unwrap_or(0),
        rss.iter().max().copied().unwrap_or(0),
    );
    println!(
        "soak: acked {}, not acked {refused}, delivered {delivered}, lost {}, duplicated {duplicated}, dead-lettered {dead}, kochava delivered {}",
        acked.len(),
        acked.len() - delivered,
        seen.kochava_ok
    );
    println!(
        "soak: rss min {:.1} MiB, max {:.1} MiB; ack p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; drain {:.1} s",
        rss_min as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0,
        drain.as_secs_f64()
    );
}
