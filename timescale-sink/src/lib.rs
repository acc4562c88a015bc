//! Kafka consumer group that bulk-COPYs telemetry into PostgreSQL/TimescaleDB exactly once.
//!
//! # Guarantee
//!
//! Every message of the topic is stored exactly once in the database, across crashes
//! (including `kill -9`), database outages, broker restarts and rebalances: each batch's rows
//! and the offsets after them are one transaction, the offset update is fenced, and on
//! assignment the consumer starts from the offsets stored in the database. Kafka-side offset
//! commits are best effort, for lag tools only.
//!
//! # Layout
//!
//! * [`consumer`]: the group member, its rebalance callbacks and backpressure;
//! * [`pipeline`]: per-writer batcher (decode, close on size/age) and committer;
//! * [`batch`]: a batch's rows, dead letters and per-partition offset ranges;
//! * [`writer`]: one batch, one transaction (fence, COPY, merge, bisect, latest);
//! * [`merge`]: one point per (tenant, device, time): grouping, merging, accounting;
//! * [`offsets`]: the fenced offset store; [`copy_writer`]: the binary COPY encoder;
//! * [`dlq`]: dead letters; [`stats`] and [`metrics`]: figures for Prometheus and
//!   `system_metrics`; [`maintenance`]: plain-PostgreSQL partition upkeep and the 1-minute
//!   rollup refresh, whose new minutes [`rollup`] aggregates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use plumbing::admin::{self, Health};
use plumbing::config::{DatabaseArgs, KafkaArgs, ObservabilityArgs};
use plumbing::db::Privilege;
use plumbing::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tracing::info;

pub mod batch;
pub mod consumer;
pub mod copy_writer;
pub mod dlq;
pub mod maintenance;
pub mod merge;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod rollup;
pub mod stats;
pub mod writer;

