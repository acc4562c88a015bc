//! API keys: created (secret shown once), listed without secrets, revoked.
//!
//! An admin manages its own tenant's `viewer` and `admin` keys; `operator_admin` manages
//! every key, including operator keys. Row-level security keeps a tenant's keys out of other
//! tenants' sight; the role rules below are the API's, on top.

use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgConnection};
use utoipa::{IntoParams, ToSchema};

use crate::api::TenantParam;
use crate::auth::{new_secret, Role};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::page::{Page, PageParams};
use crate::session::Session;
use crate::validate;

/// Visible beginning of API keys.
pub const API_KEY_KIND: &str = "fsk_";

/// An API key without its secret.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct ApiKey {
    pub key_id: i64,
    /// Absent for operator keys.
    pub tenant_id: Option<String>,
    pub role: String,
    pub name: String,
    /// First characters of the key, to tell keys apart.
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new key with its secret, returned once.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyWithSecret {
    pub api_key: ApiKey,
    /// Use as `Authorization: Bearer <key>`. Shown only here.
    pub key: String,
}

/// `POST /v1/api-keys` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub name: String,
    pub role: Role,
}

/// `GET /v1/api-keys` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApiKeyList {
    /// Tenant to list (operators; a tenant key's own by default). Operators without it list all.
    pub tenant: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

const COLUMNS: &str =
    "key_id, tenant_id, role, name, key_prefix, created_at, last_used_at, revoked_at";

/// Inserts a key and returns it with its secret. The caller's transaction must be scoped so
/// that row-level security admits the row (see [`crate::session`]).
pub async fn insert_key(
    conn: &mut PgConnection,
    tenant: Option<&str>,
    role: Role,
    name: &str,
) -> Result<ApiKeyWithSecret, sqlx::Error> {
    let secret = new_secret(API_KEY_KIND);
    let api_key: ApiKey = sqlx::query_as(&format!(
        "INSERT INTO api_keys (tenant_id, role, name, key_prefix, key_hash) \
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(tenant)
    .bind(role.as_str())
    .bind(name)
    .bind(&secret.prefix)
    .bind(&secret.hash)
    .fetch_one(conn)
    .await?;
    Ok(ApiKeyWithSecret {
        api_key,
        key: secret.secret,
    })
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api keys", params(ApiKeyList),
    responses((status = 200, body = Page<ApiKey>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    mut s: Session,
    ApiQuery(q): ApiQuery<ApiKeyList>,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    if !s.role().can_write() && !s.role().is_operator() {
        return Err(ApiError::Forbidden(format!(
            "role {} may not list API keys",
            s.role()
        )));
    }
    let scope = s.scope(q.tenant.as_deref())?;
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let page = crate::page::by_integer_key(
        &mut s.tx,
        COLUMNS,
        "api_keys",
        "key_id",
        scope.as_deref(),
        &page,
        |k: &ApiKey| k.key_id,
    )
    .await?;
    s.commit().await?;
    Ok(Json(page))
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api keys", params(TenantParam),
    request_body = NewApiKey,
    responses((status = 201, description = "Created; the key is shown only here", body = ApiKeyWithSecret),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    mut s: Session,
    ApiQuery(t): ApiQuery<TenantParam>,
    ApiJson(body): ApiJson<NewApiKey>,
) -> Result<(StatusCode, Json<ApiKeyWithSecret>), ApiError> {
    s.require_write()?;
    validate::name("name", &body.name)?;
    let tenant = if body.role.is_operator() {
        if s.role() != Role::OperatorAdmin {
            return Err(ApiError::Forbidden(format!(
                "role {} may not create operator keys",
                s.role()
            )));
        }
        if t.tenant.is_some() {
            return Err(ApiError::bad("tenant", "operator keys belong to no tenant"));
        }
        None
    } else {
        Some(s.tenant(t.tenant.as_deref())?)
    };
    let created = insert_key(&mut s.tx, tenant.as_deref(), body.role, &body.name).await?;
    s.commit().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(delete, path = "/v1/api-keys/{key_id}", tag = "api keys",
    params(("key_id" = i64, Path, description = "API key id")),
    responses((status = 204, description = "Revoked; requests with it get 401 from now on"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke(mut s: Session, ApiPath(key_id): ApiPath<i64>) -> Result<StatusCode, ApiError> {
    s.require_write()?;
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1",
    )
    .bind(key_id)
    .execute(&mut *s.tx)
    .await?
    .rows_affected();
    if revoked == 0 {
        return Err(ApiError::NotFound("API key"));
    }
    s.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's key.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub key_id: i64,
    pub role: Role,
    /// Absent for operator keys.
    pub tenant_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/me", tag = "api keys",
    responses((status = 200, description = "The key's role and tenant", body = WhoAmI),
              (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn whoami(s: Session) -> Result<Json<WhoAmI>, ApiError> {
    let principal = s.principal.clone();
    s.commit().await?;
    Ok(Json(WhoAmI {
        key_id: principal.key_id,
        role: principal.role,
        tenant_id: principal.tenant_id,
    }))
}
