//! Line-protocol benchmarks (issue 16); prints figures, asserts nothing.
//!
//! * `write`: `POST /api/v2/write`, gzip, 5,000 lines per request of realistic Telegraf
//!   metrics (per host and interval: `cpu` ×3, `mem`, `system`, `net`, `processes`: 7 lines,
//!   61 fields, one merged reading), 1,000 hosts, 4 requests in flight, for
//!   `LP_BENCH_SECONDS` (20). The service runs in this process against the real broker (a
//!   12-partition topic), the client on a runtime of its own; a request counts once Kafka
//!   acknowledged it (`204`). Bodies are about 0.94 MB decompressed (89 KB gzip), within
//!   the default `MAX_BODY_BYTES` of 1 MiB.
//! * `import`: `ingest-producer import` of a generated 1,000,000-line gzip export
//!   (`env,device_id=…,room=… temp=…,count=…i,ok=…`, 100 devices) with the sink running, both
//!   as processes from this build's directory (build them first: `cargo build --release -p
//!   ingest-producer -p timescale-sink`); times the import (every reading acknowledged) and
//!   end to end (every row in PostgreSQL).
//!
//! `cargo bench -p ingest-producer --bench line_protocol [-- write|import]`; needs
//! `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` as the tests do.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ingest_producer::credentials::token_hash;
use plumbing::testing::{TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;

const HOSTS: usize = 1_000;
const LINES_PER_REQUEST: usize = 5_000;
const LINES_PER_HOST_TIME: usize = 7;
const IN_FLIGHT: usize = 4;
const IMPORT_LINES: usize = 1_000_000;
const IMPORT_DEVICES: usize = 100;

fn main() -> Result<()> {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if which.is_empty() || which.iter().any(|w| w == "write") {
        runtime.block_on(write())?;
    }
    if which.is_empty() || which.iter().any(|w| w == "import") {
        runtime.block_on(import())?;
    }
    Ok(())
}

async fn provision(db: &TestDb, devices: impl Iterator<Item = String>) -> Result<()> {
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await?;
    let devices: Vec<String> = devices.collect();
    let hashes: Vec<String> = devices
        .iter()
        .map(|d| token_hash(&format!("tok-{d}")))
        .collect();
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id, token_hash, status) \
         SELECT 'acme', d, h, 'active' FROM unnest($1::text[], $2::text[]) AS u(d, h)",
    )
    .bind(&devices)
    .bind(&hashes)
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ('acme', 'gw', $1)",
    )
    .bind(token_hash("gw-acme"))
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// One host's Telegraf metrics at `t` (ns): 7 lines, 61 fields.
fn telegraf_lines(out: &mut String, host: usize, t: i64, k: usize) {
    use std::fmt::Write as _;
    let f = |x: usize| (x * 7919 + k * 104_729) % 10_000;
    for cpu in ["cpu-total", "cpu0", "cpu1"] {
        let _ = writeln!(
            out,
            "cpu,cpu={cpu},host=host-{host} usage_guest=0,usage_guest_nice=0,usage_idle={}.{},\
             usage_iowait=0.{},usage_irq=0,usage_nice=0,usage_softirq=0.0{},usage_steal=0,\
             usage_system=1.{},usage_user=2.{} {t}",
            90 + f(host) % 9,
            f(host + 1),
            f(host + 2),
            f(host + 3),
            f(host + 4),
            f(host + 5)
        );
    }
    let _ = writeln!(
        out,
        "mem,host=host-{host} active={}i,available={}i,available_percent=51.{},buffers={}i,\
         cached={}i,free={}i,inactive={}i,total=8254562304i,used={}i,used_percent=48.{} {t}",
        f(host) * 100_000,
        f(host + 1) * 400_000,
        f(host + 2),
        f(host + 3) * 1000,
        f(host + 4) * 100_000,
        f(host + 5) * 100_000,
        f(host + 6) * 100_000,
        f(host + 7) * 300_000,
        f(host + 8)
    );
    let _ = writeln!(
        out,
        "system,host=host-{host} load1=0.{},load15=0.{},load5=0.{},n_cpus=2i,n_users=1i,\
         uptime={}i {t}",
        f(host),
        f(host + 1),
        f(host + 2),
        1_000_000 + k
    );
    let _ = writeln!(
        out,
        "net,host=host-{host},interface=eth0 bytes_recv={}i,bytes_sent={}i,drop_in=0i,\
         drop_out=0i,err_in=0i,err_out=0i,packets_recv={}i,packets_sent={}i {t}",
        f(host) * 1_000_000 + k,
        f(host + 1) * 1_000_000 + k,
        f(host + 2) * 1000 + k,
        f(host + 3) * 1000 + k
    );
    let _ = writeln!(
        out,
        "processes,host=host-{host} blocked=0i,running={}i,sleeping={}i,stopped=0i,\
         threads={}i,total={}i,zombies=0i {t}",
        f(host) % 4,
        100 + f(host + 1) % 50,
        300 + f(host + 2) % 100,
        104 + f(host + 3) % 50
    );
}

