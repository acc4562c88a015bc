//! Bucketed series equal hand-computed values on a known dataset, in every layout this server
//! offers (plain PostgreSQL always, TimescaleDB when installed), whether served from raw
//! readings or from the 1-minute rollups plus raw edges; limits are 400s naming them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{Fixture, OTHER, OWN};
use query_api::Limits;
use serde_json::{json, Value};
use sqlx::PgPool;

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap()
}

/// (seconds after base, metrics) of device `d1` of `acme`.
fn readings() -> Vec<(i64, Value)> {
    vec![
        (0, json!({"temp": 10, "hum": 1})),
        (20, json!({"temp": 20})),
        (50, json!({"temp": 30, "hum": 3})),
        (60, json!({"temp": 5, "on": true})),
        (100, json!({"temp": 7, "hum": "wet", "on": false})),
        (150, json!({"temp": 1.5, "on": true})),
        // `to` is exclusive: never counted.
        (180, json!({"temp": 1000})),
    ]
}

async fn load(pool: &PgPool) {
    for tenant in [OWN, OTHER] {
        sqlx::query("INSERT INTO devices (tenant_id, device_id) VALUES ($1, 'd1'), ($1, 'd2')")
            .bind(tenant)
            .execute(pool)
            .await
            .unwrap();
    }
    for (seq, (offset, metrics)) in readings().into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) VALUES ($1, $2, 'd1', $3, $4)",
        )
        .bind(base() + Duration::seconds(offset))
        .bind(OWN)
        .bind(seq as i64)
        .bind(metrics)
        .execute(pool)
        .await
        .unwrap();
    }
    // Same device id in the other tenant and another device of ours: never mixed in.
    for (tenant, device) in [(OTHER, "d1"), (OWN, "d2")] {
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
             SELECT $1 + s * interval '10 seconds', $2, $3, s, '{\"temp\": 999, \"hum\": 999}' \
             FROM generate_series(0, 17) s",
        )
        .bind(base())
        .bind(tenant)
        .bind(device)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// (agg, metric, points as (seconds after base, value)).
type Expected = (&'static str, &'static str, Vec<(i64, f64)>);

fn series_uri(query: &str) -> String {
    let from = base().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (base() + Duration::seconds(180)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!("/v1/devices/d1/telemetry?from={from}&to={to}&{query}")
}

/// (seconds after base, value) of `metric` in a series answer.
fn points(body: &Value, metric: &str) -> Vec<(i64, f64)> {
    let series = body["series"].as_array().unwrap();
    let one = series.iter().find(|s| s["metric"] == metric).unwrap();
    one["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let time: DateTime<Utc> = p["time"].as_str().unwrap().parse().unwrap();
            ((time - base()).num_seconds(), p["value"].as_f64().unwrap())
        })
        .collect()
}

/// Brings the 1-minute rollups up to date (one call: the budget covers the whole history).
async fn refresh(pool: &PgPool) -> DateTime<Utc> {
    let (watermark, more): (DateTime<Utc>, bool) =
        sqlx::query_as("SELECT watermark, more FROM fleet_refresh_rollup_1m(10000000)")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(!more, "one call with this budget does all the work");
    watermark
}

async fn rollup_rows(pool: &PgPool, tenant: &str, device: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM telemetry_1m WHERE tenant_id = $1 AND device_id = $2")
        .bind(tenant)
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn bucket_aggregates_equal_hand_computed_values_in_every_layout() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        load(&fx.owner).await;
        // First from raw readings only, then with the minutes rolled up.
        for rolled_up in [false, true] {
            if rolled_up {
                refresh(&fx.owner).await;
                assert_eq!(rollup_rows(&fx.owner, OWN, "d1").await, 7, "{layout:?}");
            }
            check_hand_computed(&fx, layout).await;
        }
    }
}

