//! Keyset pagination returns every row exactly once, whatever the page size, including rows
//! that share a sort time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use common::{items, Fixture, OTHER, OWN};
use serde_json::Value;

async fn collect(
    fx: &Fixture,
    path: &str,
    key: &str,
    id: impl Fn(&Value) -> String,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let uri = match &cursor {
            Some(c) => format!("{path}{sep}cursor={c}"),
            None => path.to_owned(),
        };
        let (status, body, text) = fx.get(&uri, key).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {text}");
        seen.extend(items(&body).iter().map(&id));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
    }
    panic!("pagination of {path} never ended");
}

fn assert_once(seen: &[String], expected: usize, what: &str) {
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "{what}: a row came twice");
    assert_eq!(seen.len(), expected, "{what}: rows missing");
}

#[tokio::test]
async fn fleet_latest_pages_return_every_device_exactly_once() {
    let fx = Fixture::new().await.unwrap();
    for (tenant, n) in [(OWN, 2345), (OTHER, 321)] {
        for site in ["north", "south"] {
            sqlx::query("INSERT INTO sites (tenant_id, site_id, name) VALUES ($1, $2, $2)")
                .bind(tenant)
                .bind(site)
                .execute(&fx.owner)
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO device_latest (tenant_id, device_id, site_id, time, msg_type, seq, metrics) \
             SELECT $1, 'dev-' || s, CASE WHEN s % 3 = 0 THEN 'north' ELSE 'south' END, now(), \
                    'telemetry', s, jsonb_build_object('temp', s, 'hum', 50) \
             FROM generate_series(1, $2) s",
        )
        .bind(tenant)
        .bind(n)
        .execute(&fx.owner)
        .await
        .unwrap();
    }
    let device = |v: &Value| {
        format!(
            "{}/{}",
            v["tenant_id"].as_str().unwrap(),
            v["device_id"].as_str().unwrap()
        )
    };
    for limit in [1000, 97] {
        let seen = collect(
            &fx,
            &format!("/v1/fleet/latest?limit={limit}"),
            &fx.viewer,
            device,
        )
        .await;
        assert_once(&seen, 2345, "tenant key");
        assert!(seen.iter().all(|d| d.starts_with("acme/")));
        let seen = collect(
            &fx,
            &format!("/v1/fleet/latest?limit={limit}"),
            &fx.operator,
            device,
        )
        .await;
        assert_once(&seen, 2345 + 321, "operator, all tenants");
    }
    let seen = collect(
        &fx,
        "/v1/fleet/latest?site=north&limit=100",
        &fx.viewer,
        device,
    )
    .await;
    assert_once(&seen, 2345 / 3, "site filter");
    let seen = collect(
        &fx,
        &format!("/v1/fleet/latest?site=north&limit=50&tenant={OTHER}"),
        &fx.operator,
        device,
    )
    .await;
    assert_once(&seen, 321 / 3, "operator site filter");
    // Projection keeps only the named metrics.
    let (_, body, _) = fx
        .get("/v1/fleet/latest?metrics=temp&limit=1", &fx.viewer)
        .await;
    let metrics = items(&body)[0]["metrics"].as_object().unwrap().clone();
    assert_eq!(metrics.keys().collect::<Vec<_>>(), vec!["temp"]);
}

#[tokio::test]
async fn alerts_sharing_a_start_time_are_each_listed_once() {
    let fx = Fixture::new().await.unwrap();
    let rule = common::rule(&fx.owner, OWN).await.unwrap();
    sqlx::query(
        "INSERT INTO alerts (tenant_id, rule_id, device_id, status, severity, started_at) \
         SELECT $1, $2, 'dev-' || s, CASE WHEN s % 2 = 0 THEN 'firing' ELSE 'resolved' END, 'warning', \
                '2026-11-20T00:00:00Z'::timestamptz + (s / 10) * interval '1 minute' \
         FROM generate_series(1, 555) s",
    )
    .bind(OWN)
    .bind(rule)
    .execute(&fx.owner)
    .await
    .unwrap();
    let id = |v: &Value| v["alert_id"].to_string();
    let seen = collect(&fx, "/v1/alerts?limit=7", &fx.viewer, id).await;
    assert_once(&seen, 555, "alerts");
    let seen = collect(&fx, "/v1/alerts?limit=13&status=firing", &fx.viewer, id).await;
    assert_once(&seen, 277, "firing alerts");
}

#[tokio::test]
async fn device_site_and_key_lists_page_through_every_row() {
    let fx = Fixture::new().await.unwrap();
    sqlx::query("INSERT INTO devices (tenant_id, device_id) SELECT $1, 'd' || s FROM generate_series(1, 250) s")
        .bind(OWN)
        .execute(&fx.owner)
        .await
        .unwrap();
    sqlx::query("INSERT INTO sites (tenant_id, site_id, name) SELECT $1, 's' || s, 'x' FROM generate_series(1, 120) s")
        .bind(OWN)
        .execute(&fx.owner)
        .await
        .unwrap();
    let seen = collect(&fx, "/v1/devices?limit=33", &fx.viewer, |v| {
        v["device_id"].to_string()
    })
    .await;
    assert_once(&seen, 250, "devices");
    let seen = collect(&fx, "/v1/sites?limit=11", &fx.viewer, |v| {
        v["site_id"].to_string()
    })
    .await;
    assert_once(&seen, 120, "sites");
    let seen = collect(&fx, "/v1/api-keys?limit=1", &fx.operator_admin, |v| {
        v["key_id"].to_string()
    })
    .await;
    assert_once(&seen, 4, "api keys");
}
