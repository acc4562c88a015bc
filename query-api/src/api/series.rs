//! Time series of one device: raw readings or buckets aggregated with `avg`, `min`, `max`,
//! `last` or `count`.
//!
//! Buckets are `time_bucket` on TimescaleDB and `date_bin` on plain PostgreSQL (the layout is
//! read from `fleetstream_settings`), both aligned to 2000-01-01T00:00:00Z so the two layouts
//! give identical buckets. Reads go through `telemetry_view`, whose tenant predicate the
//! database applies; the device, tenant and time predicates are leakproof, so they still reach
//! the primary key `(tenant_id, device_id, time)`.
//!
//! Buckets of whole minutes read the 1-minute rollups (`telemetry_1m_view`, migration 0009)
//! for the whole minutes below the rollup watermark and the raw readings for the rest (the
//! partial minutes at the edges of the range, and everything at or after the watermark), and
//! combine both in one statement (one snapshot, so the watermark and the rollups agree): a day
//! of one device is ~1,440 narrow rows instead of every jsonb reading. Counts, minima, maxima
//! and last values are exactly those of the raw path; averages are exact `numeric` sums of
//! the stored decimal values divided by the count and rounded once to a double (so both
//! paths give the same bits, and no finite readings overflow them). Raw readings and buckets
//! that are not whole minutes read raw readings only.
//!
//! Limits (both 400s naming the limit): the range may not exceed `MAX_QUERY_RANGE`, and the
//! answer may not exceed `MAX_POINTS` points (buckets × metrics, or readings × metrics).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use schemas::Layout;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, ApiQuery};
use crate::http::AppState;
use crate::session::Session;
use crate::validate;

/// Most metrics one series request may name.
pub const MAX_SERIES_METRICS: usize = 10;
/// Range when `from` is not given.
const DEFAULT_RANGE: Duration = Duration::from_secs(3600);

/// Aggregate applied within each bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Agg {
    Avg,
    Min,
    Max,
    /// The value of the newest reading in the bucket.
    Last,
    /// How many readings carry the metric.
    Count,
}

/// `GET /v1/devices/{device_id}/telemetry` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeriesQuery {
    /// Tenant (operators must name it; a tenant key's own by default).
    pub tenant: Option<String>,
    /// Start, inclusive (RFC 3339). Default: one hour before `to`.
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (RFC 3339). Default: now.
    pub to: Option<DateTime<Utc>>,
    /// Comma-separated metric names (at most 10).
    pub metrics: String,
    /// Bucket width (`10s`, `1m`, `1h`); whole seconds. Without it, raw readings are returned.
    pub bucket: Option<String>,
    /// Aggregate per bucket (default `avg`); needs `bucket`.
    pub agg: Option<Agg>,
}

/// One point of a series.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct Point {
    /// Reading time, or the start of the bucket.
    pub time: DateTime<Utc>,
    pub value: f64,
}

/// The points of one metric.
#[derive(Debug, Serialize, ToSchema)]
pub struct Series {
    pub metric: String,
    pub points: Vec<Point>,
}

/// A device's series over a range.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesResponse {
    pub tenant_id: String,
    pub device_id: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Bucket width in seconds; absent for raw readings.
    pub bucket_seconds: Option<u64>,
    pub agg: Option<Agg>,
    /// One entry per requested metric, in request order (empty `points` when none).
    pub series: Vec<Series>,
    /// Minutes of this device in the range that the 1-minute rollup could not aggregate (a
    /// data error, e.g. a number beyond double precision written outside the pipeline; see
    /// `telemetry_1m_rejected`): buckets served from rollups leave their readings out. Only
    /// for buckets of whole minutes; empty otherwise.
    pub unaggregated_minutes: Vec<DateTime<Utc>>,
}

/// The device's rejected rollup minutes in `[from, to)` (migration 0014).
const UNAGGREGATED_SQL: &str = "SELECT bucket FROM telemetry_1m_rejected_view \
     WHERE tenant_id = $1 AND device_id = $2 AND bucket > $3 - interval '1 minute' AND bucket < $4 \
     ORDER BY bucket";

