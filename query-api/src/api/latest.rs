//! Latest values: one device, a page of the fleet, and the overview figures.
//!
//! `device_latest` holds one row per device, upserted by the sink, so these are index look-ups
//! on its primary key `(tenant_id, device_id)` or on `(tenant_id, site_id, device_id)`.
//!
//! The row keeps, per metric, its newest value (migration 0011): a device reporting
//! `temperature` and `humidity` in separate messages shows both. Each metric's time is stored
//! as an exception list (`metric_times`: only the metrics older than the row's `time`, in epoch
//! microseconds); answers carry it expanded to every metric, as [`MetricTimes`]. The expansion
//! happens here rather than in SQL: the database only passes the (usually empty) object along,
//! and the answer's times are exact to the microsecond and formatted like every other time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use axum::Json;
use chrono::{DateTime, Utc};
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
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
pub type StoredJson = sqlx::types::Json<Box<RawValue>>;

/// `device_latest.metric_times` as stored: metric name -> microseconds since the Unix epoch,
/// only for metrics whose newest value is older than the row's `time`.
type StoredMetricTimes = sqlx::types::Json<HashMap<String, i64>>;

/// Most metrics a projection may name.
pub const MAX_PROJECTED_METRICS: usize = 32;

/// The time of each metric's newest value, for every metric of an answer's `metrics` and in
/// the same order; serialised as a JSON object of RFC 3339 times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricTimes(Vec<(String, DateTime<Utc>)>);

impl MetricTimes {
    /// Expands the stored encoding: a metric absent from `stored` has the row's `time`.
    /// `metrics` is the row's (possibly projected) metrics object.
    pub fn expand(
        metrics: &RawValue,
        time: DateTime<Utc>,
        stored: &HashMap<String, i64>,
    ) -> Result<Self, ApiError> {
        let names = metric_names(metrics)
            .map_err(|err| ApiError::Internal(format!("device_latest.metrics: {err}")))?;
        names
            .into_iter()
            .map(|name| {
                let at = match stored.get(&name) {
                    None => time,
                    Some(&us) => DateTime::from_timestamp_micros(us).ok_or_else(|| {
                        ApiError::Internal(format!(
                            "device_latest.metric_times: {us} µs of {name:?} is out of range"
                        ))
                    })?,
                };
                Ok((name, at))
            })
            .collect::<Result<_, _>>()
            .map(MetricTimes)
    }
}

impl Serialize for MetricTimes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, time) in &self.0 {
            map.serialize_entry(name, time)?;
        }
        map.end()
    }
}

/// The names of a metrics object in their stored order, without decoding the values.
fn metric_names(metrics: &RawValue) -> Result<Vec<String>, serde_json::Error> {
    struct Names;
    impl<'de> Visitor<'de> for Names {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut names = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(name) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                names.push(name);
            }
            Ok(names)
        }
    }
    let mut de = serde_json::Deserializer::from_str(metrics.get());
    let names = (&mut de).deserialize_map(Names)?;
    de.end()?;
    Ok(names)
}

/// A device and its latest values (absent before the first reading).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceLatest {
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub status: String,
    /// Time of the newest value of any metric (the latest of `metric_times`), RFC 3339.
    pub time: Option<DateTime<Utc>>,
    /// When ingest received the newest reading (the one at `time`; at equal times, the later
    /// write in partition order).
    pub received_at: Option<DateTime<Utc>>,
    /// Device sequence number of the newest reading.
    pub seq: Option<i64>,
    /// Message type of the newest reading.
    pub msg_type: Option<String>,
    /// Every metric the device has reported, name -> its newest value. A metric missing from a
    /// reading keeps its earlier value.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<StoredJson>,
    /// Name -> time of the newest value of that metric (RFC 3339, UTC, microsecond
    /// resolution), for every key of `metrics`. Equal times: the later write in partition
    /// order wins, and its value is the one in `metrics`.
    #[schema(value_type = Option<HashMap<String, DateTime<Utc>>>,
        example = json!({"temperature": "2025-05-01T12:00:00Z", "humidity": "2025-05-01T12:00:30Z"}))]
    pub metric_times: Option<MetricTimes>,
}

/// `device_latest` joined to `devices`, as read.
#[derive(Debug, FromRow)]
struct DeviceLatestRow {
    tenant_id: String,
    device_id: String,
    site_id: Option<String>,
    status: String,
    time: Option<DateTime<Utc>>,
    received_at: Option<DateTime<Utc>>,
    seq: Option<i64>,
    msg_type: Option<String>,
    metrics: Option<StoredJson>,
    metric_times: Option<StoredMetricTimes>,
}

impl TryFrom<DeviceLatestRow> for DeviceLatest {
    type Error = ApiError;

