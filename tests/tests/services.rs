//! Every service starts in-process against real Kafka and PostgreSQL, becomes ready, serves
//! its admin endpoints, and returns cleanly when its shutdown token is cancelled.

use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Parser;
use fleetstream_tests::{free_addr, http_get, wait_for_body, wait_for_status};
use plumbing::testing::{TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;

fn args(db: &TestDb, topics: &TestTopics, admin: std::net::SocketAddr) -> Vec<String> {
    vec![
        "service".to_owned(),
        "--database-url".to_owned(),
        db.url.clone(),
        "--kafka-bootstrap-servers".to_owned(),
        topics.args.bootstrap_servers.clone(),
        "--telemetry-topic".to_owned(),
        topics.args.telemetry_topic.clone(),
        "--admin-listen".to_owned(),
        admin.to_string(),
    ]
}

async fn check_lifecycle<F>(
    name: &str,
    admin: std::net::SocketAddr,
    shutdown: Shutdown,
    service: F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let task = tokio::spawn(service);
    let ready = wait_for_status(admin, "/readyz", 200, Duration::from_secs(30))
        .await
        .map_err(|e| e.context(name.to_owned()))?;
    assert!(ready.contains("\"ready\":true"), "{name}: {ready}");
    let (status, body) = http_get(admin, "/healthz").await?;
    assert_eq!((status, body.as_str()), (200, "ok"), "{name}");
    let (status, _) = http_get(admin, "/metrics").await?;
    assert_eq!(status, 200, "{name}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .map_err(|_| anyhow!("{name} did not stop within 15 s of shutdown"))???;
    assert!(
        http_get(admin, "/healthz").await.is_err(),
        "{name} still listening after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn every_service_becomes_ready_and_stops_on_shutdown() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(3).await?;

    let admin = free_addr()?;
    let config = timescale_sink::Config::try_parse_from(args(&db, &topics, admin))?;
    let shutdown = Shutdown::new();
    let token = shutdown.clone();
    check_lifecycle("timescale-sink", admin, shutdown, async move {
        Ok(timescale_sink::run(config, token).await?)
    })
    .await?;

    let admin = free_addr()?;
    let mut ingest_args = args(&db, &topics, admin);
    // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
    ingest_args.extend(["--mqtt-listen".to_owned(), "off".to_owned()]);
    let config = ingest_producer::Config::try_parse_from(ingest_args)?;
    let shutdown = Shutdown::new();
    let token = shutdown.clone();
    check_lifecycle("ingest-producer", admin, shutdown, async move {
        Ok(ingest_producer::run(config, token).await?)
    })
    .await?;

    let admin = free_addr()?;
    let config = evaluator_stream::Config::try_parse_from(args(&db, &topics, admin))?;
    let shutdown = Shutdown::new();
    let token = shutdown.clone();
    check_lifecycle("evaluator-stream", admin, shutdown, async move {
        Ok(evaluator_stream::run(config, token).await?)
    })
    .await?;

    let admin = free_addr()?;
    let cli = query_api::Cli::try_parse_from([
        "query-api".to_owned(),
        "--database-url".to_owned(),
        db.url.clone(),
        "--admin-listen".to_owned(),
        admin.to_string(),
        "--http-listen".to_owned(),
        free_addr()?.to_string(),
    ])?;
    let shutdown = Shutdown::new();
    let token = shutdown.clone();
    check_lifecycle("query-api", admin, shutdown, async move {
        query_api::main(cli, token).await?;
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn readiness_reports_a_dependency_that_is_down() -> Result<()> {
    let topics = TestTopics::new(1).await?;
    let admin = free_addr()?;
    // Nothing listens on port 1: the database check must stay false.
    let config = timescale_sink::Config::try_parse_from([
        "timescale-sink",
        "--database-url",
        "postgres://fleet:fleet@127.0.0.1:1/none",
        "--database-acquire-timeout",
        "1s",
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        &admin.to_string(),
    ])?;
    let shutdown = Shutdown::new();
    let task = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    let body = wait_for_status(admin, "/readyz", 503, Duration::from_secs(30)).await?;
    assert!(body.contains("\"database\":false"), "{body}");
    // Kafka is up, so its check turns true while the database check stays false.
    let body = wait_for_body(admin, "/readyz", "\"kafka\":true", Duration::from_secs(30)).await?;
    assert!(body.contains("\"database\":false"), "{body}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), task).await???;
    Ok(())
}
