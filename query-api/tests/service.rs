//! The service as deployed: in-process through `serve` on a real socket, connected as
//! `fleet_api`; probes, metrics, the OpenAPI document against real answers, the statement
//! timeout, and key figures in `system_metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use clap::Parser;
use common::{seed_tenant, Fixture, OWN};
use plumbing::testing::{eventually, TestDb};
use query_api::auth::Role;
use query_api::Limits;
use serde_json::Value;

/// The database URL as `fleet_api` (the role has no password here: it is reached through
/// `SET ROLE` in tests, so the owner's URL plus `options=-c role=fleet_api`).
fn api_url(db: &TestDb) -> String {
    let sep = if db.url.contains('?') { '&' } else { '?' };
    format!("{}{sep}options=-c%20role%3Dfleet_api", db.url)
}

#[tokio::test]
async fn the_service_serves_probes_metrics_docs_and_writes_its_figures() {
    let db = TestDb::new(schemas::LayoutChoice::Postgres).await.unwrap();
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await
        .unwrap();
    let cli = query_api::Cli::try_parse_from([
        "query-api",
        "--database-url",
        &api_url(&db),
        "--admin-listen",
        "127.0.0.1:0",
        "--system-metrics-interval",
        "200ms",
    ])
    .unwrap();
    let operator = query_api::create_key(
        &plumbing::db::pool(&cli.database, "test").unwrap(),
        &query_api::CreateKeyArgs {
            role: Role::OperatorAdmin,
            tenant: None,
            name: "bootstrap".into(),
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = plumbing::Shutdown::new();
    let server = tokio::spawn(query_api::serve(cli, listener, shutdown.clone()));
    let client = reqwest::Client::new();

    eventually("readiness", Duration::from_secs(20), || async {
        match client.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap();
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let devices = client
        .get(format!("{base}/v1/devices?tenant={OWN}"))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(devices.status(), StatusCode::OK);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fleetstream_query_api_requests_total")
            && metrics.contains("route=\"/v1/devices\""),
        "{metrics}"
    );
    for page in ["/", "/docs", "/app.js", "/vendor/uPlot.iife.min.js"] {
        let response = client.get(format!("{base}{page}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{page}");
    }

    // Key figures reach system_metrics, and operators read them back through the API.
    let figures = eventually(
        "query-api figures in system_metrics",
        Duration::from_secs(20),
        || async {
            let response = client
                .get(format!(
                    "{base}/v1/system/metrics?names=query_api_requests_per_second&bucket=1s"
                ))
                .bearer_auth(&operator)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let text = response.text().await.map_err(|e| e.to_string())?;
            let body: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
            let series = body["series"].as_array().cloned().unwrap_or_default();
            if series
                .iter()
                .any(|s| s["service"] == "query-api" && !s["points"].as_array().unwrap().is_empty())
            {
                Ok(series)
            } else {
                Err(body.to_string())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(figures[0]["metric_name"], "query_api_requests_per_second");

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_statement_past_the_timeout_is_a_503_with_a_clear_body() {
    let limits = Limits {
        statement_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let fx = Fixture::with(schemas::LayoutChoice::Postgres, limits)
        .await
        .unwrap();
    seed_tenant(&fx.owner, OWN, "ac").await.unwrap();
    // Another session holds a lock the query needs, so the statement waits deterministically.
    let mut blocker = fx.owner.begin().await.unwrap();
    sqlx::query("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (status, body, _) = fx.get("/v1/devices", &fx.viewer).await;
    blocker.rollback().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("statement timeout"),
        "{body}"
    );
    // The pool's connection is healthy afterwards.
    assert_eq!(fx.get("/v1/devices", &fx.viewer).await.0, StatusCode::OK);
}

/// Resolves a `$ref` in the document.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

#[tokio::test]
async fn the_openapi_document_describes_the_real_answers() {
    let fx = Fixture::new().await.unwrap();
    let (_, alert) = seed_tenant(&fx.owner, OWN, "ac").await.unwrap();
    let (status, doc, _) = fx.get("/openapi.json", &fx.viewer).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{} paths", paths.len());
    let mut compared = 0;
    for (template, methods) in paths {
        let Some(get) = methods.get("get") else {
            continue;
        };
        let uri = template
            .replace("{tenant_id}", OWN)
            .replace("{site_id}", "ac-site")
            .replace("{device_id}", "ac-dev-1")
            .replace("{rule_id}", "1")
            .replace("{alert_id}", &alert.to_string());
        let sep = if uri.contains('?') { '&' } else { '?' };
        let uri = if template.ends_with("/telemetry") {
            format!("{uri}{sep}metrics=temp&bucket=1m")
        } else {
            uri
        };
        let key = if template.starts_with("/v1/system") {
            &fx.operator
        } else {
            &fx.admin
        };
        let (status, body, text) = fx.get(&uri, key).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {text}");
        let schema = &get["responses"]["200"]["content"]["application/json"]["schema"];
        let schema = resolve(&doc, schema);
        let documented: std::collections::BTreeSet<&String> = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{template}: {schema}"))
            .keys()
            .collect();
        let real: std::collections::BTreeSet<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(
            documented, real,
            "{template}: documented vs real top-level fields"
        );
        if let Some(items) = body
            .get("items")
            .and_then(Value::as_array)
            .and_then(|i| i.first())
        {
            let item_schema = resolve(&doc, &schema["properties"]["items"]["items"]);
            let documented: std::collections::BTreeSet<&String> = item_schema["properties"]
                .as_object()
                .unwrap()
                .keys()
                .collect();
            let real: std::collections::BTreeSet<&String> =
                items.as_object().unwrap().keys().collect();
            assert_eq!(
                documented, real,
                "{template}: documented vs real item fields"
            );
        }
        compared += 1;
    }
    assert!(compared >= 12, "compared {compared} GET answers");
}

#[tokio::test]
async fn a_role_that_bypasses_row_level_security_is_refused() {
    let fx = Fixture::new().await.unwrap();
    // The migration owner (a superuser here) instead of fleet_api.
    let state = query_api::AppState::new(fx.owner.clone(), Limits::default(), Default::default());
    let app = query_api::http::router(state, plumbing::admin::Health::new(&[])).unwrap();
    let request = axum::http::Request::builder()
        .uri("/v1/devices")
        .header("authorization", format!("Bearer {}", fx.viewer))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(app, request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("bypasses row-level security"),
        "{body}"
    );
}