/// The numeric value of `metrics -> k` (booleans as 0/1), NULL otherwise; `j` is extracted
/// once per row and metric, and NULLs are left to the aggregates (which skip them) instead of
/// a filter that would evaluate the expression a second time.
macro_rules! metric_value {
    () => {
        "CASE jsonb_typeof(x.j) \
           WHEN 'number' THEN x.j::float8 \
           WHEN 'boolean' THEN CASE WHEN x.j::boolean THEN 1.0 ELSE 0.0 END \
         END"
    };
}

/// The same value as an exact `numeric` (a jsonb number is a decimal): averages add these, so
/// no finite readings overflow them (two readings of 1.5e308 have the average 1.5e308), and
/// round once at the end (`fleet_float8`, migration 0014).
macro_rules! metric_numeric {
    () => {
        "CASE jsonb_typeof(x.j) \
           WHEN 'number' THEN x.j::numeric \
           WHEN 'boolean' THEN CASE WHEN x.j::boolean THEN 1::numeric ELSE 0::numeric END \
         END"
    };
}

macro_rules! bucketed_sql {
    ($bucket_fn:literal, $agg:literal) => {
        concat!(
            "SELECT ",
            $bucket_fn,
            "($3::interval, t.time, '2000-01-01 00:00:00+00'::timestamptz) AS bucket, m.k AS metric, \
             CASE WHEN count(m.v) > 0 THEN ",
            $agg,
            " END AS value \
             FROM telemetry_view t \
             CROSS JOIN LATERAL (SELECT x.k, ",
            metric_value!(),
            " AS v, ",
            metric_numeric!(),
            " AS nv FROM (SELECT k, t.metrics -> k AS j FROM unnest($4::text[]) AS k) x) m \
             WHERE t.tenant_id = $1 AND t.device_id = $2 AND t.time >= $5 AND t.time < $6 \
             GROUP BY 1, 2 ORDER BY 2, 1"
        )
    };
}

macro_rules! bucketed_for_layout {
    ($bucket_fn:literal, $agg:expr) => {
        match $agg {
            Agg::Avg => bucketed_sql!($bucket_fn, "fleet_float8(avg(m.nv))"),
            Agg::Min => bucketed_sql!($bucket_fn, "min(m.v)"),
            Agg::Max => bucketed_sql!($bucket_fn, "max(m.v)"),
            Agg::Count => bucketed_sql!($bucket_fn, "count(m.v)::float8"),
            Agg::Last => bucketed_sql!(
                $bucket_fn,
                "(array_agg(m.v ORDER BY t.time DESC) FILTER (WHERE m.v IS NOT NULL))[1]"
            ),
        }
    };
}

/// The statement for a layout and aggregate (static text: nothing from the request is spliced).
fn bucketed_statement(layout: Layout, agg: Agg) -> &'static str {
    match layout {
        Layout::TimescaleDb => bucketed_for_layout!("time_bucket", agg),
        Layout::Postgres => bucketed_for_layout!("date_bin", agg),
    }
}

/// One raw branch of the rollup statement: each numeric reading of `$4`'s metrics in
/// `[$lo, $hi)` as a partial of its own (n = 1).
macro_rules! raw_partials {
    ($lo:literal, $hi:literal) => {
        concat!(
            "SELECT t.time, m.k, 1::bigint, m.nv, m.v, m.v, t.time, m.v \
             FROM telemetry_view t \
             CROSS JOIN LATERAL (SELECT x.k, ",
            metric_value!(),
            " AS v, ",
            metric_numeric!(),
            " AS nv FROM (SELECT k, t.metrics -> k AS j FROM unnest($4::text[]) AS k) x) m \
             WHERE t.tenant_id = $1 AND t.device_id = $2 AND t.time >= ",
            $lo,
            " AND t.time < ",
            $hi,
            " AND m.v IS NOT NULL"
        )
    };
}

