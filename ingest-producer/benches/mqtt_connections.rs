//! MQTT connection-scale benchmark: `simulate --via mqtt` with many devices, each its own
//! connection and token, publishing QoS 1 to the ingest binary, which produces to the real
//! Kafka. Prints connections held, msg/s, PUBACK latency p50/p99 (client side: publish to
//! PUBACK, over every simulator's attempts; server side: ingest's histograms, summed bucket
//! by bucket), memory per connection (ingest's RSS over its connections) and the CPU of
//! ingest, of the simulators and (when the bench finds its process) of the Kafka broker in
//! µs per reading.
//!
//! One process holds at most ~20,000 connections here (the hard open-file limit is 20,000
//! and cannot be raised: see BENCHMARKS.md), so the fleet is split over
//! `MQTT_BENCH_PROCESSES` slices (default: one per 18,000 devices): each slice is one ingest
//! process (its own MQTT address(es) and port, its own admin port; all of them produce to the
//! same topic and read the same database) and one simulator process driving its devices
//! (`simulate --first-device K --devices n`: a disjoint range of device numbers, ids and
//! tokens, all read from one tokens file), connected to that ingest only. Besides them, this
//! program: a fresh database with the devices and their tokens, a 12-partition topic,
//! sampling `/proc` and every ingest's `/metrics` every 5 s; figures are sums over the
//! processes. Each process raises its open-file limit itself (`fd_limit`; each logs what it
//! did). One client address reaches one server address from at most ~28,000 ephemeral
//! ports, so an ingest gets one loopback address per 25,000 of its devices (127.0.0.1,
//! 127.0.0.2, …, never shared between ingest processes) and its simulator spreads the
//! devices over them.
//!
//! msg/s, ingest's PUBACK histogram, CPU and memory are taken over the steady window: from the
//! first sample with every device connected and readings stored to the sample before the
//! last (the last may catch a simulator winding down). The client-side PUBACK percentiles
//! are over every attempt of every simulator (`--latencies` files, merged).
//!
//! Settings (environment): `MQTT_BENCH_DEVICES` (default 100000), `MQTT_BENCH_PROCESSES`
//! (default devices / 18,000 rounded up), `MQTT_BENCH_INTERVAL` (default 5s: 20,000 msg/s for
//! 100,000 devices), `MQTT_BENCH_SECONDS` (default 300), `MQTT_BENCH_WORKERS` (each ingest's
//! `MQTT_WORKERS`, default 1). Needs `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` as the
//! tests do. Logs of every process go to `$TMPDIR/mqtt_bench-*`.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ingest_producer::manifest;
use plumbing::testing::{TestDb, TestTopics};
use schemas::LayoutChoice;

const PREFIX: &str = "mqttbench";
/// Devices per server address (under the ~28,000 ephemeral ports of one address pair).
const PER_ADDRESS: u32 = 25_000;
/// Devices per process by default (a process may hold ~20,000 descriptors here).
const PER_PROCESS: u32 = 18_000;
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
    name: String,
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

/// The figures of ingest's `/metrics` the benchmark reads (of one process, or summed over
/// them: [`Scrape::add`]).
#[derive(Debug, Default, Clone)]
struct Scrape {
    connections: f64,
    stored: f64,
    /// PUBACK duration histogram (QoS 1): upper bound → cumulative count.
    puback: BTreeMap<u64, f64>,
    puback_count: f64,
}

impl Scrape {
    /// Adds another process's figures: counters and gauges add up, and so do histograms
    /// bucket by bucket (the processes share the bucket bounds).
    fn add(&mut self, other: &Scrape) {
        self.connections += other.connections;
        self.stored += other.stored;
        for (bound, cumulative) in &other.puback {
            *self.puback.entry(*bound).or_default() += cumulative;
        }
        self.puback_count += other.puback_count;
    }
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

/// Loopback address number `n` (0: 127.0.0.1, 1: 127.0.0.2, …).
fn loopback(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + n)
}

/// The Kafka broker's process: the `kafka.Kafka` process whose properties file lists
/// `bootstrap` (the first of `KAFKA_BOOTSTRAP_SERVERS`) among its `listeners`, or the only
/// one running.
fn kafka_pid(bootstrap: &str) -> Option<u32> {
    let bootstrap = bootstrap.split(',').next()?.trim();
    let mut brokers = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if let Some(at) = args.iter().position(|arg| *arg == b"kafka.Kafka") {
            let properties = args
                .get(at + 1)
                .and_then(|path| {
                    std::fs::read_to_string(String::from_utf8_lossy(path).as_ref()).ok()
                })
                .unwrap_or_default();
            let serves = properties
                .lines()
                .any(|l| l.trim_start().starts_with("listeners=") && l.contains(bootstrap));
            brokers.push((pid, serves));
        }
    }
    let serving: Vec<u32> = brokers.iter().filter(|b| b.1).map(|b| b.0).collect();
    match (serving.as_slice(), brokers.as_slice()) {
        ([one], _) => Some(*one),
        (_, [(only, _)]) => Some(*only),
        _ => None,
    }
}

