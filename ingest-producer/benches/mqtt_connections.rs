//! MQTT connection-scale benchmark: `simulate --via mqtt` with many devices, each its own
//! connection and token, publishing QoS 1 to the ingest binary, which produces to the real
//! Kafka. Prints connections held, msg/s, PUBACK latency p50/p99 (client side: publish to
//! PUBACK; server side: ingest's histogram), memory per connection (ingest's RSS over its
//! connections) and the CPU of ingest and of the simulator in µs per reading.
//!
//! Three processes: this program (a fresh database with the devices and their tokens, a
//! 12-partition topic, sampling `/proc` and ingest's `/metrics` every 5 s), the ingest binary
//! and the simulator (`ingest-producer simulate`), so that each one's CPU and memory are its
//! own. Both raise their open-file limit themselves (`fd_limit`; each logs what it did).
//! One client address reaches one server address from at most ~28,000 ephemeral ports, so
//! ingest listens on several loopback addresses (127.0.0.1, 127.0.0.2, …, one per 25,000
//! devices) and the simulator spreads the devices over them.
//!
//! Settings (environment): `MQTT_BENCH_DEVICES` (default 100000), `MQTT_BENCH_INTERVAL`
//! (default 5s: 20,000 msg/s for 100,000 devices), `MQTT_BENCH_SECONDS` (default 300),
//! `MQTT_BENCH_WORKERS` (ingest's `MQTT_WORKERS`, default 1). Needs `DATABASE_URL` and
//! `KAFKA_BOOTSTRAP_SERVERS` as the tests do. Logs of both processes go to
//! `$TMPDIR/mqtt_bench-*`.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ingest_producer::manifest;
use plumbing::testing::{TestDb, TestTopics};
use schemas::LayoutChoice;

const PREFIX: &str = "mqttbench";
/// Devices per server address (under the ~28,000 ephemeral ports of one address pair).
const PER_ADDRESS: u32 = 25_000;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Clock ticks per second of `/proc/<pid>/stat` times.
const USER_HZ: f64 = 100.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// CPU seconds (user + system, all threads) of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Open-file limits of a process, as `/proc/<pid>/limits` says.
fn nofile(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_default()
}

/// The figures of ingest's `/metrics` the benchmark reads.
#[derive(Debug, Default, Clone)]
struct Scrape {
    connections: f64,
    stored: f64,
    /// PUBACK duration histogram (QoS 1): upper bound → cumulative count.
    puback: BTreeMap<u64, f64>,
    puback_count: f64,
}

fn value(line: &str) -> f64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(client: &reqwest::Client, admin: SocketAddr) -> Option<Scrape> {
    let text = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut s = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.starts_with("fleetstream_ingest_mqtt_connections{") {
            s.connections += value(line);
        } else if line.starts_with("fleetstream_ingest_mqtt_publishes_total{")
            && line.contains("outcome=\"stored\"")
        {
            s.stored += value(line);
        } else if line.starts_with("fleetstream_ingest_mqtt_puback_duration_seconds_bucket{")
            && line.contains("qos=\"1\"")
        {
            let le = line
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("+Inf");
            let bound = le.parse::<f64>().map_or(u64::MAX, |s| (s * 1e6) as u64);
            *s.puback.entry(bound).or_default() += value(line);
        } else if line.starts_with("fleetstream_ingest_mqtt_puback_duration_seconds_count{")
            && line.contains("qos=\"1\"")
        {
            s.puback_count += value(line);
        }
    }
    Some(s)
}

/// The histogram bucket (upper bound, ms) holding the `q` quantile of the PUBACKs counted
/// between two scrapes.
fn bucket_quantile(from: &Scrape, to: &Scrape, q: f64) -> String {
    let total = to.puback_count - from.puback_count;
    if total <= 0.0 {
        return "n/a".to_owned();
    }
    for (bound, cumulative) in &to.puback {
        let before = from.puback.get(bound).copied().unwrap_or(0.0);
        if cumulative - before >= q * total {
            return if *bound == u64::MAX {
                "> largest bucket".to_owned()
            } else {
                format!("≤ {} ms", *bound as f64 / 1000.0)
            };
        }
    }
    "n/a".to_owned()
}

