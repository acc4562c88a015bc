//! Tenants: listed to everyone (row-level security shows a tenant key only its own),
//! created and changed by `operator_admin`.

use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::page::{fetch_limit, Page, PageParams};
use crate::session::Session;
use crate::validate;

/// A tenant.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Tenant {
    pub tenant_id: String,
    pub name: String,
    /// `active` or `suspended` (keys and tokens of a suspended tenant are refused).
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/tenants` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TenantList {
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `POST /v1/tenants` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub tenant_id: String,
    pub name: String,
}

/// `PATCH /v1/tenants/{tenant_id}` body; absent fields are kept.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantChange {
    pub name: Option<String>,
    /// `active` or `suspended`.
    pub status: Option<String>,
}

const COLUMNS: &str = "tenant_id, name, status, created_at";

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", params(TenantList),
    responses((status = 200, description = "Tenants visible to the key", body = Page<Tenant>),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    mut s: Session,
    ApiQuery(q): ApiQuery<TenantList>,
) -> Result<Json<Page<Tenant>>, ApiError> {
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let after: Option<String> = page.after()?;
    let rows: Vec<Tenant> = sqlx::query_as(
        "SELECT tenant_id, name, status, created_at FROM tenants \
         WHERE ($1::text IS NULL OR tenant_id > $1) ORDER BY tenant_id LIMIT $2",
    )
    .bind(after)
    .bind(fetch_limit(limit))
    .fetch_all(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |t| t.tenant_id.clone())))
}

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = NewTenant,
    responses((status = 201, body = Tenant), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    mut s: Session,
    ApiJson(body): ApiJson<NewTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    s.require_operator_admin()?;
    validate::id("tenant_id", &body.tenant_id)?;
    validate::name("name", &body.name)?;
    let tenant: Tenant = sqlx::query_as(&format!(
        "INSERT INTO tenants (tenant_id, name) VALUES ($1, $2) RETURNING {COLUMNS}"
    ))
    .bind(&body.tenant_id)
    .bind(&body.name)
    .fetch_one(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant_id}", tag = "tenants",
    params(("tenant_id" = String, Path, description = "Tenant identifier")),
    responses((status = 200, body = Tenant), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    mut s: Session,
    ApiPath(tenant_id): ApiPath<String>,
) -> Result<Json<Tenant>, ApiError> {
    validate::id("tenant_id", &tenant_id)?;
    let tenant: Option<Tenant> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM tenants WHERE tenant_id = $1"
    ))
    .bind(&tenant_id)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    tenant.map(Json).ok_or(ApiError::NotFound("tenant"))
}

#[utoipa::path(patch, path = "/v1/tenants/{tenant_id}", tag = "tenants", request_body = TenantChange,
    params(("tenant_id" = String, Path, description = "Tenant identifier")),
    responses((status = 200, body = Tenant), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn update(
    mut s: Session,
    ApiPath(tenant_id): ApiPath<String>,
    ApiJson(body): ApiJson<TenantChange>,
) -> Result<Json<Tenant>, ApiError> {
    s.require_operator_admin()?;
    validate::id("tenant_id", &tenant_id)?;
    if let Some(name) = &body.name {
        validate::name("name", name)?;
    }
    if let Some(status) = &body.status {
        if status != "active" && status != "suspended" {
            return Err(ApiError::bad("status", "must be active or suspended"));
        }
    }
    let tenant: Option<Tenant> = sqlx::query_as(&format!(
        "UPDATE tenants SET name = coalesce($2, name), status = coalesce($3, status) \
         WHERE tenant_id = $1 RETURNING {COLUMNS}"
    ))
    .bind(&tenant_id)
    .bind(&body.name)
    .bind(&body.status)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    tenant.map(Json).ok_or(ApiError::NotFound("tenant"))
}
