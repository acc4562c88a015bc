//! Alerts: filters and acknowledgement; alert rules: validation naming the field, CRUD.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::http::{Method, StatusCode};
use common::{items, Fixture, OWN};
use serde_json::{json, Value};

#[tokio::test]
async fn alerts_filter_by_status_severity_device_and_time_and_acknowledge_once() {
    let fx = Fixture::new().await.unwrap();
    let rule = common::rule(&fx.owner, OWN).await.unwrap();
    for (device, status, severity, started) in [
        ("d1", "firing", "critical", "2026-11-20T10:00:00Z"),
        ("d1", "resolved", "warning", "2026-11-20T11:00:00Z"),
        ("d2", "pending", "info", "2026-11-20T12:00:00Z"),
        ("d3", "firing", "warning", "2026-11-21T12:00:00Z"),
    ] {
        sqlx::query(
            "INSERT INTO alerts (tenant_id, rule_id, device_id, status, severity, started_at) \
             VALUES ($1, $2, $3, $4, $5, $6::timestamptz)",
        )
        .bind(OWN)
        .bind(rule)
        .bind(device)
        .bind(status)
        .bind(severity)
        .bind(started)
        .execute(&fx.owner)
        .await
        .unwrap();
    }
    let devices = |body: &Value| -> Vec<String> {
        items(body)
            .iter()
            .map(|a| {
                format!(
                    "{}:{}",
                    a["device_id"].as_str().unwrap(),
                    a["status"].as_str().unwrap()
                )
            })
            .collect()
    };
    let (_, body, _) = fx.get("/v1/alerts", &fx.viewer).await;
    assert_eq!(
        devices(&body),
        ["d3:firing", "d2:pending", "d1:resolved", "d1:firing"],
        "newest first"
    );
    let (_, body, _) = fx.get("/v1/alerts?status=firing", &fx.viewer).await;
    assert_eq!(devices(&body), ["d3:firing", "d1:firing"]);
    let (_, body, _) = fx
        .get("/v1/alerts?severity=warning&device=d1", &fx.viewer)
        .await;
    assert_eq!(devices(&body), ["d1:resolved"]);
    let (_, body, _) = fx
        .get(
            "/v1/alerts?from=2026-11-20T10:30:00Z&to=2026-11-21T00:00:00Z",
            &fx.viewer,
        )
        .await;
    assert_eq!(devices(&body), ["d2:pending", "d1:resolved"]);
    let (status, body, _) = fx.get("/v1/alerts?status=open", &fx.viewer).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("status"))
    );

    let (_, body, _) = fx
        .get("/v1/alerts?status=firing&device=d1", &fx.viewer)
        .await;
    let id = items(&body)[0]["alert_id"].as_i64().unwrap();
    let (status, _, _) = fx
        .call(
            Method::POST,
            &format!("/v1/alerts/{id}/ack"),
            Some(&fx.viewer),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "viewers do not acknowledge");
    let (status, first, _) = fx
        .call(
            Method::POST,
            &format!("/v1/alerts/{id}/ack"),
            Some(&fx.admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(first["acknowledged_at"].is_string());
    assert!(first["acknowledged_by"]
        .as_str()
        .unwrap()
        .starts_with("api_key:"));
    let (_, second, _) = fx
        .call(
            Method::POST,
            &format!("/v1/alerts/{id}/ack"),
            Some(&fx.operator_admin),
            None,
        )
        .await;
    assert_eq!(
        second["acknowledged_at"], first["acknowledged_at"],
        "the first acknowledgement is kept"
    );
    assert_eq!(second["acknowledged_by"], first["acknowledged_by"]);
    assert_eq!(
        second["status"], "firing",
        "acknowledging does not change the evaluator's status"
    );
}

#[tokio::test]
async fn invalid_rules_are_400s_naming_the_field() {
    let fx = Fixture::new().await.unwrap();
    let ok =
        json!({"name": "hot", "kind": "threshold", "metric": "temp", "op": ">", "threshold": 50});
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"kind": "threshold", "metric": "temp", "op": ">", "threshold": 1, "name": ""}),
            "name",
        ),
        (json!({"name": "x", "kind": "spike"}), "kind"),
        (
            json!({"name": "x", "kind": "threshold", "op": ">", "threshold": 1}),
            "metric",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "threshold": 1}),
            "op",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": "=>", "threshold": 1}),
            "op",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": ">"}),
            "threshold",
        ),
        (
            json!({"name": "x", "kind": "window", "metric": "t", "op": ">", "threshold": 1, "window_s": 60}),
            "agg",
        ),
        (
            json!({"name": "x", "kind": "window", "metric": "t", "op": ">", "threshold": 1, "agg": "avg"}),
            "window_s",
        ),
        (
            json!({"name": "x", "kind": "window", "metric": "t", "op": ">", "threshold": 1, "agg": "avg", "window_s": 0}),
            "window_s",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "agg": "avg"}),
            "agg",
        ),
        (json!({"name": "x", "kind": "no_data"}), "no_data_s"),
        (
            json!({"name": "x", "kind": "no_data", "no_data_s": 9999999}),
            "no_data_s",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": "==", "threshold": 1, "resolve_threshold": 0}),
            "resolve_threshold",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "severity": "fatal"}),
            "severity",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "for_s": -1}),
            "for_s",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "device_id": "nope"}),
            "device_id",
        ),
        (
            json!({"name": "x", "kind": "threshold", "metric": "t", "op": ">", "threshold": 1, "site_id": "nope"}),
            "site_id",
        ),
    ];
    for (body, field) in cases {
        let (status, answer, text) = fx
            .call(
                Method::POST,
                "/v1/alert-rules",
                Some(&fx.admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert_eq!(answer["field"], field, "{body}: {text}");
    }
    let (status, _, text) = fx
        .call(
            Method::POST,
            "/v1/alert-rules",
            Some(&fx.admin),
            Some(json!({"name": "x", "kind": "threshold", "bogus": 1})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused: {text}"
    );

    let (status, created, _) = fx
        .call(Method::POST, "/v1/alert-rules", Some(&fx.admin), Some(ok))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["rule_id"].as_i64().unwrap();
    assert_eq!(
        (created["severity"].as_str(), created["enabled"].as_bool()),
        (Some("warning"), Some(true))
    );
    let window = json!({"name": "avg hot", "kind": "window", "metric": "temp", "op": ">=", "threshold": 40,
                        "agg": "avg", "window_s": 300, "for_s": 60, "resolve_threshold": 35, "severity": "critical", "enabled": false});
    let (status, replaced, text) = fx
        .call(
            Method::PUT,
            &format!("/v1/alert-rules/{id}"),
            Some(&fx.admin),
            Some(window),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        (replaced["kind"].as_str(), replaced["window_s"].as_i64()),
        (Some("window"), Some(300))
    );
    let (_, fetched, _) = fx.get(&format!("/v1/alert-rules/{id}"), &fx.viewer).await;
    assert_eq!(fetched, replaced);
    let (status, _, _) = fx
        .call(
            Method::DELETE,
            &format!("/v1/alert-rules/{id}"),
            Some(&fx.admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        fx.get(&format!("/v1/alert-rules/{id}"), &fx.viewer).await.0,
        StatusCode::NOT_FOUND
    );
}