/// Name in logs, traces, metrics and `system_metrics`.
pub const SERVICE: &str = "timescale-sink";
/// `application_name` of the connections doing the rollup refresh and partition upkeep.
pub const UPKEEP_APPLICATION_NAME: &str = "timescale-sink-upkeep";

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plumbing(#[from] plumbing::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("consumer thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Registry(#[from] plumbing::registry::RegistryError),
    #[error(transparent)]
    Schema(#[from] schemas::SchemaError),
}

/// Configuration, from flags or the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "timescale-sink",
    version,
    about = "Kafka → PostgreSQL/TimescaleDB, exactly once"
)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    #[command(flatten)]
    pub registry: plumbing::registry::RegistryArgs,
    /// Consumer group (offsets in `consumer_offsets` are kept per group).
    #[arg(long, env = "SINK_GROUP_ID", default_value = "timescale-sink")]
    pub group_id: String,
    /// A batch closes at this many messages. 10,000 rows of binary COPY amortise the
    /// per-transaction cost while keeping a batch under ~2 MB.
    #[arg(long, env = "SINK_BATCH_MAX_ROWS", default_value_t = 10_000)]
    pub batch_max_rows: usize,
    /// A batch closes at this age, bounding ingest→commit latency at low rates. 100 ms keeps
    /// the p99 at 20,000 msg/s under the 250 ms target (200 ms measured 250–300 ms); catch-up
    /// batches are unaffected.
    #[arg(long, env = "SINK_BATCH_MAX_AGE", default_value = "100ms", value_parser = plumbing::config::parse_duration)]
    pub batch_max_age: Duration,
    /// Row limit of a batch while catching up on a backlog (readings received by ingest more
    /// than `SINK_CATCHUP_AFTER` ago): several readings per device per batch, one
    /// `device_latest` upsert each. 0 (or at most `SINK_BATCH_MAX_ROWS`) turns it off.
    #[arg(long, env = "SINK_BATCH_CATCHUP_ROWS", default_value_t = 100_000)]
    pub batch_catchup_rows: usize,
    /// Readings older than this (ingest's `received_at`) mean the writer is catching up.
    #[arg(long, env = "SINK_CATCHUP_AFTER", default_value = "5s", value_parser = plumbing::config::parse_duration)]
    pub catchup_after: Duration,
    /// `device_latest` written behind the telemetry: each writer folds the readings it
    /// stored into `device_latest` once per this interval, each device once, instead of with
    /// every batch (a device reporting every 5 s is then written once per interval, not once
    /// per reading). `device_latest` is then up to this much older than the telemetry. 0:
    /// with every batch. Crash-safe either way: `consumer_offsets.latest_next_offset` says
    /// from where a restart reads again for `device_latest` (migration 0017).
    #[arg(long, env = "SINK_LATEST_INTERVAL", default_value = "0s", value_parser = plumbing::config::parse_duration)]
    pub latest_interval: Duration,
    /// Parallel writers, each its own COPY connection (one PostgreSQL backend, one core).
    #[arg(long, env = "SINK_WRITERS", default_value_t = 2)]
    pub writers: usize,
    /// Messages buffered per writer ahead of its batcher; beyond it the consumer pauses.
    #[arg(long, env = "SINK_WRITER_QUEUE", default_value_t = 20_000)]
    pub writer_queue: usize,
    /// Where a partition with no stored offset starts.
    #[arg(long, env = "SINK_START_FROM", value_enum, default_value_t = consumer::StartFrom::Earliest)]
    pub start_from: consumer::StartFrom,
    /// On SIGTERM: time to flush, commit and leave the group before giving up on in-flight
    /// batches (their offsets are then not stored; they are re-read on restart).
    #[arg(long, env = "SINK_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = plumbing::config::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Plain PostgreSQL layout: partition upkeep interval.
    #[arg(long, env = "SINK_MAINTENANCE_INTERVAL", default_value = "1h", value_parser = plumbing::config::parse_duration)]
    pub maintenance_interval: Duration,
    /// How often the 1-minute rollups are brought up to date (`fleet_refresh_rollup_1m()`,
    /// repeated while it reports work left). Also bounds how long a late reading takes to
    /// show in rollup-served series.
    #[arg(long, env = "SINK_ROLLUP_INTERVAL", default_value = "10s", value_parser = plumbing::config::parse_duration)]
    pub rollup_interval: Duration,
    /// Niceness (0-19) of the thread that aggregates a rollup step's new minutes (parses the
    /// minute's readings, sums, sorts and encodes the rollup rows: ~1.6 µs per reading, in a
    /// burst once a minute). Above 0 the step gives way to the sink's batches and takes
    /// longer instead; on a machine without CPU to spare the rollups can then fall behind
    /// for good (BENCHMARKS.md, run m), so only for machines with headroom.
    #[arg(long, env = "SINK_ROLLUP_NICE", default_value_t = 0, value_parser = clap::value_parser!(i8).range(0..=19))]
    pub rollup_nice: i8,
    /// Plain PostgreSQL layout: daily partitions kept ahead of today.
    #[arg(long, env = "PARTITIONS_AHEAD_DAYS", default_value_t = 3)]
    pub partitions_ahead_days: u32,
    /// How often key figures are written to `system_metrics`.
    #[arg(long, env = "SYSTEM_METRICS_INTERVAL", default_value = "10s", value_parser = plumbing::config::parse_duration)]
    pub system_metrics_interval: Duration,
}

