//! Alerts (list with filters, acknowledge) and alert rules (CRUD with validation).
//!
//! Alerts are written by evaluator-stream; the API only reads them and records an
//! acknowledgement (migration 0007 limits `fleet_api` to updating those columns). Rule changes
//! reach the evaluator through its reload on change.

use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use crate::api::TenantParam;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::page::{fetch_limit, Page, PageParams};
use crate::session::Session;
use crate::validate;

/// Longest `window_s` and `for_s` (one day).
pub const MAX_WINDOW_SECONDS: i32 = 86_400;
/// Longest `no_data_s` (seven days).
pub const MAX_NO_DATA_SECONDS: i32 = 7 * 86_400;

/// An alert.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Alert {
    pub alert_id: i64,
    pub tenant_id: String,
    pub rule_id: i64,
    pub device_id: String,
    pub site_id: Option<String>,
    /// `pending`, `firing` or `resolved`.
    pub status: String,
    pub severity: String,
    pub metric: Option<String>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub fired_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
}

/// `GET /v1/alerts` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertList {
    /// Tenant (operators; a tenant key's own by default). Operators without it see all tenants.
    pub tenant: Option<String>,
    /// `pending`, `firing` or `resolved`.
    pub status: Option<String>,
    /// `info`, `warning` or `critical`.
    pub severity: Option<String>,
    /// Only alerts of this device.
    pub device: Option<String>,
    /// Alerts started at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Alerts started before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

const ALERT_COLUMNS: &str = "alert_id, tenant_id, rule_id, device_id, site_id, status, severity, \
    metric, value, threshold, started_at, fired_at, resolved_at, acknowledged_at, acknowledged_by";

fn one_of(field: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::bad(
            field,
            format!("must be one of {}", allowed.join(", ")),
        )),
        _ => Ok(()),
    }
}

#[utoipa::path(get, path = "/v1/alerts", tag = "alerts", params(AlertList),
    responses((status = 200, description = "Newest first", body = Page<Alert>),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    mut s: Session,
    ApiQuery(q): ApiQuery<AlertList>,
) -> Result<Json<Page<Alert>>, ApiError> {
    let scope = s.scope(q.tenant.as_deref())?;
    one_of("status", &q.status, &["pending", "firing", "resolved"])?;
    one_of("severity", &q.severity, &["info", "warning", "critical"])?;
    if let Some(device) = &q.device {
        validate::id("device", device)?;
    }
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, i64)> = page.after()?;
    let (after_started, after_id) = after.unzip();
    let rows: Vec<Alert> = sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts \
         WHERE ($1::text IS NULL OR tenant_id = $1) \
           AND ($2::text IS NULL OR status = $2) \
           AND ($3::text IS NULL OR severity = $3) \
           AND ($4::text IS NULL OR device_id = $4) \
           AND ($5::timestamptz IS NULL OR started_at >= $5) \
           AND ($6::timestamptz IS NULL OR started_at < $6) \
           AND ($7::timestamptz IS NULL OR (started_at, alert_id) < ($7, $8)) \
         ORDER BY started_at DESC, alert_id DESC LIMIT $9"
    ))
    .bind(scope)
    .bind(&q.status)
    .bind(&q.severity)
    .bind(&q.device)
    .bind(q.from)
    .bind(q.to)
    .bind(after_started)
    .bind(after_id)
    .bind(fetch_limit(limit))
    .fetch_all(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |a| {
        (a.started_at, a.alert_id)
    })))
}

