//! The batch transaction on its own: fencing and duplicate counting, exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use common::reading;
use plumbing::testing::{TestDb, TestTopics};
use schemas::LayoutChoice;

use timescale_sink::batch::{Batch, RawMessage};
use timescale_sink::writer::Outcome;
use tokio_util::sync::CancellationToken;

/// Readings `seqs` of device 1 on partition 0 at offsets `first..`, expecting `expected`.
fn batch(first_offset: i64, seqs: std::ops::Range<i64>, expected: Option<i64>) -> Batch {
    let codec = schemas::telemetry_codec().unwrap();
    // A fixed base, so the same seq is the same reading (same key) in every batch.
    let base = chrono::Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let mut batch = Batch::with_capacity(16);
    for (i, seq) in seqs.enumerate() {
        let r = reading("acme", 1, seq, base + chrono::Duration::seconds(seq));
        let payload = codec.encode(&r).unwrap();
        let message = RawMessage {
            partition: 0,
            offset: first_offset + i as i64,
            payload,
            traceparent: None,
        };
        batch.push(message, expected, Ok(r));
    }
    batch
}

#[tokio::test]
async fn a_batch_whose_start_no_longer_matches_the_stored_offset_rolls_back_and_is_counted(
) -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let (writer, stats) = common::batch_writer(&db, &topics)?;
    let never = CancellationToken::new();
    assert!(matches!(
        writer.write(batch(0, 0..10, None), &never).await,
        Outcome::Committed { rows: 10, .. }
    ));
    // A zombie's batch that started where the offset was before the first commit.
    assert_eq!(
        writer.write(batch(0, 100..105, Some(0)), &never).await,
        Outcome::Fenced
    );
    // A batch expecting no stored row at all, while one exists.
    assert_eq!(
        writer.write(batch(0, 200..205, None), &never).await,
        Outcome::Fenced
    );
    assert_eq!(stats.fenced_batches(), 2);
    let (rows, next): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM telemetry), (SELECT next_offset FROM consumer_offsets WHERE consumer_group = 'g')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!((rows, next), (10, 10), "fenced batches wrote nothing");
    // The rightful next batch applies.
    assert!(matches!(
        writer.write(batch(10, 10..15, Some(10)), &never).await,
        Outcome::Committed { rows: 5, .. }
    ));
    Ok(())
}

#[tokio::test]
async fn re_sent_readings_are_skipped_and_counted_exactly() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let (writer, stats) = common::batch_writer(&db, &topics)?;
    let never = CancellationToken::new();
    assert_eq!(
        writer.write(batch(0, 0..100, None), &never).await,
        Outcome::Committed {
            rows: 100,
            merged: 0,
            duplicates: 0,
            dead_letters: 0
        }
    );
    // The same 100 readings again (a whole batch re-sent) plus 3 new ones.
    assert_eq!(
        writer.write(batch(100, 0..103, Some(100)), &never).await,
        Outcome::Committed {
            rows: 3,
            merged: 0,
            duplicates: 100,
            dead_letters: 0
        }
    );
    assert_eq!(stats.duplicates(), 100);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 103);
    let latest: i64 = sqlx::query_scalar("SELECT seq FROM device_latest")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(latest, 102);
    Ok(())
}

/// Readings of `acme`'s devices on partition 0 at (device, time), offsets from
/// `first_offset`, each with the metrics `edit` leaves.
fn batch_of(
    first_offset: i64,
    readings: &[(usize, chrono::DateTime<chrono::Utc>)],
    edit: impl Fn(&mut schemas::Telemetry),
) -> Batch {
    let codec = schemas::telemetry_codec().unwrap();
    let mut batch = Batch::with_capacity(readings.len());
    for (i, (device, time)) in readings.iter().enumerate() {
        let mut r = reading("acme", *device, first_offset + i as i64, *time);
        edit(&mut r);
        let payload = codec.encode(&r).unwrap();
        let message = RawMessage {
            partition: 0,
            offset: first_offset + i as i64,
            payload,
            traceparent: None,
        };
        let expected = (first_offset > 0).then_some(first_offset);
        batch.push(message, expected, Ok(r));
    }
    batch
}

/// A fresh database of `layout` with tenant `acme`, and a batch writer on it.
async fn acme_writer(
    layout: LayoutChoice,
) -> Result<(
    TestDb,
    TestTopics,
    timescale_sink::writer::BatchWriter,
    std::sync::Arc<timescale_sink::stats::Stats>,
)> {
    let db = TestDb::new(layout).await?;
    let topics = TestTopics::new(1).await?;
    let (writer, stats) = common::batch_writer(&db, &topics)?;
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'acme')")
        .execute(&db.pool)
        .await?;
    Ok((db, topics, writer, stats))
}

