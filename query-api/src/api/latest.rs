//! Latest values: one device, a page of the fleet, and the overview figures.
//!
//! `device_latest` holds one row per device, upserted by the sink, so these are index look-ups
//! on its primary key `(tenant_id, device_id)` or on `(tenant_id, site_id, device_id)`.

use std::collections::BTreeMap;

use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use crate::api::TenantParam;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, ApiQuery};
use crate::page::{fetch_limit, Page, PageParams};
use crate::session::Session;
use crate::validate;

/// A stored `jsonb` passed through as its JSON text: validated, never decoded into a tree and
/// re-encoded (a 1,000-device page is mostly metrics).
pub type StoredJson = sqlx::types::Json<Box<serde_json::value::RawValue>>;

/// Most metrics a projection may name.
pub const MAX_PROJECTED_METRICS: usize = 32;

/// A device and its last reading (absent before the first one).
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct DeviceLatest {
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub status: String,
    /// Time of the last reading.
    pub time: Option<DateTime<Utc>>,
    /// When ingest received it.
    pub received_at: Option<DateTime<Utc>>,
    pub seq: Option<i64>,
    pub msg_type: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<StoredJson>,
}

#[utoipa::path(get, path = "/v1/devices/{device_id}/latest", tag = "telemetry",
    params(("device_id" = String, Path, description = "Device identifier"), TenantParam),
    responses((status = 200, body = DeviceLatest), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn device(
    mut s: Session,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<DeviceLatest>, ApiError> {
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("device_id", &device_id)?;
    let row: Option<DeviceLatest> = sqlx::query_as(
        "SELECT d.tenant_id, d.device_id, coalesce(l.site_id, d.site_id) AS site_id, d.status, \
                l.time, l.received_at, l.seq, l.msg_type, l.metrics \
         FROM devices d \
         LEFT JOIN device_latest l ON l.tenant_id = d.tenant_id AND l.device_id = d.device_id \
         WHERE d.tenant_id = $1 AND d.device_id = $2",
    )
    .bind(&tenant)
    .bind(&device_id)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    row.map(Json).ok_or(ApiError::NotFound("device"))
}

/// `GET /v1/fleet/latest` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FleetQuery {
    /// Tenant (operators; a tenant key's own by default). Operators without it see all tenants.
    pub tenant: Option<String>,
    /// Only devices of this site.
    pub site: Option<String>,
    /// Comma-separated metric names to return (default: every metric).
    pub metrics: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One device's last reading in a fleet page.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct FleetLatest {
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub time: DateTime<Utc>,
    pub seq: i64,
    #[schema(value_type = Object)]
    pub metrics: StoredJson,
}

/// Projection of `metrics` onto the requested names (NULL array: all of them).
const PROJECTED: &str = "CASE WHEN $2::text[] IS NULL THEN l.metrics ELSE \
    (SELECT coalesce(jsonb_object_agg(k, l.metrics -> k), '{}'::jsonb) \
     FROM unnest($2::text[]) AS k WHERE l.metrics ? k) END";

#[utoipa::path(get, path = "/v1/fleet/latest", tag = "telemetry", params(FleetQuery),
    responses((status = 200, body = Page<FleetLatest>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn fleet(
    mut s: Session,
    ApiQuery(q): ApiQuery<FleetQuery>,
) -> Result<Json<Page<FleetLatest>>, ApiError> {
    let scope = s.scope(q.tenant.as_deref())?;
    if let Some(site) = &q.site {
        validate::id("site", site)?;
    }
    let metrics = q
        .metrics
        .as_deref()
        .map(|m| validate::id_list("metrics", m, MAX_PROJECTED_METRICS))
        .transpose()?;
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let after: Option<(String, String)> = page.after()?;
    // One statement per access path, so each keeps its own plan (a generic plan over
    // `$1 IS NULL OR ...` could not use the indexes).
    let select = format!(
        "SELECT l.tenant_id, l.device_id, l.site_id, l.time, l.seq, {PROJECTED} AS metrics \
         FROM device_latest l"
    );
    let sql = match (&scope, &q.site, &after) {
        (Some(_), None, _) => format!(
            "{select} WHERE l.tenant_id = $1 AND l.device_id > coalesce($4, '') \
             ORDER BY l.tenant_id, l.device_id LIMIT $5"
        ),
        (Some(_), Some(_), _) => format!(
            "{select} WHERE l.tenant_id = $1 AND l.site_id = $3 AND l.device_id > coalesce($4, '') \
             ORDER BY l.tenant_id, l.site_id, l.device_id LIMIT $5"
        ),
        (None, None, _) => format!(
            "{select} WHERE (l.tenant_id, l.device_id) > (coalesce($6, ''), coalesce($4, '')) \
             ORDER BY l.tenant_id, l.device_id LIMIT $5"
        ),
        (None, Some(_), _) => format!(
            "{select} WHERE l.site_id = $3 \
               AND (l.tenant_id, l.device_id) > (coalesce($6, ''), coalesce($4, '')) \
             ORDER BY l.tenant_id, l.device_id LIMIT $5"
        ),
    };
    let (after_tenant, after_device) = after.unzip();
    let rows: Vec<FleetLatest> = sqlx::query_as(&sql)
        .bind(&scope)
        .bind(&metrics)
        .bind(&q.site)
        .bind(after_device)
        .bind(fetch_limit(limit))
        .bind(after_tenant)
        .fetch_all(&mut *s.tx)
        .await?;
    s.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |r| {
        (r.tenant_id.clone(), r.device_id.clone())
    })))
}

