//! SQL-injection strings in every path, query and body parameter are answered with plain 400s
//! or empty results: never a 500, never another tenant's data, and the schema is untouched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::{Method, StatusCode};
use common::{items, seed_tenant, Fixture, OTHER, OWN};
use serde_json::{json, Value};

const PAYLOADS: &[&str] = &[
    "' OR '1'='1",
    "'; DROP TABLE devices; --",
    "x' UNION SELECT key_hash, NULL FROM api_keys --",
    "1; SELECT pg_sleep(5)",
    "\" OR 1=1 --",
    "acme' OR tenant_id <> 'acme",
    "$1",
    "%",
    "_",
    "\\'",
    "globex",
    "../../etc/passwd",
    "\u{0}",
    "ü'ö",
    "1e999",
    "-1",
    "99999999999999999999999",
    "2026-01-01T00:00:00Z'; --",
    "{\"a\":1}",
];

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Checks one answer: no 5xx, the error shape on 4xx, nothing of the other tenant.
fn check(what: &str, status: StatusCode, body: &Value, text: &str, failures: &mut Vec<String>) {
    if status.is_server_error() {
        failures.push(format!("{what}: {status}: {text}"));
    }
    if status.is_client_error() && body.get("error").is_none() {
        failures.push(format!("{what}: {status} without the error shape: {text}"));
    }
    if text.contains("gx-") || text.contains("\"tenant_id\":\"globex\"") {
        failures.push(format!("{what}: leaked the other tenant: {text}"));
    }
    if status.is_success() && !items(body).is_empty() && what.contains("list") {
        // Lists may answer 200 only with our own rows.
        for item in items(body) {
            if item.get("tenant_id").is_some_and(|t| t != OWN) {
                failures.push(format!("{what}: foreign row {item}"));
            }
        }
    }
}

