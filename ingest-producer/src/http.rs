//! `POST /v1/telemetry`: authenticate, read the body within its limit (decompressing a gzip
//! body, within the same limit), validate each message, authorize it against the token, take
//! rate-limit cells, produce, and answer only after Kafka acknowledged every accepted message.
//!
//! Replies:
//! * a single JSON object: `202 {"accepted":1,"points":1,"merged":0}`, or the refusal's status
//!   with `{"error","field","index"}`;
//! * a batch (array or NDJSON): `202 {"accepted":n,"points":p,"merged":m,"rejected":r,
//!   "errors":[…]}` when at least one message was accepted (each error is
//!   `{"error","field","index","status"}`); when none was, the same body with the first
//!   error's status. With `?atomic=true` any refusal rejects the whole batch and nothing is
//!   produced.
//! * `points` counts the distinct (tenant, device, time) among the accepted readings and
//!   `merged` the accepted readings that share their point with an earlier one of the request
//!   (`accepted = points + merged`): the sink stores one row per point, the union of its
//!   readings' metrics (readings without `time` all get the request's ingest time, so several
//!   of one device are one point).
//! * request-level refusals (401, 413, 415, malformed JSON or gzip, tenant rate limit) are one
//!   `{"error","field","index"}` object. 429 and 503 carry `Retry-After`, a 415 for an
//!   unsupported `Content-Encoding` carries `Accept-Encoding`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::Rng;
use schemas::Telemetry;
use serde::Serialize;
use tracing::error;

use crate::credentials::{Credentials, Principal};
use crate::encoding::ContentEncoding;
use crate::error::{retry_after_header, Rejection};
use crate::lineproto::Mapping;
use crate::message::{count_points, read_body, Format, Reading, TimeLimits};
use crate::producer::{Outgoing, Producer};
use crate::rate_limit::RateLimits;

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct IngestSettings {
    /// Largest accepted body, as sent and decompressed; larger ones get `413` without being
    /// read or inflated past the limit.
    pub max_body_bytes: usize,
    /// Allowed range of `time`.
    pub time_limits: TimeLimits,
}

/// Everything a request needs, shared by all of them.
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    credentials: Credentials,
    producer: Producer,
    rate_limits: RateLimits,
    settings: IngestSettings,
    /// How line-protocol tags become device, site and metric names.
    mapping: Mapping,
    /// Whether messages are written in the Confluent wire format (a registry is configured).
    registry_framing: bool,
    /// The registry's id of `telemetry.v1`, once registered; until then (registry framing)
    /// readings are refused with 503.
    schema_id: std::sync::OnceLock<u32>,
}

impl App {
    pub fn new(
        credentials: Credentials,
        producer: Producer,
        rate_limits: RateLimits,
        settings: IngestSettings,
    ) -> Self {
        Self::with_mapping(
            credentials,
            producer,
            rate_limits,
            settings,
            Mapping::default(),
        )
    }

