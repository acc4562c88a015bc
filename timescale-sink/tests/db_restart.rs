//! PostgreSQL restarted under a running sink: it pauses, backs off, reconnects and carries on
//! without being restarted itself; nothing is lost or duplicated.
//!
//! Restarts the local cluster with `pg_ctlcluster`, so it runs only where the test database is
//! that local Debian cluster (as `deploy/local/deps.sh` sets up, and as CI runs); elsewhere it
//! says so and passes. It is its own test binary so no other test shares the restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use common::*;
use plumbing::testing::{TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;

async fn local_cluster(db: &TestDb) -> Result<Option<String>> {
    let local = db.url.contains("@127.0.0.1:") || db.url.contains("@localhost:");
    let has_tool = Command::new("pg_ctlcluster").arg("--help").output().is_ok();
    if !local || !has_tool {
        return Ok(None);
    }
    let version: i32 =
        sqlx::query_scalar("SELECT current_setting('server_version_num')::int / 10000")
            .fetch_one(&db.pool)
            .await?;
    Ok(Some(version.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_loses_nothing_and_the_sink_recovers_by_itself() -> Result<()> {
    const PARTITIONS: i32 = 6;
    const TOTAL: i64 = 300_000;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let Some(version) = local_cluster(&db).await? else {
        eprintln!(
            "the test database is not a local pg_ctlcluster cluster: restart test not applicable"
        );
        return Ok(());
    };
    let topics = TestTopics::new(PARTITIONS).await?;
    let producer = producer(&topics)?;
    assert_eq!(
        produce(
            &producer,
            &topics.args.telemetry_topic,
            fleet(3, 15_000, 20)
        )
        .await? as i64,
        TOTAL
    );
    let config = sink_config(&db, &topics, &["--database-acquire-timeout", "2s"])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));

    wait_for_stored(&db.pool, &group, TOTAL / 6, Duration::from_secs(120)).await?;
    let status = Command::new("pg_ctlcluster")
        .args([&version, "main", "restart", "-m", "fast"])
        .status()?;
    assert!(status.success(), "pg_ctlcluster restart failed");

    // The pool reconnects by itself; errors while the server restarts count as "not yet".
    wait_for_stored(&db.pool, &group, TOTAL, Duration::from_secs(180)).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, TOTAL);
    assert_no_duplicate_keys(&db.pool).await?;
    assert_eq!(
        stored_offsets(&db.pool, &group).await?,
        end_offsets(&topics, PARTITIONS)?
    );
    Ok(())
}