#[tokio::test]
async fn injection_strings_in_paths_and_queries_are_400s_or_empty() {
    let fx = Fixture::new().await.unwrap();
    seed_tenant(&fx.owner, OWN, "ac").await.unwrap();
    seed_tenant(&fx.owner, OTHER, "gx").await.unwrap();
    let mut failures = Vec::new();
    let paths = [
        "/v1/tenants/{p}",
        "/v1/sites/{p}",
        "/v1/devices/{p}",
        "/v1/devices/{p}/latest",
        "/v1/devices/{p}/telemetry?metrics=temp",
        "/v1/alert-rules/{p}",
    ];
    let queries = [
        "/v1/devices?tenant={p}",
        "/v1/devices?site={p}",
        "/v1/devices?cursor={p}",
        "/v1/devices?limit={p}",
        "/v1/sites?tenant={p}",
        "/v1/fleet/latest?site={p}",
        "/v1/fleet/latest?metrics={p}",
        "/v1/fleet/latest?tenant={p}",
        "/v1/fleet/latest?cursor={p}",
        "/v1/fleet/summary?tenant={p}",
        "/v1/alerts?status={p}",
        "/v1/alerts?severity={p}",
        "/v1/alerts?device={p}",
        "/v1/alerts?from={p}",
        "/v1/alerts?to={p}",
        "/v1/alerts?cursor={p}",
        "/v1/alert-rules?tenant={p}",
        "/v1/api-keys?tenant={p}",
        "/v1/gateway-tokens?cursor={p}",
        "/v1/devices/ac-dev-1/telemetry?metrics={p}",
        "/v1/devices/ac-dev-1/telemetry?metrics=temp&bucket={p}",
        "/v1/devices/ac-dev-1/telemetry?metrics=temp&bucket=1m&agg={p}",
        "/v1/devices/ac-dev-1/telemetry?metrics=temp&from={p}",
        "/v1/devices/ac-dev-1/telemetry?metrics=temp&to={p}",
        "/v1/devices/ac-dev-1/telemetry?metrics=temp&tenant={p}",
        "/v1/system/metrics?names={p}",
        "/v1/system/metrics?bucket={p}",
    ];
    for payload in PAYLOADS {
        for template in paths.iter().chain(queries.iter()) {
            let uri = template.replace("{p}", &encode(payload));
            let key = if uri.starts_with("/v1/system") {
                &fx.operator
            } else {
                &fx.admin
            };
            let (status, body, text) = fx.get(&uri, key).await;
            check(
                &format!("list GET {uri}"),
                status,
                &body,
                &text,
                &mut failures,
            );
        }
        for template in [
            "/v1/alerts/{p}/ack",
            "/v1/devices/{p}/disable",
            "/v1/devices/{p}/rotate-token",
        ] {
            let uri = template.replace("{p}", &encode(payload));
            let (status, body, text) = fx.call(Method::POST, &uri, Some(&fx.admin), None).await;
            check(&format!("POST {uri}"), status, &body, &text, &mut failures);
            if status.is_success() {
                failures.push(format!(
                    "POST {uri}: accepted an injection string as an id: {text}"
                ));
            }
        }
        for template in [
            "/v1/sites/{p}",
            "/v1/api-keys/{p}",
            "/v1/gateway-tokens/{p}",
            "/v1/alert-rules/{p}",
        ] {
            let uri = template.replace("{p}", &encode(payload));
            let (status, body, text) = fx.call(Method::DELETE, &uri, Some(&fx.admin), None).await;
            check(
                &format!("DELETE {uri}"),
                status,
                &body,
                &text,
                &mut failures,
            );
            if status.is_success() {
                failures.push(format!(
                    "DELETE {uri}: accepted an injection string as an id: {text}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    schema_is_intact(&fx).await;
}

#[tokio::test]
async fn injection_strings_in_bodies_are_400s_or_stored_literally() {
    let fx = Fixture::new().await.unwrap();
    seed_tenant(&fx.owner, OWN, "ac").await.unwrap();
    seed_tenant(&fx.owner, OTHER, "gx").await.unwrap();
    let mut failures = Vec::new();
    // Strings that are valid identifiers ("_", "-1", "globex") are plain names here.
    let hostile = PAYLOADS.iter().filter(|p| {
        !p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
    });
    for (n, payload) in hostile.enumerate() {
        let p = Value::String((*payload).to_owned());
        // Identifiers: always refused.
        let id_bodies = [
            ("/v1/devices", json!({"device_id": p})),
            (
                "/v1/devices",
                json!({"device_id": format!("ok-{n}"), "site_id": p}),
            ),
            ("/v1/sites", json!({"site_id": p, "name": "x"})),
            (
                "/v1/alert-rules",
                json!({"name": "r", "kind": "threshold", "metric": p, "op": ">", "threshold": 1}),
            ),
            (
                "/v1/alert-rules",
                json!({"name": "r", "kind": "threshold", "metric": "t", "op": p, "threshold": 1}),
            ),
            (
                "/v1/alert-rules",
                json!({"name": "r", "kind": p, "metric": "t", "op": ">", "threshold": 1}),
            ),
            (
                "/v1/alert-rules",
                json!({"name": "r", "kind": "window", "metric": "t", "op": ">", "threshold": 1, "agg": p, "window_s": 60}),
            ),
            (
                "/v1/alert-rules",
                json!({"name": "r", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "device_id": p}),
            ),
            (
                "/v1/alert-rules",
                json!({"name": "r", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "severity": p}),
            ),
            ("/v1/api-keys", json!({"name": "k", "role": p})),
            ("/v1/tenants", json!({"tenant_id": p, "name": "x"})),
        ];
        for (uri, body) in id_bodies {
            let key = if uri == "/v1/tenants" {
                &fx.operator_admin
            } else {
                &fx.admin
            };
            let (status, json, text) = fx
                .call(Method::POST, uri, Some(key), Some(body.clone()))
                .await;
            check(
                &format!("POST {uri} {body}"),
                status,
                &json,
                &text,
                &mut failures,
            );
            if status != StatusCode::BAD_REQUEST {
                failures.push(format!(
                    "POST {uri} {body}: expected 400, got {status}: {text}"
                ));
            }
        }
        // Free text: stored exactly as sent (or refused when it has control characters).
        let site = format!("site-{n}");
        let (status, json, text) = fx
            .call(
                Method::POST,
                "/v1/sites",
                Some(&fx.admin),
                Some(json!({"site_id": site, "name": p, "attributes": {"note": p}})),
            )
            .await;
        check(
            &format!("POST /v1/sites name {payload:?}"),
            status,
            &json,
            &text,
            &mut failures,
        );
        if status == StatusCode::CREATED {
            let stored: String =
                sqlx::query_scalar("SELECT name FROM sites WHERE tenant_id = $1 AND site_id = $2")
                    .bind(OWN)
                    .bind(&site)
                    .fetch_one(&fx.owner)
                    .await
                    .unwrap();
            assert_eq!(stored, *payload);
        } else if status != StatusCode::BAD_REQUEST {
            failures.push(format!("site name {payload:?}: {status}: {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    schema_is_intact(&fx).await;
}

async fn schema_is_intact(fx: &Fixture) {
    let (devices, keys, other_devices): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM api_keys), \
                (SELECT count(*) FROM devices WHERE tenant_id = 'globex')",
    )
    .fetch_one(&fx.owner)
    .await
    .unwrap();
    assert!(devices >= 6 && keys >= 4);
    assert_eq!(other_devices, 3, "the other tenant's devices are untouched");
}
