//! The broker restarted under a running sink: the sink keeps its place, carries on by itself
//! once the broker is back, and every message ends up in the database exactly once.
//!
//! The broker is a [`PrivateKafka`] of this test's own: the shared one serves every other test
//! running in parallel and is never stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use common::*;
use plumbing::testing::{PrivateKafka, TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::{telemetry_codec, LayoutChoice};

const PARTITIONS: i32 = 4;
const DEVICES: usize = 2_000;

/// Readings `seqs` of every device, `seq` seconds after `base`: disjoint ranges never share a
/// (tenant, device, time) key, so every message is one row.
fn readings(
    seqs: std::ops::Range<i64>,
    base: DateTime<Utc>,
) -> Vec<(String, Vec<u8>, Option<i32>)> {
    let codec = telemetry_codec().unwrap();
    let mut out = Vec::new();
    for seq in seqs {
        for device in 0..DEVICES {
            let r = reading(
                &format!("tenant-{}", device % 3),
                device,
                seq,
                base + chrono::Duration::seconds(seq),
            );
            out.push((r.key(), codec.encode(&r).unwrap(), None));
        }
    }
    out
}

/// How the broker goes away.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGTERM: a controlled shutdown.
    Stop,
    /// SIGKILL: a crash, with fetches and commits in flight.
    Kill,
    /// SIGKILL, and the broker stays away longer than the consumer's session timeout, so the
    /// sink loses its partitions and must rejoin the group when the broker is back.
    KillPastSessionTimeout,
}

/// The sink's session timeout in the long-outage case (the broker's minimum is 6 s).
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_and_restarted_mid_run_loses_and_duplicates_nothing() -> Result<()> {
    broker_restarted_mid_run(Outage::Stop).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_mid_run_loses_and_duplicates_nothing() -> Result<()> {
    broker_restarted_mid_run(Outage::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_away_longer_than_the_session_timeout_loses_and_duplicates_nothing() -> Result<()>
{
    broker_restarted_mid_run(Outage::KillPastSessionTimeout).await
}

async fn broker_restarted_mid_run(outage: Outage) -> Result<()> {
    let mut kafka = PrivateKafka::new().await?;
    let topics = TestTopics::on(kafka.kafka_args(), PARTITIONS).await?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let base = Utc::now() - chrono::Duration::hours(1);

    // Before the restart: 20 readings per device.
    let before = readings(0..20, base);
    let first = before.len() as i64;
    let producer = producer(&topics)?;
    assert_eq!(
        produce(&producer, &topics.args.telemetry_topic, before).await? as i64,
        first
    );
    // Small batches so the sink is still at work when the broker goes.
    let session = format!(
        "session.timeout.ms={},heartbeat.interval.ms=1000",
        SESSION_TIMEOUT.as_millis()
    );
    let config = sink_config(
        &db,
        &topics,
        &["--batch-max-rows", "500", "--kafka-option", &session],
    )?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(&db.pool, &group, first / 8, Duration::from_secs(60)).await?;

    match outage {
        Outage::Stop => kafka.stop().await?,
        Outage::Kill => kafka.kill(),
        Outage::KillPastSessionTimeout => {
            kafka.kill();
            // Not a synchronisation: the outage itself, long enough for the consumer's
            // session to expire while no broker answers its heartbeats.
            tokio::time::sleep(SESSION_TIMEOUT * 2).await;
        }
    }
    let stored_at_stop = stored_total(&db.pool, &group).await?;
    eprintln!("{outage:?}: broker gone with {stored_at_stop} of {first} messages stored");
    kafka.start().await?;
    assert!(
        !sink.is_finished(),
        "the sink gave up while the broker was away"
    );

    // After the restart: 20 more per device, produced to the same (restarted) broker.
    let after = readings(20..40, base);
    let total = first + after.len() as i64;
    // The same producer: it reconnects by itself.
    produce(&producer, &topics.args.telemetry_topic, after).await?;

    wait_for_stored(&db.pool, &group, total, Duration::from_secs(180)).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, total);
    assert_no_duplicate_keys(&db.pool).await?;
    let ends = end_offsets(&topics, PARTITIONS)?;
    assert_eq!(ends.values().sum::<i64>(), total);
    assert_eq!(stored_offsets(&db.pool, &group).await?, ends);
    let newest: i64 = sqlx::query_scalar("SELECT count(*) FROM device_latest WHERE seq = 39")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(
        newest, DEVICES as i64,
        "device_latest holds the newest readings"
    );
    Ok(())
}
