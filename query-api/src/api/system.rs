//! Pipeline health for operators: the services' key figures from `system_metrics`, bucketed.
//!
//! Reads go through `system_metrics_view`, which the database restricts to operator roles; the
//! role check here only turns "nothing visible" into a clear 403 for tenant keys.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use schemas::Layout;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::series::Point;
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiQuery;
use crate::http::AppState;
use crate::session::Session;
use crate::validate;

/// Most series (metric × instance) in one answer.
pub const MAX_SYSTEM_SERIES: i64 = 200;

/// `GET /v1/system/metrics` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SystemQuery {
    /// Comma-separated metric names (default: every metric in the range).
    pub names: Option<String>,
    /// Start, inclusive (RFC 3339). Default: one hour before `to`.
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (RFC 3339). Default: now.
    pub to: Option<DateTime<Utc>>,
    /// Bucket width in whole seconds (`10s`, `1m`); default 1m. Values are averaged per bucket.
    pub bucket: Option<String>,
}

/// One figure of one service instance over time.
#[derive(Debug, Serialize, ToSchema)]
pub struct SystemSeries {
    pub metric_name: String,
    pub instance: String,
    /// The writing service (`tags.service`).
    pub service: Option<String>,
    pub points: Vec<Point>,
}

/// The answer of `GET /v1/system/metrics`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SystemMetrics {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub bucket_seconds: u64,
    pub series: Vec<SystemSeries>,
}

/// (metric_name, instance, service, bucket, average).
type SystemRow = (String, String, Option<String>, DateTime<Utc>, Option<f64>);

macro_rules! system_sql {
    ($bucket_fn:literal) => {
        concat!(
            "WITH picked AS ( \
               SELECT DISTINCT metric_name, instance FROM system_metrics_view \
               WHERE time >= $2 AND time < $3 AND ($4::text[] IS NULL OR metric_name = ANY($4)) \
               ORDER BY 1, 2 LIMIT $5) \
             SELECT v.metric_name, v.instance, max(v.tags ->> 'service') AS service, ",
            $bucket_fn,
            "($1::interval, v.time, '2000-01-01 00:00:00+00'::timestamptz) AS bucket, avg(v.value) \
             FROM system_metrics_view v JOIN picked USING (metric_name, instance) \
             WHERE v.time >= $2 AND v.time < $3 \
             GROUP BY 1, 2, 4 ORDER BY 1, 2, 4"
        )
    };
}

#[utoipa::path(get, path = "/v1/system/metrics", tag = "system", params(SystemQuery),
    responses((status = 200, body = SystemMetrics), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn metrics(
    State(state): State<AppState>,
    mut s: Session,
    ApiQuery(q): ApiQuery<SystemQuery>,
) -> Result<Json<SystemMetrics>, ApiError> {
    s.require_operator()?;
    let names = q
        .names
        .as_deref()
        .map(|n| validate::id_list("names", n, 50))
        .transpose()?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - chrono::Duration::hours(1));
    if from >= to {
        return Err(ApiError::bad("from", "must be before `to`"));
    }
    let range_s = (to - from).num_seconds().max(1) as u64;
    if range_s > state.limits.max_range.as_secs() {
        return Err(ApiError::bad(
            "from",
            format!(
                "range of {range_s}s exceeds the max_range limit of {}s",
                state.limits.max_range.as_secs()
            ),
        ));
    }
    let bucket_s = match q.bucket.as_deref() {
        None => 60,
        Some(text) => crate::api::series::parse_bucket(text)?,
    };
    let buckets = range_s.div_ceil(bucket_s) + 1;
    if buckets > state.limits.max_points {
        return Err(ApiError::bad(
            "bucket",
            format!(
                "{buckets} buckets per series exceed the max_points limit of {}",
                state.limits.max_points
            ),
        ));
    }
    let sql = match state.layout().await? {
        Layout::TimescaleDb => system_sql!("time_bucket"),
        Layout::Postgres => system_sql!("date_bin"),
    };
    let rows: Vec<SystemRow> = sqlx::query_as(sql)
        .bind(sqlx::postgres::types::PgInterval {
            months: 0,
            days: 0,
            microseconds: (bucket_s as i64).saturating_mul(1_000_000),
        })
        .bind(from)
        .bind(to)
        .bind(&names)
        .bind(MAX_SYSTEM_SERIES)
        .fetch_all(&mut *s.tx)
        .await?;
    s.commit().await?;
    let mut series: BTreeMap<(String, String), SystemSeries> = BTreeMap::new();
    for (metric_name, instance, service, time, value) in rows {
        let entry = series
            .entry((metric_name.clone(), instance.clone()))
            .or_insert_with(|| SystemSeries {
                metric_name,
                instance,
                service: service.clone(),
                points: Vec::new(),
            });
        if let Some(value) = value {
            entry.points.push(Point { time, value });
        }
    }
    Ok(Json(SystemMetrics {
        from,
        to,
        bucket_seconds: bucket_s,
        series: series.into_values().collect(),
    }))
}
