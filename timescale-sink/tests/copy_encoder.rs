//! The binary COPY encoder against a real server: every value written is read back unchanged,
//! in every storage layout the server offers.

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::{DateTime, TimeZone, Utc};
use plumbing::testing::{available_layouts, TestDb};
use schemas::{MetricValue, Telemetry};
use sqlx::Row;
use timescale_sink::copy_writer::{CopyEncoder, COPY_TELEMETRY_SQL};

fn rows(now: DateTime<Utc>) -> Vec<Telemetry> {
    (0..1000i64)
        .map(|i| {
            let mut metrics = BTreeMap::new();
            metrics.insert(
                "temperature".to_owned(),
                MetricValue::Double(20.0 + i as f64 / 8.0),
            );
            metrics.insert("count".to_owned(), MetricValue::Long(i64::MAX - i));
            metrics.insert("ok".to_owned(), MetricValue::Bool(i % 2 == 0));
            metrics.insert(
                "note".to_owned(),
                MetricValue::String(format!("ünïcødé \"quoted\" \\ {i} 🚚")),
            );
            metrics.insert("gone".to_owned(), MetricValue::Null);
            Telemetry {
                tenant_id: format!("tenant-{}", i % 3),
                device_id: format!("dev:{i:04}"),
                site_id: (i % 4 != 0).then(|| format!("site.{}", i % 5)),
                msg_type: if i % 10 == 0 {
                    "event".to_owned()
                } else {
                    "telemetry".to_owned()
                },
                seq: i - 500,
                // Recent readings, microsecond precision kept.
                time: now - chrono::Duration::microseconds(i * 1_000_003),
                received_at: now,
                metrics,
            }
        })
        .collect()
}

#[tokio::test]
async fn encoded_rows_copy_in_and_read_back_unchanged() -> Result<()> {
    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let now = Utc.timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        let rows = rows(now);
        let mut encoder = CopyEncoder::with_capacity(256 * rows.len());
        for row in &rows {
            encoder.push_telemetry(row)?;
        }
        assert_eq!(encoder.rows(), rows.len());

        let mut conn = db.pool.acquire().await?;
        let mut copy = conn.copy_in_raw(COPY_TELEMETRY_SQL).await?;
        copy.send(encoder.finish()).await?;
        let copied = copy.finish().await?;
        assert_eq!(copied, rows.len() as u64, "layout {}", db.layout);

        let stored = sqlx::query(
            "SELECT time, tenant_id, device_id, site_id, msg_type, seq, metrics FROM telemetry \
             ORDER BY device_id",
        )
        .fetch_all(&mut *conn)
        .await?;
        assert_eq!(stored.len(), rows.len());
        for (row, expected) in stored.iter().zip(&rows) {
            assert_eq!(row.try_get::<DateTime<Utc>, _>("time")?, expected.time);
            assert_eq!(row.try_get::<String, _>("tenant_id")?, expected.tenant_id);
            assert_eq!(row.try_get::<String, _>("device_id")?, expected.device_id);
            assert_eq!(
                row.try_get::<Option<String>, _>("site_id")?,
                expected.site_id
            );
            assert_eq!(row.try_get::<String, _>("msg_type")?, expected.msg_type);
            assert_eq!(row.try_get::<i64, _>("seq")?, expected.seq);
            assert_eq!(
                row.try_get::<serde_json::Value, _>("metrics")?,
                expected.metrics_json()
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_row_the_database_rejects_fails_the_copy_and_writes_nothing() -> Result<()> {
    let db = TestDb::new(schemas::LayoutChoice::Postgres).await?;
    let mut good = rows(Utc::now());
    good.truncate(10);
    let mut bad = good[0].clone();
    // PostgreSQL text cannot hold NUL: the server rejects this row.
    bad.device_id = "nul\0byte".to_owned();
    let mut encoder = CopyEncoder::default();
    for row in good.iter().chain(std::iter::once(&bad)) {
        encoder.push_telemetry(row)?;
    }
    let mut conn = db.pool.acquire().await?;
    let mut copy = conn.copy_in_raw(COPY_TELEMETRY_SQL).await?;
    copy.send(encoder.finish()).await?;
    let err = copy
        .finish()
        .await
        .expect_err("NUL in text must be rejected");
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("22021"), "{err}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&mut *conn)
        .await?;
    assert_eq!(count, 0);
    Ok(())
}
