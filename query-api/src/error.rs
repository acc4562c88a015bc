//! Errors: [`Error`] for the service's setup and one-shot commands, [`ApiError`] for refused or
//! failed requests, with the mapping to HTTP status codes in one place.
//!
//! Every error body has the shape `{"error": "...", "field": "..."?}`. 4xx bodies say what was
//! wrong; 5xx bodies are generic and the cause is logged once, by the middleware in
//! [`crate::http`], from the [`InternalCause`] extension attached here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Errors of the service outside request handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plumbing(#[from] plumbing::Error),
    #[error(transparent)]
    Storage(#[from] schemas::StorageError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The one error body of the API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// The request parameter or body field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A refused or failed request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{reason}")]
    BadRequest {
        field: Option<String>,
        reason: String,
    },
    #[error("{reason}")]
    Conflict {
        field: Option<String>,
        reason: String,
    },
    #[error("the query took longer than the statement timeout; narrow the time range, use a coarser bucket or fewer metrics")]
    Timeout,
    #[error("the database is unavailable, retry later")]
    Unavailable,
    /// 429 with `Retry-After` (seconds).
    #[error("{reason}")]
    TooManyRequests { reason: String, retry_after_s: u64 },
    #[error("the service is misconfigured: its database role bypasses row-level security, so it refuses to serve tenant data (connect as fleet_api)")]
    BypassesIsolation,
    #[error("internal error")]
    Internal(String),
}

/// Cause of a 5xx, attached to the response for the logging middleware (never sent).
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

impl ApiError {
    /// A 400 naming `field`.
    pub fn bad(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: Some(field.into()),
            reason: reason.into(),
        }
    }

    /// The HTTP status of this outcome.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout | ApiError::Unavailable | ApiError::BypassesIsolation => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Classifies a database error. Constraint violations are the client's input; a
    /// cancelled statement is the per-request timeout; a row-level-security refusal means the
    /// row belongs to a tenant this key cannot see, which is reported like a missing one.
    pub fn from_db(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                return ApiError::Unavailable
            }
            sqlx::Error::Database(db) => {
                let constraint = db.constraint().map(str::to_owned);
                match db.code().as_deref() {
                    Some("57014") => return ApiError::Timeout,
                    Some("23505") => {
                        return ApiError::Conflict {
                            field: constraint.map(|c| field_of_constraint(&c)),
                            reason: "an object with this identifier already exists".to_owned(),
                        }
                    }
                    Some("23503")
                        if constraint
                            .as_deref()
                            .is_some_and(|c| c.ends_with("tenant_id_fkey")) =>
                    {
                        return ApiError::NotFound("tenant")
                    }
                    Some("23503") => {
                        return ApiError::BadRequest {
                            field: constraint.map(|c| field_of_constraint(&c)),
                            reason: "refers to an object that does not exist".to_owned(),
                        }
                    }
                    Some("23514") | Some("23502") | Some("22P02") | Some("22001")
                    | Some("22003") | Some("22007") | Some("22008") => {
                        return ApiError::BadRequest {
                            field: constraint.map(|c| field_of_constraint(&c)),
                            reason: "a value is out of its allowed range or format".to_owned(),
                        }
                    }
                    Some("42501") => return ApiError::NotFound("tenant"),
                    Some("57P01") | Some("57P02") | Some("57P03") | Some("08006")
                    | Some("08003") | Some("08001") => return ApiError::Unavailable,
                    _ => {}
                }
            }
            _ => {}
        }
        ApiError::Internal(err.to_string())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::from_db(err)
    }
}

/// A readable field name from a constraint name such as `devices_site_id_fkey`.
fn field_of_constraint(constraint: &str) -> String {
    if let Some(table) = constraint.strip_suffix("_pkey") {
        return format!("{}_id", table.trim_end_matches('s'));
    }
    let trimmed = constraint
        .trim_end_matches("_fkey")
        .trim_end_matches("_key")
        .trim_end_matches("_check");
    match trimmed.split_once('_') {
        Some((_table, rest)) if !rest.is_empty() => rest.to_owned(),
        _ => trimmed.to_owned(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (field, cause) = match &self {
            ApiError::BadRequest { field, .. } | ApiError::Conflict { field, .. } => {
                (field.clone(), None)
            }
            ApiError::Internal(cause) => (None, Some(cause.clone())),
            _ => (None, None),
        };
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        };
        let body = ErrorBody {
            error: self.to_string(),
            field,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(cause) = cause {
            response.extensions_mut().insert(InternalCause(cause));
        }
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_names_become_field_names() {
        assert_eq!(field_of_constraint("devices_site_id_fkey"), "site_id");
        assert_eq!(field_of_constraint("devices_token_hash_key"), "token_hash");
        assert_eq!(field_of_constraint("sites_pkey"), "site_id");
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let response = ApiError::Internal("relation secret_table".into()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.extensions().get::<InternalCause>().is_some());
    }
}