fn gzip(text: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap()
}

async fn write() -> Result<()> {
    let seconds: u64 = std::env::var("LP_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    provision(&db, (0..HOSTS).map(|h| format!("host-{h}"))).await?;
    let topics = TestTopics::new(schemas::topics::DEFAULT_PARTITIONS).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // HTTP only (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        "127.0.0.1:0",
        "--tenant-rate-limit",
        "10000000",
        "--tenant-rate-burst",
        "10000000",
        "--device-rate-limit",
        "1000000",
        "--device-rate-burst",
        "1000000",
        "--log",
        "warn",
    ])?;
    let shutdown = Shutdown::new();
    let service = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));

    // Bodies: 5,000 lines each (714 host-intervals), one second apart, ending a minute ago.
    let host_times = LINES_PER_REQUEST / LINES_PER_HOST_TIME;
    let start_s = chrono::Utc::now().timestamp() - 3_600;
    let bodies: Vec<(Vec<u8>, usize, usize)> = (0..64)
        .map(|k| {
            let mut text = String::with_capacity(1 << 21);
            let mut lines = 0;
            for i in 0..host_times {
                let n = k * host_times + i;
                let (host, step) = (n % HOSTS, n / HOSTS);
                let t = (start_s + step as i64) * 1_000_000_000;
                telegraf_lines(&mut text, host, t, k);
                lines += LINES_PER_HOST_TIME;
            }
            (gzip(&text), lines, text.len())
        })
        .collect();
    let raw = bodies.iter().map(|b| b.2).sum::<usize>() / bodies.len();
    let compressed = bodies.iter().map(|b| b.0.len()).sum::<usize>() / bodies.len();

    let url = format!("http://{addr}/api/v2/write?org=o&bucket=b&precision=ns");
    let client = reqwest::Client::new();
    // Wait until the credentials are loaded (401 before).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client
            .post(&url)
            .header("authorization", "Token gw-acme")
            .body("m,host=host-0 warm=1i")
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 204 {
            break;
        }
        if Instant::now() > deadline {
            bail!("ingest not ready: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let bodies = std::sync::Arc::new(bodies);
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
            client_runtime.spawn(async move {
                let (mut lines, mut requests, mut failed) = (0usize, 0usize, 0usize);
                let mut latencies = Vec::new();
                let mut k = w;
                while Instant::now() < until {
                    let (body, n, _) = &bodies[k % bodies.len()];
                    k += IN_FLIGHT;
                    let sent = Instant::now();
                    let status = client
                        .post(&url)
                        .header("authorization", "Token gw-acme")
                        .header("content-encoding", "gzip")
                        .body(body.clone())
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    latencies.push(sent.elapsed());
                    requests += 1;
                    if status == 204 {
                        lines += n;
                    } else {
                        failed += 1;
                    }
                }
                (lines, requests, failed, latencies)
            })
        })
        .collect();
    let (mut lines, mut requests, mut failed, mut latencies) = (0, 0, 0, Vec::new());
    for worker in workers {
        let (l, r, f, lat) = worker.await?;
        lines += l;
        requests += r;
        failed += f;
        latencies.extend(lat);
    }
    let elapsed = started.elapsed().as_secs_f64();
    client_runtime.shutdown_background();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "write: /api/v2/write gzip, {LINES_PER_REQUEST} lines/request ({raw} B, {compressed} B \
         gzip), {IN_FLIGHT} in flight, {seconds} s: {:.0} points/s ({:.0} readings/s, {:.0} \
         fields/s), {requests} requests ({failed} not 204), p50 {:.1} ms, p99 {:.1} ms",
        lines as f64 / elapsed,
        lines as f64 / LINES_PER_HOST_TIME as f64 / elapsed,
        lines as f64 * 61.0 / LINES_PER_HOST_TIME as f64 / elapsed,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    shutdown.cancel();
    service.await??;
    Ok(())
}

