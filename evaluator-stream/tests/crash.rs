//! Replay safety: the evaluator binary SIGKILLed at random moments and restarted, and a
//! group of two instances rebalancing mid-scenario, each end with exactly the alerts and the
//! distinct alerts.v1 event ids of an uninterrupted run of the same scenario.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use common::*;
use plumbing::testing::{eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use rand::Rng;
use schemas::{LayoutChoice, Telemetry};

const BIN: &str = env!("CARGO_BIN_EXE_evaluator-stream");
const TENANT: &str = "tenant-a";
const DEVICES: usize = 300;
const SECONDS: i64 = 300;
const PARTITIONS: i32 = 6;

/// Every device reports each second; temperatures swing across the thresholds with a
/// device-specific phase; every tenth device is silent from 100 s to 140 s.
fn scenario(t0: DateTime<Utc>) -> Vec<Telemetry> {
    let mut out = Vec::with_capacity(DEVICES * SECONDS as usize);
    for i in 0..SECONDS {
        for d in 0..DEVICES {
            if d % 10 == 0 && (100..140).contains(&i) {
                continue;
            }
            let phase = (i as f64 + d as f64 * 7.0) / 13.0;
            let noise = ((d * 31 + i as usize * 17) % 7) as f64 - 3.0;
            let temp = 22.0 + 12.0 * phase.sin() + noise;
            out.push(reading(
                TENANT,
                &format!("dev-{d:04}"),
                t0 + chrono::Duration::seconds(i),
                &[("temp", temp)],
            ));
        }
    }
    out
}

/// A database with the tenant, devices, rules and the scenario's telemetry (what the sink
/// would have stored), and a topic pair with the scenario on it.
async fn setup(readings: &[Telemetry]) -> Result<(TestDb, TestTopics)> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let devices: Vec<String> = (0..DEVICES).map(|d| format!("dev-{d:04}")).collect();
    let pairs: Vec<(&str, &str)> = devices.iter().map(|d| (TENANT, d.as_str())).collect();
    provision(&db.pool, &[TENANT], &pairs).await?;
    rule(
        &db.pool,
        TENANT,
        "hot",
        "kind='threshold'; metric='temp'; op='>'; threshold=30",
    )
    .await?;
    rule(
        &db.pool,
        TENANT,
        "hot for 5 s",
        "kind='threshold'; metric='temp'; op='>'; threshold=32; for_s=5; resolve_threshold=28",
    )
    .await?;
    rule(
        &db.pool,
        TENANT,
        "warm on average",
        "kind='window'; metric='temp'; agg='avg'; window_s=20; op='>'; threshold=28",
    )
    .await?;
    rule(&db.pool, TENANT, "silent", "kind='no_data'; no_data_s=20").await?;
    store_telemetry(&db.pool, readings).await?;
    // device_latest as a caught-up sink leaves it.
    sqlx::query(
        "INSERT INTO device_latest (tenant_id, device_id, time, msg_type, seq, metrics) \
         SELECT DISTINCT ON (tenant_id, device_id) tenant_id, device_id, time, msg_type, seq, metrics \
         FROM telemetry ORDER BY tenant_id, device_id, time DESC",
    )
    .execute(&db.pool)
    .await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    produce(&producer(&topics)?, &topics.args.telemetry_topic, readings).await?;
    Ok((db, topics))
}

/// Waits until the group has evaluated every message and the outbox is published.
async fn until_done(db: &TestDb, group: &str, total: i64) -> Result<()> {
    eventually(
        "every message evaluated and every event published",
        Duration::from_secs(180),
        || async {
            let stored = stored_total(&db.pool, group)
                .await
                .map_err(|e| e.to_string())?;
            let unsent = unsent(&db.pool).await.map_err(|e| e.to_string())?;
            if stored == total && unsent == 0 {
                Ok(())
            } else {
                Err(format!(
                    "stored {stored} of {total}, {unsent} events unsent"
                ))
            }
        },
    )
    .await
}

async fn results(
    db: &TestDb,
    topics: &TestTopics,
) -> Result<(Vec<AlertRow>, usize, BTreeSet<String>)> {
    let alerts = alerts(&db.pool).await?;
    let args = topics.args.clone();
    let (total, ids) =
        tokio::task::spawn_blocking(move || event_ids_on(&args, Duration::from_secs(3))).await??;
    Ok((alerts, total, ids))
}

/// The uninterrupted run, in-process.
async fn baseline(readings: &[Telemetry]) -> Result<(Vec<AlertRow>, BTreeSet<String>)> {
    let (db, topics) = setup(readings).await?;
    let group = format!("eval-{}", db.name);
    let shutdown = Shutdown::new();
    let task = tokio::spawn(evaluator_stream::run(
        config(&db, &topics, &group, &[])?,
        shutdown.clone(),
    ));
    until_done(&db, &group, readings.len() as i64).await?;
    shutdown.cancel();
    task.await??;
    let (alerts, total, ids) = results(&db, &topics).await?;
    assert_eq!(
        total,
        ids.len(),
        "an uninterrupted run sends each event once"
    );
    assert!(
        ids.len() > 100,
        "the scenario makes transitions: {}",
        ids.len()
    );
    Ok((alerts, ids))
}