/// The `q` quantile of ascending latencies in µs, as ms (the simulator's own rule: the
/// nearest rank).
fn quantile_ms(sorted: &[u32], q: f64) -> String {
    if sorted.is_empty() {
        return "n/a".to_owned();
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    format!(
        "{:.1} ms",
        f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
    )
}

/// One ingest process and the devices of its slice (`first..first + devices`).
struct Ingest {
    proc: Proc,
    admin: SocketAddr,
    listen: String,
    log: PathBuf,
    first: u32,
    devices: u32,
}

/// One simulator process, driving one ingest's slice.
struct Simulator {
    proc: Proc,
    log: PathBuf,
    out: PathBuf,
    latencies: PathBuf,
}

/// Every process at one moment: CPU seconds and RSS summed over the ingest processes and
/// over the simulators, the broker's CPU seconds, and the ingest processes' figures summed.
struct Sample {
    t: f64,
    ingest_cpu: f64,
    sim_cpu: f64,
    kafka_cpu: Option<f64>,
    ingest_rss: u64,
    sim_rss: u64,
    scrape: Scrape,
}

/// Every ingest's `/metrics`, summed; `None` if one did not answer.
async fn scrape_all(client: &reqwest::Client, ingests: &[Ingest]) -> Option<Scrape> {
    let mut sum = Scrape::default();
    for ingest in ingests {
        sum.add(&scrape(client, ingest.admin).await?);
    }
    Some(sum)
}

async fn bench() -> Result<()> {
    let devices: u32 = env_or("MQTT_BENCH_DEVICES", 100_000).max(1);
    let processes: u32 =
        env_or("MQTT_BENCH_PROCESSES", devices.div_ceil(PER_PROCESS)).clamp(1, devices);
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

    // Slice `i`: devices `devices * i / processes` up to the next slice's first; its own
    // loopback addresses (one per PER_ADDRESS devices), port and admin port.
    let mut ingests = Vec::new();
    let mut next_address = 0u32;
    for i in 0..processes {
        let first = (u64::from(devices) * u64::from(i) / u64::from(processes)) as u32;
        let end = (u64::from(devices) * u64::from(i + 1) / u64::from(processes)) as u32;
        let addresses = (end - first).div_ceil(PER_ADDRESS).max(1);
        let port = free_port()?;
        let listen: Vec<String> = (next_address..next_address + addresses)
            .map(|n| format!("{}:{port}", loopback(n)))
            .collect();
        next_address += addresses;
        let listen = listen.join(",");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = dir.join(format!("ingest-{i}.log"));
        let child = Command::new(binary)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &topics.args.bootstrap_servers)
            .env("TELEMETRY_TOPIC", &topics.args.telemetry_topic)
            .env("ADMIN_LISTEN", admin.to_string())
            .env("HTTP_LISTEN", "127.0.0.1:0")
            .env("MQTT_LISTEN", &listen)
            .env("MQTT_MAX_CONNECTIONS", (end - first + 1000).to_string())
            .env("MQTT_WORKERS", workers.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting ingest {i}"))?;
        ingests.push(Ingest {
            proc: Proc {
                child,
                name: format!("ingest {i}"),
            },
            admin,
            listen,
            log,
            first,
            devices: end - first,
        });
    }
    let client = reqwest::Client::new();
    let ready_by = Instant::now() + Duration::from_secs(120 + 20 * u64::from(processes));
    for ingest in &mut ingests {
        loop {
            if let Some(status) = ingest.proc.child.try_wait()? {
                bail!(
                    "{} exited ({status}); log {}",
                    ingest.proc.name,
                    ingest.log.display()
                );
            }
            let ok = client
                .get(format!("http://{}/readyz", ingest.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            if Instant::now() > ready_by {
                bail!(
                    "{} not ready; log {}",
                    ingest.proc.name,
                    ingest.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The credentials cache holds every device once ready (first load before /readyz).

    println!("# MQTT connection benchmark: {devices} devices, one reading every {interval} each, QoS 1, {seconds} s");
    println!(
        "# {processes} ingest process(es), each with its simulator; logs in {}",
        dir.display()
    );
    let mut commands = Vec::new();
    for (i, ingest) in ingests.iter().enumerate() {
        let latencies = dir.join(format!("latencies-{i}.txt"));
        let command = format!(
            "{binary} simulate --via mqtt --auth device --qos 1 --prefix {PREFIX} --tenants 1 \
             --first-device {} --devices {} --interval {interval} --duration {seconds}s \
             --mqtt {} --device-tokens {} --latencies {} --concurrency {} --give-up-after 30s \
             --silence-probability 0",
            ingest.first,
            ingest.devices,
            ingest.listen,
            tokens.display(),
            latencies.display(),
            (ingest.devices / 25).max(1000),
        );
        println!(
            "# ingest {i}: MQTT_LISTEN={} MQTT_WORKERS={workers}, devices {} to {}",
            ingest.listen,
            ingest.first,
            ingest.first + ingest.devices - 1
        );
        println!("# simulator {i}: {command}");
        commands.push((command, latencies));
    }
    let started = Instant::now();
    let mut sims = Vec::new();
    for (i, (command, latencies)) in commands.into_iter().enumerate() {
        let (log, out) = (
            dir.join(format!("simulate-{i}.log")),
            dir.join(format!("simulate-{i}.out")),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting simulator {i}"))?;
        sims.push(Simulator {
            proc: Proc {
                child,
                name: format!("simulator {i}"),
            },
            log,
            out,
            latencies,
        });
    }

    let kafka = kafka_pid(&topics.args.bootstrap_servers);
    let mut samples: Vec<Sample> = Vec::new();
    let mut all_connected_at: Option<f64> = None;
    let mut first_publish: Option<usize> = None;
    let mut all_connected: Option<usize> = None;
    let mut max_connections = 0.0f64;
    let mut sim_nofile = vec![String::new(); sims.len()];
    // Until the first simulator ends: every sample before has all of them publishing.
    'sampling: loop {
        for sim in &mut sims {
            if let Some(status) = sim.proc.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "{} failed ({status}); log {}",
                        sim.proc.name,
                        sim.log.display()
                    );
                }
                break 'sampling;
            }
        }
        for ingest in &mut ingests {
            if let Some(status) = ingest.proc.child.try_wait()? {
                bail!(
                    "{} exited ({status}); log {}",
                    ingest.proc.name,
                    ingest.log.display()
                );
            }
        }
        if started.elapsed() > Duration::from_secs(2) {
            for (nofile_of, sim) in sim_nofile.iter_mut().zip(&sims) {
                if nofile_of.is_empty() {
                    *nofile_of = nofile(sim.proc.pid());
                }
            }
        }
        let t = started.elapsed().as_secs_f64();
        let ingest_pids = || ingests.iter().map(|i| i.proc.pid());
        let sim_pids = || sims.iter().map(|s| s.proc.pid());
        let ingest_cpu: f64 = ingest_pids().filter_map(cpu_seconds).sum();
        let sim_cpu: f64 = sim_pids().filter_map(cpu_seconds).sum();
        let kafka_cpu = kafka.and_then(cpu_seconds);
        let ingest_rss: u64 = ingest_pids().filter_map(rss_bytes).sum();
        let sim_rss: u64 = sim_pids().filter_map(rss_bytes).sum();
        if let Some(s) = scrape_all(&client, &ingests).await {
            max_connections = max_connections.max(s.connections);
            if all_connected_at.is_none() && s.connections >= f64::from(devices) {
                all_connected_at = Some(t);
                all_connected = Some(samples.len());
            }
            if first_publish.is_none() && s.stored > 0.0 {
                first_publish = Some(samples.len());
            }
            println!(
                "t={t:6.0}s connections={:6.0} stored={:9.0} ingest cpu={ingest_cpu:7.1}s rss={:6.0} MiB \
                 simulator cpu={sim_cpu:7.1}s rss={:6.0} MiB",
                s.connections,
                s.stored,
                ingest_rss as f64 / 1048576.0,
                sim_rss as f64 / 1048576.0
            );
            samples.push(Sample {
                t,
                ingest_cpu,
                sim_cpu,
                kafka_cpu,
                ingest_rss,
                sim_rss,
                scrape: s,
            });
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    // The others end within moments (each waits for its last PUBACKs, at most
    // `--give-up-after`, then writes its latencies and summary).
    let ends_by = Instant::now() + Duration::from_secs(120);
    for sim in &mut sims {
        loop {
            if let Some(status) = sim.proc.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "{} failed ({status}); log {}",
                        sim.proc.name,
                        sim.log.display()
                    );
                }
                break;
            }
            if Instant::now() > ends_by {
                bail!("{} did not end; log {}", sim.proc.name, sim.log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let ingest_nofile: Vec<String> = ingests.iter().map(|i| nofile(i.proc.pid())).collect();

    // The steady window: from the first sample with every device connected and readings
    // stored (without all connected: the first with readings stored) to the sample before
    // the last. The last one may have caught a simulator winding down (past its `--duration`
    // it stops publishing, then disconnects: a second or so before it exits); the one before
    // was taken 5 s earlier, while every simulator was publishing.
    let Some(first) = first_publish else {
        bail!("nothing was stored; logs in {}", dir.display());
    };
    let first = all_connected.map_or(first, |all| all.max(first));
    let last = samples.len().saturating_sub(2);
    if last <= first {
        bail!("no steady window (fewer than three samples with readings stored): run longer");
    }
    let (a, b) = (&samples[first], &samples[last]);
    let span = b.t - a.t;
    let readings = b.scrape.stored - a.scrape.stored;
    let steady_connections = samples[first..=last]
        .iter()
        .map(|s| s.scrape.connections)
        .fold(f64::INFINITY, f64::min);
    let mut latencies: Vec<u32> = Vec::new();
    for (i, sim) in sims.iter().enumerate() {
        let summary = std::fs::read_to_string(&sim.out)?;
        println!("# simulator {i} summary: {}", summary.trim());
        let text = std::fs::read_to_string(&sim.latencies)
            .with_context(|| format!("reading {}", sim.latencies.display()))?;
        for line in text.lines() {
            latencies.push(line.parse().with_context(|| format!("latency {line:?}"))?);
        }
    }
    latencies.sort_unstable();
    println!(
        "connections: {max_connections:.0} at most, {steady_connections:.0} at least while \
         publishing (of {devices}, over {processes} ingest processes); all connected {}",
        all_connected_at.map_or("never".to_owned(), |t| format!(
            "{t:.0} s after the simulators started"
        ))
    );
    println!(
        "msg/s stored by ingest over the steady {span:.0} s: {:.0} (offered {:.0})",
        readings / span,
        f64::from(devices) / interval_s
    );
    println!(
        "PUBACK latency, client side (publish to PUBACK), every attempt of the {processes} simulators over their whole run: \
         p50 {}, p99 {} ({} attempts)",
        quantile_ms(&latencies, 0.5),
        quantile_ms(&latencies, 0.99),
        latencies.len()
    );
    println!(
        "PUBACK latency, ingest's histogram (PUBLISH read to PUBACK) over the window, summed over the {processes} processes: p50 {}, p99 {}",
        bucket_quantile(&a.scrape, &b.scrape, 0.5),
        bucket_quantile(&a.scrape, &b.scrape, 0.99)
    );
    println!(
        "memory: ingest RSS {:.0} MiB = {:.1} KiB per connection; simulator RSS {:.0} MiB = {:.1} KiB per device",
        b.ingest_rss as f64 / 1048576.0,
        b.ingest_rss as f64 / 1024.0 / b.scrape.connections.max(1.0),
        b.sim_rss as f64 / 1048576.0,
        b.sim_rss as f64 / 1024.0 / f64::from(devices)
    );
    println!(
        "CPU over the window: ingest {:.1} µs per reading ({:.0} % of a core), simulator {:.1} µs per reading ({:.0} % of a core)",
        (b.ingest_cpu - a.ingest_cpu) * 1e6 / readings.max(1.0),
        (b.ingest_cpu - a.ingest_cpu) / span * 100.0,
        (b.sim_cpu - a.sim_cpu) * 1e6 / readings.max(1.0),
        (b.sim_cpu - a.sim_cpu) / span * 100.0
    );
    match (kafka, a.kafka_cpu, b.kafka_cpu) {
        (Some(pid), Some(from), Some(to)) => println!(
            "CPU over the window, Kafka broker (pid {pid}; all of its work, other clients' too): \
             {:.1} µs per reading ({:.0} % of a core)",
            (to - from) * 1e6 / readings.max(1.0),
            (to - from) / span * 100.0
        ),
        _ => println!(
            "CPU of the Kafka broker: not measured (no kafka.Kafka process found listening on {})",
            topics.args.bootstrap_servers
        ),
    }
    println!(
        "connecting: ingest {:.1} s CPU, simulator {:.1} s CPU until the window",
        a.ingest_cpu, a.sim_cpu
    );
    println!(
        "open-file limits (soft/hard): ingest {}, simulator {}",
        ingest_nofile.join(" "),
        sim_nofile.join(" ")
    );
    let logs = ingests
        .iter()
        .map(|i| (&i.proc.name, &i.log))
        .chain(sims.iter().map(|s| (&s.proc.name, &s.log)));
    for (name, log) in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("open-file limit")) {
            println!("{name} log: {}", strip_ansi(line));
        }
    }
    drop(sims);
    drop(ingests);
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