/// Buckets of whole minutes from partials: rollup rows for the whole minutes in
/// `[lo, hi)` (`lo` = `$5` rounded up to a minute, `hi` = `$6` rounded down, at most the
/// watermark) and raw readings in `[$5, lo)` and `[hi, $6)`. Minutes are aligned to
/// 2000-01-01 like the buckets, so every minute lies in one bucket.
///
/// The rollup rows are read one metric at a time (`OFFSET 0` keeps the lateral subquery a
/// parameterised index scan on the whole key prefix): with `metric = ANY($4)` the generic
/// plan of the prepared statement scanned every metric of the device and filtered (3× the
/// rows and heap pages on the benchmark's data).
macro_rules! rollup_sql {
    ($bucket_fn:literal, $agg:literal) => {
        concat!(
            "WITH edges AS MATERIALIZED ( \
                 SELECT e.lo, greatest(e.lo, least(date_bin('1 minute', $6, '2000-01-01 00:00:00+00'), \
                        COALESCE((SELECT s.watermark FROM telemetry_1m_state s), '-infinity'))) AS hi \
                 FROM (SELECT CASE WHEN date_bin('1 minute', $5, '2000-01-01 00:00:00+00') = $5 THEN $5 \
                              ELSE date_bin('1 minute', $5, '2000-01-01 00:00:00+00') + interval '1 minute' \
                              END AS lo) e), \
             parts (time, metric, n, sum, min, max, last_time, last) AS ( \
                 SELECT r.bucket, r.metric, r.n, r.sum, r.min, r.max, r.last_time, r.last \
                 FROM unnest($4::text[]) AS mk (metric) \
                 CROSS JOIN LATERAL (SELECT * FROM telemetry_1m_view v \
                     WHERE v.tenant_id = $1 AND v.device_id = $2 AND v.metric = mk.metric \
                       AND v.bucket >= (SELECT lo FROM edges) AND v.bucket < (SELECT hi FROM edges) \
                     OFFSET 0) r \
                 UNION ALL ",
            raw_partials!("$5", "least((SELECT lo FROM edges), $6)"),
            " UNION ALL ",
            raw_partials!("(SELECT hi FROM edges)", "$6"),
            ") SELECT ",
            $bucket_fn,
            "($3::interval, p.time, '2000-01-01 00:00:00+00'::timestamptz) AS bucket, p.metric, ",
            $agg,
            " AS value FROM parts p GROUP BY 1, 2 ORDER BY 2, 1"
        )
    };
}

macro_rules! rollup_for_layout {
    ($bucket_fn:literal, $agg:expr) => {
        match $agg {
            Agg::Avg => rollup_sql!($bucket_fn, "fleet_float8(sum(p.sum) / sum(p.n))"),
            Agg::Min => rollup_sql!($bucket_fn, "min(p.min)"),
            Agg::Max => rollup_sql!($bucket_fn, "max(p.max)"),
            Agg::Count => rollup_sql!($bucket_fn, "sum(p.n)::float8"),
            Agg::Last => rollup_sql!(
                $bucket_fn,
                "(array_agg(p.last ORDER BY p.last_time DESC))[1]"
            ),
        }
    };
}

/// The rollup statement for a layout and aggregate (for buckets of whole minutes).
fn rollup_statement(layout: Layout, agg: Agg) -> &'static str {
    match layout {
        Layout::TimescaleDb => rollup_for_layout!("time_bucket", agg),
        Layout::Postgres => rollup_for_layout!("date_bin", agg),
    }
}

/// The statement serving `bucket_s`-second buckets: rollups plus raw edges for whole
/// minutes, raw readings otherwise.
fn series_statement(layout: Layout, agg: Agg, bucket_s: u64) -> &'static str {
    if bucket_s.is_multiple_of(60) {
        rollup_statement(layout, agg)
    } else {
        bucketed_statement(layout, agg)
    }
}

