//! The MQTT guarantee checked in the database: the ingest binary is SIGKILLed while 1,000
//! devices publish at QoS 1 through `simulate --via mqtt`, started again (the devices
//! reconnect and re-send what was not acknowledged), and the timescale-sink library writes the
//! topic into the test's database. Then the simulator's client-side PUBACK log (its manifest)
//! and the `telemetry` rows must agree exactly: every PUBACKed reading stored once with its
//! metrics as sent, no row nobody sent, no reading twice, `device_latest` right.
//!
//! The ingest binary is the one `cargo test --workspace` builds beside this test
//! (`target/debug/ingest-producer`); `cargo build -p ingest-producer` first when running this
//! test alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use fleetstream_tests::fleet::check;
use ingest_producer::manifest;
use ingest_producer::simulate::{self, SimulateArgs};
use plumbing::config::KafkaArgs;
use plumbing::testing::{eventually, ServiceProcess, TestDb, TestTopics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use schemas::LayoutChoice;

const DEVICES: u32 = 1000;
const PARTITIONS: i32 = 2;
const PREFIX: &str = "sim";
const SINK_GROUP: &str = "mqtt-sigkill-sink";

fn free_port() -> SocketAddr {
    fleetstream_tests::free_addr().unwrap()
}

/// `target/debug/ingest-producer`, beside this test's `deps` directory.
fn ingest_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("ingest-producer");
    assert!(
        binary.is_file(),
        "{} missing: `cargo build -p ingest-producer` (cargo test --workspace builds it)",
        binary.display()
    );
    binary
}

/// Tenant `sim-t0` with the devices, device `d`'s token `tok-<d>`; the simulator's tokens file.
async fn seed(db: &TestDb, tokens: &Path) -> Result<()> {
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
    .bind(i64::from(DEVICES))
    .execute(&db.pool)
    .await?;
    let lines: String = (0..DEVICES).map(|d| format!("{d}\ttok-{d}\n")).collect();
    std::fs::write(tokens, lines)?;
    Ok(())
}

