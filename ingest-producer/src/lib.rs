//! Edge gateway: HTTP ingest of device readings into Kafka as Avro.
//!
//! Devices and gateways `POST /v1/telemetry` one JSON object, a JSON array or NDJSON with a
//! bearer token; each message is validated, checked against what the token may write, rate
//! limited, encoded with the shipped Avro schema and produced to `telemetry.v1` under key
//! `tenant/device`. The reply (`202` with the accepted count, and how many distinct points
//! they make) is sent only after Kafka acknowledged every accepted message.
//!
//! # Layout
//!
//! * [`http`]: the route, the request flow and the reply shapes.
//! * [`mqtt`]: MQTT 3.1.1 and 5 device ingest (ThingsBoard's device API and our own topic) on
//!   the same flow, PUBACK after Kafka's acknowledgement; plain and TLS listeners.
//! * [`fd_limit`]: the open-file limit raised for the MQTT connections (ingest and simulator).
//! * [`influx`]: the InfluxDB-compatible writes (`/api/v2/write`, `/write`, `/query`) on the
//!   same flow, with InfluxDB's answers.
//! * [`lineproto`]: line protocol: parsing with line numbers, and the mapping of
//!   measurements, tags and fields onto readings.
//! * [`encoding`]: `Content-Encoding` (identity, gzip) and decompression within the body limit.
//! * `json`: JSON as PostgreSQL stores it: the second reading of a body that refuses
//!   integers outside 64 bits, numbers a double cannot hold, U+0000, lone surrogates and
//!   duplicate keys, naming the field.
//! * [`message`]: body formats and per-message validation (schema, limits, time window), and
//!   what an accepted message becomes.
//! * [`credentials`]: device and gateway tokens (hashes) and devices, cached from PostgreSQL
//!   and refreshed by LISTEN/NOTIFY and a periodic reload.
//! * [`rate_limit`]: token buckets per device and per tenant.
//! * [`producer`]: the idempotent `acks=all` producer and its delivery guarantee.
//! * [`error`]: [`Error`] for the service, [`Rejection`] for refused requests and messages.
//! * [`metrics`]: the `fleetstream_ingest_*` metrics.
//! * [`stats`]: key figures written to `system_metrics` for the dashboard.
//! * [`simulate`]: the `simulate` subcommand, N virtual devices for demos and load tests.
//! * [`manifest`]: the simulator's record of every reading sent and whether it was accepted.
//! * [`import`], [`compare`], [`export`]: the `import` and `compare` subcommands (InfluxDB
//!   history through Kafka exactly once; the export compared with the database) and their
//!   chunked reading of export files.
//!
//! The library runs in-process from tests through [`run`] or [`http::router`].

pub mod compare;
pub mod credentials;
pub mod encoding;
pub mod error;
pub mod export;
pub mod fd_limit;
pub mod http;
pub mod import;
pub mod influx;
mod json;
pub mod lineproto;
pub mod manifest;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod producer;
pub mod rate_limit;
pub mod simulate;
mod simulate_mqtt;
pub mod stats;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use clap::{Args, Parser};
use plumbing::admin::Health;
use plumbing::config::{parse_duration, DatabaseArgs, KafkaArgs, ObservabilityArgs};
use plumbing::db::Privilege;
use plumbing::Shutdown;
use tokio::net::TcpListener;
use tracing::info;

pub use error::{Error, Rejection};

/// Name in logs, traces, metrics and `system_metrics`.
pub const SERVICE: &str = "ingest-producer";

/// Configuration, from flags or the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ingest-producer",
    version,
    about = "Edge gateway: HTTP and MQTT ingest of device readings into Kafka as Avro; device simulator"
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    #[command(flatten)]
    pub ingest: IngestArgs,
    #[command(flatten)]
    pub mqtt: mqtt::MqttArgs,
    #[command(flatten)]
    pub registry: plumbing::registry::RegistryArgs,
}

