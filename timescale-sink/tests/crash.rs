//! Crash safety with the real binary: SIGKILL at random moments, restart, and a group of two
//! where one instance is stopped or killed. Every message ends up in the database exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use common::*;
use plumbing::testing::{eventually, TestDb, TestTopics};
use rand::Rng;
use rdkafka::producer::FutureProducer;
use schemas::LayoutChoice;

const BIN: &str = env!("CARGO_BIN_EXE_timescale-sink");

/// A child sink killed when dropped, so a failing test leaves no process behind; with the
/// port of its admin endpoint.
struct Sink(Child, u16);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Sink {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Sink {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

fn spawn_sink(db: &TestDb, topics: &TestTopics, group: &str, instance: &str) -> Result<Sink> {
    spawn_sink_with(db, topics, group, instance, &[])
}

fn spawn_sink_with(
    db: &TestDb,
    topics: &TestTopics,
    group: &str,
    instance: &str,
    env: &[(&str, &str)],
) -> Result<Sink> {
    // A free port for the admin endpoint, so the test can tell when the process is up.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(Sink(
        Command::new(BIN)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &topics.args.bootstrap_servers)
            .env("TELEMETRY_TOPIC", &topics.args.telemetry_topic)
            .env("DLQ_TOPIC", &topics.args.dlq_topic)
            .env("SINK_GROUP_ID", group)
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("INSTANCE_ID", instance)
            // Fast failover when a member dies without leaving (the broker's minimum).
            .env(
                "KAFKA_OPTIONS",
                "session.timeout.ms=6000,heartbeat.interval.ms=1000",
            )
            .env(
                "RUST_LOG",
                std::env::var("SINK_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(match std::env::var("SINK_TEST_LOG_DIR") {
                Ok(dir) => Stdio::from(std::fs::File::create(format!("{dir}/{instance}.log"))?),
                Err(_) => Stdio::null(),
            })
            .spawn()?,
        admin_port,
    ))
}

/// SIGTERM once the sink is up (its admin endpoint listens: the signal handlers are installed
/// before it starts), then a clean exit within a minute. A sink that finds nothing left to do
/// is terminated moments after it was spawned, before it could have installed the handlers.
async fn terminate(sink: &mut Sink) -> Result<()> {
    let port = sink.1;
    eventually(
        "the sink's admin endpoint",
        Duration::from_secs(60),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|err| err.to_string())
        },
    )
    .await?;
    let child = &mut sink.0;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let exited = eventually(
        "the sink to exit after SIGTERM",
        Duration::from_secs(60),
        || {
            let polled = child.try_wait();
            async move {
                match polled {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => Err("still running".to_owned()),
                    Err(err) => Err(err.to_string()),
                }
            }
        },
    )
    .await?;
    assert!(exited.success(), "sink exited with {exited} after SIGTERM");
    Ok(())
}

/// Runs sinks of `group` that are SIGKILLed one after the other at `kills` random moments
/// (each once it stored a random number of offsets below 90 % of `total`), then one that
/// stores everything and stops on SIGTERM.
async fn sigkill_then_finish(
    db: &TestDb,
    topics: &TestTopics,
    group: &str,
    kills: usize,
    total: i64,
) -> Result<()> {
    let mut kill_points: Vec<i64> = (0..kills)
        .map(|_| rand::rng().random_range(1..total * 9 / 10))
        .collect();
    kill_points.sort_unstable();
    for (i, point) in kill_points.iter().enumerate() {
        let mut child = spawn_sink(db, topics, group, &format!("victim-{i}"))?;
        let reached = wait_for_stored(&db.pool, group, *point, Duration::from_secs(180)).await;
        child.kill()?; // SIGKILL
        child.wait()?;
        reached?;
    }
    let mut last = spawn_sink(db, topics, group, "survivor")?;
    wait_for_stored(&db.pool, group, total, Duration::from_secs(180)).await?;
    terminate(&mut last).await
}

