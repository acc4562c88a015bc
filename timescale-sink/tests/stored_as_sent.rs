//! Property: every reading ingest accepts is stored as the documented semantics say, compared
//! field by field (the database leg; `ingest-producer/tests/body_semantics.rs` is the body →
//! record leg). Generated readings hold every value ingest lets through — integers over the
//! whole i64 range, doubles of every finite bit pattern (subnormals, extremes, -0.0), strings
//! of any Unicode but U+0000, booleans, nulls — and share points, so merges are covered too.
//! They go through the real batch transaction in batches of random sizes; the expected rows
//! come from an independent model of the rule (one point per tenant, device and time; per
//! metric the last reading wins).
//!
//! Documented exceptions, checked as such: `-0.0` is stored as `0` (PostgreSQL's `numeric` has
//! no negative zero); a double is compared by value (jsonb keeps numbers, so `1e20` reads back
//! as `100000000000000000000`, the same double).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
use plumbing::testing::{available_layouts, TestDb, TestTopics};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rand::Rng;
use schemas::{MetricValue, Telemetry};
use timescale_sink::batch::{Batch, RawMessage};
use timescale_sink::writer::Outcome;
use tokio_util::sync::CancellationToken;

const READINGS: usize = 10_000;

fn value() -> BoxedStrategy<MetricValue> {
    prop_oneof![
        Just(MetricValue::Null),
        any::<bool>().prop_map(MetricValue::Bool),
        any::<i64>().prop_map(MetricValue::Long),
        prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0), Just(-1)].prop_map(MetricValue::Long),
        // Every finite bit pattern, subnormals included.
        any::<u64>()
            .prop_map(f64::from_bits)
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(MetricValue::Double),
        prop_oneof![
            Just(f64::MAX),
            Just(f64::MIN),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            Just(-0.0),
            Just(0.1),
            Just(1e20),
            Just(21.5)
        ]
        .prop_map(MetricValue::Double),
        // Any Unicode but U+0000 (ingest refuses it), escapes and astral characters included.
        "[^\u{0}]{0,40}".prop_map(MetricValue::String),
    ]
    .boxed()
}

/// A generated reading: device number, second, metrics.
type Generated = (u8, u8, BTreeMap<String, MetricValue>);

/// Readings of few devices and seconds, so points are shared.
fn readings() -> BoxedStrategy<Vec<Generated>> {
    let metrics = prop::collection::btree_map("[a-z][a-z0-9_.:-]{0,8}", value(), 1..6);
    prop::collection::vec((0u8..40, 0u8..60, metrics), READINGS..=READINGS).boxed()
}

/// The value as read back from `jsonb`, against the value sent.
fn assert_same(sent: &MetricValue, stored: &serde_json::Value, at: &str) {
    match (sent, stored) {
        (MetricValue::Null, serde_json::Value::Null) => {}
        (MetricValue::Bool(a), serde_json::Value::Bool(b)) => assert_eq!(a, b, "{at}"),
        (MetricValue::String(a), serde_json::Value::String(b)) => assert_eq!(a, b, "{at}"),
        (MetricValue::Long(a), serde_json::Value::Number(b)) => {
            assert_eq!(Some(*a), b.as_i64(), "{at}: integer stored exactly")
        }
        (MetricValue::Double(a), serde_json::Value::Number(b)) => {
            // Parsed from the stored text as a double, whatever form it has.
            let back: f64 = b.to_string().parse().unwrap();
            let expected = if *a == 0.0 { 0.0 } else { *a };
            assert_eq!(
                back.to_bits(),
                expected.to_bits(),
                "{at}: double {a:e} read back as {b}"
            );
        }
        _ => panic!("{at}: sent {sent:?}, stored {stored}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_reading_is_stored_as_sent_field_by_field() -> Result<()> {
    let mut runner = TestRunner::new(Config {
        cases: 1,
        ..Config::default()
    });
    let generated = readings().new_tree(&mut runner).unwrap().current();
    let base = DateTime::from_timestamp(Utc::now().timestamp() - 3_600, 0).unwrap();
    let rows: Vec<Telemetry> = generated
        .iter()
        .enumerate()
        .map(|(i, (device, second, metrics))| Telemetry {
            tenant_id: format!("tenant-{}", device % 3),
            device_id: format!("device-{device}"),
            site_id: (device % 2 == 0).then(|| format!("site-{}", device % 5)),
            msg_type: "telemetry".to_owned(),
            seq: i as i64,
            time: base + chrono::Duration::seconds(i64::from(*second)),
            received_at: Utc::now(),
            metrics: metrics.clone(),
        })
        .collect();
    // The model: one point per (tenant, device, time), per metric the last reading's value.
    let mut expected: BTreeMap<(String, String, DateTime<Utc>), BTreeMap<String, MetricValue>> =
        BTreeMap::new();
    for r in &rows {
        expected
            .entry((r.tenant_id.clone(), r.device_id.clone(), r.time))
            .or_default()
            .extend(r.metrics.clone());
    }

    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let topics = TestTopics::new(1).await?;
        let (writer, _) = common::batch_writer(&db, &topics)?;
        let never = CancellationToken::new();
        let mut offset = 0usize;
        while offset < rows.len() {
            let size = rand::rng().random_range(1..=1_500).min(rows.len() - offset);
            let mut batch = Batch::with_capacity(size);
            for (i, row) in rows[offset..offset + size].iter().enumerate() {
                let message = RawMessage {
                    partition: 0,
                    offset: (offset + i) as i64,
                    payload: Vec::new(),
                    traceparent: None,
                };
                batch.push(
                    message,
                    (offset > 0).then_some(offset as i64),
                    Ok(row.clone()),
                );
            }
            offset += size;
            let outcome = writer.write(batch, &never).await;
            assert!(
                matches!(
                    outcome,
                    Outcome::Committed {
                        dead_letters: 0,
                        ..
                    }
                ),
                "{outcome:?}"
            );
        }
        let stored: Vec<(String, String, DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
            "SELECT tenant_id::text, device_id::text, time, metrics FROM telemetry \
             ORDER BY tenant_id, device_id, time",
        )
        .fetch_all(&db.pool)
        .await?;
        assert_eq!(
            stored.len(),
            expected.len(),
            "{layout:?}: one row per point"
        );
        for ((tenant, device, time, metrics), ((t, d, at), sent)) in stored.iter().zip(&expected) {
            assert_eq!((tenant, device, time), (t, d, at));
            let metrics = metrics.as_object().unwrap();
            assert_eq!(
                metrics.keys().collect::<Vec<_>>(),
                sent.keys().collect::<Vec<_>>(),
                "{tenant}/{device} at {time}"
            );
            for (name, value) in sent {
                assert_same(
                    value,
                    &metrics[name],
                    &format!("{tenant}/{device} at {time}: {name}"),
                );
            }
        }
    }
    Ok(())
}