/// Device minutes waiting for the rollup to recompute: (device, minute), sorted.
async fn invalidated_minutes(db: &TestDb) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT device_id, bucket FROM telemetry_1m_invalid_minutes ORDER BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await?)
}

fn minute_of(t: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let micros = t.timestamp_micros();
    chrono::DateTime::from_timestamp_micros(micros - micros.rem_euclid(60_000_000)).unwrap()
}

/// Microseconds, as the database stores them.
fn now_micros() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(chrono::Utc::now().timestamp_micros()).unwrap()
}

fn maintenance(
    db: &TestDb,
    stats: std::sync::Arc<timescale_sink::stats::Stats>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(timescale_sink::maintenance::run(
        db.pool.clone(),
        3,
        timescale_sink::maintenance::Intervals {
            partitions: Duration::from_secs(3600),
            rollup: Duration::from_millis(20),
            rollup_nice: 10,
        },
        stats,
        shutdown.clone(),
    ))
}

/// The batch transaction records the device minute of each late reading for the rollup
/// (readings older than the database clock minus the settle time) and nothing for live
/// readings: a 2-day-old reading of one device among live readings of another marks that one
/// device minute, not the ~2,880 minutes between them for every device. The maintenance
/// task's refresh then recomputes exactly those device minutes.
#[tokio::test]
async fn a_late_reading_marks_only_its_own_device_minute_for_the_rollup() -> Result<()> {
    for layout in plumbing::testing::available_layouts().await? {
        late_reading_in(layout).await?;
    }
    Ok(())
}

async fn late_reading_in(layout: LayoutChoice) -> Result<()> {
    let (db, _topics, writer, stats) = acme_writer(layout).await?;
    let never = CancellationToken::new();
    let now = now_micros();
    let live = [
        (1, now - chrono::Duration::seconds(5)),
        (2, now - chrono::Duration::seconds(2)),
    ];
    assert!(matches!(
        writer.write(batch_of(0, &live, |_| ()), &never).await,
        Outcome::Committed { rows: 2, .. }
    ));
    assert_eq!(
        invalidated_minutes(&db).await?,
        vec![],
        "live readings are not late"
    );
    // The rollup is running: its watermark starts at the live readings' minute.
    timescale_sink::maintenance::refresh_rollup(&db.pool).await?;

    let two_days_ago = now - chrono::Duration::days(2);
    let late = [
        (1, now - chrono::Duration::seconds(1)),
        (2, two_days_ago),
        (2, two_days_ago + chrono::Duration::seconds(1)),
        (3, now - chrono::Duration::minutes(30)),
        (1, now),
    ];
    assert!(matches!(
        writer.write(batch_of(2, &late, |_| ()), &never).await,
        Outcome::Committed { rows: 5, .. }
    ));
    let mut want = vec![
        ("dev-000002".to_owned(), minute_of(two_days_ago)),
        (
            "dev-000003".to_owned(),
            minute_of(now - chrono::Duration::minutes(30)),
        ),
    ];
    if minute_of(two_days_ago + chrono::Duration::seconds(1)) != minute_of(two_days_ago) {
        want.insert(
            1,
            (
                "dev-000002".to_owned(),
                minute_of(two_days_ago + chrono::Duration::seconds(1)),
            ),
        );
    }
    assert_eq!(invalidated_minutes(&db).await?, want, "{layout:?}");

    let shutdown = CancellationToken::new();
    let task = maintenance(&db, stats.clone(), &shutdown);
    // Everything below the watermark, each reading once (one snapshot: a refresh commits
    // the watermark and its rows together).
    let (rolled_up, expected) = plumbing::testing::eventually(
        "the refresh consumed the invalidations and rolled the readings up",
        Duration::from_secs(30),
        || async {
            let (pending, rolled_up, expected): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM telemetry_1m_invalid_minutes), \
                        (SELECT COALESCE(sum(n), 0)::int8 FROM telemetry_1m WHERE metric = 'battery'), \
                        (SELECT count(*) FROM telemetry WHERE time < s.watermark) \
                 FROM telemetry_1m_state s",
            )
            .fetch_one(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
            if pending == 0 && expected >= 3 {
                Ok((rolled_up, expected))
            } else {
                Err(format!("pending {pending}, rolled up {rolled_up} of {expected}"))
            }
        },
    )
    .await?;
    if rolled_up != expected {
        // Per device minute below the watermark: readings stored, readings rolled up.
        let detail: Vec<(String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT t.device_id, date_bin('1 minute', t.time, '2000-01-01')::text, count(*), \
                    (SELECT r.n FROM telemetry_1m r WHERE r.device_id = t.device_id \
                       AND r.metric = 'battery' \
                       AND r.bucket = date_bin('1 minute', t.time, '2000-01-01')) \
             FROM telemetry t, telemetry_1m_state s WHERE t.time < s.watermark \
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&db.pool)
        .await?;
        let watermark: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT watermark FROM telemetry_1m_state")
                .fetch_one(&db.pool)
                .await?;
        panic!(
            "{layout:?}: {rolled_up} readings rolled up, {expected} below the watermark \
             {watermark:?} (now was {now}): {detail:?}"
        );
    }
    assert_eq!(stats.rollup_device_minutes_pending(), 0);
    assert!(
        stats.rollup_lag() < 180.0,
        "{layout:?}: the rollups stay within their normal lag ({} s)",
        stats.rollup_lag()
    );
    shutdown.cancel();
    task.await?;
    Ok(())
}