#[utoipa::path(post, path = "/v1/alerts/{alert_id}/ack", tag = "alerts",
    params(("alert_id" = i64, Path, description = "Alert id")),
    responses((status = 200, description = "Acknowledged (idempotent: the first acknowledgement is kept)", body = Alert),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn acknowledge(
    mut s: Session,
    ApiPath(alert_id): ApiPath<i64>,
) -> Result<Json<Alert>, ApiError> {
    s.require_write()?;
    let actor = s.actor();
    let alert: Option<Alert> = sqlx::query_as(&format!(
        "UPDATE alerts SET acknowledged_at = coalesce(acknowledged_at, now()), \
                acknowledged_by = coalesce(acknowledged_by, $2), updated_at = now() \
         WHERE alert_id = $1 RETURNING {ALERT_COLUMNS}"
    ))
    .bind(alert_id)
    .bind(actor)
    .fetch_optional(&mut *s.tx)
    .await?;
    let alert = alert.ok_or(ApiError::NotFound("alert"))?;
    s.commit().await?;
    Ok(Json(alert))
}

/// An alert rule.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct AlertRule {
    pub rule_id: i64,
    pub tenant_id: String,
    pub name: String,
    pub site_id: Option<String>,
    pub device_id: Option<String>,
    pub metric: Option<String>,
    /// `threshold`, `window` or `no_data`.
    pub kind: String,
    pub agg: Option<String>,
    pub op: Option<String>,
    pub threshold: Option<f64>,
    pub window_s: Option<i32>,
    pub for_s: i32,
    pub no_data_s: Option<i32>,
    pub resolve_threshold: Option<f64>,
    pub severity: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A rule as created or replaced.
///
/// * `threshold`: `metric`, `op`, `threshold` (fires when the latest value compares true);
/// * `window`: also `agg` and `window_s` (the aggregate over the sliding window compares true);
/// * `no_data`: `no_data_s` (the device is silent that long).
///
/// `for_s` is how long the condition must hold before firing; `resolve_threshold` (with an
/// ordered `op`) is the hysteresis level at which a firing alert resolves.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleInput {
    pub name: String,
    pub kind: String,
    pub site_id: Option<String>,
    pub device_id: Option<String>,
    pub metric: Option<String>,
    /// `avg`, `min`, `max` or `count`.
    pub agg: Option<String>,
    /// `>`, `>=`, `<`, `<=`, `==` or `!=`.
    pub op: Option<String>,
    pub threshold: Option<f64>,
    pub window_s: Option<i32>,
    pub for_s: Option<i32>,
    pub no_data_s: Option<i32>,
    pub resolve_threshold: Option<f64>,
    /// `info`, `warning` (default) or `critical`.
    pub severity: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
}

fn required<'a, T>(field: &str, value: &'a Option<T>, kind: &str) -> Result<&'a T, ApiError> {
    value
        .as_ref()
        .ok_or_else(|| ApiError::bad(field, format!("is required for a {kind} rule")))
}

fn seconds(field: &str, value: Option<i32>, min: i32, max: i32) -> Result<(), ApiError> {
    match value {
        Some(v) if v < min || v > max => Err(ApiError::bad(
            field,
            format!("must be between {min} and {max} seconds"),
        )),
        _ => Ok(()),
    }
}

fn finite(field: &str, value: Option<f64>) -> Result<(), ApiError> {
    match value {
        Some(v) if !v.is_finite() => Err(ApiError::bad(field, "must be a finite number")),
        _ => Ok(()),
    }
}

