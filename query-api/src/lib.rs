//! HTTP API for dashboards and provisioning; tenant isolation is enforced by PostgreSQL
//! (row-level security and security-barrier views), not by handler `WHERE` clauses.
//!
//! This crate is a library with a thin `main.rs`, so tests run it in-process. At this stage it
//! serves its admin endpoints (`/metrics`, `/healthz`, `/readyz`) and owns the `migrate`
//! command that brings a database to the current schema; the API itself is issue #7.

use clap::{Parser, Subcommand};
use plumbing::config::{DatabaseArgs, ObservabilityArgs, StorageArgs};
use plumbing::Shutdown;
use tracing::info;

/// Name in logs, traces, metrics and `system_metrics`.
pub const SERVICE: &str = "query-api";

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plumbing(#[from] plumbing::Error),
    #[error(transparent)]
    Storage(#[from] schemas::StorageError),
}

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
}

/// One-shot commands; without one, the API is served.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Create or upgrade the schema (idempotent), then exit.
    Migrate(StorageArgs),
}

/// Runs the command line: a one-shot command, or the server until `shutdown`.
pub async fn main(cli: Cli, shutdown: Shutdown) -> Result<(), Error> {
    match &cli.command {
        Some(Command::Migrate(storage)) => {
            let pool = plumbing::db::pool(&cli.database, SERVICE)?;
            let layout = schemas::migrate(&pool, &storage.options()?).await?;
            info!(%layout, "schema is current");
            pool.close().await;
            Ok(())
        }
        None => run(cli, shutdown).await,
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: Shutdown) -> Result<(), Error> {
    let pool = plumbing::db::pool(&cli.database, SERVICE)?;
    plumbing::probe::serve_admin_with_probes(cli.observability.admin_listen, pool, None, shutdown)
        .await?;
    info!("stopped");
    Ok(())
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
}