/// Tenant `mqttbench-t0` with the devices, device `d`'s token `tok-<d>`; the tokens file.
async fn seed(db: &TestDb, devices: u32, tokens: &Path) -> Result<()> {
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, 'MQTT bench')")
        .bind(manifest::tenant_id(PREFIX, 0))
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id, token_hash) \
         SELECT $1, $2 || '-d' || lpad(d::text, 6, '0'), \
                encode(sha256(('tok-' || d)::bytea), 'hex') \
         FROM generate_series(0, $3 - 1) d",
    )
    .bind(manifest::tenant_id(PREFIX, 0))
    .bind(PREFIX)
    .bind(i64::from(devices))
    .execute(&db.pool)
    .await?;
    let lines: String = (0..devices).map(|d| format!("{d}\ttok-{d}\n")).collect();
    std::fs::write(tokens, lines)?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn bench() -> Result<()> {
    let devices: u32 = env_or("MQTT_BENCH_DEVICES", 100_000);
    let seconds: u64 = env_or("MQTT_BENCH_SECONDS", 300);
    let interval: String = env_or("MQTT_BENCH_INTERVAL", "5s".to_owned());
    let workers: usize = env_or("MQTT_BENCH_WORKERS", 1);
    let interval_s = plumbing::config::parse_duration(&interval)
        .map_err(anyhow::Error::msg)?
        .as_secs_f64();
    let binary = env!("CARGO_BIN_EXE_ingest-producer");
    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("mqtt_bench"));
    std::fs::create_dir_all(&dir)?;
    let tokens = dir.join("tokens.tsv");

    let db = TestDb::new(LayoutChoice::Postgres).await?;
    seed(&db, devices, &tokens).await?;
    let topics = TestTopics::new(schemas::topics::DEFAULT_PARTITIONS).await?;

    let addresses = devices.div_ceil(PER_ADDRESS).max(1);
    let port = free_port()?;
    let listen: Vec<String> = (1..=addresses)
        .map(|n| format!("127.0.0.{n}:{port}"))
        .collect();
    let listen = listen.join(",");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let ingest_log = dir.join("ingest.log");
    let ingest = Proc {
        child: Command::new(binary)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &topics.args.bootstrap_servers)
            .env("TELEMETRY_TOPIC", &topics.args.telemetry_topic)
            .env("ADMIN_LISTEN", admin.to_string())
            .env("HTTP_LISTEN", "127.0.0.1:0")
            .env("MQTT_LISTEN", &listen)
            .env("MQTT_MAX_CONNECTIONS", (devices + 1000).to_string())
            .env("MQTT_WORKERS", workers.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&ingest_log)?)
            .spawn()
            .context("starting ingest")?,
        name: "ingest",
    };
    let client = reqwest::Client::new();
    let ready_by = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        if Instant::now() > ready_by {
            bail!("ingest not ready; log {}", ingest_log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The credentials cache holds every device once ready (first load before /readyz).

    let sim_log = dir.join("simulate.log");
    let sim_out = dir.join("simulate.out");
    let command = format!(
        "{binary} simulate --via mqtt --auth device --qos 1 --prefix {PREFIX} --tenants 1 \
         --devices {devices} --interval {interval} --duration {seconds}s --mqtt {listen} \
         --device-tokens {} --concurrency {} --give-up-after 30s --silence-probability 0",
        tokens.display(),
        (devices / 25).max(1000),
    );
    println!("# MQTT connection benchmark: {devices} devices, one reading every {interval} each, QoS 1, {seconds} s");
    println!(
        "# ingest: MQTT_LISTEN={listen} MQTT_WORKERS={workers}; logs in {}",
        dir.display()
    );
    println!("# simulator: {command}");
    let started = Instant::now();
    let mut sim = Proc {
        child: Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&sim_out)?)
            .stderr(std::fs::File::create(&sim_log)?)
            .spawn()
            .context("starting the simulator")?,
        name: "simulator",
    };

    // Samples: (time since start, ingest CPU s, simulator CPU s, ingest RSS, simulator RSS,
    // scrape).
    let mut samples: Vec<(f64, f64, f64, u64, u64, Scrape)> = Vec::new();
    let mut all_connected_at: Option<f64> = None;
    let mut first_publish: Option<usize> = None;
    let mut max_connections = 0.0f64;
    let mut sim_nofile = String::new();
    loop {
        if let Some(status) = sim.child.try_wait()? {
            if !status.success() {
                bail!("simulator failed ({status}); log {}", sim_log.display());
            }
            break;
        }
        if sim_nofile.is_empty() && started.elapsed() > Duration::from_secs(2) {
            sim_nofile = nofile(sim.pid());
        }
        let t = started.elapsed().as_secs_f64();
        let (ic, sc) = (
            cpu_seconds(ingest.pid()).unwrap_or(0.0),
            cpu_seconds(sim.pid()).unwrap_or(0.0),
        );
        let (ir, sr) = (
            rss_bytes(ingest.pid()).unwrap_or(0),
            rss_bytes(sim.pid()).unwrap_or(0),
        );
        if let Some(s) = scrape(&client, admin).await {
            max_connections = max_connections.max(s.connections);
            if all_connected_at.is_none() && s.connections >= f64::from(devices) {
                all_connected_at = Some(t);
            }
            if first_publish.is_none() && s.stored > 0.0 {
                first_publish = Some(samples.len());
            }
            println!(
                "t={t:6.0}s connections={:6.0} stored={:9.0} ingest cpu={ic:7.1}s rss={:6.0} MiB \
                 simulator cpu={sc:7.1}s rss={:6.0} MiB",
                s.connections,
                s.stored,
                ir as f64 / 1048576.0,
                sr as f64 / 1048576.0
            );
            samples.push((t, ic, sc, ir, sr, s));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let summary = std::fs::read_to_string(&sim_out)?;
    let ingest_nofile = nofile(ingest.pid());

    // The steady window: from the first sample with readings stored to the last sample (the
    // simulator was still publishing then).
    let Some(first) = first_publish else {
        bail!("nothing was stored; logs in {}", dir.display());
    };
    let (a, b) = (&samples[first], &samples[samples.len() - 1]);
    let span = b.0 - a.0;
    let readings = b.5.stored - a.5.stored;
    let steady_connections = samples[first..]
        .iter()
        .map(|s| s.5.connections)
        .fold(f64::INFINITY, f64::min);
    println!("# simulator summary: {}", summary.trim());
    println!(
        "connections: {max_connections:.0} at most, {steady_connections:.0} at least while \
         publishing (of {devices}); all connected {}",
        all_connected_at.map_or("never".to_owned(), |t| format!(
            "{t:.0} s after the simulator started"
        ))
    );
    println!(
        "msg/s stored by ingest over the steady {span:.0} s: {:.0} (offered {:.0})",
        readings / span,
        f64::from(devices) / interval_s
    );
    println!(
        "PUBACK latency, ingest's histogram (PUBLISH read to PUBACK) over the window: p50 {}, p99 {}",
        bucket_quantile(&a.5, &b.5, 0.5),
        bucket_quantile(&a.5, &b.5, 0.99)
    );
    println!(
        "memory: ingest RSS {:.0} MiB = {:.1} KiB per connection; simulator RSS {:.0} MiB = {:.1} KiB per device",
        b.3 as f64 / 1048576.0,
        b.3 as f64 / 1024.0 / b.5.connections.max(1.0),
        b.4 as f64 / 1048576.0,
        b.4 as f64 / 1024.0 / f64::from(devices)
    );
    println!(
        "CPU over the window: ingest {:.1} µs per reading ({:.0} % of a core), simulator {:.1} µs per reading ({:.0} % of a core)",
        (b.1 - a.1) * 1e6 / readings.max(1.0),
        (b.1 - a.1) / span * 100.0,
        (b.2 - a.2) * 1e6 / readings.max(1.0),
        (b.2 - a.2) / span * 100.0
    );
    println!(
        "connecting: ingest {:.1} s CPU, simulator {:.1} s CPU until the first stored reading",
        a.1, a.2
    );
    println!("open-file limits (soft/hard): ingest {ingest_nofile}, simulator {sim_nofile}");
    for (name, log) in [(ingest.name, &ingest_log), (sim.name, &sim_log)] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("open-file limit")) {
            println!("{name} log: {}", strip_ansi(line));
        }
    }
    drop(sim);
    drop(ingest);
    Ok(())
}

/// The log line without terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
