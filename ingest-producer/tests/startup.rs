//! Misconfiguration fails loudly at start-up: a telemetry topic that does not exist or a
//! database not migrated ends `run_on` with an error naming it, instead of a service that
//! stays up answering 503.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use plumbing::testing::{unique_name, EmptyDb, TestDb, TestTopics};
use schemas::LayoutChoice;

/// How long a misconfigured ingest may take to give up: one metadata request and a few queries.
const FAIL_WITHIN: Duration = Duration::from_secs(30);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs ingest until it ends by itself (it must, within [`FAIL_WITHIN`]); its error text.
async fn start_up_error(database_url: &str, bootstrap: &str, telemetry: &str) -> Result<String> {
    let config = ingest_producer::Config::try_parse_from([
        "ingest-producer",
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        bootstrap,
        "--telemetry-topic",
        telemetry,
        "--admin-listen",
        &format!("127.0.0.1:{}", free_port()?),
        "--instance-id",
        "ingest-startup-test",
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = plumbing::Shutdown::new();
    let ended = tokio::time::timeout(
        FAIL_WITHIN,
        ingest_producer::run_on(listener, config, shutdown.clone()),
    )
    .await;
    shutdown.cancel();
    match ended {
        Ok(Err(err)) => Ok(err.to_string()),
        Ok(Ok(())) => anyhow::bail!("ingest stopped without an error"),
        Err(_) => anyhow::bail!("ingest still running after {FAIL_WITHIN:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_telemetry_topic_ends_ingest_with_an_error_naming_it() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let missing = unique_name("missing");
    let error = start_up_error(&db.url, &topics.args.bootstrap_servers, &missing).await?;
    assert!(
        error.contains(&format!("kafka topic(s) {missing} do not exist")),
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_migrated_ends_ingest_with_an_error_saying_so() -> Result<()> {
    let topics = TestTopics::new(1).await?;
    let empty = EmptyDb::new().await?;
    let error = start_up_error(
        &empty.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
    )
    .await?;
    assert!(
        error.contains("database not migrated: schema version none found"),
        "{error}"
    );
    Ok(())
}