async fn assert_exactly_once(
    db: &TestDb,
    topics: &TestTopics,
    group: &str,
    partitions: i32,
    total: i64,
) -> Result<()> {
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, total);
    assert_no_duplicate_keys(&db.pool).await?;
    assert_eq!(
        stored_offsets(&db.pool, group).await?,
        end_offsets(topics, partitions)?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_five_random_moments_loses_and_duplicates_nothing() -> Result<()> {
    const PARTITIONS: i32 = 6;
    const TOTAL: i64 = 500_000;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let producer = producer(&topics)?;
    assert_eq!(
        produce(
            &producer,
            &topics.args.telemetry_topic,
            fleet(4, 25_000, 20)
        )
        .await? as i64,
        TOTAL
    );
    let group = format!("crash-{}", db.name);

    sigkill_then_finish(&db, &topics, &group, 5, TOTAL).await?;
    assert_exactly_once(&db, &topics, &group, PARTITIONS, TOTAL).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_group_and_one_stopping_or_dying_loses_nothing() -> Result<()> {
    const PARTITIONS: i32 = 6;
    const TOTAL: i64 = 300_000;
    for kill in [false, true] {
        let db = TestDb::new(LayoutChoice::Postgres).await?;
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
        let group = format!("pair-{}", db.name);
        let mut a = spawn_sink(&db, &topics, &group, "a")?;
        let mut b = spawn_sink(&db, &topics, &group, "b")?;
        wait_for_stored(&db.pool, &group, TOTAL / 3, Duration::from_secs(180)).await?;
        if kill {
            b.kill()?;
            b.wait()?;
        } else {
            terminate(&mut b).await?;
        }
        wait_for_stored(&db.pool, &group, TOTAL, Duration::from_secs(180)).await?;
        terminate(&mut a).await?;
        assert_exactly_once(&db, &topics, &group, PARTITIONS, TOTAL).await?;
    }
    Ok(())
}

/// Split-sensor devices (temperature and humidity in separate messages at the same
/// timestamps, with exact re-sends) through the real binary, SIGKILLed twice at random
/// moments: every point holds both metrics exactly once and `device_latest` shows both with
/// their own times, on every layout the server offers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sensor_readings_merge_exactly_across_sigkills() -> Result<()> {
    const PARTITIONS: i32 = 3;
    for layout in plumbing::testing::available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let topics = TestTopics::new(PARTITIONS).await?;
        let fleet = SplitSensors::new(1_000, 12, 9);
        let total = fleet.messages.len() as i64;
        let producer = producer(&topics)?;
        assert_eq!(
            produce(
                &producer,
                &topics.args.telemetry_topic,
                fleet.messages.clone()
            )
            .await? as i64,
            total
        );
        let group = format!("split-{}", db.name);
        sigkill_then_finish(&db, &topics, &group, 2, total).await?;
        assert_eq!(
            stored_offsets(&db.pool, &group).await?,
            end_offsets(&topics, PARTITIONS)?
        );
        fleet.assert_stored(&db.pool).await?;
    }
    Ok(())
}

/// `device_latest` as the telemetry says it must be, per device and metric the newest value:
/// (devices missing, devices differing, rows in `device_latest`).
async fn latest_against_telemetry(pool: &sqlx::PgPool) -> Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "WITH newest AS ( \
             SELECT DISTINCT ON (tenant_id, device_id, key) tenant_id, device_id, key, value \
             FROM telemetry, jsonb_each(metrics) ORDER BY tenant_id, device_id, key, time DESC \
         ), expected AS ( \
             SELECT tenant_id, device_id, jsonb_object_agg(key, value) AS metrics \
             FROM newest GROUP BY tenant_id, device_id \
         ) \
         SELECT count(*) FILTER (WHERE d.metrics IS NULL), \
                count(*) FILTER (WHERE d.metrics <> e.metrics), \
                (SELECT count(*) FROM device_latest) \
         FROM expected e LEFT JOIN device_latest d USING (tenant_id, device_id)",
    )
    .fetch_one(pool)
    .await?)
}

/// Partitions of `group` whose `device_latest` is behind (`latest_next_offset` set), with it.
async fn latest_behind(pool: &sqlx::PgPool, group: &str) -> Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, latest_next_offset FROM consumer_offsets \
         WHERE consumer_group = $1 AND latest_next_offset IS NOT NULL",
    )
    .bind(group)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Ok once no partition of `group` waits for `device_latest` and it holds exactly the newest
/// reading per metric of `devices` devices; else what is still off (for `eventually`).
async fn latest_caught_up(
    pool: &sqlx::PgPool,
    group: &str,
    devices: i64,
) -> std::result::Result<(), String> {
    let behind = latest_behind(pool, group)
        .await
        .map_err(|e| e.to_string())?;
    let check = latest_against_telemetry(pool)
        .await
        .map_err(|e| e.to_string())?;
    if behind.is_empty() && check == (0, 0, devices) {
        Ok(())
    } else {
        Err(format!(
            "behind {behind:?}, (missing, differing, rows) {check:?}"
        ))
    }
}