    /// [`App::new`] with the line-protocol tag mapping of `INFLUX_DEVICE_TAGS`.
    pub fn with_mapping(
        credentials: Credentials,
        producer: Producer,
        rate_limits: RateLimits,
        settings: IngestSettings,
        mapping: Mapping,
    ) -> Self {
        App {
            inner: Arc::new(Inner {
                credentials,
                producer,
                rate_limits,
                settings,
                mapping,
                registry_framing: false,
                schema_id: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Writes the Confluent wire format, with the id given to [`App::set_schema_id`]; until
    /// then readings are refused as unavailable. Call right after building the app.
    pub fn with_registry_framing(mut self) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.registry_framing = true,
            // Cloned already: build a fresh inner with the same parts is not possible
            // without Clone; refuse loudly in logs rather than write the wrong framing.
            None => error!("with_registry_framing called on a shared App; framing unchanged"),
        }
        self
    }

    /// The registry's id of `telemetry.v1` (see [`App::with_registry_framing`]).
    pub fn set_schema_id(&self, id: u32) {
        let _ = self.inner.schema_id.set(id);
    }

    pub(crate) fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    pub(crate) fn settings(&self) -> &IngestSettings {
        &self.inner.settings
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.inner.mapping
    }

    /// The rate-limit buckets (for periodic cleanup).
    pub fn rate_limits(&self) -> &RateLimits {
        &self.inner.rate_limits
    }

    /// Waits up to `timeout` for queued messages (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        self.inner.producer.flush(timeout);
    }
}

/// The ingest routes: `POST /v1/telemetry` and the InfluxDB-compatible writes.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/telemetry", post(ingest))
        .merge(crate::influx::routes())
        .with_state(app)
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// One refused message of a batch.
#[derive(Debug, Serialize)]
struct BatchError {
    error: String,
    field: Option<String>,
    index: Option<usize>,
    status: u16,
}

#[derive(Debug, Serialize)]
struct BatchReply {
    accepted: usize,
    /// Distinct (tenant, device, time) among the accepted readings.
    points: usize,
    /// Accepted readings merged into the point of an earlier one (`accepted - points`).
    merged: usize,
    rejected: usize,
    errors: Vec<BatchError>,
}

#[derive(Debug, Serialize)]
struct SingleReply {
    accepted: usize,
    points: usize,
    merged: usize,
}

pub(crate) struct InFlight;

impl InFlight {
    pub(crate) fn enter() -> Self {
        crate::metrics::in_flight(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::in_flight(-1.0);
    }
}

async fn ingest(State(app): State<App>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::enter();
    let response = match handle(&app, &uri, &headers, body).await {
        Ok(response) => response,
        Err(rejection) => {
            crate::metrics::rejected(rejection.code, 1);
            rejection.into_response()
        }
    };
    crate::metrics::request(response.status().as_u16(), started.elapsed());
    response
}

/// Request-level refusals are `Err`; per-message outcomes are in the `Ok` response.
async fn handle(
    app: &App,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let inner = &app.inner;
    let atomic = atomic_mode(uri)?;
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = inner.credentials.authenticate(authorization)?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("invalid"));
    let format = Format::from_content_type(content_type)?;
    let encoding = ContentEncoding::from_headers(headers)?;
    let limit = inner.settings.max_body_bytes;
    let bytes = encoding.decode(read_limited(headers, body, limit).await?, limit)?;
    let received_at = Utc::now();
    let parsed = read_body(format, &bytes, received_at, inner.settings.time_limits)?;
    drop(bytes);

    let mut outcomes = authorize_all(app, &principal, parsed.readings, received_at);