impl RuleInput {
    /// Checks everything the table's CHECK constraints would, naming the field.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::name("name", &self.name)?;
        for (field, value) in [
            ("site_id", &self.site_id),
            ("device_id", &self.device_id),
            ("metric", &self.metric),
        ] {
            if let Some(value) = value {
                validate::id(field, value)?;
            }
        }
        one_of("agg", &self.agg, &["avg", "min", "max", "count"])?;
        one_of("op", &self.op, &[">", ">=", "<", "<=", "==", "!="])?;
        one_of("severity", &self.severity, &["info", "warning", "critical"])?;
        finite("threshold", self.threshold)?;
        finite("resolve_threshold", self.resolve_threshold)?;
        seconds("window_s", self.window_s, 1, MAX_WINDOW_SECONDS)?;
        seconds("for_s", self.for_s, 0, MAX_WINDOW_SECONDS)?;
        seconds("no_data_s", self.no_data_s, 1, MAX_NO_DATA_SECONDS)?;
        if self.resolve_threshold.is_some()
            && !matches!(self.op.as_deref(), Some(">" | ">=" | "<" | "<="))
        {
            return Err(ApiError::bad(
                "resolve_threshold",
                "needs an ordered op (>, >=, <, <=)",
            ));
        }
        if self.kind != "window" {
            for (field, present) in [
                ("agg", self.agg.is_some()),
                ("window_s", self.window_s.is_some()),
            ] {
                if present {
                    return Err(ApiError::bad(field, "only a window rule has one"));
                }
            }
        }
        match self.kind.as_str() {
            "threshold" => {
                required("metric", &self.metric, "threshold")?;
                required("op", &self.op, "threshold")?;
                required("threshold", &self.threshold, "threshold")?;
            }
            "window" => {
                required("metric", &self.metric, "window")?;
                required("op", &self.op, "window")?;
                required("threshold", &self.threshold, "window")?;
                required("agg", &self.agg, "window")?;
                required("window_s", &self.window_s, "window")?;
            }
            "no_data" => {
                required("no_data_s", &self.no_data_s, "no_data")?;
            }
            _ => {
                return Err(ApiError::bad(
                    "kind",
                    "must be one of threshold, window, no_data",
                ))
            }
        }
        Ok(())
    }
}

/// `GET /v1/alert-rules` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RuleList {
    /// Tenant (operators; a tenant key's own by default). Operators without it see all tenants.
    pub tenant: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

const RULE_COLUMNS: &str = "rule_id, tenant_id, name, site_id, device_id, metric, kind, agg, op, \
    threshold, window_s, for_s, no_data_s, resolve_threshold, severity, enabled, created_at, updated_at";