/// The ingest endpoint's address and limits.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Address of `POST /v1/telemetry`.
    #[arg(long, env = "HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Largest request body in bytes (1 MiB holds a few thousand readings).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// How far ahead of the ingest clock a reading's `time` may be.
    #[arg(long, env = "MAX_CLOCK_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
    /// Readings older than this are refused (they would fall to retention at once).
    #[arg(long, env = "TELEMETRY_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub telemetry_retention: Duration,
    /// Sustained messages per second per device (a device normally sends one every 5 s).
    #[arg(long, env = "DEVICE_RATE_LIMIT", default_value_t = nz(10))]
    pub device_rate_limit: NonZeroU32,
    /// Messages a device may send at once (catching up after an outage).
    #[arg(long, env = "DEVICE_RATE_BURST", default_value_t = nz(100))]
    pub device_rate_burst: NonZeroU32,
    /// Sustained messages per second per tenant.
    #[arg(long, env = "TENANT_RATE_LIMIT", default_value_t = nz(50_000))]
    pub tenant_rate_limit: NonZeroU32,
    /// Messages a tenant may send at once.
    #[arg(long, env = "TENANT_RATE_BURST", default_value_t = nz(100_000))]
    pub tenant_rate_burst: NonZeroU32,
    /// Full reload of tokens and devices, besides reloads on NOTIFY.
    #[arg(long, env = "CREDENTIALS_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub credentials_refresh_interval: Duration,
    /// How often key figures are written to `system_metrics`.
    #[arg(long, env = "SYSTEM_METRICS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub system_metrics_interval: Duration,
    /// Longest wait for Kafka to acknowledge a message before answering 503
    /// (`message.timeout.ms`).
    #[arg(long, env = "KAFKA_DELIVERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub kafka_delivery_timeout: Duration,
    /// Line-protocol tags naming the device, the first a line has wins (`/api/v2/write`,
    /// `/write`, `import`).
    #[arg(
        long,
        env = "INFLUX_DEVICE_TAGS",
        value_delimiter = ',',
        default_value = "device_id,device,host"
    )]
    pub influx_device_tags: Vec<String>,
}

const fn nz(value: u32) -> NonZeroU32 {
    match NonZeroU32::new(value) {
        Some(v) => v,
        None => NonZeroU32::MIN,
    }
}

impl IngestArgs {
    /// The request limits.
    pub fn settings(&self) -> http::IngestSettings {
        http::IngestSettings {
            max_body_bytes: self.max_body_bytes,
            time_limits: message::TimeLimits {
                max_future: self.max_clock_skew,
                retention: self.telemetry_retention,
            },
        }
    }

    /// How line-protocol tags map onto device and site.
    pub fn mapping(&self) -> lineproto::Mapping {
        lineproto::Mapping {
            device_tags: self.influx_device_tags.clone(),
            ..lineproto::Mapping::default()
        }
    }

    /// The rate-limit buckets.
    pub fn rate_limits(&self) -> rate_limit::RateLimits {
        rate_limit::RateLimits::new(
            rate_limit::Limit::per_second(self.device_rate_limit, self.device_rate_burst),
            rate_limit::Limit::per_second(self.tenant_rate_limit, self.tenant_rate_burst),
        )
    }
}

/// Runs the service until `shutdown` is cancelled, binding `HTTP_LISTEN`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    let (listener, _) = plumbing::admin::bind(config.ingest.http_listen).await?;
    run_on(listener, config, shutdown).await
}

