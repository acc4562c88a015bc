//! One point per (tenant, device, time): readings that share it are merged, exactly, whatever
//! the batch boundaries, on both layouts, into compressed TimescaleDB chunks too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::Result;
use common::SplitSensors;
use plumbing::testing::{available_layouts, TestDb, TestTopics};
use rand::Rng;
use schemas::LayoutChoice;
use timescale_sink::batch::{Batch, RawMessage};
use timescale_sink::writer::{BatchWriter, Outcome};
use tokio_util::sync::CancellationToken;

/// Writes `indexes` of `fleet` as partition 0 from offset `first_offset` on, in batches of
/// random sizes, as the consumer would. Returns (rows, merged, duplicates).
async fn write_in_random_batches(
    writer: &BatchWriter,
    fleet: &SplitSensors,
    indexes: &[usize],
    first_offset: i64,
) -> Result<(u64, u64, u64)> {
    let never = CancellationToken::new();
    let (mut rows, mut merged, mut duplicates) = (0, 0, 0);
    let mut offset = first_offset;
    let mut rest = indexes;
    while !rest.is_empty() {
        let size = rand::rng().random_range(1..=3_000).min(rest.len());
        let (now, later) = rest.split_at(size);
        rest = later;
        let expected = (offset > 0).then_some(offset);
        let mut batch = Batch::with_capacity(size);
        for &i in now {
            let message = RawMessage {
                partition: 0,
                offset,
                payload: fleet.messages[i].1.clone(),
                traceparent: None,
            };
            offset += 1;
            batch.push(message, expected, Ok(fleet.readings[i].clone()));
        }
        match writer.write(batch, &never).await {
            Outcome::Committed {
                rows: r,
                merged: m,
                duplicates: d,
                dead_letters: 0,
            } => {
                rows += r;
                merged += m;
                duplicates += d;
            }
            other => panic!("batch not committed cleanly: {other:?}"),
        }
    }
    Ok((rows, merged, duplicates))
}

/// 1,000 devices report temperature and humidity in separate messages at the same
/// timestamps, interleaved with exact re-sends, in batches of random sizes: every point holds
/// both metrics once, `device_latest` shows both with their own times, and each reading is
/// accounted exactly (new point, merged, or duplicate).
#[tokio::test]
async fn split_sensor_readings_merge_into_one_point_and_are_accounted_exactly() -> Result<()> {
    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let topics = TestTopics::new(1).await?;
        let (writer, stats) = common::batch_writer(&db, &topics)?;
        let fleet = SplitSensors::new(1_000, 12, 9);
        let all: Vec<usize> = (0..fleet.messages.len()).collect();
        let (rows, merged, duplicates) = write_in_random_batches(&writer, &fleet, &all, 0).await?;
        assert_eq!(
            (rows, merged, duplicates),
            (fleet.points(), fleet.merged(), fleet.resends),
            "{layout:?}: (new points, merged, duplicates)"
        );
        assert_eq!(stats.duplicates(), fleet.resends);
        assert_eq!(stats.merged(), fleet.merged());
        fleet.assert_stored(&db.pool).await?;
    }
    Ok(())
}

