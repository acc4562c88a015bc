//! Devices and gateway tokens: provisioning with one-time secrets.
//!
//! A device token (or gateway token) is returned once, by the request that creates or rotates
//! it; only its SHA-256 is stored, and ingest-producer picks the change up through the
//! `fleet_credentials` notification of migration 0004.

use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use crate::api::{attributes, TenantParam};
use crate::auth::new_secret;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::page::{fetch_limit, Page, PageParams};
use crate::session::Session;
use crate::validate;

/// Visible beginning of device tokens.
pub const DEVICE_TOKEN_KIND: &str = "fsd_";
/// Visible beginning of gateway tokens.
pub const GATEWAY_TOKEN_KIND: &str = "fsg_";

/// A device.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Device {
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub name: Option<String>,
    /// `active` or `disabled` (a disabled device's readings are refused at ingest).
    pub status: String,
    #[schema(value_type = Object)]
    pub attributes: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A device with its token, returned once.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceWithToken {
    pub device: Device,
    /// The device's bearer token for ingest. Shown only in this response.
    pub token: String,
}

/// `GET /v1/devices` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceList {
    /// Tenant to list (operators; a tenant key's own by default). Operators without it list all.
    pub tenant: Option<String>,
    /// Only devices of this site.
    pub site: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `POST /v1/devices` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    pub device_id: String,
    pub site_id: Option<String>,
    pub name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Value>,
}

const COLUMNS: &str =
    "tenant_id, device_id, site_id, name, status, attributes, created_at, updated_at";

#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(DeviceList),
    responses((status = 200, body = Page<Device>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    mut s: Session,
    ApiQuery(q): ApiQuery<DeviceList>,
) -> Result<Json<Page<Device>>, ApiError> {
    let scope = s.scope(q.tenant.as_deref())?;
    if let Some(site) = &q.site {
        validate::id("site", site)?;
    }
    let page = PageParams {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let after: Option<(String, String)> = page.after()?;
    let (after_tenant, after_device) = after.unzip();
    let rows: Vec<Device> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM devices \
         WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR site_id = $2) \
           AND ($3::text IS NULL OR (tenant_id, device_id) > ($3, $4)) \
         ORDER BY tenant_id, device_id LIMIT $5"
    ))
    .bind(scope)
    .bind(q.site)
    .bind(after_tenant)
    .bind(after_device)
    .bind(fetch_limit(limit))
    .fetch_all(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |d| {
        (d.tenant_id.clone(), d.device_id.clone())
    })))
}