async fn check_hand_computed(fx: &Fixture, layout: schemas::LayoutChoice) {
    {
        let expected: [Expected; 8] = [
            ("avg", "temp", vec![(0, 20.0), (60, 6.0), (120, 1.5)]),
            ("min", "temp", vec![(0, 10.0), (60, 5.0), (120, 1.5)]),
            ("max", "temp", vec![(0, 30.0), (60, 7.0), (120, 1.5)]),
            ("last", "temp", vec![(0, 30.0), (60, 7.0), (120, 1.5)]),
            ("count", "temp", vec![(0, 3.0), (60, 2.0), (120, 1.0)]),
            // A string value is not a number: it is left out, not an error.
            ("avg", "hum", vec![(0, 2.0)]),
            ("last", "hum", vec![(0, 3.0)]),
            // Booleans count as 1 and 0.
            ("avg", "on", vec![(60, 0.5), (120, 1.0)]),
        ];
        for (agg, metric, want) in expected {
            let (status, body, text) = fx
                .get(
                    &series_uri(&format!("metrics=temp,hum,on&bucket=1m&agg={agg}")),
                    &fx.viewer,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{text}");
            assert_eq!(
                points(&body, metric),
                want,
                "{layout:?} {agg}({metric}): {text}"
            );
            assert_eq!(body["bucket_seconds"], 60);
            assert_eq!(body["agg"], agg);
        }
        let (_, body, text) = fx
            .get(&series_uri("metrics=temp&bucket=30s"), &fx.viewer)
            .await;
        assert_eq!(
            points(&body, "temp"),
            vec![(0, 15.0), (30, 30.0), (60, 5.0), (90, 7.0), (150, 1.5)],
            "{layout:?} 30s buckets default to avg: {text}"
        );
        let (_, body, text) = fx.get(&series_uri("metrics=temp"), &fx.viewer).await;
        assert_eq!(
            points(&body, "temp"),
            vec![
                (0, 10.0),
                (20, 20.0),
                (50, 30.0),
                (60, 5.0),
                (100, 7.0),
                (150, 1.5)
            ],
            "{layout:?} raw readings: {text}"
        );
        // The other tenant's d1 (all 999) is reachable to an operator naming it, never mixed in.
        let (_, body, _) = fx
            .get(
                &series_uri(&format!("metrics=temp&bucket=1m&agg=max&tenant={OTHER}")),
                &fx.operator,
            )
            .await;
        assert_eq!(
            points(&body, "temp"),
            vec![(0, 999.0), (60, 999.0), (120, 999.0)]
        );
    }
}

/// (metric, bucket, n, sum, min, max, last_time, last) of a `telemetry_1m` row.
type RollupRow = (
    String,
    DateTime<Utc>,
    i64,
    f64,
    f64,
    f64,
    DateTime<Utc>,
    f64,
);

/// The rollup rows of `acme/d1` equal the hand-computed per-minute aggregates: numbers and
/// booleans (as 1/0) only, strings and nulls neither values nor counted.
#[tokio::test]
async fn rollup_refresh_equals_hand_computed_aggregates() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        load(&fx.owner).await;
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
             VALUES ($1, $2, 'd1', 99, '{\"temp\": null, \"hum\": \"dry\", \"on\": false}')",
        )
        .bind(base() + Duration::seconds(200))
        .bind(OWN)
        .execute(&fx.owner)
        .await
        .unwrap();
        refresh(&fx.owner).await;
        let rows: Vec<RollupRow> = sqlx::query_as(
            "SELECT metric, bucket, n, sum::float8, min, max, last_time, last FROM telemetry_1m \
                 WHERE tenant_id = $1 AND device_id = 'd1' ORDER BY metric, bucket",
        )
        .bind(OWN)
        .fetch_all(&fx.owner)
        .await
        .unwrap();
        let at = |s: i64| base() + Duration::seconds(s);
        let want = vec![
            ("hum".to_owned(), at(0), 2, 4.0, 1.0, 3.0, at(50), 3.0),
            ("on".to_owned(), at(60), 2, 1.0, 0.0, 1.0, at(100), 0.0),
            ("on".to_owned(), at(120), 1, 1.0, 1.0, 1.0, at(150), 1.0),
            ("on".to_owned(), at(180), 1, 0.0, 0.0, 0.0, at(200), 0.0),
            ("temp".to_owned(), at(0), 3, 60.0, 10.0, 30.0, at(50), 30.0),
            ("temp".to_owned(), at(60), 2, 12.0, 5.0, 7.0, at(100), 7.0),
            ("temp".to_owned(), at(120), 1, 1.5, 1.5, 1.5, at(150), 1.5),
            (
                "temp".to_owned(),
                at(180),
                1,
                1000.0,
                1000.0,
                1000.0,
                at(180),
                1000.0,
            ),
        ];
        assert_eq!(rows, want, "{layout:?}");
        // The other tenant's device of the same id has its own rows.
        assert_eq!(rollup_rows(&fx.owner, OTHER, "d1").await, 6, "{layout:?}");
    }
}

