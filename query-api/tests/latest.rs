//! Latest values keep, per metric, the newest value and its time (issue 13): the answers of
//! `/v1/devices/{id}/latest` and `/v1/fleet/latest` give every metric its own time, from
//! `device_latest` rows stored the way the sink stores them (migration 0011), and another
//! tenant sees none of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::{device_with_latest, Fixture, OTHER, OWN};
use query_api::auth::Role;
use serde_json::{json, Value};

/// A description with its line breaks as spaces.
fn text(field: &Value) -> String {
    let description = field["description"].as_str().unwrap_or_default();
    description.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The temperature sensor's reading (microseconds, to check they survive exactly).
const T1: &str = "2026-11-20T12:00:00.123456Z";
/// The humidity sensor's reading, 30 s later: the device's newest.
const T2: &str = "2026-11-20T12:00:30Z";

fn at(rfc3339: &str) -> DateTime<Utc> {
    rfc3339.parse().unwrap()
}

/// `split-1` of `acme`: temperature at T1 and humidity at T2 arrived in separate messages, so
/// the sink stores time = T2 and temperature's older time as an exception in microseconds.
async fn split_sensor_device(fx: &Fixture) {
    device_with_latest(
        &fx.owner,
        OWN,
        "split-1",
        "north",
        at(T2),
        &json!({"temperature": 21.5, "humidity": 40}),
        &json!({"temperature": at(T1).timestamp_micros()}),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_split_sensor_device_shows_each_metric_with_the_time_of_its_newest_value() {
    let fx = Fixture::new().await.unwrap();
    split_sensor_device(&fx).await;

    let (status, body, text) = fx.get("/v1/devices/split-1/latest", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        body,
        json!({
            "tenant_id": "acme",
            "device_id": "split-1",
            "site_id": "north",
            "status": "active",
            "time": "2026-11-20T12:00:30Z",
            "received_at": "2026-11-20T12:00:30.250Z",
            "seq": 7,
            "msg_type": "telemetry",
            "metrics": {"temperature": 21.5, "humidity": 40},
            "metric_times": {
                "temperature": "2026-11-20T12:00:00.123456Z",
                "humidity": "2026-11-20T12:00:30Z"
            }
        })
    );

    let (status, body, text) = fx.get("/v1/fleet/latest", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        body,
        json!({
            "items": [{
                "tenant_id": "acme",
                "device_id": "split-1",
                "site_id": "north",
                "time": "2026-11-20T12:00:30Z",
                "seq": 7,
                "metrics": {"temperature": 21.5, "humidity": 40},
                "metric_times": {
                    "temperature": "2026-11-20T12:00:00.123456Z",
                    "humidity": "2026-11-20T12:00:30Z"
                }
            }],
            "next_cursor": null
        })
    );
}

#[tokio::test]
async fn a_fleet_projection_keeps_the_times_of_the_named_metrics_only() {
    let fx = Fixture::new().await.unwrap();
    split_sensor_device(&fx).await;

    let (status, body, text) = fx
        .get(
            "/v1/fleet/latest?site=north&metrics=temperature,pressure",
            &fx.viewer,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        body,
        json!({
            "items": [{
                "tenant_id": "acme",
                "device_id": "split-1",
                "site_id": "north",
                "time": "2026-11-20T12:00:30Z",
                "seq": 7,
                "metrics": {"temperature": 21.5},
                "metric_times": {"temperature": "2026-11-20T12:00:00.123456Z"}
            }],
            "next_cursor": null
        })
    );
}

#[tokio::test]
async fn a_device_reporting_every_metric_together_gives_each_metric_the_row_time() {
    let fx = Fixture::new().await.unwrap();
    device_with_latest(
        &fx.owner,
        OWN,
        "whole-1",
        "south",
        at(T1),
        &json!({"temperature": 19, "on": true, "mode": "eco"}),
        &json!({}),
    )
    .await
    .unwrap();

    let (status, body, text) = fx.get("/v1/devices/whole-1/latest", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        body,
        json!({
            "tenant_id": "acme",
            "device_id": "whole-1",
            "site_id": "south",
            "status": "active",
            "time": "2026-11-20T12:00:00.123456Z",
            "received_at": "2026-11-20T12:00:00.373456Z",
            "seq": 7,
            "msg_type": "telemetry",
            "metrics": {"temperature": 19, "on": true, "mode": "eco"},
            "metric_times": {
                "temperature": "2026-11-20T12:00:00.123456Z",
                "on": "2026-11-20T12:00:00.123456Z",
                "mode": "2026-11-20T12:00:00.123456Z"
            }
        })
    );

    let (status, body, text) = fx.get("/v1/fleet/latest?site=south", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        body["items"][0]["metric_times"],
        json!({
            "temperature": "2026-11-20T12:00:00.123456Z",
            "on": "2026-11-20T12:00:00.123456Z",
            "mode": "2026-11-20T12:00:00.123456Z"
        })
    );
}

#[tokio::test]
async fn a_device_without_readings_has_neither_metrics_nor_metric_times() {
    let fx = Fixture::new().await.unwrap();
    sqlx::query("INSERT INTO devices (tenant_id, device_id) VALUES ($1, 'silent-1')")
        .bind(OWN)
        .execute(&fx.owner)
        .await
        .unwrap();

    let (status, body, text) = fx.get("/v1/devices/silent-1/latest", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        body,
        json!({
            "tenant_id": "acme",
            "device_id": "silent-1",
            "site_id": null,
            "status": "active",
            "time": null,
            "received_at": null,
            "seq": null,
            "msg_type": null,
            "metrics": null,
            "metric_times": null
        })
    );
}

#[tokio::test]
async fn another_tenant_sees_neither_the_values_nor_the_times() {
    let fx = Fixture::new().await.unwrap();
    split_sensor_device(&fx).await;
    let other = common::key(&fx.owner, Role::Viewer, Some(OTHER))
        .await
        .unwrap();

    for uri in [
        "/v1/devices/split-1/latest",
        "/v1/devices/split-1/latest?tenant=acme",
    ] {
        let (status, body, _) = fx.get(uri, &other).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body, json!({"error": "device not found"}), "{uri}");
    }
    for uri in [
        "/v1/fleet/latest",
        "/v1/fleet/latest?tenant=acme",
        "/v1/fleet/latest?site=north&metrics=temperature",
    ] {
        let (status, body, _) = fx.get(uri, &other).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        assert_eq!(body, json!({"items": [], "next_cursor": null}), "{uri}");
    }
    // The same row is there for its own tenant's operators.
    let (status, body, _) = fx
        .get("/v1/devices/split-1/latest?tenant=acme", &fx.operator)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["metric_times"]["temperature"],
        "2026-11-20T12:00:00.123456Z"
    );
}

#[tokio::test]
async fn the_openapi_document_gives_metric_times_as_rfc3339_times_per_metric() {
    let fx = Fixture::new().await.unwrap();
    let (status, doc, _) = fx.get("/openapi.json", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK);
    for schema in ["DeviceLatest", "FleetLatest"] {
        let field = &doc["components"]["schemas"][schema]["properties"]["metric_times"];
        assert_eq!(
            field["additionalProperties"],
            json!({"type": "string", "format": "date-time"}),
            "{schema}: {field}"
        );
        let description = text(field);
        assert!(
            description.contains("newest value of that metric")
                && description.contains("later write in partition order wins"),
            "{schema}: {description}"
        );
        let time = &doc["components"]["schemas"][schema]["properties"]["time"];
        assert!(
            text(time).contains("newest value of any metric"),
            "{schema}: {time}"
        );
    }
}