/// A fresh database and `partitions`-partition topic holding `fleet(tenants, devices,
/// per_device)`, every reading produced.
async fn seeded(
    partitions: i32,
    tenants: usize,
    devices: usize,
    per_device: i64,
) -> Result<(TestDb, TestTopics, FutureProducer)> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(partitions).await?;
    let producer = producer(&topics)?;
    let readings = fleet(tenants, devices, per_device);
    let expected = devices * per_device as usize;
    assert_eq!(
        produce(&producer, &topics.args.telemetry_topic, readings).await?,
        expected
    );
    Ok((db, topics, producer))
}

/// `SINK_LATEST_INTERVAL` (migration 0017): a sink writing `device_latest` behind is SIGKILLed
/// before its first flush; the next sink reads the partitions again from
/// `latest_next_offset`, applies those readings to `device_latest` only (nothing is stored
/// twice), and flushes on its timer, also for readings that carry only some metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_latest_written_behind_is_exact_after_a_sigkill_and_its_timer() -> Result<()> {
    const PARTITIONS: i32 = 6;
    const DEVICES: usize = 2_000;
    const FIRST: i64 = 20_000;
    let (db, topics, producer) = seeded(PARTITIONS, 4, DEVICES, 10).await?;
    let group = format!("latest-{}", db.name);

    // An hour's interval: nothing reaches device_latest before the kill.
    let mut victim = spawn_sink_with(
        &db,
        &topics,
        &group,
        "latest-victim",
        &[("SINK_LATEST_INTERVAL", "1h")],
    )?;
    wait_for_stored(&db.pool, &group, FIRST, Duration::from_secs(120)).await?;
    victim.kill()?; // SIGKILL
    victim.wait()?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, FIRST);
    assert_eq!(
        latest_against_telemetry(&db.pool).await?,
        (DEVICES as i64, 0, 0),
        "no device_latest row before the first flush"
    );
    assert_eq!(
        latest_behind(&db.pool, &group).await?,
        (0..PARTITIONS).map(|p| (p, 0)).collect::<BTreeMap<_, _>>(),
        "every partition's readings wait for device_latest from offset 0"
    );

    // A sink with a 1-second interval replays them for device_latest and flushes on its timer.
    let mut survivor = spawn_sink_with(
        &db,
        &topics,
        &group,
        "latest-survivor",
        &[("SINK_LATEST_INTERVAL", "1s")],
    )?;
    let caught_up = || latest_caught_up(&db.pool, &group, DEVICES as i64);
    eventually(
        "device_latest exact after the replay",
        Duration::from_secs(120),
        caught_up,
    )
    .await?;

    // Newer readings carrying only the temperature: merged per metric by the timer flush.
    let codec = schemas::telemetry_codec()?;
    let now = chrono::Utc::now();
    let partial = (0..DEVICES).map(|device| {
        let mut r = reading(&format!("tenant-{}", device % 4), device, 10, now);
        r.metrics.retain(|name, _| name == "temperature");
        (r.key(), codec.encode(&r).unwrap(), None)
    });
    assert_eq!(
        produce(&producer, &topics.args.telemetry_topic, partial).await?,
        DEVICES
    );
    wait_for_stored(
        &db.pool,
        &group,
        FIRST + DEVICES as i64,
        Duration::from_secs(120),
    )
    .await?;
    eventually(
        "device_latest exact after the timer flush",
        Duration::from_secs(60),
        caught_up,
    )
    .await?;
    let merged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM device_latest \
         WHERE seq = 10 AND metrics ?& array['temperature', 'battery', 'door_open']",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        merged, DEVICES as i64,
        "new temperature, older metrics kept"
    );
    terminate(&mut survivor).await?;
    assert_exactly_once(&db, &topics, &group, PARTITIONS, FIRST + DEVICES as i64).await
}