/// Asserts two runs agree, printing only the differences.
fn same(
    got: &[AlertRow],
    want: &[AlertRow],
    got_ids: &BTreeSet<String>,
    want_ids: &BTreeSet<String>,
) {
    let g: BTreeSet<&AlertRow> = got.iter().collect();
    let w: BTreeSet<&AlertRow> = want.iter().collect();
    let extra: Vec<_> = g.difference(&w).take(10).collect();
    let missing: Vec<_> = w.difference(&g).take(10).collect();
    assert!(
        got.len() == want.len() && extra.is_empty(),
        "alerts differ: {} vs {} rows; unexpected {extra:?}; missing {missing:?}",
        got.len(),
        want.len()
    );
    let extra: Vec<_> = got_ids.difference(want_ids).take(10).collect();
    let missing: Vec<_> = want_ids.difference(got_ids).take(10).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "event ids differ: {} vs {}; unexpected {extra:?}; missing {missing:?}",
        got_ids.len(),
        want_ids.len()
    );
}

/// A child evaluator killed when dropped, so a failing test leaves no process behind.
struct Evaluator(Child);

impl Drop for Evaluator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(db: &TestDb, topics: &TestTopics, group: &str) -> Result<Evaluator> {
    Ok(Evaluator(
        Command::new(BIN)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &topics.args.bootstrap_servers)
            .env("TELEMETRY_TOPIC", &topics.args.telemetry_topic)
            .env("ALERTS_TOPIC", &topics.args.alerts_topic)
            .env("EVALUATOR_GROUP_ID", group)
            .env("EVALUATOR_START_FROM", "earliest")
            .env("EVALUATOR_IDLE_TIMEOUT", "1h")
            .env("EVALUATOR_COMMIT_INTERVAL", "100ms")
            .env("ADMIN_LISTEN", "127.0.0.1:0")
            .env(
                "KAFKA_OPTIONS",
                "session.timeout.ms=6000,heartbeat.interval.ms=1000",
            )
            .env(
                "RUST_LOG",
                std::env::var("EVALUATOR_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_changes_nothing() -> Result<()> {
    let t0 = DateTime::<Utc>::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
    let readings = scenario(t0);
    let total = readings.len() as i64;
    let (want_alerts, want_ids) = baseline(&readings).await?;

    let (db, topics) = setup(&readings).await?;
    let group = format!("eval-{}", db.name);
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut last = 0;
    while kills < 5 {
        let mut child = spawn(&db, &topics, &group)?;
        // Kill once this run has made progress (or the outbox is still publishing), at a
        // random point after that.
        let progressed = eventually(
            "progress before the kill",
            Duration::from_secs(60),
            || async {
                let stored = stored_total(&db.pool, &group)
                    .await
                    .map_err(|e| e.to_string())?;
                if stored > last || stored == total {
                    Ok(stored)
                } else {
                    Err(format!("stored {stored}"))
                }
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        child.0.kill()?;
        child.0.wait()?;
        kills += 1;
        last = progressed;
    }
    let _child = spawn(&db, &topics, &group)?;
    until_done(&db, &group, total).await?;
    let (got_alerts, sent, got_ids) = results(&db, &topics).await?;
    same(&got_alerts, &want_alerts, &got_ids, &want_ids);
    assert!(sent >= got_ids.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_two_instances_changes_nothing() -> Result<()> {
    let t0 = DateTime::<Utc>::from_timestamp(Utc::now().timestamp() - 7200, 0).unwrap();
    let readings = scenario(t0);
    let total = readings.len() as i64;
    let (want_alerts, want_ids) = baseline(&readings).await?;

    let (db, topics) = setup(&readings).await?;
    let group = format!("eval-{}", db.name);
    let first = Shutdown::new();
    let first_task = tokio::spawn(evaluator_stream::run(
        config(&db, &topics, &group, &["--instance-id", "first"])?,
        first.clone(),
    ));
    eventually(
        "the first instance makes progress",
        Duration::from_secs(60),
        || async {
            match stored_total(&db.pool, &group).await {
                Ok(n) if n > 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    // A second member joins (partitions move), then the first leaves (they move again).
    let second = Shutdown::new();
    let second_task = tokio::spawn(evaluator_stream::run(
        config(&db, &topics, &group, &["--instance-id", "second"])?,
        second.clone(),
    ));
    let before = stored_total(&db.pool, &group).await?;
    eventually(
        "progress after the join",
        Duration::from_secs(60),
        || async {
            match stored_total(&db.pool, &group).await {
                Ok(n) if n > before || n == total => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    first.cancel();
    first_task.await??;
    until_done(&db, &group, total).await?;
    second.cancel();
    second_task.await??;
    let (got_alerts, _, got_ids) = results(&db, &topics).await?;
    same(&got_alerts, &want_alerts, &got_ids, &want_ids);
    Ok(())
}