/// A reading, its metrics, and their numeric values as the API sees them.
struct Reading {
    time: DateTime<Utc>,
    metrics: Value,
}

/// Readings of one device every 7 s (plus some microseconds) over 45 minutes starting
/// `start`: floats, a metric that is sometimes a string, booleans, nulls, gaps.
fn mixed_readings(start: DateTime<Utc>) -> Vec<Reading> {
    (0..386i64)
        .map(|i| {
            let mut metrics = serde_json::Map::new();
            if i % 9 != 4 {
                metrics.insert("temp".into(), json!(((i * 37) % 101) as f64 * 0.37 - 5.0));
            }
            metrics.insert(
                "hum".into(),
                if i % 5 == 0 {
                    json!("wet")
                } else {
                    json!(i % 13)
                },
            );
            metrics.insert("on".into(), json!(i % 3 == 0));
            metrics.insert("nul".into(), Value::Null);
            Reading {
                time: start + Duration::milliseconds(i * 7_000 + 123) + Duration::microseconds(456),
                metrics: Value::Object(metrics),
            }
        })
        .collect()
}

fn numeric(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// The raw path's answer computed here: (bucket start, value) per bucket with values.
fn reference(
    readings: &[Reading],
    metric: &str,
    agg: &str,
    bucket_s: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, f64)> {
    let origin = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
    let mut buckets: std::collections::BTreeMap<DateTime<Utc>, Vec<f64>> = Default::default();
    for r in readings.iter().filter(|r| r.time >= from && r.time < to) {
        if let Some(v) = r.metrics.get(metric).and_then(numeric) {
            let since = (r.time - origin).num_microseconds().unwrap();
            let width = bucket_s * 1_000_000;
            let start = origin + Duration::microseconds(since.div_euclid(width) * width);
            buckets.entry(start).or_default().push(v);
        }
    }
    buckets
        .into_iter()
        .map(|(start, vs)| {
            let value = match agg {
                "avg" => vs.iter().sum::<f64>() / vs.len() as f64,
                "min" => vs.iter().copied().fold(f64::INFINITY, f64::min),
                "max" => vs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                "last" => *vs.last().unwrap(),
                _ => vs.len() as f64,
            };
            // As the answer is read back: serde_json's default float parsing may land one bit
            // off the written value, the same way for both.
            let text = serde_json::to_string(&value).unwrap();
            (start, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn answer(body: &Value, metric: &str) -> Vec<(DateTime<Utc>, f64)> {
    let series = body["series"].as_array().unwrap();
    let one = series.iter().find(|s| s["metric"] == metric).unwrap();
    one["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["time"].as_str().unwrap().parse().unwrap(),
                p["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Equal, except that an average may differ from the reference in the last bits: the
/// reference adds doubles one by one, the API divides the exact sum of the stored decimals.
fn assert_same(got: &[(DateTime<Utc>, f64)], want: &[(DateTime<Utc>, f64)], agg: &str, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((gt, gv), (wt, wv)) in got.iter().zip(want) {
        assert_eq!(gt, wt, "{what}");
        if agg == "avg" {
            assert!(
                (gv - wv).abs() <= 1e-12 * wv.abs().max(1.0),
                "{what}: {gv} vs {wv} at {gt}"
            );
        } else {
            assert_eq!(gv, wv, "{what} at {gt}");
        }
    }
}

async fn insert_readings(pool: &PgPool, tenant: &str, readings: &[Reading]) {
    for (seq, r) in readings.iter().enumerate() {
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) VALUES ($1, $2, 'd1', $3, $4)",
        )
        .bind(r.time)
        .bind(tenant)
        .bind(seq as i64)
        .bind(&r.metrics)
        .execute(pool)
        .await
        .unwrap();
    }
}

fn floor_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let micros = t.timestamp_micros();
    DateTime::from_timestamp_micros(micros - micros.rem_euclid(60_000_000)).unwrap()
}

/// Rollups below the watermark plus raw readings at the edges and past the watermark answer
/// exactly what the raw readings alone give, for every aggregate, several whole-minute bucket
/// widths and a range that starts and ends inside minutes; the other tenant's device of the
/// same id never contributes.
#[tokio::test]
async fn series_from_rollups_and_raw_edges_equal_the_raw_answer() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        for tenant in [OWN, OTHER] {
            sqlx::query("INSERT INTO devices (tenant_id, device_id) VALUES ($1, 'd1')")
                .bind(tenant)
                .execute(&fx.owner)
                .await
                .unwrap();
        }
        // 40 minutes before now to 5 after, so the watermark (now - settle) falls inside.
        let start = floor_minute(Utc::now()) - Duration::minutes(40);
        let ours = mixed_readings(start);
        insert_readings(&fx.owner, OWN, &ours).await;
        let theirs: Vec<Reading> = ours
            .iter()
            .map(|r| Reading {
                time: r.time,
                metrics: json!({"temp": 999, "hum": 999, "on": 999}),
            })
            .collect();
        insert_readings(&fx.owner, OTHER, &theirs).await;

        let from = start + Duration::seconds(17) + Duration::microseconds(250);
        let to = start + Duration::minutes(44) + Duration::seconds(41);
        let check = |label: &'static str| {
            let fx = &fx;
            let ours = &ours;
            async move {
                for bucket_s in [60i64, 300, 420] {
                    for agg in ["avg", "min", "max", "last", "count"] {
                        let uri = format!(
                            "/v1/devices/d1/telemetry?metrics=temp,hum,on,nul&bucket={bucket_s}s&agg={agg}&from={}&to={}",
                            from.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                            to.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                        )
                        .replace('+', "%2B");
                        let (status, body, text) = fx.get(&uri, &fx.viewer).await;
                        assert_eq!(status, StatusCode::OK, "{text}");
                        for metric in ["temp", "hum", "on", "nul"] {
                            let want = reference(ours, metric, agg, bucket_s, from, to);
                            let what = format!("{layout:?} {label} {bucket_s}s {agg}({metric})");
                            assert_same(&answer(&body, metric), &want, agg, &what);
                        }
                    }
                }
            }
        };
        check("raw only").await;
        let watermark = refresh(&fx.owner).await;
        assert!(
            watermark > from && watermark < to,
            "the watermark {watermark} splits the range"
        );
        assert!(rollup_rows(&fx.owner, OWN, "d1").await > 0);
        check("rollups and raw").await;
    }
}

/// A reading written below the watermark, with the invalidation the sink records in its
/// batch transaction, is in the rollup-served answer after the next refresh.
#[tokio::test]
async fn a_late_reading_is_reflected_after_the_next_refresh() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        load(&fx.owner).await;
        refresh(&fx.owner).await;
        let writer = fx.db.role_pool("fleet_writer", 1).await.unwrap();
        let late = base() + Duration::seconds(70);
        let mut tx = writer.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
             VALUES ($1, $2, 'd1', 100, '{\"temp\": 100, \"on\": \"yes\"}')",
        )
        .bind(late)
        .bind(OWN)
        .execute(&mut *tx)
        .await
        .unwrap();
        let recorded: bool = sqlx::query_scalar("SELECT fleet_rollup_1m_invalidate($1, $1)")
            .bind(late)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert!(recorded, "a reading days old is late");
        tx.commit().await.unwrap();

        let (watermark, recomputed): (DateTime<Utc>, i32) =
            sqlx::query_as("SELECT watermark, minutes_recomputed FROM fleet_refresh_rollup_1m()")
                .fetch_one(&fx.owner)
                .await
                .unwrap();
        assert!(watermark > late);
        assert_eq!(recomputed, 1, "only the late reading's minute");
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_1m_invalid")
            .fetch_one(&fx.owner)
            .await
            .unwrap();
        assert_eq!(pending, 0);
        for (agg, want) in [
            ("avg", vec![(0, 20.0), (60, 112.0 / 3.0), (120, 1.5)]),
            ("max", vec![(0, 30.0), (60, 100.0), (120, 1.5)]),
            ("last", vec![(0, 30.0), (60, 7.0), (120, 1.5)]),
            ("count", vec![(0, 3.0), (60, 3.0), (120, 1.0)]),
        ] {
            let (_, body, text) = fx
                .get(
                    &series_uri(&format!("metrics=temp,on&bucket=1m&agg={agg}")),
                    &fx.viewer,
                )
                .await;
            assert_eq!(points(&body, "temp"), want, "{layout:?} {agg}: {text}");
        }
        // The string is not a value: `on` is as before.
        let (_, body, _) = fx
            .get(&series_uri("metrics=on&bucket=1m&agg=count"), &fx.viewer)
            .await;
        assert_eq!(points(&body, "on"), vec![(60, 2.0), (120, 1.0)]);

        // A live reading records nothing.
        let live: bool = sqlx::query_scalar("SELECT fleet_rollup_1m_invalidate(now(), now())")
            .fetch_one(&writer)
            .await
            .unwrap();
        assert!(!live);
    }
}

