//! Misconfiguration fails loudly at start-up, with the real binary: a missing topic, a database
//! not migrated or a role without a right ends the process with a non-zero status and an
//! error naming the problem. Brokers that cannot be reached yet are waited for, not fatal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use plumbing::testing::{eventually, unique_name, EmptyDb, ServiceProcess, TestDb, TestTopics};
use schemas::LayoutChoice;

const BIN: &str = env!("CARGO_BIN_EXE_timescale-sink");

/// How long a misconfigured sink may take to give up: one metadata request and a few queries.
const FAIL_WITHIN: Duration = Duration::from_secs(30);

fn spawn_sink(
    database_url: &str,
    bootstrap: &str,
    telemetry: &str,
    dlq: &str,
) -> Result<ServiceProcess> {
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = Command::new(BIN);
    command
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("TELEMETRY_TOPIC", telemetry)
        .env("DLQ_TOPIC", dlq)
        .env("SINK_GROUP_ID", unique_name("g"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("RUST_LOG", "warn");
    ServiceProcess::spawn(command, "sink")
}

/// Runs the sink against these settings until it fails at start-up; its stderr.
async fn start_up_error(
    database_url: &str,
    bootstrap: &str,
    telemetry: &str,
    dlq: &str,
) -> Result<String> {
    spawn_sink(database_url, bootstrap, telemetry, dlq)?
        .failure(FAIL_WITHIN)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_telemetry_topic_ends_the_sink_with_an_error_naming_it() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let missing = unique_name("missing");
    let stderr = start_up_error(
        &db.url,
        &topics.args.bootstrap_servers,
        &missing,
        &topics.args.dlq_topic,
    )
    .await?;
    assert!(
        stderr.contains(&format!("kafka topic(s) {missing} do not exist")),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dlq_topic_ends_the_sink_with_an_error_naming_it() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let missing = unique_name("missing_dlq");
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
async fn a_database_not_migrated_ends_the_sink_with_an_error_saying_so() -> Result<()> {
    let topics = TestTopics::new(1).await?;
    let empty = EmptyDb::new().await?;
    let stderr = start_up_error(
        &empty.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
        &topics.args.dlq_topic,
    )
    .await?;
    assert!(
        stderr.contains("database not migrated: schema version none found"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_a_right_ends_the_sink_with_an_error_naming_the_right() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let role = db.writer_login("sink_role").await?;
    // Only in this test's database: grants are per database object.
    sqlx::query(
        "REVOKE EXECUTE ON FUNCTION fleet_refresh_rollup_1m_plan(integer, integer) FROM fleet_writer",
    )
    .execute(&db.pool)
    .await?;
    let stderr = start_up_error(
        &role.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
        &topics.args.dlq_topic,
    )
    .await?;
    let role = &role.name;
    assert!(
        stderr.contains(&format!(
            "database role `{role}` lacks EXECUTE on function fleet_refresh_rollup_1m_plan(integer, integer)"
        )),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_at_start_up_are_waited_for_not_fatal() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut sink = spawn_sink(
        &db.url,
        &format!("127.0.0.1:{port}"),
        "telemetry.v1",
        "telemetry.v1.dlq",
    )?;
    let sink_ref = &sink;
    eventually(
        "the sink to report kafka unreachable",
        Duration::from_secs(60),
        || {
            let stderr = sink_ref.stderr();
            async move {
                if stderr.contains("kafka unreachable at start-up; retrying") {
                    Ok(())
                } else {
                    Err(stderr)
                }
            }
        },
    )
    .await?;
    assert!(
        sink.try_wait()?.is_none(),
        "sink exited while kafka was unreachable; stderr:\n{}",
        sink.stderr()
    );
    let status = Command::new("kill")
        .args(["-TERM", &sink.id().to_string()])
        .status()?;
    assert!(status.success());
    let exited = sink.exit_status(Duration::from_secs(60)).await?;
    assert!(
        exited.success(),
        "sink exited with {exited} after SIGTERM; stderr:\n{}",
        sink.stderr()
    );
    Ok(())
}
