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