    if atomic && outcomes.iter().any(Result::is_err) {
        return Ok(reply(parsed.batch, outcomes, true));
    }
    let produced = produce(app, &principal, &mut outcomes, headers, atomic).await?;
    Ok(reply(parsed.batch, outcomes, !produced))
}

/// Checks each validated reading against what the token may write and makes it the record
/// produced (`received_at` is the ingest clock): the step between validation and [`produce`]
/// of `POST /v1/telemetry` and the MQTT topics.
pub(crate) fn authorize_all(
    app: &App,
    principal: &Principal,
    readings: Vec<Result<Reading, Rejection>>,
    received_at: DateTime<Utc>,
) -> Vec<Result<Telemetry, Rejection>> {
    readings
        .into_iter()
        .enumerate()
        .map(|(index, reading)| {
            reading
                .and_then(|reading| {
                    let (tenant_id, device_id, registered_site) = app.inner.credentials.authorize(
                        principal,
                        reading.tenant_id.as_deref(),
                        reading.device_id.as_deref(),
                    )?;
                    Ok(reading.into_telemetry(tenant_id, device_id, registered_site, received_at))
                })
                .map_err(|rejection| rejection.at(index))
        })
        .collect()
}

/// Rate limits, encodes and produces the valid readings of a request, waiting for Kafka's
/// acknowledgement of each: the one path of `POST /v1/telemetry` and the InfluxDB-compatible
/// writes. A reading refused on the way (device rate limit, encoding, no acknowledgement)
/// becomes its outcome's `Err`. `Err` is the tenant's rate limit, which refuses the request.
/// Returns false when `atomic` held everything back (nothing was produced).
pub(crate) async fn produce(
    app: &App,
    principal: &Principal,
    outcomes: &mut [Result<Telemetry, Rejection>],
    headers: &HeaderMap,
    atomic: bool,
) -> Result<bool, Rejection> {
    let inner = &app.inner;
    let valid = outcomes.iter().filter(|o| o.is_ok()).count();
    if let Err(wait) = inner.rate_limits.check_tenant(principal.tenant_id(), valid) {
        crate::metrics::rejected("rate_limited", valid.saturating_sub(1));
        return Err(Rejection::rate_limited("tenant", wait));
    }
    limit_devices(&inner.rate_limits, outcomes);
    if atomic && outcomes.iter().any(Result::is_err) {
        return Ok(false);
    }

    let codec = schemas::telemetry_codec().map_err(|err| {
        error!(error = %err, "telemetry codec unavailable");
        Rejection::internal()
    })?;
    // With a registry, nothing is written before the schema is registered.
    let schema_id = match (inner.registry_framing, inner.schema_id.get()) {
        (false, _) => None,
        (true, Some(&id)) => Some(id),
        (true, None) => return Err(Rejection::unavailable()),
    };
    let mut outgoing = Vec::with_capacity(valid);
    let mut positions = Vec::with_capacity(valid);
    for (position, outcome) in outcomes.iter_mut().enumerate() {
        let Ok(telemetry) = outcome else { continue };
        let encoded = match schema_id {
            Some(id) => codec.encode_confluent(telemetry, id),
            None => codec.encode(telemetry),
        };
        match encoded {
            Ok(payload) => {
                outgoing.push(Outgoing {
                    key: telemetry.key(),
                    payload,
                });
                positions.push(position);
            }
            Err(err) => {
                error!(error = %err, "cannot encode a validated reading");
                *outcome = Err(Rejection::internal().at(position));
            }
        }
    }
    let traceparent = traceparent(headers);
    let delivered = inner.producer.send_all(&outgoing, &traceparent).await;
    for (position, result) in positions.into_iter().zip(delivered) {
        if let Err(rejection) = result {
            outcomes[position] = Err(rejection.at(position));
        }
    }
    Ok(true)
}

/// Takes each device's cells; a device over its limit has all its messages refused.
fn limit_devices(rate_limits: &RateLimits, outcomes: &mut [Result<Telemetry, Rejection>]) {
    let mut per_device: HashMap<(&str, &str), usize, foldhash::fast::RandomState> =
        HashMap::default();
    for telemetry in outcomes.iter().flatten() {
        *per_device
            .entry((&telemetry.tenant_id, &telemetry.device_id))
            .or_default() += 1;
    }
    let limited: HashMap<(String, String), Duration> = per_device
        .into_iter()
        .filter_map(|((tenant, device), n)| {
            rate_limits
                .check_device(tenant, device, n)
                .err()
                .map(|wait| ((tenant.to_owned(), device.to_owned()), wait))
        })
        .collect();
    if limited.is_empty() {
        return;
    }
    for (index, outcome) in outcomes.iter_mut().enumerate() {
        let wait = match outcome {
            Ok(t) => limited
                .get(&(t.tenant_id.clone(), t.device_id.clone()))
                .copied(),
            Err(_) => None,
        };
        if let Some(wait) = wait {
            *outcome = Err(Rejection::rate_limited("device", wait)
                .field("device_id")
                .at(index));
        }
    }
}

/// Builds the reply; with `none_accepted` (atomic refusal) valid messages count as not
/// accepted either.
fn reply(
    batch: bool,
    outcomes: Vec<Result<Telemetry, Rejection>>,
    none_accepted: bool,
) -> Response {
    let mut accepted = 0;
    let mut held_back = 0;
    let mut errors = Vec::new();
    let mut delivered = Vec::new();
    for outcome in &outcomes {
        match outcome {
            Ok(_) if none_accepted => held_back += 1,
            Ok(telemetry) => {
                accepted += 1;
                delivered.push(telemetry);
            }
            Err(_) => {}
        }
    }
    let points = count_points(delivered);
    let merged = accepted - points;
    errors.extend(outcomes.into_iter().filter_map(Result::err));
    crate::metrics::accepted(accepted);
    for rejection in &errors {
        crate::metrics::rejected(rejection.code, 1);
    }
    // Valid messages of a refused atomic batch.
    crate::metrics::rejected("atomic", held_back);
    if !batch {
        return match errors.into_iter().next() {
            None => (
                StatusCode::ACCEPTED,
                Json(SingleReply {
                    accepted,
                    points,
                    merged,
                }),
            )
                .into_response(),
            Some(rejection) => rejection.into_response(),
        };
    }
    let status = match errors.first() {
        Some(first) if accepted == 0 => first.status,
        _ => StatusCode::ACCEPTED,
    };
    let retry_after = errors.iter().filter_map(|e| e.retry_after).max();
    let body = BatchReply {
        accepted,
        points,
        merged,
        rejected: errors.len(),
        errors: errors
            .into_iter()
            .map(|e| BatchError {
                status: e.status.as_u16(),
                error: e.error,
                field: e.field,
                index: e.index,
            })
            .collect(),
    };
    let mut response = (status, Json(body)).into_response();
    if let Some(wait) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", retry_after_header(wait));
    }
    response
}