/// The temperature readings are stored and their chunk compressed; then the humidity
/// readings and the re-sends arrive. TimescaleDB merges them into the compressed chunk.
#[tokio::test]
async fn readings_merge_into_a_compressed_timescaledb_chunk() -> Result<()> {
    if !available_layouts()
        .await?
        .contains(&LayoutChoice::TimescaleDb)
    {
        eprintln!("skipped: this PostgreSQL server does not offer the timescaledb extension");
        return Ok(());
    }
    let db = TestDb::new(LayoutChoice::TimescaleDb).await?;
    let topics = TestTopics::new(1).await?;
    let (writer, _stats) = common::batch_writer(&db, &topics)?;
    let fleet = SplitSensors::new(300, 6, 5);
    let is_first_temperature = |i: usize| {
        fleet.readings[i].metrics.contains_key("temperature")
            && (i == 0 || fleet.messages[i - 1].1 != fleet.messages[i].1)
    };
    let first: Vec<usize> = (0..fleet.messages.len())
        .filter(|&i| is_first_temperature(i))
        .collect();
    let rest: Vec<usize> = (0..fleet.messages.len())
        .filter(|&i| !is_first_temperature(i))
        .collect();
    let (rows, merged, _) = write_in_random_batches(&writer, &fleet, &first, 0).await?;
    assert_eq!((rows, merged), (fleet.points(), 0));
    let compressed: i64 =
        sqlx::query_scalar("SELECT count(compress_chunk(c)) FROM show_chunks('telemetry') c")
            .fetch_one(&db.pool)
            .await?;
    assert!(compressed >= 1);
    let uncompressed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'telemetry' AND NOT is_compressed",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(uncompressed, 0, "every telemetry chunk is compressed");
    // Two halves, the second through a writer that remembers nothing (as after a restart):
    // either way the COPY meets the compressed points and the batch is merged.
    let (one, two) = rest.split_at(rest.len() / 2);
    let a = write_in_random_batches(&writer, &fleet, one, first.len() as i64).await?;
    let (fresh, _) = common::batch_writer(&db, &topics)?;
    let b = write_in_random_batches(&fresh, &fleet, two, (first.len() + one.len()) as i64).await?;
    assert_eq!(
        (a.0 + b.0, a.1 + b.1, a.2 + b.2),
        (0, fleet.merged(), fleet.resends),
        "(new points, merged, duplicates) of the second part"
    );
    fleet.assert_stored(&db.pool).await?;
    Ok(())
}

/// `device_latest` per metric: a reading older than the stored row only updates the metrics
/// whose stored value is older still, and every metric keeps its own time.
#[tokio::test]
async fn an_older_reading_updates_only_the_metrics_it_has_newer() -> Result<()> {
    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let topics = TestTopics::new(1).await?;
        let (writer, _) = common::batch_writer(&db, &topics)?;
        let never = CancellationToken::new();
        let t0 = chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let reading = |seq: i64, time, metrics: &[(&str, f64)]| schemas::Telemetry {
            tenant_id: "acme".into(),
            device_id: "d1".into(),
            site_id: None,
            msg_type: "telemetry".into(),
            seq,
            time,
            received_at: time,
            metrics: metrics
                .iter()
                .map(|(k, v)| ((*k).to_owned(), schemas::MetricValue::Double(*v)))
                .collect(),
        };
        let batches = [
            vec![reading(1, at(10), &[("a", 1.0), ("b", 2.0)])],
            // Older than the row: `a` stays (newer stored), `c` is new, `b` untouched.
            vec![reading(2, at(5), &[("a", 9.0), ("c", 3.0)])],
            // Newer, without `b` and `c`: they keep their values and times.
            vec![reading(3, at(20), &[("a", 4.0)])],
        ];
        for (offset, rows) in batches.into_iter().enumerate() {
            let mut batch = Batch::with_capacity(1);
            for r in rows {
                let message = RawMessage {
                    partition: 0,
                    offset: offset as i64,
                    payload: Vec::new(),
                    traceparent: None,
                };
                batch.push(message, (offset > 0).then_some(offset as i64), Ok(r));
            }
            assert!(matches!(
                writer.write(batch, &never).await,
                Outcome::Committed { rows: 1, .. }
            ));
        }
        let (time, seq, metrics, metric_times, keys): (
            chrono::DateTime<chrono::Utc>,
            i64,
            serde_json::Value,
            serde_json::Value,
            Vec<String>,
        ) = sqlx::query_as(
            "SELECT time, seq, metrics, metric_times, metric_keys FROM device_latest",
        )
        .fetch_one(&db.pool)
        .await?;
        assert_eq!((time, seq), (at(20), 3), "{layout:?}");
        assert_eq!(metrics, serde_json::json!({"a": 4.0, "b": 2.0, "c": 3.0}));
        assert_eq!(
            metric_times,
            serde_json::json!({"b": at(10).timestamp_micros(), "c": at(5).timestamp_micros()})
        );
        assert_eq!(keys, ["a", "b", "c"]);
    }
    Ok(())
}
