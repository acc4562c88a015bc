//! Misconfiguration fails loudly at start-up, with the real binary: a missing topic, a database
//! not migrated or a role without a right ends the process with a non-zero status and an
//! error naming the problem. Brokers that cannot be reached yet are waited for, not fatal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use plumbing::testing::{admin_database_url, eventually, unique_name, TestDb, TestTopics};
use schemas::LayoutChoice;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

const BIN: &str = env!("CARGO_BIN_EXE_timescale-sink");

/// How long a misconfigured sink may take to give up: one metadata request and a few queries.
const FAIL_WITHIN: Duration = Duration::from_secs(30);

/// A child sink killed when dropped, so a failing test leaves no process behind; its stderr
/// goes to a file the test reads.
struct Sink {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

impl Sink {
    fn spawn(database_url: &str, bootstrap: &str, telemetry: &str, dlq: &str) -> Result<Sink> {
        let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let path = std::env::temp_dir().join(format!("{}.stderr", unique_name("sink_startup")));
        let file = std::fs::File::create(&path)?;
        let child = Command::new(BIN)
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
            .env("TELEMETRY_TOPIC", telemetry)
            .env("DLQ_TOPIC", dlq)
            .env("SINK_GROUP_ID", unique_name("g"))
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()?;
        Ok(Sink {
            child,
            stderr: path,
        })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn exit_status(&mut self, within: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        eventually("the sink to exit", within, || {
            let polled = child.try_wait();
            async move {
                match polled {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => Err("still running".to_owned()),
                    Err(err) => Err(err.to_string()),
                }
            }
        })
        .await
    }

    /// Waits for the sink to fail at start-up; its stderr.
    async fn failure(&mut self) -> Result<String> {
        let status = self.exit_status(FAIL_WITHIN).await?;
        let stderr = self.stderr();
        assert!(
            !status.success(),
            "sink exited with {status}; stderr:\n{stderr}"
        );
        Ok(stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_telemetry_topic_ends_the_sink_with_an_error_naming_it() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let missing = unique_name("missing");
    let mut sink = Sink::spawn(
        &db.url,
        &topics.args.bootstrap_servers,
        &missing,
        &topics.args.dlq_topic,
    )?;
    let stderr = sink.failure().await?;
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
    let mut sink = Sink::spawn(
        &db.url,
        &topics.args.bootstrap_servers,
        &topics.args.telemetry_topic,
        &missing,
    )?;
    let stderr = sink.failure().await?;
    assert!(
        stderr.contains(&format!("kafka topic(s) {missing} do not exist")),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_migrated_ends_the_sink_with_an_error_saying_so() -> Result<()> {
    let topics = TestTopics::new(1).await?;
    let admin_url = admin_database_url().await?;
    let name = unique_name("fleet_empty");
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await?;
    let url = admin_url
        .parse::<PgConnectOptions>()?
        .database(&name)
        .to_url_lossy()
        .to_string();
    let result = async {
        let mut sink = Sink::spawn(
            &url,
            &topics.args.bootstrap_servers,
            &topics.args.telemetry_topic,
            &topics.args.dlq_topic,
        )?;
        sink.failure().await
    }
    .await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    let stderr = result?;
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
    let role = unique_name("sink_role");
    sqlx::query(&format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD 'sink-test' IN ROLE fleet_writer"
    ))
    .execute(&db.pool)
    .await
    .context("creating a login role")?;
    // Only in this test's database: grants are per database object.
    sqlx::query("REVOKE EXECUTE ON FUNCTION fleet_refresh_rollup_1m(integer) FROM fleet_writer")
        .execute(&db.pool)
        .await?;
    let url = db
        .url
        .parse::<PgConnectOptions>()?
        .username(&role)
        .password("sink-test")
        .to_url_lossy()
        .to_string();
    let result = async {
        let mut sink = Sink::spawn(
            &url,
            &topics.args.bootstrap_servers,
            &topics.args.telemetry_topic,
            &topics.args.dlq_topic,
        )?;
        sink.failure().await
    }
    .await;
    sqlx::query(&format!("DROP ROLE IF EXISTS \"{role}\""))
        .execute(&db.pool)
        .await?;
    let stderr = result?;
    assert!(
        stderr.contains(&format!(
            "database role `{role}` lacks EXECUTE on function fleet_refresh_rollup_1m(integer)"
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
    let mut sink = Sink::spawn(
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
        sink.child.try_wait()?.is_none(),
        "sink exited while kafka was unreachable; stderr:\n{}",
        sink.stderr()
    );
    let status = Command::new("kill")
        .args(["-TERM", &sink.child.id().to_string()])
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