const RAW_SQL: &str = "SELECT t.time, t.metrics FROM telemetry_view t \
     WHERE t.tenant_id = $1 AND t.device_id = $2 AND t.time >= $3 AND t.time < $4 \
     ORDER BY t.time LIMIT $5";

/// Whole seconds of a bucket parameter (`10s`, `1m`, `1h`, `1d`).
pub(crate) fn parse_bucket(text: &str) -> Result<u64, ApiError> {
    // Bounded before parsing: the shared duration parser panics on values beyond `Duration`.
    let digits = text.chars().filter(char::is_ascii_digit).count();
    if text.len() > 16 || digits > 9 {
        return Err(ApiError::bad(
            "bucket",
            "must be a duration such as 10s, 1m or 1h",
        ));
    }
    let bucket = plumbing::config::parse_duration(text).map_err(|e| ApiError::bad("bucket", e))?;
    if bucket.subsec_nanos() != 0 || bucket.as_secs() == 0 {
        return Err(ApiError::bad(
            "bucket",
            "must be a whole number of seconds, at least 1s",
        ));
    }
    Ok(bucket.as_secs())
}

#[utoipa::path(get, path = "/v1/devices/{device_id}/telemetry", tag = "telemetry",
    params(("device_id" = String, Path, description = "Device identifier"), SeriesQuery),
    responses((status = 200, body = SeriesResponse),
              (status = 400, description = "Bad parameter, or over the range or points limit (the body names it)", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 503, description = "The statement timeout was reached", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn series(
    State(state): State<AppState>,
    mut s: Session,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(q): ApiQuery<SeriesQuery>,
) -> Result<Json<SeriesResponse>, ApiError> {
    let tenant = s.tenant(q.tenant.as_deref())?;
    validate::id("device_id", &device_id)?;
    let metrics = validate::id_list("metrics", &q.metrics, MAX_SERIES_METRICS)?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = match q.from {
        Some(from) => from,
        None => to - chrono::Duration::from_std(DEFAULT_RANGE).unwrap_or_default(),
    };
    if from >= to {
        return Err(ApiError::bad("from", "must be before `to`"));
    }
    let limits = &state.limits;
    let range_ms = (to - from).num_milliseconds().max(0) as u128;
    if range_ms > limits.max_range.as_millis() {
        return Err(ApiError::bad(
            "from",
            format!(
                "range of {}s exceeds the max_range limit of {}s",
                range_ms / 1000,
                limits.max_range.as_secs()
            ),
        ));
    }
    let bucket = q.bucket.as_deref().map(parse_bucket).transpose()?;
    if bucket.is_none() && q.agg.is_some() {
        return Err(ApiError::bad("agg", "needs a bucket"));
    }
    let agg = bucket.map(|_| q.agg.unwrap_or(Agg::Avg));

    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2")
            .bind(&tenant)
            .bind(&device_id)
            .fetch_optional(&mut *s.tx)
            .await?;
    if exists.is_none() {
        return Err(ApiError::NotFound("device"));
    }

    let mut by_metric: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    let mut unaggregated_minutes = Vec::new();
    match (bucket, agg) {
        (Some(bucket_s), Some(agg)) => {
            let buckets = (range_ms as u64).div_ceil(bucket_s * 1000) + 1;
            let points = buckets.saturating_mul(metrics.len() as u64);
            if points > limits.max_points {
                return Err(ApiError::bad(
                    "bucket",
                    format!(
                        "up to {points} points exceed the max_points limit of {}; use a coarser bucket, a shorter range or fewer metrics",
                        limits.max_points
                    ),
                ));
            }
            let layout = state.layout().await?;
            let rows: Vec<(DateTime<Utc>, String, Option<f64>)> =
                sqlx::query_as(series_statement(layout, agg, bucket_s))
                    .bind(&tenant)
                    .bind(&device_id)
                    .bind(sqlx::postgres::types::PgInterval {
                        months: 0,
                        days: 0,
                        microseconds: (bucket_s as i64).saturating_mul(1_000_000),
                    })
                    .bind(&metrics)
                    .bind(from)
                    .bind(to)
                    .fetch_all(&mut *s.tx)
                    .await?;
            if bucket_s % 60 == 0 {
                unaggregated_minutes = sqlx::query_scalar(UNAGGREGATED_SQL)
                    .bind(&tenant)
                    .bind(&device_id)
                    .bind(from)
                    .bind(to)
                    .fetch_all(&mut *s.tx)
                    .await?;
            }
            for (time, metric, value) in rows {
                if let Some(value) = value {
                    by_metric
                        .entry(metric)
                        .or_default()
                        .push(Point { time, value });
                }
            }
        }
        _ => {
            let max_rows = (limits.max_points / metrics.len() as u64).max(1);
            let rows: Vec<(DateTime<Utc>, serde_json::Value)> = sqlx::query_as(RAW_SQL)
                .bind(&tenant)
                .bind(&device_id)
                .bind(from)
                .bind(to)
                .bind(max_rows as i64 + 1)
                .fetch_all(&mut *s.tx)
                .await?;
            if rows.len() as u64 > max_rows {
                return Err(ApiError::bad(
                    "bucket",
                    format!(
                        "more than {max_rows} readings × {} metrics exceed the max_points limit of {}; set a bucket or a shorter range",
                        metrics.len(),
                        limits.max_points
                    ),
                ));
            }
            for (time, values) in rows {
                for metric in &metrics {
                    let value = match values.get(metric) {
                        Some(serde_json::Value::Number(n)) => n.as_f64(),
                        Some(serde_json::Value::Bool(b)) => Some(if *b { 1.0 } else { 0.0 }),
                        _ => None,
                    };
                    if let Some(value) = value {
                        by_metric
                            .entry(metric.clone())
                            .or_default()
                            .push(Point { time, value });
                    }
                }
            }
        }
    }
    s.commit().await?;
    let series = metrics
        .into_iter()
        .map(|metric| Series {
            points: by_metric.remove(&metric).unwrap_or_default(),
            metric,
        })
        .collect();
    Ok(Json(SeriesResponse {
        tenant_id: tenant,
        device_id,
        from,
        to,
        bucket_seconds: bucket,
        agg,
        series,
        unaggregated_minutes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_whole_seconds() {
        assert_eq!(parse_bucket("1m").unwrap(), 60);
        assert_eq!(parse_bucket("10").unwrap(), 10);
        assert!(parse_bucket("500ms").is_err());
        assert!(parse_bucket("0s").is_err());
        assert!(parse_bucket("1'; DROP TABLE x").is_err());
        assert!(parse_bucket("99999999999999999999999").is_err());
    }

    #[test]
    fn each_layout_uses_its_bucket_function() {
        assert!(bucketed_statement(Layout::Postgres, Agg::Avg).contains("date_bin("));
        assert!(bucketed_statement(Layout::TimescaleDb, Agg::Last).contains("time_bucket("));
        assert!(bucketed_statement(Layout::Postgres, Agg::Count).contains("count(m.v)"));
        assert!(rollup_statement(Layout::Postgres, Agg::Avg).contains("date_bin($3"));
        assert!(rollup_statement(Layout::TimescaleDb, Agg::Avg).contains("time_bucket($3"));
    }

    #[test]
    fn whole_minute_buckets_read_rollups_others_raw_readings() {
        for agg in [Agg::Avg, Agg::Min, Agg::Max, Agg::Last, Agg::Count] {
            for bucket_s in [60, 300, 3600, 86_400] {
                let sql = series_statement(Layout::Postgres, agg, bucket_s);
                assert!(sql.contains("telemetry_1m_view"), "{agg:?} {bucket_s}s");
            }
            for bucket_s in [1, 30, 90, 150] {
                let sql = series_statement(Layout::Postgres, agg, bucket_s);
                assert!(!sql.contains("telemetry_1m_view"), "{agg:?} {bucket_s}s");
            }
        }
    }
}
