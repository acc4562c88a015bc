//! `/metrics`, `/healthz` and `/readyz`, served by every service on its admin address.
//!
//! Liveness (`/healthz`) only says the process answers. Readiness (`/readyz`) is the
//! conjunction of named checks each service keeps up to date (e.g. `kafka`, `database`,
//! `assigned`); it answers `503` with the failing checks while any is false.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{Error, Shutdown};

/// Named readiness checks, shared between the service and its admin endpoints.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<BTreeMap<&'static str, bool>>>,
}

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    checks: BTreeMap<&'static str, bool>,
}

impl Health {
    /// A health registry whose checks all start as not ready.
    pub fn new(checks: &[&'static str]) -> Self {
        let health = Health::default();
        for check in checks {
            health.set(check, false);
        }
        health
    }

    /// Records the state of one check.
    pub fn set(&self, check: &'static str, ok: bool) {
        if let Ok(mut checks) = self.checks.write() {
            checks.insert(check, ok);
        }
    }

    /// True when every check is.
    pub fn is_ready(&self) -> bool {
        self.checks
            .read()
            .map(|checks| checks.values().all(|ok| *ok))
            .unwrap_or(false)
    }

    fn snapshot(&self) -> Readiness {
        let checks = self.checks.read().map(|c| c.clone()).unwrap_or_default();
        Readiness {
            ready: checks.values().all(|ok| *ok),
            checks,
        }
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    prometheus: PrometheusHandle,
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let readiness = state.health.snapshot();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// The admin routes; services may merge their own.
pub fn router(health: Health) -> Result<Router, Error> {
    let state = AdminState {
        health,
        prometheus: crate::observability::prometheus()?,
    };
    Ok(Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state))
}

/// Binds `addr` (port 0 picks a free one) and returns the listener and its address.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: Shutdown) -> Result<(), Error> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
