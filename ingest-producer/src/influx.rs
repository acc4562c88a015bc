//! InfluxDB-compatible writes on the ingest listener, so agents that speak line protocol
//! (Telegraf, the InfluxDB client libraries, firmware) move by changing a URL and a token:
//!
//! * `POST /api/v2/write?org=&bucket=&precision=ns|us|ms|s` with `Authorization: Token <device
//!   or gateway token>` (`org` and `bucket` are accepted and ignored: the tenant is the
//!   token's);
//! * `POST /write?db=&rp=&precision=n|ns|u|µ|ms|s|m|h` (InfluxDB 1.x), the token as
//!   `Authorization: Token …`, as the password of HTTP Basic, or as the `p` query parameter;
//! * `POST /query` answering `CREATE DATABASE …` as InfluxDB does (a no-op: there is one
//!   store per tenant), so Telegraf's 1.x output starts cleanly; `GET /ping` answers `204`.
//!
//! A write goes through the same steps as `POST /v1/telemetry`: the token, the body within
//! `MAX_BODY_BYTES` as sent and decompressed (`Content-Encoding: gzip`), per-reading
//! validation, the token's authorization, the tenant and device rate limits, the Avro record
//! on `telemetry.v1`, and an answer only after Kafka acknowledged every record
//! ([`crate::http::produce`]). Lines become readings as [`crate::lineproto`] documents.
//!
//! Answers:
//! * `204`: every line stored;
//! * `400`: partial write, as InfluxDB 1.x and 3 do it: the valid lines are stored, the
//!   message lists each rejected line by number and reason (`partial write: 2 of 5 lines
//!   rejected: line 2: …; line 5: …`, or `no line stored: …` when none was);
//! * `401`/`403`: token unknown, revoked or missing / tenant suspended; `413`: body over the
//!   limit as sent or decompressed (Telegraf splits such a batch); `415`: an encoding other
//!   than gzip;
//! * `429`/`503` with `Retry-After`: a rate limit, or Kafka did not acknowledge; every line
//!   may be retried (a re-sent line is the same point, stored once).
//!
//! Error bodies are InfluxDB's: `{"code","message"}` with `X-Platform-Error-Code` on the v2
//! endpoint, `{"error"}` on the 1.x ones.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::Utc;
use futures::StreamExt;
use schemas::Telemetry;
use serde_json::json;
use tracing::Instrument;

use crate::encoding::ContentEncoding;
use crate::error::{retry_after_header, Rejection};
use crate::http::{produce, read_limited, App, InFlight};
use crate::lineproto::{self, Context, Precision};

/// Longest `/query` form body read (a `CREATE DATABASE` statement is a few dozen bytes).
const MAX_QUERY_BYTES: usize = 64 << 10;

/// Which InfluxDB API a request came in on: it decides the error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/api/v2/write`: `{"code","message"}` + `X-Platform-Error-Code`.
    V2,
    /// `/write`, `/query`: `{"error"}`.
    V1,
}

impl Api {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Api::V2 => "v2",
            Api::V1 => "v1",
        }
    }
}

/// An error answer in InfluxDB's shape.
#[derive(Debug)]
pub struct InfluxError {
    api: Api,
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
    /// Metric label of the reason.
    reason: &'static str,
}

impl InfluxError {
    fn new(api: Api, status: StatusCode, reason: &'static str, message: String) -> Self {
        InfluxError {
            api,
            status,
            message,
            retry_after: None,
            reason,
        }
    }

    fn bad_request(api: Api, message: impl Into<String>) -> Self {
        InfluxError::new(api, StatusCode::BAD_REQUEST, "invalid", message.into())
    }

    /// A request-level refusal of the shared ingest steps, in this API's shape.
    fn from_rejection(api: Api, rejection: Rejection) -> Self {
        let mut error = InfluxError::new(api, rejection.status, rejection.code, rejection.error);
        error.retry_after = rejection.retry_after;
        error
    }

    /// InfluxDB 2's error code for a status.
    fn code(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "invalid",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not found",
            413 => "request too large",
            415 => "unsupported media type",
            422 => "unprocessable entity",
            429 => "too many requests",
            503 => "unavailable",
            _ => "internal error",
        }
    }
}

impl IntoResponse for InfluxError {
    fn into_response(self) -> Response {
        let mut response = match self.api {
            Api::V2 => {
                let code = self.code();
                let mut response = (
                    self.status,
                    Json(json!({"code": code, "message": self.message})),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert("x-platform-error-code", HeaderValue::from_static(code));
                response
            }
            Api::V1 => (self.status, Json(json!({"error": self.message}))).into_response(),
        };
        if let Some(wait) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", retry_after_header(wait));
        }
        if self.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            response.headers_mut().insert(
                axum::http::header::ACCEPT_ENCODING,
                HeaderValue::from_static("gzip, identity"),
            );
        }
        response
    }
}

