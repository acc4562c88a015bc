//! Errors: [`Error`] for setting up and running the service, [`Rejection`] for one refused
//! request or message, with the one mapping to HTTP status and JSON body.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// What can stop the service from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plumbing(#[from] plumbing::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("schema: {0}")]
    Schema(#[from] schemas::SchemaError),
    #[error("invalid setting `{name}`: {reason}")]
    Config { name: &'static str, reason: String },
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error(transparent)]
    Registry(#[from] plumbing::registry::RegistryError),
}

/// Why a request, or one message of it, was refused.
///
/// `code` is the metric label (`reason`); `error`, `field` and `index` are what the client
/// reads. Variants are constructors rather than an enum so every refusal carries exactly the
/// body the API documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    #[serde(skip)]
    pub status: StatusCode,
    #[serde(skip)]
    pub code: &'static str,
    /// Human-readable reason, lowercase.
    pub error: String,
    /// The offending field (`metrics.temp`, `time`), when one is to blame.
    pub field: Option<String>,
    /// Position of the message in the batch (0 for a single object), when one is to blame.
    pub index: Option<usize>,
    /// Seconds the client should wait (429, 503).
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Rejection {
    fn new(status: StatusCode, code: &'static str, error: impl Into<String>) -> Self {
        Rejection {
            status,
            code,
            error: error.into(),
            field: None,
            index: None,
            retry_after: None,
        }
    }

    /// Names the field to blame.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Names the message to blame.
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// 400: the message does not follow the schema or its limits.
    pub fn invalid(field: impl Into<String>, error: impl Into<String>) -> Self {
        Rejection::new(StatusCode::BAD_REQUEST, "invalid", error).field(field)
    }

    /// 400: the body is not JSON.
    pub fn malformed(error: impl Into<String>) -> Self {
        Rejection::new(StatusCode::BAD_REQUEST, "malformed", error)
    }

    /// 400: a request-level problem that is no single field's fault.
    pub fn bad_request(error: impl Into<String>) -> Self {
        Rejection::new(StatusCode::BAD_REQUEST, "invalid", error)
    }

    /// 413: the body is larger than the limit.
    pub fn too_large(limit: usize) -> Self {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds {limit} bytes"),
        )
    }

    /// 413: the body as sent fitted, but it decompresses to more than the limit.
    pub fn too_large_decompressed(limit: usize) -> Self {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("decompressed body exceeds {limit} bytes"),
        )
    }

    /// 400: the body does not decompress with its `Content-Encoding`.
    pub fn malformed_encoding(encoding: &str, error: impl std::fmt::Display) -> Self {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("malformed {encoding} body: {error}"),
        )
    }

    /// 415: a `Content-Encoding` other than gzip or identity. The response lists the
    /// supported ones in `Accept-Encoding` (RFC 9110, section 12.5.3).
    pub fn unsupported_encoding(encoding: &str) -> Self {
        let encoding: String = encoding.chars().take(64).collect();
        Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            UNSUPPORTED_ENCODING,
            format!("content-encoding {encoding} is not supported; send gzip or identity"),
        )
        .field("content-encoding")
    }

    /// 415: neither JSON nor NDJSON.
    pub fn unsupported_media_type() -> Self {
        Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "content type must be application/json or application/x-ndjson",
        )
    }

    /// 401: no usable bearer token.
    pub fn unauthorized(error: impl Into<String>) -> Self {
        Rejection::new(StatusCode::UNAUTHORIZED, "unauthorized", error)
    }

    /// 403: the token may not write this device or tenant.
    pub fn forbidden(field: impl Into<String>, error: impl Into<String>) -> Self {
        Rejection::new(StatusCode::FORBIDDEN, "forbidden", error).field(field)
    }

    /// 422: the device is not registered, or disabled.
    pub fn unknown_device(error: impl Into<String>) -> Self {
        Rejection::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_device", error).field("device_id")
    }

    /// 429: a token bucket is empty.
    pub fn rate_limited(scope: &str, wait: Duration) -> Self {
        let mut rejection = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("rate limit exceeded for {scope}"),
        );
        rejection.retry_after = Some(wait);
        rejection
    }

    /// 503: Kafka's local queue is full; the client should retry shortly.
    pub fn queue_full() -> Self {
        let mut rejection = Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "kafka producer queue is full",
        );
        rejection.retry_after = Some(Duration::from_secs(1));
        rejection
    }

    /// 503: Kafka did not acknowledge the message in time.
    pub fn unavailable() -> Self {
        let mut rejection = Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "kafka did not acknowledge the message",
        );
        rejection.retry_after = Some(Duration::from_secs(5));
        rejection
    }

    /// 500: a bug or an unexpected dependency failure; details are logged, not sent.
    pub fn internal() -> Self {
        Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

/// Metric label of an unsupported `Content-Encoding`; its response gets `Accept-Encoding`.
const UNSUPPORTED_ENCODING: &str = "unsupported_encoding";

/// The encodings a request body may have, as sent in `Accept-Encoding` with a 415.
const ACCEPTED_ENCODINGS: &str = "gzip, identity";

/// `Retry-After` in whole seconds, at least one.
pub(crate) fn retry_after_header(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = self.status;
        let retry_after = self.retry_after;
        let code = self.code;
        let mut response = (status, Json(self)).into_response();
        if let Some(wait) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", retry_after_header(wait));
        }
        if code == UNSUPPORTED_ENCODING {
            response.headers_mut().insert(
                axum::http::header::ACCEPT_ENCODING,
                HeaderValue::from_static(ACCEPTED_ENCODINGS),
            );
        }
        response
    }
}