    fn try_from(row: DeviceLatestRow) -> Result<Self, ApiError> {
        let metric_times = match (&row.metrics, row.time, &row.metric_times) {
            (Some(metrics), Some(time), Some(stored)) => {
                Some(MetricTimes::expand(metrics, time, stored)?)
            }
            _ => None,
        };
        Ok(DeviceLatest {
            tenant_id: row.tenant_id,
            device_id: row.device_id,
            site_id: row.site_id,
            status: row.status,
            time: row.time,
            received_at: row.received_at,
            seq: row.seq,
            msg_type: row.msg_type,
            metrics: row.metrics,
            metric_times,
        })
    }
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
    let row: Option<DeviceLatestRow> = sqlx::query_as(
        "SELECT d.tenant_id, d.device_id, coalesce(l.site_id, d.site_id) AS site_id, d.status, \
                l.time, l.received_at, l.seq, l.msg_type, l.metrics, l.metric_times \
         FROM devices d \
         LEFT JOIN device_latest l ON l.tenant_id = d.tenant_id AND l.device_id = d.device_id \
         WHERE d.tenant_id = $1 AND d.device_id = $2",
    )
    .bind(&tenant)
    .bind(&device_id)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    let row = row.ok_or(ApiError::NotFound("device"))?;
    Ok(Json(row.try_into()?))
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

/// One device's latest values in a fleet page.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetLatest {
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    /// Time of the newest value of any metric (the latest of `metric_times`), RFC 3339.
    pub time: DateTime<Utc>,
    /// Device sequence number of the newest reading.
    pub seq: i64,
    /// Name -> newest value of each metric (those named by `metrics=`, when given).
    #[schema(value_type = Object)]
    pub metrics: StoredJson,
    /// Name -> time of the newest value of that metric (RFC 3339, UTC, microsecond
    /// resolution), for every key of `metrics`. Equal times: the later write in partition
    /// order wins, and its value is the one in `metrics`.
    #[schema(value_type = HashMap<String, DateTime<Utc>>,
        example = json!({"temperature": "2025-05-01T12:00:00Z", "humidity": "2025-05-01T12:00:30Z"}))]
    pub metric_times: MetricTimes,
}

/// A fleet page row, as read.
#[derive(Debug, FromRow)]
struct FleetLatestRow {
    tenant_id: String,
    device_id: String,
    site_id: Option<String>,
    time: DateTime<Utc>,
    seq: i64,
    metrics: StoredJson,
    metric_times: StoredMetricTimes,
}

impl TryFrom<FleetLatestRow> for FleetLatest {
    type Error = ApiError;

    fn try_from(row: FleetLatestRow) -> Result<Self, ApiError> {
        let metric_times = MetricTimes::expand(&row.metrics, row.time, &row.metric_times)?;
        Ok(FleetLatest {
            tenant_id: row.tenant_id,
            device_id: row.device_id,
            site_id: row.site_id,
            time: row.time,
            seq: row.seq,
            metrics: row.metrics,
            metric_times,
        })
    }
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
        "SELECT l.tenant_id, l.device_id, l.site_id, l.time, l.seq, {PROJECTED} AS metrics, \
                l.metric_times \
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
    let rows: Vec<FleetLatestRow> = sqlx::query_as(&sql)
        .bind(&scope)
        .bind(&metrics)
        .bind(&q.site)
        .bind(after_device)
        .bind(fetch_limit(limit))
        .bind(after_tenant)
        .fetch_all(&mut *s.tx)
        .await?;
    s.commit().await?;
    let rows = rows
        .into_iter()
        .map(FleetLatest::try_from)
        .collect::<Result<Vec<_>, _>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    fn at(us: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(us).unwrap()
    }

    #[test]
    fn metric_times_name_every_metric_in_the_order_of_metrics() {
        let stored = HashMap::from([("temperature".to_owned(), 1_700_000_000_123_457)]);
        let times = MetricTimes::expand(
            &raw(r#"{"on": true, "humidity": 40, "temperature": {"nested": [1, "}"]}}"#),
            at(1_700_000_030_000_000),
            &stored,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&times).unwrap(),
            r#"{"on":"2023-11-14T22:13:50Z","humidity":"2023-11-14T22:13:50Z","temperature":"2023-11-14T22:13:20.123457Z"}"#
        );
    }

    #[test]
    fn metric_times_keep_escaped_names_and_ignore_stale_exceptions() {
        let stored = HashMap::from([("gone".to_owned(), 0)]);
        let times = MetricTimes::expand(&raw(r#"{"a\"b": 1}"#), at(0), &stored).unwrap();
        assert_eq!(
            serde_json::to_string(&times).unwrap(),
            r#"{"a\"b":"1970-01-01T00:00:00Z"}"#
        );
        let empty = MetricTimes::expand(&raw("{}"), at(0), &HashMap::new()).unwrap();
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
    }

    #[test]
    fn unreadable_stored_metrics_or_times_are_internal_errors() {
        let stored = HashMap::from([("t".to_owned(), i64::MAX)]);
        let err = MetricTimes::expand(&raw(r#"{"t": 1}"#), at(0), &stored).unwrap_err();
        assert!(matches!(err, ApiError::Internal(_)), "{err:?}");
        let err = MetricTimes::expand(&raw("[1]"), at(0), &HashMap::new()).unwrap_err();
        assert!(matches!(err, ApiError::Internal(_)), "{err:?}");
    }
}