/// Figures for the fleet overview.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetSummary {
    /// Provisioned devices.
    pub devices: i64,
    pub devices_disabled: i64,
    /// Devices whose last reading is at most 5 minutes old.
    pub devices_reporting: i64,
    pub alerts_firing: i64,
    pub alerts_pending: i64,
    /// Pipeline figures from `system_metrics` (latest per instance, summed); operators only,
    /// absent for tenant keys.
    pub pipeline: Option<BTreeMap<String, f64>>,
}

/// Pipeline figures shown on the overview.
const PIPELINE_METRICS: [&str; 4] = [
    "sink_rows_per_second",
    "sink_consumer_lag_messages",
    "sink_ingest_to_commit_avg_seconds",
    "ingest_request_avg_seconds",
];

#[utoipa::path(get, path = "/v1/fleet/summary", tag = "telemetry", params(TenantParam),
    responses((status = 200, body = FleetSummary), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn summary(
    mut s: Session,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<FleetSummary>, ApiError> {
    let scope = s.scope(t.tenant.as_deref())?;
    let (devices, devices_disabled): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'disabled') FROM devices \
         WHERE ($1::text IS NULL OR tenant_id = $1)",
    )
    .bind(&scope)
    .fetch_one(&mut *s.tx)
    .await?;
    let devices_reporting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM device_latest \
         WHERE ($1::text IS NULL OR tenant_id = $1) AND time > now() - interval '5 minutes'",
    )
    .bind(&scope)
    .fetch_one(&mut *s.tx)
    .await?;
    let (alerts_firing, alerts_pending): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'firing'), count(*) FILTER (WHERE status = 'pending') \
         FROM alerts WHERE ($1::text IS NULL OR tenant_id = $1) AND status IN ('firing', 'pending')",
    )
    .bind(&scope)
    .fetch_one(&mut *s.tx)
    .await?;
    // The view shows tenant keys nothing: the database, not this code, decides who sees it.
    let figures: Vec<(String, f64)> = sqlx::query_as(
        "SELECT metric_name, sum(value) FROM ( \
           SELECT DISTINCT ON (metric_name, instance) metric_name, instance, value \
           FROM system_metrics_view \
           WHERE metric_name = ANY($1) AND time > now() - interval '5 minutes' \
           ORDER BY metric_name, instance, time DESC) latest \
         GROUP BY metric_name",
    )
    .bind(&PIPELINE_METRICS[..])
    .fetch_all(&mut *s.tx)
    .await?;
    s.commit().await?;
    let pipeline = (!figures.is_empty()).then(|| figures.into_iter().collect());
    Ok(Json(FleetSummary {
        devices,
        devices_disabled,
        devices_reporting,
        alerts_firing,
        alerts_pending,
        pipeline,
    }))
}