/// Readings near the limit of double precision (devices send f64::MAX for "sensor absent"):
/// the average of a minute is the readings' average, from raw readings and from rollups alike,
/// where adding them as doubles overflowed (a 500 from the raw path, a refresh that failed
/// for every tenant from the rollup).
#[tokio::test]
async fn averages_of_readings_near_the_double_precision_limit_are_exact() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        load(&fx.owner).await;
        for (s, v) in [
            (61, "1.5e308"),
            (62, "1.5e308"),
            (63, "1.7976931348623157e308"),
        ] {
            sqlx::query(
                "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
                 VALUES ($1, $2, 'd1', $3, jsonb_build_object('big', $4::numeric))",
            )
            .bind(base() + Duration::seconds(s))
            .bind(OWN)
            .bind(200 + s)
            .bind(v)
            .execute(&fx.owner)
            .await
            .unwrap();
        }
        // (3e308 + 1.7976931348623157e308) / 3, rounded once; read back as the answer is.
        let exact: f64 = "1.599231044954105233333333e308".parse().unwrap();
        let want: f64 = serde_json::from_str(&serde_json::to_string(&exact).unwrap()).unwrap();
        let uri = series_uri("metrics=big,temp&bucket=1m&agg=avg");
        let (status, body, text) = fx.get(&uri, &fx.viewer).await;
        assert_eq!(status, StatusCode::OK, "{layout:?} raw: {text}");
        assert_eq!(points(&body, "big"), vec![(60, want)], "{layout:?} raw");
        let raw = body.clone();
        refresh(&fx.owner).await;
        let (status, body, text) = fx.get(&uri, &fx.viewer).await;
        assert_eq!(status, StatusCode::OK, "{layout:?} rollups: {text}");
        assert_eq!(
            body["series"], raw["series"],
            "{layout:?}: rollups equal raw"
        );
        assert_eq!(
            points(&body, "temp"),
            vec![(0, 20.0), (60, 6.0), (120, 1.5)],
            "{layout:?}: the other metrics of the minute are rolled up too"
        );
    }
}

