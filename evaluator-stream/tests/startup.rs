//! Misconfiguration fails loudly at start-up, with the real binary: a missing topic, a database
//! not migrated or a role without a right ends the process with a non-zero status and an
//! error naming the problem. (Unreachable brokers are waited for: see the evaluator's test of the
//! shared check.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use plumbing::testing::{unique_name, EmptyDb, ServiceProcess, TestDb, TestTopics};
use schemas::LayoutChoice;

const BIN: &str = env!("CARGO_BIN_EXE_evaluator-stream");

/// How long a misconfigured evaluator may take to give up: one metadata request and a few queries.
const FAIL_WITHIN: Duration = Duration::from_secs(30);

/// Runs the evaluator against these settings until it fails at start-up; its stderr.
async fn start_up_error(
    database_url: &str,
    bootstrap: &str,
    telemetry: &str,
    alerts: &str,
) -> Result<String> {
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = Command::new(BIN);
    command
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("TELEMETRY_TOPIC", telemetry)
        .env("ALERTS_TOPIC", alerts)
        .env("EVALUATOR_GROUP_ID", unique_name("g"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("RUST_LOG", "warn");
    ServiceProcess::spawn(command, "evaluator")?
        .failure(FAIL_WITHIN)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_alerts_topic_ends_the_evaluator_with_an_error_naming_it() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let missing = unique_name("missing_alerts");
    let stderr = start_up_error(
        &db.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
        &missing,
    )
    .await?;
    assert!(
        stderr.contains(&format!("kafka topic(s) {missing} do not exist")),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_migrated_ends_the_evaluator_with_an_error_saying_so() -> Result<()> {
    let topics = TestTopics::new(1).await?;
    let empty = EmptyDb::new().await?;
    let stderr = start_up_error(
        &empty.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
        &topics.args.alerts_topic,
    )
    .await?;
    assert!(
        stderr.contains("database not migrated: schema version none found"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_a_right_ends_the_evaluator_with_an_error_naming_the_right() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let role = db.writer_login("evaluator_role").await?;
    // Only in this test's database: grants are per database object.
    sqlx::query("REVOKE DELETE ON alert_outbox FROM fleet_writer")
        .execute(&db.pool)
        .await?;
    let stderr = start_up_error(
        &role.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
        &topics.args.alerts_topic,
    )
    .await?;
    let role = &role.name;
    assert!(
        stderr.contains(&format!(
            "database role `{role}` lacks DELETE on table alert_outbox"
        )),
        "{stderr}"
    );
    Ok(())
}
