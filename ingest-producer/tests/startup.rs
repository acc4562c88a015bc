//! Misconfiguration fails loudly at start-up: a telemetry topic that does not exist, a
//! database not migrated or a role without a right ends `run_on` with an error naming it,
//! instead of a service that stays up answering 503. Brokers that cannot be reached yet are
//! waited for (not ready), not fatal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use plumbing::testing::{eventually, unique_name, EmptyDb, TestDb, TestTopics};
use schemas::LayoutChoice;

/// How long a misconfigured ingest may take to give up: one metadata request and a few queries.
const FAIL_WITHIN: Duration = Duration::from_secs(30);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn config(
    database_url: &str,
    bootstrap: &str,
    telemetry: &str,
    admin_port: u16,
) -> Result<ingest_producer::Config> {
    Ok(ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        bootstrap,
        "--telemetry-topic",
        telemetry,
        "--admin-listen",
        &format!("127.0.0.1:{admin_port}"),
        "--instance-id",
        "ingest-startup-test",
    ])?)
}

/// Runs ingest until it ends by itself (it must, within [`FAIL_WITHIN`]); its error text.
async fn start_up_error(database_url: &str, bootstrap: &str, telemetry: &str) -> Result<String> {
    let config = config(database_url, bootstrap, telemetry, free_port()?)?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_a_right_ends_ingest_with_an_error_naming_the_right() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let role = db.writer_login("ingest_role").await?;
    // Only in this test's database: grants are per database object.
    sqlx::query("REVOKE SELECT ON gateway_tokens FROM fleet_writer")
        .execute(&db.pool)
        .await?;
    let error = start_up_error(
        &role.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
    )
    .await?;
    let role = &role.name;
    assert!(
        error.contains(&format!(
            "database role `{role}` lacks SELECT on table gateway_tokens"
        )),
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_at_start_up_are_waited_for_not_fatal() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    // A port nothing listens on.
    let broker = format!("127.0.0.1:{}", free_port()?);
    let admin_port = free_port()?;
    let config = config(&db.url, &broker, "telemetry.v1", admin_port)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = plumbing::Shutdown::new();
    let ingest = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    eventually(
        "/readyz: not ready, the database reached and kafka not",
        Duration::from_secs(30),
        || {
            let request = client.get(&url).send();
            async move {
                let response = request.await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let body = response.text().await.map_err(|e| e.to_string())?;
                if status == 503
                    && body.contains(r#""database":true"#)
                    && body.contains(r#""kafka":false"#)
                {
                    Ok(())
                } else {
                    Err(format!("{status} {body}"))
                }
            }
        },
    )
    .await?;
    if ingest.is_finished() {
        panic!(
            "ingest ended while the brokers were unreachable: {:?}",
            ingest.await
        );
    }
    shutdown.cancel();
    let ended = tokio::time::timeout(FAIL_WITHIN, ingest).await??;
    assert!(ended.is_ok(), "{ended:?}");
    Ok(())
}
