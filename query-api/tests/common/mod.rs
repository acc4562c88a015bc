//! Shared fixtures: a migrated database per test, the router in-process (connected as
//! `fleet_api`, so row-level security applies), keys for each role, and a request helper.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use plumbing::admin::Health;
use plumbing::testing::TestDb;
use query_api::auth::Role;
use query_api::{AppState, CreateKeyArgs, Limits};
use schemas::LayoutChoice;
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt;

/// The tenant whose keys the tests hold.
pub const OWN: &str = "acme";
/// The other tenant; none of its identifiers may reach an `acme` key.
pub const OTHER: &str = "globex";

/// A database, the API over it, and a key per role.
pub struct Fixture {
    pub db: TestDb,
    pub app: Router,
    /// Pool as the migration owner, for arranging data.
    pub owner: PgPool,
    pub viewer: String,
    pub admin: String,
    pub operator: String,
    pub operator_admin: String,
}

impl Fixture {
    pub async fn new() -> anyhow::Result<Self> {
        Self::with(LayoutChoice::Postgres, Limits::default()).await
    }

    pub async fn with(layout: LayoutChoice, limits: Limits) -> anyhow::Result<Self> {
        let db = TestDb::new(layout).await?;
        let owner = db.pool.clone();
        let api_pool = db.role_pool("fleet_api", 8).await?;
        let state = AppState::new(api_pool, limits, Arc::new(Default::default()));
        let app = query_api::http::router(state, Health::new(&[]))?;
        for tenant in [OWN, OTHER] {
            sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
                .bind(tenant)
                .execute(&owner)
                .await?;
        }
        let viewer = key(&owner, Role::Viewer, Some(OWN)).await?;
        let admin = key(&owner, Role::Admin, Some(OWN)).await?;
        let operator = key(&owner, Role::Operator, None).await?;
        let operator_admin = key(&owner, Role::OperatorAdmin, None).await?;
        Ok(Fixture {
            db,
            app,
            owner,
            viewer,
            admin,
            operator,
            operator_admin,
        })
    }

    pub fn key(&self, role: Role) -> &str {
        match role {
            Role::Viewer => &self.viewer,
            Role::Admin => &self.admin,
            Role::Operator => &self.operator,
            Role::OperatorAdmin => &self.operator_admin,
        }
    }

    /// Sends one request; returns the status, the JSON body (Null when not JSON) and the raw text.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value, String) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .expect("request builds");
        let response = self.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .expect("body reads");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, json, text)
    }

    pub async fn get(&self, uri: &str, key: &str) -> (StatusCode, Value, String) {
        self.call(Method::GET, uri, Some(key), None).await
    }
}

/// Creates a key the way `query-api create-key` does.
pub async fn key(pool: &PgPool, role: Role, tenant: Option<&str>) -> anyhow::Result<String> {
    Ok(query_api::create_key(
        pool,
        &CreateKeyArgs {
            role,
            tenant: tenant.map(str::to_owned),
            name: format!("test {role}"),
        },
    )
    .await?)
}

/// A site, devices with latest values, a rule and a firing alert for `tenant`, with ids
/// prefixed by `prefix`. Returns (rule_id, alert_id).
pub async fn seed_tenant(pool: &PgPool, tenant: &str, prefix: &str) -> anyhow::Result<(i64, i64)> {
    sqlx::query("INSERT INTO sites (tenant_id, site_id, name) VALUES ($1, $2, 'plant')")
        .bind(tenant)
        .bind(format!("{prefix}-site"))
        .execute(pool)
        .await?;
    for n in 1..=3 {
        let device = format!("{prefix}-dev-{n}");
        sqlx::query(
            "INSERT INTO devices (tenant_id, device_id, site_id, token_hash) VALUES ($1, $2, $3, $4)",
        )
        .bind(tenant)
        .bind(&device)
        .bind(format!("{prefix}-site"))
        .bind(format!("{prefix}-hash-{n}"))
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO device_latest (tenant_id, device_id, site_id, time, msg_type, seq, metrics) \
             VALUES ($1, $2, $3, now(), 'telemetry', 1, '{\"temp\": 20.5, \"on\": true}')",
        )
        .bind(tenant)
        .bind(&device)
        .bind(format!("{prefix}-site"))
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, site_id, seq, metrics) \
             VALUES (now() - interval '1 minute', $1, $2, $3, 1, '{\"temp\": 20.5}')",
        )
        .bind(tenant)
        .bind(&device)
        .bind(format!("{prefix}-site"))
        .execute(pool)
        .await?;
    }
    let rule_id = rule(pool, tenant).await?;
    let alert_id: i64 = sqlx::query_scalar(
        "INSERT INTO alerts (tenant_id, rule_id, device_id, site_id, status, severity, metric, \
                             value, threshold, started_at, fired_at) \
         VALUES ($1, $2, $3, $4, 'firing', 'critical', 'temp', 99, 50, now(), now()) RETURNING alert_id",
    )
    .bind(tenant)
    .bind(rule_id)
    .bind(format!("{prefix}-dev-1"))
    .bind(format!("{prefix}-site"))
    .fetch_one(pool)
    .await?;
    Ok((rule_id, alert_id))
}

/// Provisions `device` of `tenant` at `site` (created if missing) with a `device_latest` row
/// as the sink stores it since migration 0011: `time` is the newest time of any metric, and
/// `metric_times` maps each metric whose newest value is older to that value's time in
/// microseconds since the Unix epoch (`{}` when every metric has `time`). The row's `seq` is 7
/// and its `received_at` 250 ms after `time`.
pub async fn device_with_latest(
    pool: &PgPool,
    tenant: &str,
    device: &str,
    site: &str,
    time: DateTime<Utc>,
    metrics: &Value,
    metric_times: &Value,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO sites (tenant_id, site_id, name) VALUES ($1, $2, $2) \
         ON CONFLICT DO NOTHING",
    )
    .bind(tenant)
    .bind(site)
    .execute(pool)
    .await?;
    sqlx::query("INSERT INTO devices (tenant_id, device_id, site_id) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(device)
        .bind(site)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO device_latest (tenant_id, device_id, site_id, time, msg_type, seq, metrics, \
                                    metric_times, received_at) \
         VALUES ($1, $2, $3, $4, 'telemetry', 7, $5, $6, $7)",
    )
    .bind(tenant)
    .bind(device)
    .bind(site)
    .bind(time)
    .bind(metrics)
    .bind(metric_times)
    .bind(time + Duration::milliseconds(250))
    .execute(pool)
    .await?;
    Ok(())
}

/// A threshold rule of `tenant`.
pub async fn rule(pool: &PgPool, tenant: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO alert_rules (tenant_id, name, metric, kind, op, threshold) \
         VALUES ($1, 'hot', 'temp', 'threshold', '>', 50) RETURNING rule_id",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await?)
}

/// Extracts `items` of a page.
pub fn items(body: &Value) -> Vec<Value> {
    body["items"].as_array().cloned().unwrap_or_default()
}