/// A device minute the refresh cannot aggregate (a jsonb number beyond double precision,
/// written outside the sink) is isolated: recorded with PostgreSQL's error, every other
/// device minute of the step is written and the watermark moves on. Once its readings are
/// fixed and the minute invalidated, it is aggregated and no longer listed.
#[tokio::test]
async fn a_device_minute_that_cannot_be_aggregated_is_isolated_and_recorded() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        load(&fx.owner).await;
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
             VALUES ($1, $2, 'd2', 500, '{\"temp\": 1e400}')",
        )
        .bind(base() + Duration::seconds(65))
        .bind(OWN)
        .execute(&fx.owner)
        .await
        .unwrap();
        let (watermark, rejected, more): (DateTime<Utc>, i32, bool) = sqlx::query_as(
            "SELECT watermark, device_minutes_rejected, more FROM fleet_refresh_rollup_1m(10000000)",
        )
        .fetch_one(&fx.owner)
        .await
        .unwrap();
        assert!(!more);
        assert!(watermark > base() + Duration::seconds(180), "{layout:?}");
        assert_eq!(rejected, 1, "{layout:?}");
        let recorded: Vec<(String, String, DateTime<Utc>, String)> = sqlx::query_as(
            "SELECT tenant_id, device_id, bucket, sqlstate FROM telemetry_1m_rejected",
        )
        .fetch_all(&fx.owner)
        .await
        .unwrap();
        assert_eq!(
            recorded,
            vec![(
                OWN.to_owned(),
                "d2".to_owned(),
                base() + Duration::seconds(60),
                "22003".to_owned()
            )],
            "{layout:?}"
        );
        // Every other device minute, ours and the other tenant's, is rolled up.
        assert_eq!(rollup_rows(&fx.owner, OWN, "d1").await, 7, "{layout:?}");
        assert_eq!(rollup_rows(&fx.owner, OTHER, "d1").await, 6, "{layout:?}");
        let d2_minutes: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT DISTINCT bucket FROM telemetry_1m WHERE tenant_id = $1 AND device_id = 'd2' ORDER BY 1",
        )
        .bind(OWN)
        .fetch_all(&fx.owner)
        .await
        .unwrap();
        assert_eq!(
            d2_minutes,
            vec![base(), base() + Duration::seconds(120)],
            "{layout:?}: d2's other minutes are rolled up"
        );
        // The series says which minute its buckets leave out, to the device's tenant only.
        let (status, body, text) = fx
            .get(
                &series_uri("metrics=temp&bucket=1m&agg=max").replace("/d1/", "/d2/"),
                &fx.viewer,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{layout:?}: {text}");
        assert_eq!(
            body["unaggregated_minutes"],
            json!([
                (base() + Duration::seconds(60)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ]),
            "{layout:?}"
        );
        let (_, body, _) = fx
            .get(&series_uri("metrics=temp&bucket=1m&agg=max"), &fx.viewer)
            .await;
        assert_eq!(
            body["unaggregated_minutes"],
            json!([]),
            "{layout:?}: d1 has none"
        );
        // Another tenant does not see it through the API role's view.
        let api = fx.db.role_pool("fleet_api", 1).await.unwrap();
        let mut tx = api.begin().await.unwrap();
        sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
            .bind(OTHER)
            .execute(&mut *tx)
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_1m_rejected_view")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(seen, 0, "another tenant does not see it");
        tx.rollback().await.unwrap();

        // Fixed, and invalidated as a writer does: aggregated, no longer listed.
        sqlx::query(
            "UPDATE telemetry SET metrics = '{\"temp\": 4}' WHERE device_id = 'd2' AND seq = 500",
        )
        .execute(&fx.owner)
        .await
        .unwrap();
        sqlx::query("SELECT fleet_rollup_1m_invalidate_minutes(ARRAY[$1], ARRAY['d2'], ARRAY[$2::timestamptz])")
            .bind(OWN)
            .bind(base() + Duration::seconds(65))
            .execute(&fx.owner)
            .await
            .unwrap();
        let (recomputed, rejected): (i32, i32) = sqlx::query_as(
            "SELECT device_minutes_recomputed, device_minutes_rejected FROM fleet_refresh_rollup_1m()",
        )
        .fetch_one(&fx.owner)
        .await
        .unwrap();
        assert_eq!((recomputed, rejected), (1, 0), "{layout:?}");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_1m_rejected")
            .fetch_one(&fx.owner)
            .await
            .unwrap();
        assert_eq!(left, 0, "{layout:?}");
        let (n, max): (i64, f64) = sqlx::query_as(
            "SELECT n, max FROM telemetry_1m WHERE tenant_id = $1 AND device_id = 'd2' \
             AND metric = 'temp' AND bucket = $2",
        )
        .bind(OWN)
        .bind(base() + Duration::seconds(60))
        .fetch_one(&fx.owner)
        .await
        .unwrap();
        assert_eq!((n, max), (7, 999.0), "{layout:?}");
    }
}