/// The InfluxDB-compatible routes.
pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/write", post(write_v2))
        .route("/write", post(write_v1))
        .route("/query", post(query_v1).get(query_v1))
        .route("/ping", get(ping).head(ping))
}

async fn write_v2(State(app): State<App>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    write(app, Api::V2, uri, headers, body).await
}

async fn write_v1(State(app): State<App>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    write(app, Api::V1, uri, headers, body).await
}

async fn ping() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert("x-influxdb-build", HeaderValue::from_static("fleetstream"));
    response
}

async fn write(app: App, api: Api, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::enter();
    let span = tracing::info_span!(
        "influx_write",
        api = api.label(),
        tenant_id = tracing::field::Empty,
        lines = tracing::field::Empty,
        rejected = tracing::field::Empty,
    );
    let response = match handle_write(&app, api, &uri, &headers, body)
        .instrument(span)
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => {
            // A partial write's lines were counted one by one.
            if error.reason != "partial" {
                crate::metrics::rejected(error.reason, 1);
            }
            error.into_response()
        }
    };
    let status = response.status().as_u16();
    crate::metrics::request(status, started.elapsed());
    crate::metrics::line_protocol_request(api.label(), status);
    response
}

/// The query parameters, decoded.
fn params(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// The token of a request: `Authorization: Token …` (or `Bearer …`) on both APIs; on the 1.x
/// ones also HTTP Basic (the token is the password) and the `p` query parameter.
fn token(
    api: Api,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<String, InfluxError> {
    let missing = || {
        let how = match api {
            Api::V2 => "send Authorization: Token <device or gateway token>",
            Api::V1 => {
                "send Authorization: Token <device or gateway token>, HTTP Basic with the \
                 token as password, or the token as query parameter p"
            }
        };
        InfluxError::new(
            api,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("missing token: {how}"),
        )
    };
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(value) = authorization {
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
            return if rest.is_empty() {
                Err(missing())
            } else {
                Ok(rest.to_owned())
            };
        }
        if api == Api::V1 && scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|pair| pair.split_once(':').map(|(_, p)| p.to_owned()))
                .filter(|password| !password.is_empty());
            return decoded.ok_or_else(|| {
                InfluxError::new(
                    api,
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "malformed basic credentials".to_owned(),
                )
            });
        }
        return Err(missing());
    }
    match (api, param(params, "p")) {
        (Api::V1, Some(p)) if !p.is_empty() => Ok(p.to_owned()),
        _ => Err(missing()),
    }
}

async fn handle_write(
    app: &App,
    api: Api,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), InfluxError> {
    let params = params(uri);
    let precision = match api {
        Api::V2 => Precision::from_v2(param(&params, "precision")),
        Api::V1 => Precision::from_v1(param(&params, "precision")),
    }
    .map_err(|message| InfluxError::bad_request(api, message))?;
    let token = token(api, headers, &params)?;
    let principal = app
        .credentials()
        .authenticate_token(&token)
        .map_err(|r| InfluxError::from_rejection(api, r))?;
    tracing::Span::current().record("tenant_id", principal.tenant_id());
    let limit = app.settings().max_body_bytes;
    let encoding =
        ContentEncoding::from_headers(headers).map_err(|r| InfluxError::from_rejection(api, r))?;
    let bytes = read_limited(headers, body, limit)
        .await
        .and_then(|raw| encoding.decode(raw, limit))
        .map_err(|r| InfluxError::from_rejection(api, r))?;
    let now = Utc::now();
    let lines = lineproto::parse(&bytes, precision);
    drop(bytes);
    if lines.is_empty() {
        return Err(InfluxError::bad_request(api, "writing requires points"));
    }
    let batch = lineproto::assemble(
        lines,
        &Context {
            credentials: app.credentials(),
            principal: &principal,
            mapping: app.mapping(),
            limits: app.settings().time_limits,
            now,
        },
    );
    let total = batch.lines;
    let mut refused = batch.refused;
    let (readings, numbers): (Vec<Telemetry>, Vec<Vec<usize>>) = batch.readings.into_iter().unzip();
    let mut outcomes: Vec<Result<Telemetry, Rejection>> = readings.into_iter().map(Ok).collect();
    if !outcomes.is_empty() {
        produce(app, &principal, &mut outcomes, headers, false)
            .await
            .map_err(|r| InfluxError::from_rejection(api, r))?;
    }
    let mut stored = 0;
    for (outcome, numbers) in outcomes.into_iter().zip(numbers) {
        match outcome {
            Ok(_) => stored += 1,
            Err(rejection) => refused.extend(numbers.into_iter().map(|n| (n, rejection.clone()))),
        }
    }
    refused.sort_by_key(|(number, _)| *number);
    refused.dedup_by_key(|(number, _)| *number);
    crate::metrics::accepted(stored);
    for (_, rejection) in &refused {
        crate::metrics::rejected(rejection.code, 1);
    }
    crate::metrics::line_protocol_lines(api.label(), total - refused.len(), refused.len());
    let span = tracing::Span::current();
    span.record("lines", total);
    span.record("rejected", refused.len());
    if refused.is_empty() {
        return Ok(());
    }
    // A line refused for a reason that passes (a rate limit, Kafka away) makes the whole
    // request retryable: the client resends it all, and lines already stored are the same
    // points again.
    if let Some((_, retryable)) = refused
        .iter()
        .filter(|(_, r)| matches!(r.status.as_u16(), 429 | 503))
        .max_by_key(|(_, r)| r.retry_after)
    {
        let mut error = InfluxError::from_rejection(api, retryable.clone());
        error.message = format!(
            "{}: {} of {total} lines not stored, retry the request",
            retryable.error,
            refused.len()
        );
        return Err(error);
    }
    let listed: Vec<String> = refused
        .iter()
        .map(|(number, r)| match r.field.as_deref() {
            Some(field) if !field.is_empty() => format!("line {number}: {field}: {}", r.error),
            _ => format!("line {number}: {}", r.error),
        })
        .collect();
    let lead = if refused.len() < total {
        "partial write"
    } else {
        "no line stored"
    };
    Err(InfluxError::new(
        api,
        StatusCode::BAD_REQUEST,
        "partial",
        format!(
            "{lead}: {} of {total} lines rejected: {}",
            refused.len(),
            listed.join("; ")
        ),
    ))
}