#[utoipa::path(post, path = "/v1/devices", tag = "devices", params(TenantParam), request_body = NewDevice,
    responses((status = 201, description = "Created; the token is shown only here", body = DeviceWithToken),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    mut s: Session,
    ApiQuery(t): ApiQuery<TenantParam>,
    ApiJson(body): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<DeviceWithToken>), ApiError> {
    s.require_write()?;
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("device_id", &body.device_id)?;
    if let Some(site) = &body.site_id {
        validate::id("site_id", site)?;
    }
    if let Some(name) = &body.name {
        validate::name("name", name)?;
    }
    let attributes = attributes(body.attributes)?;
    let secret = new_secret(DEVICE_TOKEN_KIND);
    let device: Device = sqlx::query_as(&format!(
        "INSERT INTO devices (tenant_id, device_id, site_id, name, attributes, token_hash) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    ))
    .bind(&tenant)
    .bind(&body.device_id)
    .bind(&body.site_id)
    .bind(&body.name)
    .bind(attributes)
    .bind(&secret.hash)
    .fetch_one(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(DeviceWithToken {
            device,
            token: secret.secret,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/devices/{device_id}", tag = "devices",
    params(("device_id" = String, Path, description = "Device identifier"), TenantParam),
    responses((status = 200, body = Device), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    mut s: Session,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<Device>, ApiError> {
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("device_id", &device_id)?;
    let device: Option<Device> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM devices WHERE tenant_id = $1 AND device_id = $2"
    ))
    .bind(&tenant)
    .bind(&device_id)
    .fetch_optional(&mut *s.tx)
    .await?;
    s.commit().await?;
    device.map(Json).ok_or(ApiError::NotFound("device"))
}

async fn set_status(
    mut s: Session,
    device_id: String,
    tenant: Option<String>,
    status: &str,
) -> Result<Json<Device>, ApiError> {
    s.require_write()?;
    let tenant = s.tenant(tenant.as_deref())?;
    validate::id("device_id", &device_id)?;
    let device: Option<Device> = sqlx::query_as(&format!(
        "UPDATE devices SET status = $3, updated_at = now() \
         WHERE tenant_id = $1 AND device_id = $2 RETURNING {COLUMNS}"
    ))
    .bind(&tenant)
    .bind(&device_id)
    .bind(status)
    .fetch_optional(&mut *s.tx)
    .await?;
    let device = device.ok_or(ApiError::NotFound("device"))?;
    s.commit().await?;
    Ok(Json(device))
}

#[utoipa::path(post, path = "/v1/devices/{device_id}/disable", tag = "devices",
    params(("device_id" = String, Path, description = "Device identifier"), TenantParam),
    responses((status = 200, body = Device), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn disable(
    s: Session,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<Device>, ApiError> {
    set_status(s, device_id, t.tenant, "disabled").await
}

#[utoipa::path(post, path = "/v1/devices/{device_id}/enable", tag = "devices",
    params(("device_id" = String, Path, description = "Device identifier"), TenantParam),
    responses((status = 200, body = Device), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn enable(
    s: Session,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<Device>, ApiError> {
    set_status(s, device_id, t.tenant, "active").await
}

#[utoipa::path(post, path = "/v1/devices/{device_id}/rotate-token", tag = "devices",
    params(("device_id" = String, Path, description = "Device identifier"), TenantParam),
    responses((status = 200, description = "The new token, shown only here; the old one stops working", body = DeviceWithToken),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn rotate_token(
    mut s: Session,
    ApiPath(device_id): ApiPath<String>,
    ApiQuery(t): ApiQuery<TenantParam>,
) -> Result<Json<DeviceWithToken>, ApiError> {
    s.require_write()?;
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::id("device_id", &device_id)?;
    let secret = new_secret(DEVICE_TOKEN_KIND);
    let device: Option<Device> = sqlx::query_as(&format!(
        "UPDATE devices SET token_hash = $3, updated_at = now() \
         WHERE tenant_id = $1 AND device_id = $2 RETURNING {COLUMNS}"
    ))
    .bind(&tenant)
    .bind(&device_id)
    .bind(&secret.hash)
    .fetch_optional(&mut *s.tx)
    .await?;
    let device = device.ok_or(ApiError::NotFound("device"))?;
    s.commit().await?;
    Ok(Json(DeviceWithToken {
        device,
        token: secret.secret,
    }))
}

/// A gateway token (without its secret).
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct GatewayToken {
    pub token_id: i64,
    pub tenant_id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new gateway token with its secret, returned once.
#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayTokenWithSecret {
    pub gateway_token: GatewayToken,
    /// Bearer token for ingest, valid for every device of the tenant. Shown only here.
    pub token: String,
}

/// `POST /v1/gateway-tokens` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGatewayToken {
    pub name: String,
}

/// `GET /v1/gateway-tokens` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GatewayTokenList {
    /// Tenant to list (operators; a tenant key's own by default). Operators without it list all.
    pub tenant: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

const GATEWAY_COLUMNS: &str = "token_id, tenant_id, name, created_at, revoked_at";

#[utoipa::path(get, path = "/v1/gateway-tokens", tag = "devices", params(GatewayTokenList),
    responses((status = 200, body = Page<GatewayToken>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_gateway_tokens(
    mut s: Session,
    ApiQuery(q): ApiQuery<GatewayTokenList>,
) -> Result<Json<Page<GatewayToken>>, ApiError> {
    if !s.role().can_write() && !s.role().is_operator() {
        return Err(ApiError::Forbidden(format!(
            "role {} may not list credentials",
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
        GATEWAY_COLUMNS,
        "gateway_tokens",
        "token_id",
        scope.as_deref(),
        &page,
        |g: &GatewayToken| g.token_id,
    )
    .await?;
    s.commit().await?;
    Ok(Json(page))
}

#[utoipa::path(post, path = "/v1/gateway-tokens", tag = "devices", params(TenantParam),
    request_body = NewGatewayToken,
    responses((status = 201, description = "Created; the token is shown only here", body = GatewayTokenWithSecret),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_gateway_token(
    mut s: Session,
    ApiQuery(t): ApiQuery<TenantParam>,
    ApiJson(body): ApiJson<NewGatewayToken>,
) -> Result<(StatusCode, Json<GatewayTokenWithSecret>), ApiError> {
    s.require_write()?;
    let tenant = s.tenant(t.tenant.as_deref())?;
    validate::name("name", &body.name)?;
    let secret = new_secret(GATEWAY_TOKEN_KIND);
    let gateway_token: GatewayToken = sqlx::query_as(&format!(
        "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ($1, $2, $3) \
         RETURNING {GATEWAY_COLUMNS}"
    ))
    .bind(&tenant)
    .bind(&body.name)
    .bind(&secret.hash)
    .fetch_one(&mut *s.tx)
    .await?;
    s.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(GatewayTokenWithSecret {
            gateway_token,
            token: secret.secret,
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/gateway-tokens/{token_id}", tag = "devices",
    params(("token_id" = i64, Path, description = "Gateway token id")),
    responses((status = 204, description = "Revoked"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_gateway_token(
    mut s: Session,
    ApiPath(token_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    s.require_write()?;
    let revoked = sqlx::query(
        "UPDATE gateway_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE token_id = $1",
    )
    .bind(token_id)
    .execute(&mut *s.tx)
    .await?
    .rows_affected();
    if revoked == 0 {
        return Err(ApiError::NotFound("gateway token"));
    }
    s.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
