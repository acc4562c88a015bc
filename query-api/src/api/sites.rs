//! Sites of a tenant: read by everyone in reach, created and deleted by admins.

use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use crate::api::{attributes, TenantParam};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::page::{fetch_limit, Page, PageParams};
use crate::session::Session;
use crate::validate;

/// A site (a place devices are installed at).
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Site {
    pub tenant_id: String,
    pub site_id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub attributes: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/sites` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SiteList {
    /// Tenant to list (operators; a tenant key's own by default). Operators without it list all.
    pub tenant: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `POST /v1/sites` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSite {
    pub site_id: String,
    pub name: String,
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Value>,
}

const COLUMNS: &str = "tenant_id, site_id, name, attributes, created_at";

#[utoipa::path(get, path = "/v1/sites", tag = "sites", params(SiteList),
    responses((status = 200, body = Page<Site>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    mut s: Session,
    ApiQuery(q): ApiQuery<SiteList>,
) -> Result<Json<Page<Site>>, ApiError> {
    let scope = s.scope(q.tenant.as_deref())?;
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let after: Option<(String, String)> = page.after()?;
    let (after_tenant, after_site) = after.unzip();
    let rows: Vec<Site> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM sites \
         WHERE ($1::text IS NULL OR tenant_id = $1) \
           AND ($2::text IS NULL OR (tenant_id, site_id) > ($2, $3)) \
         ORDER BY tenant_id, site_id LIMIT $4"
    ))
    .bind(scope)
    .bind(after_tenant)
    .bind(after_site)
    .bind(fetch_limit(limit))
    .fetch_all(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |r| {
        (r.tenant_id.clone(), r.site_id.clone())
    })))
}

#[utoipa::path(post, path = "/v1/sites", tag = "sites", params(TenantParam), request_body = NewSite,
    responses((status = 201, body = Site), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    mut s: Session,
    ApiQuery(t): ApiQuery<TenantParam>,
    ApiJson(body): ApiJson<NewSite>,
) -> Result<(StatusCode, Json<Site>), ApiError> {
    s.require_write()?;
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("site_id", &body.site_id)?;
    validate::name("name", &body.name)?;
    let attributes = attributes(body.attributes)?;
    let site: Site = sqlx::query_as(&format!(
        "INSERT INTO sites (tenant_id, site_id, name, attributes) VALUES ($1, $2, $3, $4) \
         RETURNING {COLUMNS}"
    ))
    .bind(&tenant)
    .bind(&body.site_id)
    .bind(&body.name)
    .bind(attributes)
    .fetch_one(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok((StatusCode::CREATED, Json(site)))
}

#[utoipa::path(get, path = "/v1/sites/{site_id}", tag = "sites",
    params(("site_id" = String, Path, description = "Site identifier"), TenantParam),
    responses((status = 200, body = Site), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    mut s: Session,
    ApiPath(site_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<Site>, ApiError> {
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("site_id", &site_id)?;
    let site: Option<Site> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM sites WHERE tenant_id = $1 AND site_id = $2"
    ))
    .bind(&tenant)
    .bind(&site_id)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    site.map(Json).ok_or(ApiError::NotFound("site"))
}

#[utoipa::path(delete, path = "/v1/sites/{site_id}", tag = "sites",
    params(("site_id" = String, Path, description = "Site identifier"), TenantParam),
    responses((status = 204, description = "Deleted; its devices keep running without a site"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete(
    mut s: Session,
    ApiPath(site_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<StatusCode, ApiError> {
    s.require_write()?;
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("site_id", &site_id)?;
    let deleted = sqlx::query("DELETE FROM sites WHERE tenant_id = $1 AND site_id = $2")
        .bind(&tenant)
        .bind(&site_id)
        .execute(&mut *s.tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(ApiError::NotFound("site"));
    }
    s.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