/// Runs the sink until `shutdown` is cancelled: then stops fetching, flushes, commits and
/// leaves the group within `shutdown_timeout`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    metrics::describe();
    let health = Health::new(&["database", "kafka", "assigned"]);
    let mut pool_args = config.database.clone();
    // Each writer holds one connection for its transaction (and one more for its
    // `device_latest` flush when that is written behind); probes, offsets and upkeep share
    // the rest.
    let per_writer = if config.latest_interval.is_zero() {
        1
    } else {
        2
    };
    pool_args.database_max_connections = pool_args
        .database_max_connections
        .max(config.writers as u32 * per_writer + 3);
    let pool = plumbing::db::pool(&pool_args, SERVICE)?;
    let (listener, addr) = admin::bind(config.observability.admin_listen).await?;
    info!(%addr, "admin endpoints listening");
    let background = Shutdown::new();
    let stats = Arc::new(stats::Stats::default());
    let probes = [
        plumbing::probe::spawn_database_probe(pool.clone(), health.clone(), background.clone()),
        plumbing::probe::spawn_kafka_probe(
            config.kafka.clone(),
            health.clone(),
            background.clone(),
        ),
    ];
    let reporter = stats::spawn_reporter(
        pool.clone(),
        stats.clone(),
        config.observability.instance(),
        config.system_metrics_interval,
        background.clone(),
    );
    let admin_task = tokio::spawn(admin::serve(
        listener,
        admin::router(health.clone())?,
        background.clone(),
    ));

    if let Err(err) = startup_checks(&config, &pool, &shutdown).await {
        background.cancel();
        let _ = admin_task.await;
        for probe in probes {
            let _ = probe.await;
        }
        let _ = reporter.await;
        pool.close().await;
        return Err(err);
    }
    // Upkeep only once the schema is known to be there. Its own connections (one for a step,
    // one to cancel it on shutdown) under their own application_name, so the database cost of
    // the rollup refresh and partition upkeep shows apart from the batches' in
    // pg_stat_activity and in per-backend CPU.
    let mut upkeep_args = config.database.clone();
    upkeep_args.database_max_connections = 2;
    let upkeep_pool = plumbing::db::pool(&upkeep_args, UPKEEP_APPLICATION_NAME)?;
    let maintenance = tokio::spawn(maintenance::run(
        upkeep_pool.clone(),
        config.partitions_ahead_days,
        maintenance::Intervals {
            partitions: config.maintenance_interval,
            rollup: config.rollup_interval,
            rollup_nice: config.rollup_nice,
        },
        stats.clone(),
        // The signal itself, not `background`: a rollup step in progress is cancelled
        // at once and none starts while the writers flush, so shutdown keeps its deadline.
        shutdown.clone(),
    ));

    let dlq_producer: FutureProducer =
        plumbing::kafka::producer_config(&config.kafka, &format!("{SERVICE}-dlq")).create()?;
    let dlq = dlq::DeadLetterQueue::new(
        dlq_producer,
        config.kafka.dlq_topic.clone(),
        config.kafka.telemetry_topic.clone(),
    );

    let registry = plumbing::registry::Registry::from_args(&config.registry)?;
    if let Some(registry) = &registry {
        info!(
            url = registry.url(),
            "schema registry: Confluent-framed ids are looked up there"
        );
    }
    let decoding = pipeline::Decoding {
        reader: Arc::new(plumbing::registry::TelemetryReader::new(
            schemas::TelemetryDecoder::new(schemas::telemetry_codec()?),
            registry,
            config.registry.schema_registry_cache_capacity,
        )),
        shutdown: shutdown.clone(),
    };
    let give_up = Shutdown::new();
    let mut writers = Vec::new();
    let mut tasks = Vec::new();
    let topic = config.kafka.telemetry_topic.clone();
    let stored = plumbing::kafka::StoredOffsets::default();
    let recent = Arc::new(merge::RecentPoints::default());
    for _ in 0..config.writers.max(1) {
        let stored = stored.clone();
        let writer = writer::BatchWriter {
            pool: pool.clone(),
            group: config.group_id.clone(),
            topic: topic.clone(),
            dlq: dlq.clone(),
            on_committed: Arc::new(move |ranges| {
                // The consumer thread commits these to Kafka too, for lag tools.
                for (&partition, range) in ranges {
                    stored.set(partition, range.next);
                }
            }),
            stats: stats.clone(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            recent: recent.clone(),
            latest: Arc::new(writer::LatestBehind::new(config.latest_interval)),
        };
        let limits = pipeline::BatchLimits {
            max_rows: config.batch_max_rows,
            max_age: config.batch_max_age,
            catchup_rows: config.batch_catchup_rows,
            catchup_after: config.catchup_after,
        };
        let (input, handles) = pipeline::spawn_writer(
            writer,
            limits,
            config.writer_queue,
            give_up.clone(),
            decoding.clone(),
        );
        writers.push(input);
        tasks.extend(handles);
    }

    let context = consumer::SinkContext::new(
        writers,
        pool.clone(),
        tokio::runtime::Handle::current(),
        config.group_id.clone(),
        topic.clone(),
        config.start_from,
        health.clone(),
        shutdown.clone(),
        stored,
    );
    let mut consumer_config =
        plumbing::kafka::bulk_consumer_config(&config.kafka, SERVICE, &config.group_id);
    // Eager protocol: see the `consumer` module for why not cooperative-sticky.
    consumer_config.set("partition.assignment.strategy", "roundrobin");
    let consumer: Arc<BaseConsumer<consumer::SinkContext>> =
        Arc::new(consumer_config.create_with_context(context)?);
    consumer.subscribe(&[&topic])?;
    info!(topic = %topic, group = %config.group_id, writers = config.writers, "sink started");

    let poller = consumer.clone();
    let poll_stats = stats.clone();
    let shutdown_timeout = config.shutdown_timeout;
    let thread = std::thread::Builder::new()
        .name("sink-consumer".to_owned())
        .spawn(move || {
            consumer::poll_loop(&poller, &poll_stats);
            consumer::drain_and_close(&poller, Instant::now() + shutdown_timeout);
            // Dropping the last reference (after the writers finish) closes the consumer.
            drop(poller);
        })
        .map_err(|err| Error::Thread(err.to_string()))?;

    shutdown.cancelled().await;
    info!("shutting down: flushing batches and leaving the group");
    // A deadline for committers still retrying: past it, in-flight batches are abandoned.
    let deadline_token = give_up.clone();
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(shutdown_timeout).await;
        deadline_token.cancel();
    });
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("consumer thread panicked");
    }
    // The consumer (its context) holds the writers' inputs: dropping it ends the writers once
    // their last batches are written. Closing a consumer may block, so not on a runtime thread.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    for task in tasks {
        let _ = task.await;
    }
    deadline.abort();
    background.cancel();
    let _ = admin_task.await;
    for probe in probes {
        let _ = probe.await;
    }
    let _ = maintenance.await;
    upkeep_pool.close().await;
    let _ = reporter.await;
    pool.close().await;
    info!(rows = stats.rows(), "stopped");
    Ok(())
}

