//! HTTP API for dashboards and provisioning; tenant isolation is enforced by PostgreSQL
//! (row-level security and security-barrier views), not by handler `WHERE` clauses.
//!
//! # Layout
//!
//! * [`session`]: the per-request transaction: key verification, then `app.tenant_id`,
//!   `app.role` and `statement_timeout` set with `set_config(..., true)` before any query.
//! * [`auth`]: API keys (hashed), roles and secrets.
//! * [`api`]: the `/v1` handlers (tenants, sites, devices and tokens, API keys, latest values,
//!   series, alerts and rules, system metrics) and the OpenAPI document built from them.
//! * [`page`]: keyset pagination; [`validate`]: input checks naming the field;
//!   [`extract`]: extractors whose rejections use the error shape of [`error`].
//! * [`http`]: router, shared state and limits, request metrics and logging middleware.
//! * [`web`]: the embedded dashboard, docs page and `/openapi.json`.
//! * [`metrics`] and [`stats`]: Prometheus metrics and key figures into `system_metrics`.
//!
//! The library runs in-process from tests through [`run`] or [`http::router`].

pub mod api;
pub mod auth;
pub mod error;
pub mod extract;
pub mod http;
pub mod metrics;
pub mod page;
pub mod session;
pub mod stats;
pub mod tenant_gate;
pub mod validate;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use plumbing::admin::{self, Health};
use plumbing::config::{parse_duration, DatabaseArgs, ObservabilityArgs, StorageArgs};
use plumbing::Shutdown;
use tokio::net::TcpListener;
use tracing::info;

pub use error::{ApiError, Error};
pub use http::{AppState, Limits};

use crate::auth::Role;

/// Name in logs, traces, metrics and `system_metrics`.
pub const SERVICE: &str = "query-api";

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "query-api",
    version,
    about = "fleetstream query and provisioning API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// The API's address and limits.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Address of the API, the dashboard and the docs.
    #[arg(long, env = "HTTP_LISTEN", default_value = "127.0.0.1:8081")]
    pub http_listen: SocketAddr,
    /// `statement_timeout` of each request's transaction; slower requests get a 503 (5 s keeps
    /// a dashboard responsive and one heavy query from holding a connection for long).
    #[arg(long, env = "STATEMENT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub statement_timeout: Duration,
    /// Longest time range of one series request.
    #[arg(long, env = "MAX_QUERY_RANGE", default_value = "31d", value_parser = parse_duration)]
    pub max_query_range: Duration,
    /// Most points in one series answer (10,000 is ~1 week at 1-minute buckets for one metric).
    #[arg(long, env = "MAX_POINTS", default_value_t = 10_000)]
    pub max_points: u64,
    /// Most requests of one tenant in progress at a time (operator keys share one budget);
    /// more wait up to a second, then get a 429 with `Retry-After`. Keep it below
    /// `DATABASE_MAX_CONNECTIONS`, so one tenant never holds every connection.
    #[arg(long, env = "TENANT_MAX_CONCURRENT_REQUESTS", default_value_t = 4)]
    pub tenant_max_concurrent_requests: usize,
    /// How often key figures are written to `system_metrics`.
    #[arg(long, env = "SYSTEM_METRICS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub system_metrics_interval: Duration,
}

impl ApiArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            statement_timeout: self.statement_timeout,
            max_range: self.max_query_range,
            max_points: self.max_points,
            tenant_concurrency: self.tenant_max_concurrent_requests,
        }
    }
}

/// One-shot commands; without one, the API is served.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Create or upgrade the schema (idempotent), then exit.
    Migrate(StorageArgs),
    /// Create an API key and print it once (bootstraps the first `operator_admin` key).
    CreateKey(CreateKeyArgs),
}

/// `create-key` arguments.
#[derive(Debug, Clone, Args)]
pub struct CreateKeyArgs {
    /// `viewer`, `admin` (need --tenant), `operator` or `operator_admin`.
    #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
    pub role: Role,
    /// Tenant of a viewer or admin key.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Name shown in key listings.
    #[arg(long, default_value = "bootstrap")]
    pub name: String,
}

/// What one-shot commands produce for `main` to print.
#[derive(Debug)]
pub enum Outcome {
    /// The service ran until shutdown, or a command needed no output.
    Done,
    /// A key created by `create-key`: shown once.
    Key(String),
}

/// Runs the command line: a one-shot command, or the server until `shutdown`.
pub async fn main(cli: Cli, shutdown: Shutdown) -> Result<Outcome, Error> {
    match &cli.command {
        Some(Command::Migrate(storage)) => {
            let pool = plumbing::db::pool(&cli.database, SERVICE)?;
            let layout = schemas::migrate(&pool, &storage.options()?).await?;
            info!(%layout, "schema is current");
            pool.close().await;
            Ok(Outcome::Done)
        }
        Some(Command::CreateKey(args)) => {
            let pool = plumbing::db::pool(&cli.database, SERVICE)?;
            let key = create_key(&pool, args).await;
            pool.close().await;
            Ok(Outcome::Key(key?))
        }
        None => {
            run(cli, shutdown).await?;
            Ok(Outcome::Done)
        }
    }
}

