//! `simulate --via mqtt` against the ingest binary: every reading the simulator saw
//! PUBACKed is on the topic, and ingest reports the connections to `system_metrics`. (The
//! SIGKILL of ingest while 1,000 devices publish is checked against the database, through the
//! sink, in the end-to-end crate: `tests/tests/mqtt_sigkill.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use ingest_producer::manifest::{self, ManifestReader, Outcome};
use ingest_producer::simulate::{self, SimulateArgs, Summary};
use plumbing::config::KafkaArgs;
use plumbing::testing::{eventually, ServiceProcess, TestDb, TestTopics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use schemas::LayoutChoice;

const PARTITIONS: i32 = 2;
const PREFIX: &str = "sim";

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Tenant `sim-t0` with `devices` devices, device `d`'s token `tok-<d>` (stored as its hex
/// SHA-256, as `credentials::token_hash`); the tokens file the simulator reads.
async fn seed(db: &TestDb, devices: u32, tokens: &Path) -> Result<()> {
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, 'Sim')")
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

/// The ingest binary with its MQTT listener on `mqtt`, ready.
async fn ingest(db: &TestDb, kafka: &KafkaArgs, mqtt: SocketAddr) -> Result<ServiceProcess> {
    let admin = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest-producer"));
    command
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("TELEMETRY_TOPIC", &kafka.telemetry_topic)
        .env("ADMIN_LISTEN", admin.to_string())
        .env("HTTP_LISTEN", "127.0.0.1:0")
        .env("MQTT_LISTEN", mqtt.to_string())
        .env("SYSTEM_METRICS_INTERVAL", "200ms")
        .env("RUST_LOG", "warn");
    let process = ServiceProcess::spawn(command, "ingest-mqtt")?;
    let client = reqwest::Client::new();
    eventually("ingest ready", Duration::from_secs(60), || async {
        let status = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .status();
        (status == 200)
            .then_some(())
            .ok_or(format!("/readyz {status}"))
    })
    .await
    .map_err(|err| anyhow::anyhow!("{err}; stderr: {}", process.stderr()))?;
    Ok(process)
}

async fn topic_count(args: &KafkaArgs) -> i64 {
    let args = args.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "sim-mqtt-count")
            .create()
            .unwrap();
        (0..PARTITIONS)
            .map(|p| {
                let (low, high) = consumer
                    .fetch_watermarks(&args.telemetry_topic, p, Duration::from_secs(10))
                    .unwrap();
                high - low
            })
            .sum()
    })
    .await
    .unwrap()
}

/// Every reading on the topic as (device number, time µs, metrics digest), sorted.
async fn topic_readings(args: &KafkaArgs) -> Vec<(u32, i64, u64)> {
    use rdkafka::Message;
    let expected = topic_count(args).await;
    let args = args.clone();
    let device_prefix = format!("{PREFIX}-d");
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "sim-mqtt-read")
            .set("group.id", plumbing::testing::unique_name("sim-mqtt-read"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        for p in 0..PARTITIONS {
            assignment
                .add_partition_offset(&args.telemetry_topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let codec = schemas::telemetry_codec().unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while (out.len() as i64) < expected && std::time::Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                let t = codec.decode(message.payload().unwrap()).unwrap();
                let device = t
                    .device_id
                    .strip_prefix(&device_prefix)
                    .unwrap()
                    .parse()
                    .unwrap();
                out.push((
                    device,
                    t.time.timestamp_micros(),
                    manifest::metrics_digest(&t.metrics),
                ));
            }
        }
        assert_eq!(out.len() as i64, expected, "messages read back");
        out.sort_unstable();
        out
    })
    .await
    .unwrap()
}

fn simulate_args(
    devices: u32,
    duration: &str,
    mqtt: SocketAddr,
    tokens: &Path,
    manifest: &Path,
) -> SimulateArgs {
    mqtt_args(
        devices,
        duration,
        &mqtt.to_string(),
        tokens,
        &["--manifest", manifest.to_str().unwrap()],
    )
}

/// `simulate --via mqtt` at one reading a second per device, with `extra` arguments.
fn mqtt_args(
    devices: u32,
    duration: &str,
    mqtt: &str,
    tokens: &Path,
    extra: &[&str],
) -> SimulateArgs {
    let devices = devices.to_string();
    let mut argv = vec![
        "simulate",
        "--via",
        "mqtt",
        "--auth",
        "device",
        "--qos",
        "1",
        "--devices",
        &devices,
        "--interval",
        "1s",
        "--duration",
        duration,
        "--give-up-after",
        "30s",
        "--concurrency",
        "2000",
        "--mqtt",
        mqtt,
        "--device-tokens",
        tokens.to_str().unwrap(),
        "--silence-probability",
        "0",
    ];
    argv.extend_from_slice(extra);
    SimulateArgs::try_parse_from(argv).unwrap()
}

/// The latencies a `--latencies` file lists, checked ascending.
fn latencies(path: &Path) -> Vec<u32> {
    let list: Vec<u32> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(list.windows(2).all(|w| w[0] <= w[1]), "not ascending");
    list
}

