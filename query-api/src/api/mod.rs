//! The `/v1` routes and the OpenAPI document generated from their annotations.

pub mod alerts;
pub mod devices;
pub mod keys;
pub mod latest;
pub mod series;
pub mod sites;
pub mod system;
pub mod tenants;

use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::error::{ApiError, ErrorBody};
use crate::http::AppState;
use crate::page::Page;

/// Largest `attributes` object, serialised.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

/// `?tenant=` of a request about one tenant's data.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TenantParam {
    /// Tenant addressed. Operator keys must name one; tenant keys default to their own.
    pub tenant: Option<String>,
}

/// Validates an optional `attributes` object.
pub(crate) fn attributes(value: Option<serde_json::Value>) -> Result<serde_json::Value, ApiError> {
    let value = value.unwrap_or_else(|| serde_json::json!({}));
    if !value.is_object() {
        return Err(ApiError::bad("attributes", "must be a JSON object"));
    }
    if value.to_string().len() > MAX_ATTRIBUTES_BYTES {
        return Err(ApiError::bad(
            "attributes",
            format!("must be at most {MAX_ATTRIBUTES_BYTES} bytes"),
        ));
    }
    Ok(value)
}

/// Every `/v1` route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants", get(tenants::list).post(tenants::create))
        .route(
            "/v1/tenants/{tenant_id}",
            get(tenants::get).patch(tenants::update),
        )
        .route("/v1/sites", get(sites::list).post(sites::create))
        .route("/v1/sites/{site_id}", get(sites::get).delete(sites::delete))
        .route("/v1/devices", get(devices::list).post(devices::create))
        .route("/v1/devices/{device_id}", get(devices::get))
        .route("/v1/devices/{device_id}/disable", post(devices::disable))
        .route("/v1/devices/{device_id}/enable", post(devices::enable))
        .route(
            "/v1/devices/{device_id}/rotate-token",
            post(devices::rotate_token),
        )
        .route("/v1/devices/{device_id}/latest", get(latest::device))
        .route("/v1/devices/{device_id}/telemetry", get(series::series))
        .route(
            "/v1/gateway-tokens",
            get(devices::list_gateway_tokens).post(devices::create_gateway_token),
        )
        .route(
            "/v1/gateway-tokens/{token_id}",
            delete(devices::revoke_gateway_token),
        )
        .route("/v1/api-keys", get(keys::list).post(keys::create))
        .route("/v1/api-keys/{key_id}", delete(keys::revoke))
        .route("/v1/me", get(keys::whoami))
        .route("/v1/fleet/latest", get(latest::fleet))
        .route("/v1/fleet/summary", get(latest::summary))
        .route("/v1/alerts", get(alerts::list))
        .route("/v1/alerts/{alert_id}/ack", post(alerts::acknowledge))
        .route(
            "/v1/alert-rules",
            get(alerts::list_rules).post(alerts::create_rule),
        )
        .route(
            "/v1/alert-rules/{rule_id}",
            get(alerts::get_rule)
                .put(alerts::replace_rule)
                .delete(alerts::delete_rule),
        )
        .route("/v1/system/metrics", get(system::metrics))
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`fsk_...`) as `Authorization: Bearer <key>`",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3 document served at `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetstream query-api",
        description = "Dashboards and provisioning for fleetstream. Every request runs in a \
            transaction scoped to its key's tenant and role; PostgreSQL (row-level security \
            and security-barrier views) enforces the isolation. Another tenant's object is a \
            404 like a missing one. Errors have the shape {\"error\", \"field\"?}."
    ),
    modifiers(&BearerAuth),
    paths(
        tenants::list, tenants::create, tenants::get, tenants::update,
        sites::list, sites::create, sites::get, sites::delete,
        devices::list, devices::create, devices::get, devices::disable, devices::enable,
        devices::rotate_token, devices::list_gateway_tokens, devices::create_gateway_token,
        devices::revoke_gateway_token,
        keys::list, keys::create, keys::revoke, keys::whoami,
        latest::device, latest::fleet, latest::summary,
        series::series,
        alerts::list, alerts::acknowledge, alerts::list_rules, alerts::get_rule,
        alerts::create_rule, alerts::replace_rule, alerts::delete_rule,
        system::metrics,
    ),
    components(schemas(
        ErrorBody,
        Page<tenants::Tenant>, Page<sites::Site>, Page<devices::Device>,
        Page<devices::GatewayToken>, Page<keys::ApiKey>, Page<latest::FleetLatest>,
        Page<alerts::Alert>, Page<alerts::AlertRule>,
    )),
    tags(
        (name = "tenants", description = "Tenants (operator_admin provisions them)"),
        (name = "sites", description = "Sites of a tenant"),
        (name = "devices", description = "Devices and gateway tokens, with one-time secrets"),
        (name = "api keys", description = "API keys and roles"),
        (name = "telemetry", description = "Latest values and time series"),
        (name = "alerts", description = "Alerts and alert rules"),
        (name = "system", description = "Pipeline health (operators)"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;