/// Creates a key as `operator_admin` would: the transaction is scoped like an API request's,
/// so row-level security admits the row even when connected as `fleet_api`.
pub async fn create_key(pool: &sqlx::PgPool, args: &CreateKeyArgs) -> Result<String, Error> {
    let tenant = match (args.role.is_operator(), &args.tenant) {
        (true, Some(_)) => {
            return Err(Error::InvalidArgument {
                field: "tenant",
                reason: "operator keys belong to no tenant".to_owned(),
            })
        }
        (false, None) => {
            return Err(Error::InvalidArgument {
                field: "tenant",
                reason: format!("a {} key needs --tenant", args.role),
            })
        }
        (_, tenant) => tenant.clone(),
    };
    if let Some(tenant) = &tenant {
        validate::id("tenant", tenant).map_err(|e| Error::InvalidArgument {
            field: "tenant",
            reason: e.to_string(),
        })?;
    }
    validate::name("name", &args.name).map_err(|e| Error::InvalidArgument {
        field: "name",
        reason: e.to_string(),
    })?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('app.role', 'operator_admin', true), set_config('app.tenant_id', '', true)")
        .execute(&mut *tx)
        .await?;
    let created = api::keys::insert_key(&mut tx, tenant.as_deref(), args.role, &args.name).await?;
    tx.commit().await?;
    info!(key_id = created.api_key.key_id, role = %args.role, "API key created");
    Ok(created.key)
}

/// Serves the API, dashboard and admin endpoints on `HTTP_LISTEN` until `shutdown` is
/// cancelled.
pub async fn run(cli: Cli, shutdown: Shutdown) -> Result<(), Error> {
    let (listener, _) = admin::bind(cli.api.http_listen).await?;
    serve(cli, listener, shutdown).await
}

/// Like [`run`], on a listener the caller bound (tests bind port 0).
pub async fn serve(cli: Cli, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    metrics::describe();
    let pool = plumbing::db::pool(&cli.database, SERVICE)?;
    let health = Health::new(&["database"]);
    let background = Shutdown::new();
    let stats = Arc::new(stats::Stats::default());
    let tasks = [
        plumbing::probe::spawn_database_probe(pool.clone(), health.clone(), background.clone()),
        stats::spawn_reporter(
            pool.clone(),
            stats.clone(),
            cli.observability.instance(),
            cli.api.system_metrics_interval,
            background.clone(),
        ),
    ];
    let (admin_listener, admin_addr) = admin::bind(cli.observability.admin_listen).await?;
    info!(addr = %admin_addr, "admin endpoints listening");
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(health.clone())?,
        background.clone(),
    ));
    let state = AppState::new(pool.clone(), cli.api.limits(), stats);
    let router = http::router(state, health)?;
    info!(addr = %listener.local_addr()?, "API and dashboard listening");
    let served = admin::serve(listener, router, shutdown).await;
    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let _ = admin_task.await;
    pool.close().await;
    info!("stopped");
    served.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_subcommand_takes_storage_settings() {
        let cli = Cli::try_parse_from([
            "query-api",
            "--database-url",
            "postgres://u:p@db/fleet",
            "migrate",
            "--storage-layout",
            "postgres",
            "--telemetry-retention",
            "30d",
        ])
        .unwrap();
        let Some(Command::Migrate(storage)) = cli.command else {
            panic!("expected migrate, got {:?}", cli.command);
        };
        assert_eq!(storage.storage_layout, "postgres");
        assert_eq!(storage.telemetry_retention.as_secs(), 30 * 86_400);
    }

    #[test]
    fn create_key_and_limits_parse() {
        let cli = Cli::try_parse_from([
            "query-api",
            "--database-url",
            "postgres://u:p@db/fleet",
            "--statement-timeout",
            "2s",
            "--max-points",
            "500",
            "create-key",
            "--role",
            "operator_admin",
        ])
        .unwrap();
        let Some(Command::CreateKey(args)) = &cli.command else {
            panic!("expected create-key, got {:?}", cli.command);
        };
        assert_eq!(args.role, Role::OperatorAdmin);
        assert_eq!(cli.api.limits().statement_timeout, Duration::from_secs(2));
        assert_eq!(cli.api.limits().max_points, 500);
        assert!(Cli::try_parse_from([
            "query-api",
            "--database-url",
            "x",
            "create-key",
            "--role",
            "root"
        ])
        .is_err());
    }
}