/// `POST|GET /query`: `CREATE DATABASE` is answered as InfluxDB does; anything else is
/// refused (fleetstream is queried through query-api).
async fn query_v1(State(app): State<App>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = match handle_query(&app, &uri, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let status = response.status().as_u16();
    crate::metrics::request(status, started.elapsed());
    crate::metrics::line_protocol_request("query", status);
    response
}

async fn handle_query(
    app: &App,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, InfluxError> {
    let api = Api::V1;
    let mut params = params(uri);
    let token = token(api, headers, &params)?;
    app.credentials()
        .authenticate_token(&token)
        .map_err(|r| InfluxError::from_rejection(api, r))?;
    let form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        let mut bytes = Vec::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| InfluxError::bad_request(api, "cannot read the body"))?;
            if bytes.len() + chunk.len() > MAX_QUERY_BYTES {
                return Err(InfluxError::from_rejection(
                    api,
                    Rejection::too_large(MAX_QUERY_BYTES),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        params.extend(form_urlencoded::parse(&bytes).into_owned());
    }
    let Some(query) = param(&params, "q") else {
        return Err(InfluxError::bad_request(
            api,
            "missing required parameter \"q\"",
        ));
    };
    let words: Vec<&str> = query.split_whitespace().take(2).collect();
    let create_database = words.len() == 2
        && words[0].eq_ignore_ascii_case("create")
        && words[1].eq_ignore_ascii_case("database");
    if !create_database {
        return Err(InfluxError::bad_request(
            api,
            "only CREATE DATABASE is answered here (the tenant comes from the token); \
             read data through query-api",
        ));
    }
    Ok((
        StatusCode::OK,
        Json(json!({"results": [{"statement_id": 0}]})),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            authorization.parse().unwrap(),
        );
        headers
    }

    #[test]
    fn tokens_come_from_token_basic_or_the_p_parameter() {
        let none: Vec<(String, String)> = Vec::new();
        assert_eq!(token(Api::V2, &headers("Token abc"), &none).unwrap(), "abc");
        assert_eq!(token(Api::V1, &headers("token abc"), &none).unwrap(), "abc");
        // "user:tok" in base64.
        assert_eq!(
            token(Api::V1, &headers("Basic dXNlcjp0b2s="), &none).unwrap(),
            "tok"
        );
        let p = vec![
            ("u".to_owned(), "x".to_owned()),
            ("p".to_owned(), "tok".to_owned()),
        ];
        assert_eq!(token(Api::V1, &HeaderMap::new(), &p).unwrap(), "tok");
        assert_eq!(
            token(Api::V2, &HeaderMap::new(), &p).unwrap_err().message,
            "missing token: send Authorization: Token <device or gateway token>"
        );
        assert_eq!(
            token(Api::V2, &headers("Basic dXNlcjp0b2s="), &none)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
    }
}
