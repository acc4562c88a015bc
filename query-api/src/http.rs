//! The router: `/v1` API, `/openapi.json`, `/docs`, the dashboard at `/`, and the admin
//! endpoints; shared state; the middleware that measures, counts and logs every request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use plumbing::admin::Health;
use schemas::Layout;
use sqlx::PgPool;
use tokio::sync::OnceCell;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;
use tracing::{error, info_span};

use crate::error::{ApiError, InternalCause};
use crate::stats::Stats;

/// Largest request body (provisioning bodies are small; attributes are capped at 16 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Query limits, from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `statement_timeout` of every request's transaction; past it the request gets a 503.
    pub statement_timeout: Duration,
    /// Longest `to - from` of a series.
    pub max_range: Duration,
    /// Most points in one series answer.
    pub max_points: u64,
    /// Most requests of one tenant in progress at a time (see [`crate::tenant_gate`]).
    pub tenant_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(5),
            max_range: Duration::from_secs(31 * 86_400),
            max_points: 10_000,
            tenant_concurrency: 4,
        }
    }
}

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Connections as `fleet_api`; its size bounds concurrent requests in the database.
    pub pool: PgPool,
    pub limits: Arc<Limits>,
    /// Storage layout, read from `fleetstream_settings` on first use (the database may be
    /// down when the service starts).
    layout: Arc<OnceCell<Layout>>,
    /// Whether the pool's role is subject to row-level security, checked once.
    isolated: Arc<OnceCell<bool>>,
    stats: Arc<Stats>,
    /// Per-tenant request budgets.
    pub gate: Arc<crate::tenant_gate::TenantGate>,
}

impl AppState {
    pub fn new(pool: PgPool, limits: Limits, stats: Arc<Stats>) -> Self {
        Self {
            pool,
            gate: Arc::new(crate::tenant_gate::TenantGate::new(
                limits.tenant_concurrency,
            )),
            limits: Arc::new(limits),
            layout: Arc::new(OnceCell::new()),
            isolated: Arc::new(OnceCell::new()),
            stats,
        }
    }

    /// Refuses to serve tenant data over a role that bypasses row-level security (a superuser
    /// or `BYPASSRLS` URL by mistake): isolation would then rest on handler `WHERE` clauses.
    pub async fn require_isolation(&self) -> Result<(), ApiError> {
        let isolated = self
            .isolated
            .get_or_try_init(|| async {
                let bypass: bool = sqlx::query_scalar(
                    "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
                )
                .fetch_one(&self.pool)
                .await?;
                if bypass {
                    error!("the database role bypasses row-level security; refusing to serve tenant data (connect as fleet_api)");
                }
                Ok::<bool, ApiError>(!bypass)
            })
            .await?;
        if *isolated {
            Ok(())
        } else {
            Err(ApiError::BypassesIsolation)
        }
    }

    /// The storage layout of the database.
    pub async fn layout(&self) -> Result<Layout, ApiError> {
        self.layout
            .get_or_try_init(|| async {
                let mut conn = self.pool.acquire().await?;
                match schemas::storage::stored_layout(&mut conn).await {
                    Ok(Some(layout)) => Ok(layout),
                    Ok(None) => Err(ApiError::Internal(
                        "database has no storage layout: run `query-api migrate`".to_owned(),
                    )),
                    Err(err) => Err(ApiError::Internal(err.to_string())),
                }
            })
            .await
            .copied()
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState, health: Health) -> Result<Router, crate::Error> {
    let stats = state.stats.clone();
    Ok(Router::new()
        .merge(crate::api::routes().with_state(state))
        .merge(crate::web::routes())
        .merge(plumbing::admin::router(health)?)
        // A panicking handler answers a generic 500 in the error shape (logged and counted by
        // `observe`) instead of dropping the connection.
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(stats, observe))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let route = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                info_span!("request", method = %request.method(), route = %route)
            }),
        ))
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".to_owned());
    ApiError::Internal(format!("handler panicked: {message}")).into_response()
}

/// Counts, times and (for 5xx) logs each request, once.
async fn observe(State(stats): State<Arc<Stats>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed().as_secs_f64();
    let status = response.status();
    if let Some(InternalCause(cause)) = response.extensions().get::<InternalCause>() {
        error!(%route, %method, status = status.as_u16(), cause = %cause, "request failed");
    }
    stats.record(elapsed, status.is_server_error());
    let class = format!("{}xx", status.as_u16() / 100);
    metrics::counter!(crate::metrics::REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => status.as_u16().to_string()).increment(1);
    metrics::histogram!(crate::metrics::REQUEST_DURATION, "route" => route, "method" => method, "status" => class).record(elapsed);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_generic_500_with_its_cause_kept_for_the_log() {
        let response = panic_response(Box::new("index out of bounds"));
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        let cause = response.extensions().get::<InternalCause>().unwrap();
        assert!(cause.0.contains("index out of bounds"));
    }
}