/// The readings the manifest lists as accepted (PUBACKed).
fn acknowledged(manifest: &Path) -> Vec<(u32, i64, u64)> {
    let reader = ManifestReader::open(manifest).unwrap();
    let mut out: Vec<_> = reader
        .map(|r| r.unwrap())
        .filter(|r| r.outcome == Outcome::Accepted)
        .map(|r| (r.device, r.time_us, r.digest))
        .collect();
    out.sort_unstable();
    out
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Scratch {
    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("sim_mqtt"));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_mqtt_devices_are_puback_exactly_what_is_on_the_topic() -> Result<()> {
    let dir = scratch();
    let (tokens, manifest) = (dir.0.join("tokens.tsv"), dir.0.join("manifest.bin"));
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    seed(&db, 20, &tokens).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let mqtt = free_port();
    let _ingest = ingest(&db, &topics.args, mqtt).await?;
    let run = tokio::spawn(simulate::run(
        simulate_args(20, "6s", mqtt, &tokens, &manifest),
        plumbing::Shutdown::new(),
    ));
    // While they run, ingest reports their 20 connections to `system_metrics` (the
    // dashboard's pipeline-health page charts every figure there).
    eventually("mqtt_connections = 20", Duration::from_secs(30), || async {
        let value: Option<f64> = sqlx::query_scalar(
            "SELECT value FROM system_metrics WHERE metric_name = 'mqtt_connections' \
             ORDER BY time DESC LIMIT 1",
        )
        .fetch_optional(&db.pool)
        .await
        .map_err(|e| e.to_string())?;
        (value == Some(20.0))
            .then_some(())
            .ok_or(format!("{value:?}"))
    })
    .await?;
    let summary: Summary = run.await??;
    assert!(summary.accepted >= 20, "{summary:?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    let acked = acknowledged(&manifest);
    assert_eq!(acked.len() as u64, summary.accepted);
    assert_eq!(topic_readings(&topics.args).await, acked);
    Ok(())
}

/// Two simulators share one fleet of 20 devices, each its slice (`--first-device`): every
/// device publishes under its own id and token, the readings on the topic are exactly those
/// each simulator saw PUBACKed, and each writes one latency per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulators_drive_disjoint_slices_of_one_fleet() -> Result<()> {
    let dir = scratch();
    let tokens = dir.0.join("tokens.tsv");
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    seed(&db, 20, &tokens).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let mqtt = free_port();
    let _ingest = ingest(&db, &topics.args, mqtt).await?;
    // Uneven slices, so that an index mistaken for a number shows.
    let slices = [(0u32, 12u32), (12, 8)];
    let runs: Vec<_> = slices
        .iter()
        .map(|&(first, devices)| {
            let latencies = dir.0.join(format!("latencies-{first}.txt"));
            let args = mqtt_args(
                devices,
                "5s",
                &mqtt.to_string(),
                &tokens,
                &[
                    "--first-device",
                    &first.to_string(),
                    "--latencies",
                    latencies.to_str().unwrap(),
                ],
            );
            (
                tokio::spawn(simulate::run(args, plumbing::Shutdown::new())),
                latencies,
            )
        })
        .collect();
    let mut summaries = Vec::new();
    for (run, latencies_file) in runs {
        let summary: Summary = run.await??;
        assert_eq!(summary.failed, 0, "{summary:?}");
        assert_eq!(
            latencies(&latencies_file).len() as u64,
            summary.accepted + summary.failed + summary.retries,
            "{summary:?}"
        );
        summaries.push(summary);
    }
    assert_eq!(summaries[0].connections, 12);
    assert_eq!(summaries[1].connections, 8);
    let on_topic = topic_readings(&topics.args).await;
    let mut per_device = std::collections::BTreeMap::<u32, u64>::new();
    for (device, _, _) in &on_topic {
        *per_device.entry(*device).or_default() += 1;
    }
    assert_eq!(
        per_device.keys().copied().collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    let in_slice = |range: std::ops::Range<u32>| -> u64 {
        per_device
            .iter()
            .filter(|(d, _)| range.contains(d))
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(in_slice(0..12), summaries[0].accepted);
    assert_eq!(in_slice(12..20), summaries[1].accepted);
    Ok(())
}

/// A manifest lists a whole fleet's devices by number from 0: a slice cannot write one.
#[tokio::test]
async fn a_slice_cannot_write_a_manifest() {
    let dir = scratch();
    let args = mqtt_args(
        2,
        "1s",
        "127.0.0.1:1",
        &dir.0.join("tokens.tsv"),
        &[
            "--first-device",
            "5",
            "--manifest",
            dir.0.join("m.bin").to_str().unwrap(),
        ],
    );
    let err = simulate::run(args, plumbing::Shutdown::new())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid settings: --manifest records a whole fleet: not with --first-device"
    );
}

/// Devices that never connect: their clients' queues (16 publishes each) fill, and the
/// readings after that are given up after `--give-up-after` like the others instead of
/// waiting for room for ever (the run then never ended: it waits for every reading sent).
/// The connection wait at the start takes its minute first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_devices_that_cannot_connect_are_given_up() -> Result<()> {
    let dir = scratch();
    let (tokens, latencies_file) = (dir.0.join("tokens.tsv"), dir.0.join("latencies.txt"));
    std::fs::write(&tokens, "0\ttok-0\n1\ttok-1\n2\ttok-2\n")?;
    // A port nobody listens on.
    let closed = free_port();
    let mut args = mqtt_args(
        3,
        "3s",
        &closed.to_string(),
        &tokens,
        &["--latencies", latencies_file.to_str().unwrap()],
    );
    // 300 readings a second, many more than the 3 × 16 the clients' queues hold.
    args.interval = Duration::from_millis(10);
    args.give_up_after = Duration::from_secs(1);
    let summary = tokio::time::timeout(
        Duration::from_secs(180),
        simulate::run(args, plumbing::Shutdown::new()),
    )
    .await
    .expect("the simulator ended")?;
    assert_eq!(summary.accepted, 0, "{summary:?}");
    assert_eq!(summary.connections, 0, "{summary:?}");
    assert_eq!(summary.retries, 0, "{summary:?}");
    assert_eq!(latencies(&latencies_file).len() as u64, summary.failed);
    assert!(summary.failed > 3 * 16, "{summary:?}");
    Ok(())
}