/// Readings of f64::MAX-sized values (what devices send for "sensor absent") in one minute
/// overflowed the rollup's double-precision sum and stopped the refresh for every tenant. Now
/// the refresh goes on, the sum is exact, and the minute's average is the readings' average.
#[tokio::test]
async fn readings_near_the_double_precision_limit_do_not_stop_the_rollups() -> Result<()> {
    for layout in plumbing::testing::available_layouts().await? {
        let (db, _topics, writer, stats) = acme_writer(layout).await?;
        let never = CancellationToken::new();
        // Three minutes ago, two readings of device 1 with 1.5e308, one of device 2 with 20.
        let minute = minute_of(now_micros() - chrono::Duration::minutes(3));
        let readings = [
            (1, minute + chrono::Duration::seconds(1)),
            (1, minute + chrono::Duration::seconds(2)),
            (2, minute + chrono::Duration::seconds(3)),
        ];
        let batch = batch_of(0, &readings, |r| {
            let v = if r.device_id == "dev-000001" {
                1.5e308
            } else {
                20.0
            };
            r.metrics
                .insert("temperature".to_owned(), schemas::MetricValue::Double(v));
        });
        assert!(matches!(
            writer.write(batch, &never).await,
            Outcome::Committed { rows: 3, .. }
        ));
        let shutdown = CancellationToken::new();
        let task = maintenance(&db, stats.clone(), &shutdown);
        plumbing::testing::eventually(
            "the watermark passed the minute",
            Duration::from_secs(30),
            || async {
                let passed: bool = sqlx::query_scalar(
                    "SELECT COALESCE(watermark > $1, false) FROM telemetry_1m_state",
                )
                .bind(minute)
                .fetch_one(&db.pool)
                .await
                .map_err(|e| e.to_string())?;
                passed.then_some(()).ok_or_else(|| "not yet".to_owned())
            },
        )
        .await?;
        shutdown.cancel();
        task.await?;
        let rows: Vec<(String, i64, String, f64, f64)> = sqlx::query_as(
            "SELECT device_id, n, sum::text, fleet_float8(sum / n), max FROM telemetry_1m \
             WHERE metric = 'temperature' AND bucket = $1 ORDER BY device_id",
        )
        .bind(minute)
        .fetch_all(&db.pool)
        .await?;
        let big = format!("3{}", "0".repeat(308));
        assert_eq!(
            rows,
            vec![
                ("dev-000001".to_owned(), 2, big, 1.5e308, 1.5e308),
                ("dev-000002".to_owned(), 1, "20.0".to_owned(), 20.0, 20.0),
            ],
            "{layout:?}"
        );
        assert!(
            stats.rollup_lag() < 180.0,
            "{layout:?}: the rollup lag stays bounded"
        );
    }
    Ok(())
}