/// The API reads rollups only through the view, which shows a tenant its own rows.
#[tokio::test]
async fn the_api_role_sees_only_its_tenants_rollups_and_never_the_table() {
    let fx = Fixture::new().await.unwrap();
    load(&fx.owner).await;
    refresh(&fx.owner).await;
    let api = fx.db.role_pool("fleet_api", 1).await.unwrap();
    let mut tx = api.begin().await.unwrap();
    let err = sqlx::query("SELECT count(*) FROM telemetry_1m")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501"),
        "{err}"
    );
    tx.rollback().await.unwrap();
    let mut tx = api.begin().await.unwrap();
    let unset: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_1m_view")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(unset, 0, "an unset tenant sees nothing");
    sqlx::query(
        "SELECT set_config('app.tenant_id', $1, true), set_config('app.role', 'admin', true)",
    )
    .bind(OWN)
    .execute(&mut *tx)
    .await
    .unwrap();
    let tenants: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tenant_id FROM telemetry_1m_view ORDER BY 1")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert_eq!(tenants, vec![OWN.to_owned()]);
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn series_limits_are_400s_naming_the_limit() {
    let limits = Limits {
        max_points: 100,
        max_range: std::time::Duration::from_secs(86_400),
        ..Limits::default()
    };
    let fx = Fixture::with(schemas::LayoutChoice::Postgres, limits)
        .await
        .unwrap();
    load(&fx.owner).await;
    let (status, body, _) = fx
        .get(&series_uri("metrics=temp&bucket=1s"), &fx.viewer)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "bucket");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("max_points limit of 100"),
        "{body}"
    );

    let to = base().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let from = (base() - Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, body, _) = fx
        .get(
            &format!("/v1/devices/d1/telemetry?metrics=temp&bucket=1h&from={from}&to={to}"),
            &fx.viewer,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "from");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("max_range limit of 86400s"),
        "{body}"
    );

    let (status, body, _) = fx
        .get(&series_uri("metrics=temp&agg=avg"), &fx.viewer)
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("agg"))
    );
    let (status, body, _) = fx
        .get(&series_uri("metrics=temp&bucket=1m&agg=median"), &fx.viewer)
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("agg"))
    );
}

#[tokio::test]
async fn raw_series_over_the_points_limit_is_a_400() {
    let limits = Limits {
        max_points: 5,
        ..Limits::default()
    };
    let fx = Fixture::with(schemas::LayoutChoice::Postgres, limits)
        .await
        .unwrap();
    load(&fx.owner).await;
    let (status, body, _) = fx.get(&series_uri("metrics=temp"), &fx.viewer).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "bucket");
    assert!(body["error"].as_str().unwrap().contains("max_points"));
}