#[utoipa::path(get, path = "/v1/alert-rules", tag = "alerts", params(RuleList),
    responses((status = 200, body = Page<AlertRule>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_rules(
    mut s: Session,
    ApiQuery(q): ApiQuery<RuleList>,
) -> Result<Json<Page<AlertRule>>, ApiError> {
    let scope = s.scope(q.tenant.as_deref())?;
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let page = crate::page::by_integer_key(
        &mut s.tx,
        RULE_COLUMNS,
        "alert_rules",
        "rule_id",
        scope.as_deref(),
        &page,
        |r: &AlertRule| r.rule_id,
    )
    .await?;
    s.commit().await?;
    Ok(Json(page))
}

#[utoipa::path(get, path = "/v1/alert-rules/{rule_id}", tag = "alerts",
    params(("rule_id" = i64, Path, description = "Rule id")),
    responses((status = 200, body = AlertRule), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_rule(
    mut s: Session,
    ApiPath(rule_id): ApiPath<i64>,
) -> Result<Json<AlertRule>, ApiError> {
    let rule: Option<AlertRule> = sqlx::query_as(&format!(
        "SELECT {RULE_COLUMNS} FROM alert_rules WHERE rule_id = $1"
    ))
    .bind(rule_id)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    rule.map(Json).ok_or(ApiError::NotFound("alert rule"))
}

/// The scope a rule names must exist in the rule's tenant.
async fn check_targets(s: &mut Session, tenant: &str, rule: &RuleInput) -> Result<(), ApiError> {
    if let Some(site) = &rule.site_id {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM sites WHERE tenant_id = $1 AND site_id = $2")
                .bind(tenant)
                .bind(site)
                .fetch_optional(&mut *s.tx)
                .await?;
        if found.is_none() {
            return Err(ApiError::bad("site_id", "no such site"));
        }
    }
    if let Some(device) = &rule.device_id {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2")
                .bind(tenant)
                .bind(device)
                .fetch_optional(&mut *s.tx)
                .await?;
        if found.is_none() {
            return Err(ApiError::bad("device_id", "no such device"));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/alert-rules", tag = "alerts", params(TenantParam),
    request_body = RuleInput,
    responses((status = 201, body = AlertRule), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_rule(
    mut s: Session,
    ApiQuery(t): ApiQuery<TenantParam>,
    ApiJson(rule): ApiJson<RuleInput>,
) -> Result<(StatusCode, Json<AlertRule>), ApiError> {
    s.require_write()?;
    let tenant = s.tenant(t.tenant.as_deref())?;
    rule.validate()?;
    check_targets(&mut s, &tenant, &rule).await?;
    let created: AlertRule = sqlx::query_as(&format!(
        "INSERT INTO alert_rules (tenant_id, name, site_id, device_id, metric, kind, agg, op, \
             threshold, window_s, for_s, no_data_s, resolve_threshold, severity, enabled) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, coalesce($11, 0), $12, $13, \
                 coalesce($14, 'warning'), coalesce($15, true)) \
         RETURNING {RULE_COLUMNS}"
    ))
    .bind(&tenant)
    .bind(&rule.name)
    .bind(&rule.site_id)
    .bind(&rule.device_id)
    .bind(&rule.metric)
    .bind(&rule.kind)
    .bind(&rule.agg)
    .bind(&rule.op)
    .bind(rule.threshold)
    .bind(rule.window_s)
    .bind(rule.for_s)
    .bind(rule.no_data_s)
    .bind(rule.resolve_threshold)
    .bind(&rule.severity)
    .bind(rule.enabled)
    .fetch_one(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(put, path = "/v1/alert-rules/{rule_id}", tag = "alerts",
    params(("rule_id" = i64, Path, description = "Rule id")), request_body = RuleInput,
    responses((status = 200, body = AlertRule), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn replace_rule(
    mut s: Session,
    ApiPath(rule_id): ApiPath<i64>,
    ApiJson(rule): ApiJson<RuleInput>,
) -> Result<Json<AlertRule>, ApiError> {
    s.require_write()?;
    rule.validate()?;
    let tenant: Option<String> =
        sqlx::query_scalar("SELECT tenant_id FROM alert_rules WHERE rule_id = $1 FOR UPDATE")
            .bind(rule_id)
            .fetch_optional(&mut *s.tx)
            .await?;
    let tenant = tenant.ok_or(ApiError::NotFound("alert rule"))?;
    check_targets(&mut s, &tenant, &rule).await?;
    let updated: Option<AlertRule> = sqlx::query_as(&format!(
        "UPDATE alert_rules SET name = $2, site_id = $3, device_id = $4, metric = $5, kind = $6, \
             agg = $7, op = $8, threshold = $9, window_s = $10, for_s = coalesce($11, 0), \
             no_data_s = $12, resolve_threshold = $13, severity = coalesce($14, 'warning'), \
             enabled = coalesce($15, true), updated_at = now() \
         WHERE rule_id = $1 RETURNING {RULE_COLUMNS}"
    ))
    .bind(rule_id)
    .bind(&rule.name)
    .bind(&rule.site_id)
    .bind(&rule.device_id)
    .bind(&rule.metric)
    .bind(&rule.kind)
    .bind(&rule.agg)
    .bind(&rule.op)
    .bind(rule.threshold)
    .bind(rule.window_s)
    .bind(rule.for_s)
    .bind(rule.no_data_s)
    .bind(rule.resolve_threshold)
    .bind(&rule.severity)
    .bind(rule.enabled)
    .fetch_optional(&mut *s.tx)
    .await?;
    let updated = updated.ok_or(ApiError::NotFound("alert rule"))?;
    s.commit().await?;
    Ok(Json(updated))
}

#[utoipa::path(delete, path = "/v1/alert-rules/{rule_id}", tag = "alerts",
    params(("rule_id" = i64, Path, description = "Rule id")),
    responses((status = 204, description = "Deleted with its alerts"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_rule(
    mut s: Session,
    ApiPath(rule_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    s.require_write()?;
    let deleted = sqlx::query("DELETE FROM alert_rules WHERE rule_id = $1")
        .bind(rule_id)
        .execute(&mut *s.tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(ApiError::NotFound("alert rule"));
    }
    s.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
