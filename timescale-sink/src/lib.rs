//! Kafka consumer group that bulk-COPYs telemetry into PostgreSQL/TimescaleDB exactly once.
//!
//! This crate is a library with a thin `main.rs`, so tests run the service in-process
//! through [`run`]. At this stage it serves its admin endpoints (`/metrics`, `/healthz`,
//! `/readyz`) and probes its dependencies; the pipeline stage itself is the subject of
//! issue #4; its hand-written binary COPY encoder ([`copy_writer`]) is in place.

use clap::Parser;
use plumbing::config::{DatabaseArgs, KafkaArgs, ObservabilityArgs};
use plumbing::Shutdown;

pub mod copy_writer;
use tracing::info;

/// Name in logs, traces, metrics and `system_metrics`.
pub const SERVICE: &str = "timescale-sink";

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plumbing(#[from] plumbing::Error),
}

/// Configuration, from flags or the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "timescale-sink",
    version,
    about = "Kafka consumer group that bulk-COPYs telemetry into PostgreSQL/TimescaleDB exactly once"
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    let pool = plumbing::db::pool(&config.database, SERVICE)?;
    plumbing::probe::serve_admin_with_probes(
        config.observability.admin_listen,
        pool,
        Some(config.kafka),
        shutdown,
    )
    .await?;
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_the_shared_variable_names() {
        let config = Config::try_parse_from([
            "timescale-sink",
            "--database-url",
            "postgres://u:p@db/fleet",
            "--kafka-bootstrap-servers",
            "k:9092",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(config.database.database_url, "postgres://u:p@db/fleet");
        assert_eq!(config.kafka.bootstrap_servers, "k:9092");
        assert_eq!(config.kafka.telemetry_topic, "telemetry.v1");
    }
}