/// Runs the service on an already bound HTTP listener (tests bind port 0).
pub async fn run_on(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> Result<(), Error> {
    // The caller's signal, or a failed start-up check: either stops the service, and the
    // latter must not cancel the caller's token.
    let shutdown = shutdown.child_token();
    // The recorder must exist before the descriptions are registered.
    plumbing::observability::prometheus()?;
    metrics::describe();
    let pool = plumbing::db::pool(&config.database, SERVICE)?;
    let registry = plumbing::registry::Registry::from_args(&config.registry)?;
    let health = if registry.is_some() {
        Health::new(&["database", "kafka", "credentials", "schema_registry"])
    } else {
        Health::new(&["database", "kafka", "credentials"])
    };
    let credentials = credentials::Credentials::default();
    let producer = producer::Producer::new(
        &config.kafka,
        &config.observability.instance(),
        config.ingest.kafka_delivery_timeout,
    )?;
    let app = http::App::with_mapping(
        credentials.clone(),
        producer,
        config.ingest.rate_limits(),
        config.ingest.settings(),
        config.ingest.mapping(),
    );
    let app = if registry.is_some() {
        app.with_registry_framing()
    } else {
        app
    };

    let mqtt = mqtt::MqttListener::start(app.clone(), &config.mqtt)?;

    let (admin_listener, admin_addr) =
        plumbing::admin::bind(config.observability.admin_listen).await?;
    info!(%admin_addr, "admin endpoints listening");
    let tasks = vec![
        plumbing::probe::spawn_database_probe(pool.clone(), health.clone(), shutdown.clone()),
        plumbing::probe::spawn_kafka_probe(config.kafka.clone(), health.clone(), shutdown.clone()),
        credentials::spawn_refresher(
            credentials,
            pool.clone(),
            config.ingest.credentials_refresh_interval,
            health.clone(),
            shutdown.clone(),
        ),
        spawn_bucket_cleanup(app.clone(), shutdown.clone()),
        stats::spawn_reporter(
            pool.clone(),
            config.observability.instance(),
            config.ingest.system_metrics_interval,
            shutdown.clone(),
        ),
    ];
    let health_for_registry = health.clone();
    let admin = plumbing::admin::serve(
        admin_listener,
        plumbing::admin::router(health)?,
        shutdown.clone(),
    );
    let addr = listener.local_addr().map_err(plumbing::Error::from)?;
    info!(%addr, "ingest listening");
    let ingest = async {
        axum::serve(listener, http::router(app.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .map_err(plumbing::Error::from)
    };
    // Alongside serving, not before it: while the brokers or the database cannot be reached
    // yet, ingest answers (503, not ready) as it always did.
    let checks = async {
        let result = tokio::try_join!(
            startup_checks(&config, &pool, &shutdown),
            register_schema(
                registry.as_ref(),
                &config,
                &app,
                &health_for_registry,
                &shutdown
            ),
        )
        .map(|_| ());
        if result.is_err() {
            shutdown.cancel();
        }
        result
    };
    let (checks, admin, ingest) = tokio::join!(checks, admin, ingest);
    if let Some(mqtt) = mqtt {
        mqtt.stop().await;
    }
    let failed = checks.err();
    if failed.is_none() {
        admin?;
        ingest?;
    }
    for task in tasks {
        let _ = task.await;
    }
    app.flush(Duration::from_secs(10));
    pool.close().await;
    if let Some(err) = failed {
        return Err(err);
    }
    info!("stopped");
    Ok(())
}

/// With a registry: registers `telemetry.v1` under `<telemetry topic>-value` (waiting while the
/// registry is away; ingest answers 503 and is not ready meanwhile), then writes the Confluent
/// wire format with the id it got. A schema the registry or our BACKWARD check refuses stops
/// the service.
async fn register_schema(
    registry: Option<&plumbing::registry::Registry>,
    config: &Config,
    app: &http::App,
    health: &Health,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let Some(registry) = registry else {
        return Ok(());
    };
    let codec = schemas::telemetry_codec()?;
    let topic = &config.kafka.telemetry_topic;
    let id = registry
        .register(
            topic,
            codec.current_name(),
            codec.current_json(),
            shutdown,
            |err| tracing::warn!(error = %err, url = registry.url(), "schema registry not reachable yet; retrying"),
        )
        .await
        .inspect_err(|err| tracing::error!(error = %err, "schema registration failed"))?;
    app.set_schema_id(id);
    health.set("schema_registry", true);
    info!(schema_id = id, subject = %format!("{topic}-value"), url = registry.url(), "registered telemetry.v1; writing the Confluent wire format");
    Ok(())
}

/// What ingest reads and writes in the database: checked at start-up so a missing right fails
/// at once instead of as endless credential-refresh warnings.
const PRIVILEGES: &[Privilege] = &[
    Privilege::Table {
        table: "tenants",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "devices",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "gateway_tokens",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "system_metrics",
        privilege: "INSERT",
    },
];

/// Fails on a telemetry topic that does not exist, a database not migrated, a role without a
/// right ingest needs (see [`plumbing::startup_checks`]).
async fn startup_checks(
    config: &Config,
    pool: &sqlx::PgPool,
    shutdown: &Shutdown,
) -> Result<(), Error> {
    let topics = [config.kafka.telemetry_topic.as_str()];
    Ok(plumbing::startup_checks(&config.kafka, &topics, pool, PRIVILEGES, shutdown).await?)
}

/// Forgets full rate-limit buckets every minute, so memory follows active devices.
fn spawn_bucket_cleanup(app: http::App, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => app.rate_limits().forget_idle(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_the_shared_variable_names() {
        let config = Config::try_parse_from([
            "ingest-producer",
            "--database-url",
            "postgres://u:p@db/fleet",
            "--kafka-bootstrap-servers",
            "k:9092",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "0.0.0.0:8081",
            "--device-rate-limit",
            "2",
            "--telemetry-retention",
            "7d",
        ])
        .unwrap();
        assert_eq!(config.database.database_url, "postgres://u:p@db/fleet");
        assert_eq!(config.kafka.bootstrap_servers, "k:9092");
        assert_eq!(config.kafka.telemetry_topic, "telemetry.v1");
        assert_eq!(config.ingest.http_listen.port(), 8081);
        assert_eq!(config.ingest.device_rate_limit.get(), 2);
        assert_eq!(config.ingest.max_body_bytes, 1 << 20);
        assert_eq!(
            config.ingest.telemetry_retention,
            Duration::from_secs(7 * 86_400)
        );
    }
}