/// A timed flush of more devices than one slice (`writer::LATEST_SLICE`, 2,500) commits them
/// slice by slice, 1.5 s apart at this interval: the test sees `device_latest` partly
/// written, SIGKILLs the sink between two slices, and the next sink completes it exactly from
/// `latest_next_offset` (the slices already written are applied again, harmlessly). A flush in
/// one transaction would never show the partial state and the test would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_latest_flush_goes_in_slices_and_a_sigkill_between_them_loses_nothing() -> Result<()>
{
    const DEVICES: usize = 12_000;
    // One partition: one writer holds every device.
    let (db, topics, _producer) = seeded(1, 4, DEVICES, 1).await?;
    let group = format!("slices-{}", db.name);
    // 10 s: five slices spread over three quarters of it, 1.5 s apart.
    let mut victim = spawn_sink_with(
        &db,
        &topics,
        &group,
        "slices-victim",
        &[("SINK_LATEST_INTERVAL", "10s")],
    )?;
    wait_for_stored(&db.pool, &group, DEVICES as i64, Duration::from_secs(120)).await?;
    let written = || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM device_latest")
            .fetch_one(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
        if rows > 0 && rows < DEVICES as i64 {
            Ok(rows)
        } else {
            Err(format!("{rows} device_latest rows"))
        }
    };
    let partly = eventually(
        "device_latest partly written",
        Duration::from_secs(60),
        written,
    )
    .await?;
    victim.kill()?; // SIGKILL, between two slices
    victim.wait()?;
    let (missing, differing, rows) = latest_against_telemetry(&db.pool).await?;
    assert!(
        rows >= partly
            && rows < DEVICES as i64
            && missing == DEVICES as i64 - rows
            && differing == 0,
        "slices written before the kill are exact, the rest missing: {partly} seen, then \
         (missing, differing, rows) = {:?}",
        (missing, differing, rows)
    );
    assert_eq!(
        latest_behind(&db.pool, &group).await?,
        BTreeMap::from([(0, 0)]),
        "the partition still waits for device_latest from offset 0"
    );

    let mut survivor = spawn_sink_with(
        &db,
        &topics,
        &group,
        "slices-survivor",
        &[("SINK_LATEST_INTERVAL", "1s")],
    )?;
    eventually(
        "device_latest exact after the replay",
        Duration::from_secs(120),
        || latest_caught_up(&db.pool, &group, DEVICES as i64),
    )
    .await?;
    terminate(&mut survivor).await?;
    assert_exactly_once(&db, &topics, &group, 1, DEVICES as i64).await
}

/// `SINK_LATEST_INTERVAL` far longer than the test: what a sink holds for `device_latest` is
/// written when its partitions are revoked (a second member joins) and when it stops on
/// SIGTERM, so no partition is left behind for a new owner to read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_latest_written_behind_is_flushed_at_a_rebalance_and_on_sigterm() -> Result<()> {
    const PARTITIONS: i32 = 6;
    const DEVICES: usize = 1_000;
    const FIRST: i64 = 10_000;
    let (db, topics, producer) = seeded(PARTITIONS, 2, DEVICES, 10).await?;
    let group = format!("latest-rebalance-{}", db.name);
    let hour = [("SINK_LATEST_INTERVAL", "1h")];
    let mut a = spawn_sink_with(&db, &topics, &group, "latest-a", &hour)?;
    wait_for_stored(&db.pool, &group, FIRST, Duration::from_secs(120)).await?;
    assert_eq!(
        latest_against_telemetry(&db.pool).await?,
        (DEVICES as i64, 0, 0),
        "nothing in device_latest before a flush"
    );

    // A second member: the eager rebalance revokes all of a's partitions, and a writes what
    // it holds before it lets them go.
    let mut b = spawn_sink_with(&db, &topics, &group, "latest-b", &hour)?;
    eventually(
        "device_latest written at the rebalance",
        Duration::from_secs(120),
        || latest_caught_up(&db.pool, &group, DEVICES as i64),
    )
    .await?;

    // Newer readings for both members; SIGTERM writes them to device_latest.
    let codec = schemas::telemetry_codec()?;
    let now = chrono::Utc::now();
    let newer = (0..DEVICES).map(|device| {
        let r = reading(&format!("tenant-{}", device % 2), device, 10, now);
        (r.key(), codec.encode(&r).unwrap(), None)
    });
    assert_eq!(
        produce(&producer, &topics.args.telemetry_topic, newer).await?,
        DEVICES
    );
    wait_for_stored(
        &db.pool,
        &group,
        FIRST + DEVICES as i64,
        Duration::from_secs(120),
    )
    .await?;
    assert!(
        !latest_behind(&db.pool, &group).await?.is_empty(),
        "the newer readings wait for device_latest"
    );
    terminate(&mut b).await?;
    terminate(&mut a).await?;
    assert_eq!(latest_behind(&db.pool, &group).await?, BTreeMap::new());
    assert_eq!(
        latest_against_telemetry(&db.pool).await?,
        (0, 0, DEVICES as i64)
    );
    let newest: i64 = sqlx::query_scalar("SELECT count(*) FROM device_latest WHERE seq = 10")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(newest, DEVICES as i64, "every device at its newest reading");
    assert_exactly_once(&db, &topics, &group, PARTITIONS, FIRST + DEVICES as i64).await
}
