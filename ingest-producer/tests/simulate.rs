//! The simulator against the real service and broker: what it counts as accepted is exactly
//! what is on the topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use ingest_producer::simulate::{self, SimulateArgs};
use plumbing::config::KafkaArgs;
use plumbing::testing::{TestDb, TestTopics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use schemas::LayoutChoice;

const PARTITIONS: i32 = 2;

async fn topic_count(args: &KafkaArgs) -> i64 {
    let args = args.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "sim-test-count")
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

#[tokio::test]
async fn simulated_devices_provision_themselves_and_every_accepted_reading_is_on_the_topic(
) -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        &admin.to_string(),
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = plumbing::Shutdown::new();
    let service = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));

    let args = SimulateArgs::try_parse_from([
        "simulate",
        "--devices",
        "40",
        "--tenants",
        "2",
        "--interval",
        "200ms",
        "--duration",
        "1500ms",
        "--batch",
        "10",
        "--provision",
        "--database-url",
        &db.url,
        "--url",
        &url,
        "--silence-probability",
        "0",
    ])?;
    // The service learns of the provisioned devices through NOTIFY; readings sent before
    // that are refused (422) and counted as failed, so only the accepted count is compared.
    let summary = simulate::run(args.clone(), plumbing::Shutdown::new()).await?;
    assert!(summary.accepted > 0, "{summary:?}");
    assert_eq!(topic_count(&topics.args).await, summary.accepted as i64);

    // Four demo alert rules per tenant, valid for the table's checks; provisioning again
    // adds nothing.
    simulate::provision(&args, &db.pool).await?;
    let rules: Vec<(String, i64)> =
        sqlx::query_as("SELECT tenant_id::text, count(*) FROM alert_rules GROUP BY 1 ORDER BY 1")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(rules, vec![(args.tenant_id(0), 4), (args.tenant_id(1), 4)]);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), service).await???;
    Ok(())
}

#[tokio::test]
async fn the_simulator_can_produce_straight_to_kafka() -> Result<()> {
    let topics = TestTopics::new(PARTITIONS).await?;
    let args = SimulateArgs::try_parse_from([
        "simulate",
        "--via",
        "kafka",
        "--devices",
        "100",
        "--interval",
        "100ms",
        "--duration",
        "1s",
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
    ])?;
    let summary = simulate::run(args, plumbing::Shutdown::new()).await?;
    assert_eq!(summary.failed, 0);
    // How many readings fit in the second depends on the machine (and on the producer's
    // first metadata fetch); what matters is that every one sent is on the topic.
    assert!(summary.accepted > 0, "{summary:?}");
    assert_eq!(topic_count(&topics.args).await, summary.accepted as i64);
    Ok(())
}

/// Every message on the topic as (device number, time µs, metrics digest), sorted.
async fn topic_readings(args: &KafkaArgs, prefix: &str) -> Vec<(u32, i64, u64)> {
    use rdkafka::Message;
    let args = args.clone();
    let device_prefix = format!("{prefix}-d");
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "sim-test-read")
            .set("group.id", "sim-test-read")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        let mut remaining = 0;
        for p in 0..PARTITIONS {
            let (_, high) = consumer
                .fetch_watermarks(&args.telemetry_topic, p, Duration::from_secs(10))
                .unwrap();
            remaining += high;
            assignment
                .add_partition_offset(&args.telemetry_topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let codec = schemas::telemetry_codec().unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while remaining > 0 && std::time::Instant::now() < deadline {
            // Errors here are the consumer's events (no group is joined), not messages.
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
                    ingest_producer::manifest::metrics_digest(&t.metrics),
                ));
                remaining -= 1;
            }
        }
        out.sort_unstable();
        out
    })
    .await
    .unwrap()
}

/// Devices faster than their rate limit get `429` with `Retry-After`; the simulator retries
/// as a device would, and its manifest lists exactly the readings on the topic as accepted,
/// with the metrics sent.
#[tokio::test]
async fn refused_readings_are_retried_and_the_manifest_matches_the_topic() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        &admin.to_string(),
        // 4 readings a second per device against a limit of 2 (burst 2): about half the
        // readings are refused with 429 + Retry-After at first.
        "--device-rate-limit",
        "2",
        "--device-rate-burst",
        "2",
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = plumbing::Shutdown::new();
    let service = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));

    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("sim_manifest"));
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("manifest.bin");
    let args = SimulateArgs::try_parse_from([
        "simulate",
        "--devices",
        "6",
        "--tenants",
        "2",
        "--interval",
        "250ms",
        "--duration",
        "2s",
        "--batch",
        "3",
        "--give-up-after",
        "20s",
        "--provision",
        "--database-url",
        &db.url,
        "--url",
        &url,
        "--silence-probability",
        "0",
        "--manifest",
        manifest.to_str().unwrap(),
    ])?;
    let summary = simulate::run(args, plumbing::Shutdown::new()).await?;
    assert!(summary.retries > 0, "{summary:?}");

    let reader = ingest_producer::manifest::ManifestReader::open(&manifest)?;
    assert_eq!(reader.header.devices, 6);
    let records: Vec<_> = reader.collect::<Result<_, _>>()?;
    // The last HTTP status of every reading given up on, to say why.
    let refused: Vec<u16> = records
        .iter()
        .filter(|r| r.outcome != ingest_producer::manifest::Outcome::Accepted)
        .map(|r| r.status)
        .collect();
    assert_eq!(summary.failed, 0, "statuses {refused:?}; {summary:?}");
    assert_eq!(records.len() as u64, summary.accepted);
    let mut accepted: Vec<(u32, i64, u64)> = records
        .iter()
        .filter(|r| r.outcome == ingest_producer::manifest::Outcome::Accepted)
        .map(|r| (r.device, r.time_us, r.digest))
        .collect();
    accepted.sort_unstable();
    assert_eq!(accepted.len() as u64, summary.accepted);
    assert_eq!(topic_readings(&topics.args, "sim").await, accepted);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), service).await???;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