/// What the sink does to the database: checked at start-up so a missing right fails at once,
/// not on the first batch (which would be retried for ever).
const PRIVILEGES: &[Privilege] = &[
    Privilege::Table {
        table: "telemetry",
        privilege: "INSERT",
    },
    Privilege::Table {
        table: "telemetry",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "tenants",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "device_latest",
        privilege: "INSERT",
    },
    Privilege::Table {
        table: "device_latest",
        privilege: "UPDATE",
    },
    Privilege::Table {
        table: "consumer_offsets",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "consumer_offsets",
        privilege: "INSERT",
    },
    Privilege::Table {
        table: "consumer_offsets",
        privilege: "UPDATE",
    },
    Privilege::Table {
        table: "system_metrics",
        privilege: "INSERT",
    },
    Privilege::Execute {
        function: "fleet_rollup_1m_cutoff()",
    },
    Privilege::Execute {
        function: "fleet_rollup_1m_invalidate(timestamptz, timestamptz)",
    },
    Privilege::Execute {
        function: "fleet_rollup_1m_invalidate_minutes(text[], text[], timestamptz[])",
    },
    Privilege::Execute {
        function: "fleet_refresh_rollup_1m_plan(integer, integer)",
    },
    Privilege::Execute {
        function: "fleet_rollup_1m_write_device_minutes(text[], text[], timestamptz[])",
    },
    Privilege::Table {
        table: "telemetry_1m",
        privilege: "INSERT",
    },
    Privilege::Execute {
        function: "fleet_maintain_partitions(integer)",
    },
];

/// Fails on a telemetry or DLQ topic that does not exist, a database not migrated, a role
/// without a right the sink needs (see [`plumbing::startup_checks`]).
async fn startup_checks(config: &Config, pool: &PgPool, shutdown: &Shutdown) -> Result<(), Error> {
    let topics = [
        config.kafka.telemetry_topic.as_str(),
        config.kafka.dlq_topic.as_str(),
    ];
    Ok(plumbing::startup_checks(&config.kafka, &topics, pool, PRIVILEGES, shutdown).await?)
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
            "--batch-max-rows",
            "5000",
            "--batch-max-age",
            "150ms",
        ])
        .unwrap();
        assert_eq!(config.database.database_url, "postgres://u:p@db/fleet");
        assert_eq!(config.kafka.bootstrap_servers, "k:9092");
        assert_eq!(config.kafka.telemetry_topic, "telemetry.v1");
        assert_eq!(config.group_id, "timescale-sink");
        assert_eq!(config.batch_max_rows, 5000);
        assert_eq!(config.batch_max_age, Duration::from_millis(150));
        assert_eq!(config.writers, 2);
        assert_eq!(config.batch_catchup_rows, 100_000);
        assert_eq!(config.catchup_after, Duration::from_secs(5));
        assert_eq!(config.rollup_interval, Duration::from_secs(10));
    }
}