fn atomic_mode(uri: &Uri) -> Result<bool, Rejection> {
    let Some(query) = uri.query() else {
        return Ok(false);
    };
    let mut atomic = false;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key == "atomic" {
            atomic = match value {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(
                        Rejection::bad_request("atomic must be true or false").field("atomic")
                    )
                }
            };
        }
    }
    Ok(atomic)
}

/// Reads at most `limit` bytes: a declared length over it is refused before reading, a
/// streamed body as soon as it passes the limit. (A compressed body is limited here as sent,
/// and again as decompressed by [`ContentEncoding::decode`].)
///
/// Why not a library limit (checked against tower-http 0.6.11 and 0.7.1, axum 0.8.9):
/// * `tower_http::limit::RequestBodyLimitLayer` answers a declared `Content-Length` over the
///   limit itself, with a fixed `text/plain` body (`length limit exceeded`) and no hook to
///   replace it, so the documented `{"error","field","index"}` 413 would be lost; rewriting
///   its response in another layer would depend on the library's wording.
/// * `axum::extract::DefaultBodyLimit` only applies to buffering extractors (`Bytes`, `Json`),
///   which run before the handler: the body would be read before the token and the content
///   type are checked (an unauthenticated client could make us read up to the limit), a
///   declared oversize length is not refused before reading, and its rejection is plain text.
///
/// This function keeps the order (authenticate, check the type, then read) and the JSON body,
/// and never holds more than `limit` bytes.
pub(crate) async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Vec<u8>, Rejection> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Rejection::too_large(limit));
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Rejection::bad_request("cannot read the body"))?;
        if bytes.len() + chunk.len() > limit {
            return Err(Rejection::too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The request's W3C trace id (a new one when absent or malformed) with a new span id.
fn traceparent(headers: &HeaderMap) -> String {
    let mut rng = rand::rng();
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_traceparent(v));
    let (trace_id, flags) = match incoming {
        Some(v) => (v[3..35].to_owned(), v[53..55].to_owned()),
        None => (
            format!("{:032x}", rng.random::<u128>() | 1),
            "01".to_owned(),
        ),
    };
    format!("00-{trace_id}-{:016x}-{flags}", rng.random::<u64>() | 1)
}

fn is_traceparent(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.len() == 55
        && value.starts_with("00-")
        && bytes[35] == b'-'
        && bytes[52] == b'-'
        && value[3..35].bytes().all(|b| b.is_ascii_hexdigit())
        && value[36..52].bytes().all(|b| b.is_ascii_hexdigit())
        && value[53..55].bytes().all(|b| b.is_ascii_hexdigit())
        && &value[3..35] != "00000000000000000000000000000000"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_keeps_its_trace_id() {
        let mut headers = HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", incoming.parse().unwrap());
        let out = traceparent(&headers);
        assert!(is_traceparent(&out));
        assert_eq!(&out[..36], &incoming[..36]);
        let fresh = traceparent(&HeaderMap::new());
        assert!(is_traceparent(&fresh));
    }

    #[test]
    fn atomic_is_a_boolean_query_parameter() {
        assert!(!atomic_mode(&"/v1/telemetry".parse().unwrap()).unwrap());
        assert!(atomic_mode(&"/v1/telemetry?atomic=true".parse().unwrap()).unwrap());
        assert!(!atomic_mode(&"/v1/telemetry?atomic=0".parse().unwrap()).unwrap());
        assert!(atomic_mode(&"/v1/telemetry?atomic=maybe".parse().unwrap()).is_err());
    }
}