/// The ingest binary with its MQTT listener on `mqtt`, ready.
async fn ingest(db: &TestDb, kafka: &KafkaArgs, mqtt: SocketAddr) -> Result<ServiceProcess> {
    let admin = free_port();
    let mut command = Command::new(ingest_binary());
    command
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("TELEMETRY_TOPIC", &kafka.telemetry_topic)
        .env("ADMIN_LISTEN", admin.to_string())
        .env("HTTP_LISTEN", "127.0.0.1:0")
        .env("MQTT_LISTEN", mqtt.to_string())
        .env("RUST_LOG", "warn");
    let process = ServiceProcess::spawn(command, "ingest-mqtt-sigkill")?;
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

/// The sink in this process, its own group, writing into the test's database.
fn sink(
    db: &TestDb,
    kafka: &KafkaArgs,
    shutdown: plumbing::Shutdown,
) -> Result<tokio::task::JoinHandle<Result<(), timescale_sink::Error>>> {
    let config = timescale_sink::Config::try_parse_from([
        "timescale-sink",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &kafka.bootstrap_servers,
        "--telemetry-topic",
        &kafka.telemetry_topic,
        "--admin-listen",
        &free_port().to_string(),
        "--group-id",
        SINK_GROUP,
    ])?;
    Ok(tokio::spawn(timescale_sink::run(config, shutdown)))
}

/// High watermarks of the telemetry topic's partitions.
async fn end_offsets(args: &KafkaArgs) -> Vec<i64> {
    let args = args.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "mqtt-sigkill-count")
            .create()
            .unwrap();
        (0..PARTITIONS)
            .map(|p| {
                consumer
                    .fetch_watermarks(&args.telemetry_topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The sink's offsets stored in PostgreSQL, by partition (0 where none yet).
async fn stored_offsets(db: &TestDb, topic: &str) -> Vec<i64> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(SINK_GROUP)
    .bind(topic)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            rows.iter()
                .find(|(partition, _)| *partition == p)
                .map_or(0, |(_, next)| *next)
        })
        .collect()
}

async fn rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn simulate_args(mqtt: SocketAddr, tokens: &Path, manifest: &Path) -> SimulateArgs {
    SimulateArgs::try_parse_from([
        "simulate",
        "--via",
        "mqtt",
        "--auth",
        "device",
        "--qos",
        "1",
        "--prefix",
        PREFIX,
        "--tenants",
        "1",
        "--devices",
        &DEVICES.to_string(),
        "--interval",
        "1s",
        "--duration",
        "25s",
        "--give-up-after",
        "30s",
        "--concurrency",
        "2000",
        "--mqtt",
        &mqtt.to_string(),
        "--device-tokens",
        tokens.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--silence-probability",
        "0",
    ])
    .unwrap()
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_1000_devices_publish_every_pubacked_reading_is_in_the_database_once(
) -> Result<()> {
    let dir = Scratch(std::env::temp_dir().join(plumbing::testing::unique_name("mqtt_sigkill")));
    std::fs::create_dir_all(&dir.0)?;
    let (tokens, manifest) = (dir.0.join("tokens.tsv"), dir.0.join("manifest.bin"));
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    seed(&db, &tokens).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let sink_shutdown = plumbing::Shutdown::new();
    let sink_task = sink(&db, &topics.args, sink_shutdown.clone())?;
    let mqtt = free_port();
    let first = ingest(&db, &topics.args, mqtt).await?;
    let run = tokio::spawn(simulate::run(
        simulate_args(mqtt, &tokens, &manifest),
        plumbing::Shutdown::new(),
    ));
    // Under load (two rounds of every device already in the database), the process is killed.
    eventually(
        "readings in the database",
        Duration::from_secs(120),
        || async {
            let n = rows(&db).await;
            (n >= 2 * i64::from(DEVICES))
                .then_some(())
                .ok_or(format!("{n} rows"))
        },
    )
    .await?;
    drop(first); // SIGKILL
    let at_kill: i64 = end_offsets(&topics.args).await.iter().sum();
    let _second = ingest(&db, &topics.args, mqtt).await?;
    let summary = run.await??;

    // The sink has written everything on the topic.
    eventually(
        "sink at the end of the topic",
        Duration::from_secs(120),
        || async {
            let (ends, stored) = (
                end_offsets(&topics.args).await,
                stored_offsets(&db, &topics.args.telemetry_topic).await,
            );
            (ends == stored)
                .then_some(())
                .ok_or(format!("ends {ends:?}, sink {stored:?}"))
        },
    )
    .await?;
    sink_shutdown.cancel();
    sink_task.await??;

    let acc = check::account(&db.pool, &manifest).await?;
    eprintln!(
        "PUBACKed {}, not acknowledged {} ({} of them stored), rows {}, {at_kill} on the topic at \
         the kill; {acc:?}",
        acc.accepted,
        acc.not_accepted,
        acc.stored_not_accepted,
        rows(&db).await
    );
    assert_eq!(acc.accepted, summary.accepted, "{acc:?}");
    assert_eq!(acc.lost, 0, "PUBACKed, not in the database: {acc:?}");
    assert_eq!(acc.altered, 0, "{acc:?}");
    assert_eq!(acc.phantom, 0, "{acc:?}");
    assert_eq!(acc.duplicate_rows, 0, "{acc:?}");
    assert_eq!(acc.manifest_duplicates, 0, "{acc:?}");
    assert_eq!(acc.stored_as_sent, acc.accepted, "{acc:?}");
    assert_eq!(acc.latest_mismatches + acc.latest_extra, 0, "{acc:?}");
    assert!(acc.is_exact(), "{acc:?}");
    // Every row is a reading the simulator sent: PUBACKed, or sent and not acknowledged
    // (Kafka had it when the process died, before its PUBACK went out).
    assert_eq!(
        rows(&db).await as u64,
        acc.stored_as_sent + acc.stored_not_accepted,
        "{acc:?}"
    );
    // The run went on after the restart: more was acknowledged than was there at the kill.
    assert!(
        acc.accepted as i64 > at_kill,
        "accepted {} at kill {at_kill}; {summary:?}",
        acc.accepted
    );
    Ok(())
}
