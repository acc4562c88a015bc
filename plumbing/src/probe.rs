//! Background readiness probes that keep [`Health`](crate::admin::Health) checks current.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;
use tracing::{debug, warn};

use crate::admin::Health;
use crate::config::KafkaArgs;
use crate::Shutdown;

/// How often probes run.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps check `database` true while `SELECT 1` succeeds.
pub fn spawn_database_probe(
    pool: PgPool,
    health: Health,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ok = match sqlx::query("SELECT 1").execute(&pool).await {
                Ok(_) => true,
                Err(err) => {
                    warn!(error = %err, "database probe failed");
                    false
                }
            };
            health.set("database", ok);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
        }
    })
}

/// Keeps check `kafka` true while the brokers answer a metadata request for the telemetry topic.
pub fn spawn_kafka_probe(
    args: KafkaArgs,
    health: Health,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let consumer: Result<BaseConsumer, _> =
            crate::kafka::base_config(&args, "fleetstream-probe").create();
        let consumer = match consumer {
            Ok(consumer) => std::sync::Arc::new(consumer),
            Err(err) => {
                warn!(error = %err, "cannot create kafka probe client");
                return;
            }
        };
        loop {
            let probe = consumer.clone();
            let topic = args.telemetry_topic.clone();
            let ok = tokio::task::spawn_blocking(move || {
                probe
                    .fetch_metadata(Some(&topic), Duration::from_secs(3))
                    .map(|metadata| metadata.topics().iter().any(|t| t.error().is_none()))
            })
            .await;
            let ok = match ok {
                Ok(Ok(found)) => found,
                Ok(Err(err)) => {
                    debug!(error = %err, "kafka probe failed");
                    false
                }
                Err(_) => false,
            };
            health.set("kafka", ok);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
        }
    })
}

/// Serves the admin endpoints on `listen` with a `database` check (and a `kafka` check when
/// `kafka` is given) until `shutdown`, then waits for the probes and closes the pool.
pub async fn serve_admin_with_probes(
    listen: std::net::SocketAddr,
    pool: PgPool,
    kafka: Option<KafkaArgs>,
    shutdown: Shutdown,
) -> Result<(), crate::Error> {
    let checks: &[&'static str] = if kafka.is_some() {
        &["database", "kafka"]
    } else {
        &["database"]
    };
    let health = Health::new(checks);
    let (listener, addr) = crate::admin::bind(listen).await?;
    tracing::info!(%addr, "admin endpoints listening");
    let mut probes = vec![spawn_database_probe(
        pool.clone(),
        health.clone(),
        shutdown.clone(),
    )];
    if let Some(kafka) = kafka {
        probes.push(spawn_kafka_probe(kafka, health.clone(), shutdown.clone()));
    }
    crate::admin::serve(listener, crate::admin::router(health)?, shutdown).await?;
    for probe in probes {
        let _ = probe.await;
    }
    pool.close().await;
    Ok(())
}