/// A shutdown while a rollup step runs: the step is cancelled on the server and none starts
/// after it, so the maintenance task ends at once. (Before, a SIGTERM waited for a catch-up
/// step of minutes, then started another: 82 s against a 30 s shutdown deadline.) The step
/// here is held by a lock on the rollup state row, as a long step would be by its work.
#[tokio::test]
async fn shutdown_cancels_a_rollup_step_in_progress_and_starts_none() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let mut blocker = db.pool.begin().await?;
    sqlx::query("SELECT 1 FROM telemetry_1m_state FOR UPDATE")
        .execute(&mut *blocker)
        .await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(timescale_sink::maintenance::run(
        db.pool.clone(),
        3,
        timescale_sink::maintenance::Intervals {
            partitions: Duration::from_secs(3600),
            rollup: Duration::from_millis(20),
            rollup_nice: 10,
        },
        Default::default(),
        shutdown.clone(),
    ));
    let steps = |state: &'static str| {
        let pool = db.pool.clone();
        let name = db.name.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = $2 \
                 AND query LIKE '%FROM fleet_refresh_rollup_1m_plan(%' AND pid <> pg_backend_pid()",
            )
            .bind(name)
            .bind(state)
            .fetch_one(&pool)
            .await
        }
    };
    plumbing::testing::eventually(
        "a rollup step waiting on the state row",
        Duration::from_secs(30),
        || async {
            match steps("active").await {
                Ok(n) if n >= 1 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the maintenance task ends while the step's lock is still held")?;
    // The backend reports itself idle a moment after the client has the cancellation error.
    plumbing::testing::eventually(
        "no rollup step left running",
        Duration::from_secs(5),
        || async {
            match steps("active").await {
                Ok(0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    blocker.rollback().await?;
    let watermark: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT watermark FROM telemetry_1m_state")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(watermark, None, "the cancelled step rolled back");
    Ok(())
}

/// A sink that has fallen behind holds the rollups back (migration 0015): the refresh does
/// not aggregate the minutes the sink is still writing, so the readings it writes while it
/// catches up are rolled up once and nothing is recomputed. (With the horizon at the clock
/// minus the settle time, the first refresh would roll up the 4-minute-old readings, and
/// the catching-up batch's readings would land in aggregated minutes and be recomputed.)
#[tokio::test]
async fn a_sink_behind_holds_the_rollups_back_so_nothing_is_recomputed() -> Result<()> {
    for layout in plumbing::testing::available_layouts().await? {
        sink_behind_in(layout).await?;
    }
    Ok(())
}

async fn sink_behind_in(layout: LayoutChoice) -> Result<()> {
    let (db, _topics, writer, _stats) = acme_writer(layout).await?;
    let never = CancellationToken::new();
    let now = now_micros();
    let ago = |s: i64| now - chrono::Duration::seconds(s);
    // Readings received when they were taken: the sink stores them `lag` after.
    let received_when_taken = |r: &mut schemas::Telemetry| r.received_at = r.time;

    let behind = [(1, ago(240)), (2, ago(239))];
    assert!(matches!(
        writer
            .write(batch_of(0, &behind, received_when_taken), &never)
            .await,
        Outcome::Committed { rows: 2, .. }
    ));
    let stored_through: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT stored_through FROM consumer_offsets WHERE partition = 0")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(stored_through, Some(ago(239)), "{layout:?}");

    let first = timescale_sink::maintenance::refresh_rollup(&db.pool).await?;
    let watermark = first.watermark.expect("a watermark");
    assert!(
        watermark <= ago(240),
        "{layout:?}: the horizon stays behind what the sink stored ({watermark} > {})",
        ago(240)
    );
    assert_eq!(first.rows_written, 0, "{layout:?}: nothing rolled up yet");

    // The sink catches up: readings of 3 to 2 minutes ago, then live ones.
    let catching_up: Vec<(usize, chrono::DateTime<chrono::Utc>)> = (0..13)
        .map(|i| (1 + i % 3, ago(185 - 5 * i as i64)))
        .collect();
    assert!(matches!(
        writer
            .write(batch_of(2, &catching_up, received_when_taken), &never)
            .await,
        Outcome::Committed { rows: 13, .. }
    ));
    let live = [(1, ago(2)), (2, ago(1))];
    assert!(matches!(
        writer
            .write(batch_of(15, &live, received_when_taken), &never)
            .await,
        Outcome::Committed { rows: 2, .. }
    ));

    let (mut recomputed, mut device_minutes_recomputed) = (0, 0);
    let mut last = first;
    for _ in 0..100 {
        last = timescale_sink::maintenance::refresh_rollup(&db.pool).await?;
        recomputed += last.minutes_recomputed;
        device_minutes_recomputed += last.device_minutes_recomputed;
        if !last.more {
            break;
        }
    }
    assert!(!last.more, "{layout:?}: the refresh finished");
    let watermark = last.watermark.expect("a watermark");
    // The horizon once caught up: the minute of the newest stored reading (1 s ago) minus
    // the settle time (1 minute), or later. So between 61 and 121 s ago, depending on where
    // in its minute the test runs; every catching-up reading (125 s ago or older) is below.
    let caught_up = chrono::DurationRound::duration_trunc(ago(61), chrono::Duration::minutes(1))?;
    assert!(
        watermark >= caught_up,
        "{layout:?}: once the sink caught up, the rollups caught up ({watermark} < {caught_up})"
    );
    assert_eq!(
        (recomputed, device_minutes_recomputed),
        (0, 0),
        "{layout:?}: nothing aggregated twice"
    );
    let (rolled_up, expected): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(n), 0)::int8 FROM telemetry_1m WHERE metric = 'battery'), \
                (SELECT count(*) FROM telemetry WHERE time < $1)",
    )
    .bind(watermark)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        rolled_up, expected,
        "{layout:?}: every reading rolled up once"
    );
    assert_eq!(
        expected, 15,
        "{layout:?}: {expected} readings below the watermark"
    );
    Ok(())
}
