//! Mechanics shared by every fleetstream service, and nothing about any one of them.
//!
//! # Layout
//!
//! * [`config`]: clap argument groups with the same flag and environment-variable names in
//!   every service (`DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`, `TELEMETRY_TOPIC`, ...).
//! * [`observability`]: `tracing` subscriber, OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set, the Prometheus recorder.
//! * [`admin`]: the `/metrics`, `/healthz`, `/readyz` endpoints every service serves.
//! * [`shutdown`]: SIGTERM/SIGINT as a cancellation token passed to `run`.
//! * [`kafka`]: librdkafka client settings, topic administration and the start-up check that
//!   the service's topics exist.
//! * [`db`]: the PostgreSQL pool, and the start-up check that the database is migrated and the
//!   role holds the rights the service needs.
//! * [`probe`]: background readiness probes for the database and the brokers.
//! * [`registry`]: the Confluent-compatible schema registry (`SCHEMA_REGISTRY_URL`):
//!   registering a schema at start-up, writer schemas of Confluent-framed telemetry by id.
//! * [`system_metrics`]: key figures into the `system_metrics` table.
//! * `testing` (feature `testing`): a fresh migrated database and fresh topics per test, and a
//!   private Kafka broker for tests that stop and restart it.

pub mod admin;
pub mod config;
pub mod db;
pub mod error;
pub mod kafka;
pub mod observability;
pub mod probe;
pub mod registry;
pub mod shutdown;
pub mod system_metrics;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::Error;
pub use shutdown::{shutdown_signal, Shutdown};

/// A service's start-up checks: fails on what no retry fixes — one of `topics` missing on a
/// broker that answers, a database not migrated to this build, a role without one of
/// `privileges` — logging one error line; brokers or a database that cannot be reached yet are
/// waited for (readiness stays red meanwhile) until `shutdown`.
pub async fn startup_checks(
    kafka: &config::KafkaArgs,
    topics: &[&str],
    pool: &sqlx::PgPool,
    privileges: &[db::Privilege],
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let result = tokio::try_join!(
        kafka::require_topics(kafka, topics, shutdown),
        db::require_schema(pool, privileges, shutdown),
    );
    if let Err(err) = &result {
        tracing::error!(error = %err, "start-up check failed");
    }
    result.map(|_| ())
}
