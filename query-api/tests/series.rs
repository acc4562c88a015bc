//! Bucketed series equal hand-computed values on a known dataset, in every layout this server
//! offers (plain PostgreSQL always, TimescaleDB when installed); limits are 400s naming them.

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

#[tokio::test]
async fn bucket_aggregates_equal_hand_computed_values_in_every_layout() {
    for layout in plumbing::testing::available_layouts().await.unwrap() {
        let fx = Fixture::with(layout, Limits::default()).await.unwrap();
        load(&fx.owner).await;
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