fn bin(name: &str) -> Result<PathBuf> {
    // target/release/deps/line_protocol-<hash> → target/release/<name>
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .context("target directory")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} missing: cargo build --release -p ingest-producer -p timescale-sink",
            path.display()
        );
    }
    Ok(path)
}

async fn import() -> Result<()> {
    let (ingest, sink) = (bin("ingest-producer")?, bin("timescale-sink")?);
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    provision(&db, (0..IMPORT_DEVICES).map(|d| format!("dev{d}"))).await?;
    let topics = TestTopics::new(schemas::topics::DEFAULT_PARTITIONS).await?;
    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("lp-bench"));
    std::fs::create_dir_all(&dir)?;
    let export = dir.join("export.lp.gz");
    {
        let end_s = chrono::Utc::now().timestamp() - 600;
        let file = std::fs::File::create(&export)?;
        let mut out = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::fast(),
        );
        for i in 0..IMPORT_LINES {
            let (device, step) = (i % IMPORT_DEVICES, (i / IMPORT_DEVICES) as i64);
            let t = (end_s - 10_000 + step) * 1_000_000_000 + 250_000_000;
            writeln!(
                out,
                "env,device_id=dev{device},room=r{} temp={}.{},count={}i,ok={} {t}",
                device % 4,
                step % 40,
                device % 10,
                step,
                step % 2 == 0
            )?;
        }
        out.finish()?.flush()?;
    }
    let size = std::fs::metadata(&export)?.len();
    let mut sink = Command::new(sink)
        .args(["--database-url", &db.url])
        .args(["--kafka-bootstrap-servers", &topics.args.bootstrap_servers])
        .args(["--telemetry-topic", &topics.args.telemetry_topic])
        .args(["--admin-listen", "127.0.0.1:0", "--log", "warn"])
        .spawn()?;
    let started = Instant::now();
    let output = Command::new(ingest)
        .arg("import")
        .arg(&export)
        .args(["--tenant", "acme", "--database-url", &db.url])
        .args(["--kafka-bootstrap-servers", &topics.args.bootstrap_servers])
        .args(["--telemetry-topic", &topics.args.telemetry_topic])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--progress",
            "never",
            "--log",
            "warn",
        ])
        .output()?;
    let imported = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stdout));
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
            .fetch_one(&db.pool)
            .await?;
        if rows >= IMPORT_LINES as i64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{rows} rows after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = started.elapsed().as_secs_f64();
    println!(
        "import: {IMPORT_LINES} lines ({size} B gzip), {IMPORT_DEVICES} devices: import \
         {imported:.1} s = {:.0} points/s acknowledged by Kafka; end to end into PostgreSQL \
         {stored:.1} s = {:.0} points/s",
        IMPORT_LINES as f64 / imported,
        IMPORT_LINES as f64 / stored,
    );
    let _ = sink.kill();
    let _ = sink.wait();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
