//! Kafka consumer group that evaluates alert rules on the telemetry stream.
//!
//! # Guarantee
//!
//! Each alert transition (pending → firing → resolved, one open alert per rule and device) is
//! written to `alerts` and to the `alert_outbox` in the transaction that stores this group's
//! offsets and event-time clocks in `consumer_offsets`. On assignment a partition restarts at
//! its stored offset, with its open alerts loaded from `alerts` and its devices' window
//! history from `telemetry`, so a crash, `kill -9` or rebalance at any moment neither loses
//! nor repeats a transition in the database. The outbox publisher sends every row to
//! `alerts.v1` at least once, always with the same `event_id`.
//!
//! # Layout
//!
//! * [`consumer`]: the group member and its rebalance callbacks;
//! * [`engine`]: the deterministic rule state machine (windows, timers, lifecycle);
//! * [`rules`]: `alert_rules` rows, indexed; reloaded on NOTIFY and periodically;
//! * [`store`]: warm-start reads and the commit transaction;
//! * [`outbox`]: the `alerts.v1` publisher; [`metrics`]: Prometheus names.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use plumbing::admin::{self, Health};
use plumbing::config::{DatabaseArgs, KafkaArgs, ObservabilityArgs};
use plumbing::db::Privilege;
use plumbing::system_metrics::{LatencyWindow, Rate};
use plumbing::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use schemas::Telemetry;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, info_span, warn, Instrument};

pub mod consumer;
pub mod engine;
pub mod metrics;
pub mod outbox;
pub mod rules;
pub mod store;

use engine::{CommitUnit, Engine, EngineConfig};
use rules::RuleSet;

/// Name in logs, traces, metrics and `system_metrics`.
pub const SERVICE: &str = "evaluator-stream";

/// Total consumer lag over the assigned partitions, as last measured.
static LAG_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plumbing(#[from] plumbing::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("schema: {0}")]
    Schema(#[from] schemas::SchemaError),
    #[error("consumer thread: {0}")]
    Thread(String),
    #[error("shut down before the rules could be loaded")]
    Cancelled,
    #[error(transparent)]
    Registry(#[from] plumbing::registry::RegistryError),
}

/// Configuration, from flags or the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "evaluator-stream",
    version,
    about = "Kafka consumer group that evaluates alert rules on the telemetry stream"
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
    /// Consumer group (its offsets and clocks are kept in `consumer_offsets`).
    #[arg(long, env = "EVALUATOR_GROUP_ID", default_value = "evaluator-stream")]
    pub group_id: String,
    /// Where a partition with no stored offset starts. `latest` by default: a new evaluator
    /// judges the present, not years of history.
    #[arg(long, env = "EVALUATOR_START_FROM", value_enum, default_value_t = consumer::StartFrom::Latest)]
    pub start_from: consumer::StartFrom,
    /// How far behind its partition's clock a reading may arrive and still count.
    #[arg(long, env = "EVALUATOR_ALLOWED_LATENESS", default_value = "5s", value_parser = plumbing::config::parse_duration)]
    pub allowed_lateness: Duration,
    /// A partition silent this long has its clock moved by the wall clock (so no-data and
    /// `for` timers still fire when every device on it went quiet).
    #[arg(long, env = "EVALUATOR_IDLE_TIMEOUT", default_value = "10s", value_parser = plumbing::config::parse_duration)]
    pub idle_timeout: Duration,
    /// Offsets are stored at least this often when no transition forces a commit.
    #[arg(long, env = "EVALUATOR_COMMIT_INTERVAL", default_value = "1s", value_parser = plumbing::config::parse_duration)]
    pub commit_interval: Duration,
    /// An alert transition waits at most this long (plus a commit already in flight) for its
    /// commit, so transitions that come close together share one transaction and one
    /// `alerts.v1` publish round: under load, at most ~1/delay transition commits per second
    /// whatever the alert rate. Adds at most this much to alert latency; `0s` commits every
    /// transition at once. Offsets-only commits (`commit_interval`) take waiting transitions
    /// along.
    #[arg(long, env = "EVALUATOR_TRANSITION_COMMIT_DELAY", default_value = "50ms", value_parser = plumbing::config::parse_duration)]
    pub transition_commit_delay: Duration,
    /// Rules are re-read this often besides on change notifications.
    #[arg(long, env = "EVALUATOR_RULES_REFRESH", default_value = "30s", value_parser = plumbing::config::parse_duration)]
    pub rules_refresh: Duration,
    /// Sent outbox rows are deleted after this long.
    #[arg(long, env = "EVALUATOR_OUTBOX_RETENTION", default_value = "1d", value_parser = plumbing::config::parse_duration)]
    pub outbox_retention: Duration,
    /// Messages buffered ahead of evaluation; beyond it the consumer pauses.
    #[arg(long, env = "EVALUATOR_QUEUE", default_value_t = 50_000)]
    pub queue: usize,
    /// On SIGTERM: time to commit and leave the group before giving up (uncommitted work
    /// is then re-read by the next owner).
    #[arg(long, env = "EVALUATOR_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = plumbing::config::parse_duration)]
    pub shutdown_timeout: Duration,
    /// How often key figures are written to `system_metrics`.
    #[arg(long, env = "SYSTEM_METRICS_INTERVAL", default_value = "10s", value_parser = plumbing::config::parse_duration)]
    pub system_metrics_interval: Duration,
}

/// Running figures for `system_metrics`.
#[derive(Debug, Default)]
struct Stats {
    messages: AtomicU64,
    evaluations: AtomicU64,
    transitions: AtomicU64,
    late_accepted: AtomicU64,
    late_dropped: AtomicU64,
    open_alerts: AtomicU64,
    latency: LatencyWindow,
}

/// Runs the evaluator until `shutdown` is cancelled: then it stops fetching, commits, leaves
/// the group and stops within `shutdown_timeout`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    metrics::describe();
    let registry = plumbing::registry::Registry::from_args(&config.registry)?;
    let health = if registry.is_some() {
        Health::new(&["database", "kafka", "assigned", "rules", "schema_registry"])
    } else {
        Health::new(&["database", "kafka", "assigned", "rules"])
    };
    let mut pool_args = config.database.clone();
    pool_args.database_max_connections = pool_args.database_max_connections.max(6);
    let pool = plumbing::db::pool(&pool_args, SERVICE)?;
    let (listener, addr) = admin::bind(config.observability.admin_listen).await?;
    info!(%addr, "admin endpoints listening");
    let background = Shutdown::new();
    let mut tasks = vec![
        plumbing::probe::spawn_database_probe(pool.clone(), health.clone(), background.clone()),
        plumbing::probe::spawn_kafka_probe(
            config.kafka.clone(),
            health.clone(),
            background.clone(),
        ),
        {
            let router = admin::router(health.clone())?;
            let stop = background.clone();
            tokio::spawn(async move {
                if let Err(err) = admin::serve(listener, router, stop).await {
                    warn!(error = %err, "admin endpoints stopped");
                }
            })
        },
    ];

    let started = async {
        startup_checks(&config, &pool, &shutdown).await?;
        register_alert_schema(registry.as_ref(), &config, &health, &shutdown).await
    };
    let framing = match started.await {
        Ok(framing) => framing,
        Err(err) => {
            background.cancel();
            for task in tasks {
                let _ = task.await;
            }
            pool.close().await;
            return Err(err);
        }
    };
    let rules = load_rules_until_ok(&pool, &shutdown).await?;
    health.set("rules", true);
    let (rules_tx, rules_rx) = watch::channel(rules.clone());
    tasks.push(spawn_rules_watcher(
        pool.clone(),
        rules_tx,
        config.rules_refresh,
        background.clone(),
    ));

    let producer: FutureProducer =
        plumbing::kafka::producer_config(&config.kafka, &format!("{SERVICE}-alerts")).create()?;
    let wake = Arc::new(Notify::new());
    tasks.push(
        outbox::Publisher {
            pool: pool.clone(),
            producer,
            topic: config.kafka.alerts_topic.clone(),
            retention: config.outbox_retention,
            poll_interval: Duration::from_secs(1),
        }
        .spawn(wake.clone(), background.clone()),
    );

    let stats = Arc::new(Stats::default());
    tasks.push(spawn_reporter(
        pool.clone(),
        stats.clone(),
        config.observability.instance(),
        config.system_metrics_interval,
        background.clone(),
    ));

    let give_up = Shutdown::new();
    let (input_tx, input_rx) = mpsc::channel((config.queue / consumer::SEND_CHUNK).max(2));
    let stored = plumbing::kafka::StoredOffsets::default();
    let runner = Runner {
        engine: Engine::new(
            EngineConfig {
                allowed_lateness: config.allowed_lateness,
                idle_timeout: config.idle_timeout,
            },
            rules,
        ),
        pool: pool.clone(),
        group: config.group_id.clone(),
        topic: config.kafka.telemetry_topic.clone(),
        framing,
        partition_count: 0,
        commit_interval: config.commit_interval,
        transition_commit_delay: config.transition_commit_delay,
        last_commit: Instant::now(),
        transitions_since: None,
        wake,
        give_up: give_up.clone(),
        stats: stats.clone(),
        reported: engine::Counters::default(),
        traces: Vec::new(),
        inflight: None,
        stored: stored.clone(),
    };
    let engine_task = tokio::spawn(runner.run(input_rx, rules_rx));

    let context = consumer::EvalContext::new(
        input_tx,
        pool.clone(),
        tokio::runtime::Handle::current(),
        config.group_id.clone(),
        config.kafka.telemetry_topic.clone(),
        config.start_from,
        config.shutdown_timeout,
        health.clone(),
        shutdown.clone(),
        Arc::new(plumbing::registry::TelemetryReader::new(
            schemas::TelemetryDecoder::new(schemas::telemetry_codec()?),
            registry,
            config.registry.schema_registry_cache_capacity,
        )),
        stored,
    );
    let mut consumer_config =
        plumbing::kafka::consumer_config(&config.kafka, SERVICE, &config.group_id);
    // Eager protocol: see the sink's `consumer` module for why not cooperative-sticky.
    consumer_config.set("partition.assignment.strategy", "roundrobin");
    // End-of-partition events tell a silent partition (wall-clock fallback) from one whose
    // backlog is still being fetched.
    consumer_config.set("enable.partition.eof", "true");
    let consumer: Arc<BaseConsumer<consumer::EvalContext>> =
        Arc::new(consumer_config.create_with_context(context)?);
    consumer.subscribe(&[&config.kafka.telemetry_topic])?;
    info!(topic = %config.kafka.telemetry_topic, group = %config.group_id, "evaluator started");

    let poller = consumer.clone();
    let thread = std::thread::Builder::new()
        .name("evaluator-consumer".to_owned())
        .spawn(move || {
            consumer::poll_loop(&poller);
            consumer::leave(&poller);
            drop(poller);
        })
        .map_err(|err| Error::Thread(err.to_string()))?;

    shutdown.cancelled().await;
    info!("shutting down: committing and leaving the group");
    let deadline_token = give_up.clone();
    let shutdown_timeout = config.shutdown_timeout;
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(shutdown_timeout).await;
        deadline_token.cancel();
    });
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("consumer thread panicked");
    }
    // The consumer's context holds the engine's input: dropping it ends the engine task
    // after a last commit. Closing a consumer may block, so not on a runtime thread.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    let _ = engine_task.await;
    deadline.abort();
    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    pool.close().await;
    info!(messages = stats.messages.load(Ordering::Relaxed), "stopped");
    Ok(())
}

/// What the evaluator does to the database: checked at start-up so a missing right fails at
/// once, not on the first commit (which would be retried for ever).
const PRIVILEGES: &[Privilege] = &[
    Privilege::Table {
        table: "alert_rules",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "telemetry",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "device_latest",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "devices",
        privilege: "SELECT",
    },
    Privilege::Table {
        table: "alerts",
        privilege: "SELECT",
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
        table: "alert_outbox",
        privilege: "INSERT",
    },
    Privilege::Table {
        table: "alert_outbox",
        privilege: "UPDATE",
    },
    Privilege::Table {
        table: "alert_outbox",
        privilege: "DELETE",
    },
    Privilege::Table {
        table: "system_metrics",
        privilege: "INSERT",
    },
    Privilege::Execute {
        function: "fleet_apply_alert_transitions(text[], bigint[], text[], text[], text[], \
                   text[], text[], text[], double precision[], double precision[], \
                   timestamptz[], timestamptz[])",
    },
];

/// Fails on a telemetry or alerts topic that does not exist, a database not migrated, a role
/// without a right the evaluator needs (see [`plumbing::startup_checks`]).
async fn startup_checks(config: &Config, pool: &PgPool, shutdown: &Shutdown) -> Result<(), Error> {
    let topics = [
        config.kafka.telemetry_topic.as_str(),
        config.kafka.alerts_topic.as_str(),
    ];
    Ok(plumbing::startup_checks(&config.kafka, &topics, pool, PRIVILEGES, shutdown).await?)
}

/// With a registry: registers `alert_event.v1` under `<alerts topic>-value` (waiting while the
/// registry is away; nothing is consumed meanwhile and readiness says `schema_registry: false`)
/// and returns the Confluent framing with the id it got. A schema the registry or our BACKWARD
/// check refuses, or a registry that refuses us (401, 403), stops the service with the reason.
async fn register_alert_schema(
    registry: Option<&plumbing::registry::Registry>,
    config: &Config,
    health: &Health,
    shutdown: &Shutdown,
) -> Result<store::AlertFraming, Error> {
    let Some(registry) = registry else {
        return Ok(store::AlertFraming::SingleObject);
    };
    let codec = schemas::alert_codec()?;
    let topic = &config.kafka.alerts_topic;
    let schema_id = registry
        .register(
            topic,
            codec.current_name(),
            codec.current_json(),
            shutdown,
            |err| warn!(error = %err, url = registry.url(), "schema registry not reachable yet; retrying"),
        )
        .await
        .inspect_err(|err| tracing::error!(error = %err, "alert schema registration failed"))?;
    health.set("schema_registry", true);
    info!(
        schema_id,
        subject = %format!("{topic}-value"),
        url = registry.url(),
        "registered {}; writing alerts in the Confluent wire format",
        codec.current_name()
    );
    Ok(store::AlertFraming::Confluent { schema_id })
}

async fn load_rules_until_ok(pool: &PgPool, shutdown: &Shutdown) -> Result<Arc<RuleSet>, Error> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match rules::load(pool).await {
            Ok((set, invalid)) => {
                for err in invalid {
                    warn!(error = %err, "alert rule skipped");
                }
                ::metrics::gauge!(metrics::RULES).set(set.enabled() as f64);
                info!(rules = set.enabled(), "alert rules loaded");
                return Ok(Arc::new(set));
            }
            Err(err) => {
                warn!(error = %err, "cannot load alert rules; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(Error::Cancelled),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Reloads the rules on `alert_rules_changed` notifications and every `refresh`.
fn spawn_rules_watcher(
    pool: PgPool,
    rules: watch::Sender<Arc<RuleSet>>,
    refresh: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        loop {
            if listener.is_none() {
                match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(mut l) => match l.listen("alert_rules_changed").await {
                        Ok(()) => listener = Some(l),
                        Err(err) => warn!(error = %err, "cannot LISTEN for rule changes"),
                    },
                    Err(err) => warn!(error = %err, "cannot connect to LISTEN for rule changes"),
                }
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok(())
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = notified => {
                    if let Err(err) = result {
                        warn!(error = %err, "rule-change listener failed; reconnecting");
                        listener = None;
                    }
                    // A burst of changes (a bulk update) becomes one reload.
                    if let Some(l) = listener.as_mut() {
                        while let Ok(Ok(Some(_))) =
                            tokio::time::timeout(Duration::from_millis(20), l.try_recv()).await
                        {}
                    }
                }
                _ = tokio::time::sleep(refresh) => {}
            }
            match rules::load(&pool).await {
                Ok((set, invalid)) => {
                    for err in invalid {
                        warn!(error = %err, "alert rule skipped");
                    }
                    ::metrics::gauge!(metrics::RULES).set(set.enabled() as f64);
                    let _ = rules.send(Arc::new(set));
                }
                Err(err) => warn!(error = %err, "cannot reload alert rules"),
            }
        }
    })
}

fn spawn_reporter(
    pool: PgPool,
    stats: Arc<Stats>,
    instance: String,
    interval: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let mut messages = Rate::new(0);
    let mut evaluations = Rate::new(0);
    plumbing::system_metrics::spawn_reporter(
        pool,
        SERVICE,
        instance,
        interval,
        shutdown,
        move || {
            let (avg, max) = stats.latency.take();
            vec![
                (
                    "evaluator_messages_per_second",
                    messages.per_second(stats.messages.load(Ordering::Relaxed)),
                ),
                (
                    "evaluator_messages_total",
                    stats.messages.load(Ordering::Relaxed) as f64,
                ),
                (
                    "evaluator_rule_evaluations_per_second",
                    evaluations.per_second(stats.evaluations.load(Ordering::Relaxed)),
                ),
                (
                    "evaluator_transitions_total",
                    stats.transitions.load(Ordering::Relaxed) as f64,
                ),
                (
                    "evaluator_open_alerts",
                    stats.open_alerts.load(Ordering::Relaxed) as f64,
                ),
                (
                    "evaluator_late_accepted_total",
                    stats.late_accepted.load(Ordering::Relaxed) as f64,
                ),
                (
                    "evaluator_late_dropped_total",
                    stats.late_dropped.load(Ordering::Relaxed) as f64,
                ),
                (
                    "evaluator_consumer_lag_messages",
                    LAG_TOTAL.load(Ordering::Relaxed) as f64,
                ),
                ("evaluator_alert_latency_avg_seconds", avg),
                ("evaluator_alert_latency_max_seconds", max),
            ]
        },
    )
}

fn now_micros() -> engine::Micros {
    chrono::Utc::now().timestamp_micros()
}

/// A message of a chunk: partition, offset, the reading (`None`: undecodable), traceparent.
type Decoded = (i32, i64, Option<Box<Telemetry>>, Option<String>);

/// Trace links on one commit span at most.
const MAX_TRACE_LINKS: usize = 32;

/// The evaluation task: owns the engine, warms devices, commits.
struct Runner {
    engine: Engine,
    pool: PgPool,
    group: String,
    topic: String,
    /// How alert events are encoded (registry framing once `alert_event.v1` is registered).
    framing: store::AlertFraming,
    partition_count: i32,
    commit_interval: Duration,
    transition_commit_delay: Duration,
    last_commit: Instant,
    /// When the oldest transition not yet handed to a commit occurred (`None`: none waits).
    transitions_since: Option<Instant>,
    wake: Arc<Notify>,
    give_up: Shutdown,
    stats: Arc<Stats>,
    reported: engine::Counters,
    /// `traceparent`s of the messages that caused the transitions of the next commit.
    traces: Vec<String>,
    /// The commit in flight (at most one), overlapping the evaluation of what follows.
    inflight: Option<tokio::task::JoinHandle<CommitOutcome>>,
    /// Offsets stored in PostgreSQL, for the lag report (shared with the consumer thread).
    stored: plumbing::kafka::StoredOffsets,
}

impl Runner {
    async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<consumer::Input>>,
        mut rules: watch::Receiver<Arc<RuleSet>>,
    ) {
        let mut chunks = Vec::with_capacity(16);
        let mut buf = Vec::with_capacity(4096);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rules_open = true;
        loop {
            tokio::select! {
                n = input.recv_many(&mut chunks, 16) => {
                    if n == 0 {
                        break;
                    }
                    buf.extend(chunks.drain(..).flatten());
                    self.handle(&mut buf).await;
                }
                changed = rules.changed(), if rules_open => {
                    if changed.is_ok() {
                        let set = rules.borrow_and_update().clone();
                        self.set_rules(set).await;
                    } else {
                        rules_open = false;
                    }
                }
                _ = tick.tick() => {
                    self.engine.tick(now_micros());
                }
                // Transitions waiting for their commit's delay to pass while nothing else
                // wakes the loop.
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(
                    self.transitions_since.unwrap_or_else(Instant::now) + self.transition_commit_delay,
                )), if self.inflight.is_none() && self.transitions_since.is_some() => {}
                outcome = async {
                    match self.inflight.as_mut() {
                        Some(handle) => join_commit(handle).await,
                        None => std::future::pending().await,
                    }
                }, if self.inflight.is_some() => {
                    self.inflight = None;
                    if let Some(outcome) = outcome {
                        self.apply_outcome(outcome);
                    }
                }
            }
            if self.engine.has_transitions() {
                self.transitions_since.get_or_insert_with(Instant::now);
            }
            let transitions_due = self
                .transitions_since
                .is_some_and(|since| since.elapsed() >= self.transition_commit_delay);
            if transitions_due || self.last_commit.elapsed() >= self.commit_interval {
                self.start_commit();
            }
        }
        self.flush().await;
    }

    async fn handle(&mut self, buf: &mut Vec<consumer::Input>) {
        let mut chunk: Vec<Decoded> = Vec::with_capacity(buf.len());
        for input in buf.drain(..) {
            match input {
                consumer::Input::Message {
                    partition,
                    offset,
                    reading,
                    traceparent,
                } => chunk.push((partition, offset, reading, traceparent)),
                control => {
                    self.evaluate(&mut chunk).await;
                    self.control(control).await;
                }
            }
        }
        self.evaluate(&mut chunk).await;
    }

    /// Warms the chunk's cold devices (one query), then evaluates every message in order.
    async fn evaluate(&mut self, chunk: &mut Vec<Decoded>) {
        if chunk.is_empty() {
            return;
        }
        let mut seen = HashSet::new();
        let mut cold = Vec::new();
        let mut sites = Vec::new();
        for (partition, _, message, _) in chunk.iter() {
            let Some(message) = message else { continue };
            if let Some(device) = self.engine.cold(*partition, message) {
                if seen.insert((device.tenant_id.clone(), device.device_id.clone())) {
                    sites.push(message.site_id.clone());
                    cold.push(device);
                }
            }
        }
        if !cold.is_empty() {
            let pool = self.pool.clone();
            let history = self
                .retry("load window history", || store::load_history(&pool, &cold))
                .await;
            if let Some(history) = history {
                for ((device, site), history) in cold.iter().zip(&sites).zip(&history) {
                    self.engine.warm(device, site.as_deref(), history);
                }
            }
        }
        for (partition, offset, message, traceparent) in chunk.drain(..) {
            match message {
                Some(message) => {
                    let before = self.engine.pending_transitions();
                    self.engine.process(partition, offset, &message);
                    if let Some(traceparent) = traceparent {
                        if self.engine.pending_transitions() > before
                            && self.traces.len() < MAX_TRACE_LINKS
                        {
                            self.traces.push(traceparent);
                        }
                    }
                }
                None => self.engine.skip(partition, offset),
            }
        }
        self.publish_counters();
    }

    async fn control(&mut self, input: consumer::Input) {
        match input {
            consumer::Input::Assigned {
                partitions,
                partition_count,
            } => {
                if partition_count > 0 {
                    self.partition_count = partition_count;
                }
                self.finish_inflight().await;
                let mine: HashSet<i32> = partitions.iter().map(|p| p.0).collect();
                for (partition, offset, clock) in partitions {
                    self.engine.assign(partition, offset, clock);
                }
                self.restore(&mine, None).await;
            }
            consumer::Input::Revoked { partitions, ack } => {
                self.flush().await;
                for partition in partitions {
                    self.engine.revoke(partition);
                }
                let _ = ack.send(());
            }
            consumer::Input::Eof { partition } => self.engine.caught_up(partition),
            consumer::Input::Message { .. } => {}
        }
    }

    /// Warm start of `partitions`: their open alerts, and their devices' last readings for
    /// no-data rules (only `tenants`' when given).
    async fn restore(&mut self, partitions: &HashSet<i32>, tenants: Option<Vec<String>>) {
        let count = self.partition_count;
        let partition_of = |tenant: &str, device: &str| {
            plumbing::kafka::partition_for_key(
                schemas::message_key(tenant, device).as_bytes(),
                count,
            )
        };
        let pool = self.pool.clone();
        if tenants.is_none() {
            let open = self
                .retry("load open alerts", || store::load_open_alerts(&pool))
                .await
                .unwrap_or_default();
            for a in open {
                let partition = partition_of(&a.tenant_id, &a.device_id);
                if partitions.contains(&partition) {
                    self.engine.restore_open_alert(
                        partition,
                        &a.tenant_id,
                        &a.device_id,
                        a.site_id.as_deref(),
                        a.rule_id,
                        a.status,
                        a.started_at,
                        a.value,
                    );
                }
            }
        }
        let tenants = tenants.unwrap_or_else(|| {
            self.engine
                .rules()
                .no_data_tenants()
                .map(str::to_owned)
                .collect()
        });
        if tenants.is_empty() {
            return;
        }
        let seen = self
            .retry("load last readings", || {
                store::load_last_seen(&pool, &tenants)
            })
            .await
            .unwrap_or_default();
        // A stored latest reading beyond the partition's clock will be read again: what
        // counts is the last reading at or before the clock.
        let mut exact = Vec::new();
        let mut beyond = Vec::new();
        for (tenant, device, site, last) in seen {
            let partition = partition_of(&tenant, &device);
            if !partitions.contains(&partition) {
                continue;
            }
            match self.engine.clock(partition) {
                Some(clock) if last > clock => {
                    beyond.push((tenant, device, site, partition, clock))
                }
                _ => exact.push((tenant, device, site, partition, last)),
            }
        }
        if !beyond.is_empty() {
            let keys: Vec<(String, String, engine::Micros)> = beyond
                .iter()
                .map(|(t, d, _, _, clock)| (t.clone(), d.clone(), *clock))
                .collect();
            let before = self
                .retry("load last readings before the clock", || {
                    store::load_last_seen_before(&pool, &keys)
                })
                .await
                .unwrap_or_default();
            for (i, (tenant, device, site, partition, clock)) in beyond.into_iter().enumerate() {
                let last = before.get(i).copied().flatten().unwrap_or(clock);
                exact.push((tenant, device, site, partition, last));
            }
        }
        for (tenant, device, site, partition, last) in exact {
            self.engine
                .restore_last_seen(partition, &tenant, &device, site.as_deref(), last);
        }
    }

    async fn set_rules(&mut self, rules: Arc<RuleSet>) {
        let before: HashSet<String> = self
            .engine
            .rules()
            .no_data_tenants()
            .map(str::to_owned)
            .collect();
        self.engine.set_rules(rules.clone());
        let added: Vec<String> = rules
            .no_data_tenants()
            .filter(|t| !before.contains(*t))
            .map(str::to_owned)
            .collect();
        if !added.is_empty() {
            let mine: HashSet<i32> = self.engine.partitions().into_iter().collect();
            self.restore(&mine, Some(added)).await;
        }
    }

    /// Retries `op` with backoff until it succeeds or the shutdown deadline passes.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match op().await {
                Ok(value) => return Some(value),
                Err(err) => {
                    warn!(error = %err, "{what} failed; retrying");
                    ::metrics::counter!(metrics::DB_RETRIES).increment(1);
                    tokio::select! {
                        _ = self.give_up.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Starts committing the engine's transitions and progress unless a commit is already in
    /// flight (the next one starts when it ends: at most one at a time, so each commit's fence
    /// expects the offsets the previous one stored). Evaluation goes on meanwhile.
    fn start_commit(&mut self) {
        if self.inflight.is_some() {
            return;
        }
        self.last_commit = Instant::now();
        self.transitions_since = None;
        let unit: CommitUnit = self.engine.take_commit();
        let traces = std::mem::take(&mut self.traces);
        if unit.is_empty() {
            return;
        }
        self.spawn_commit(unit, traces);
    }

    fn spawn_commit(&mut self, unit: CommitUnit, traces: Vec<String>) {
        let pool = self.pool.clone();
        let group = self.group.clone();
        let topic = self.topic.clone();
        let give_up = self.give_up.clone();
        self.inflight = Some(tokio::spawn(commit_until_done(
            pool,
            group,
            topic,
            self.framing,
            give_up,
            unit,
            traces,
        )));
    }

    /// Waits for the commit in flight, if any, and applies its outcome.
    async fn finish_inflight(&mut self) {
        if let Some(mut handle) = self.inflight.take() {
            if let Some(outcome) = join_commit(&mut handle).await {
                self.apply_outcome(outcome);
            }
        }
    }

    /// Everything evaluated so far is committed (or given up at the shutdown deadline) when
    /// this returns: before a rebalance and at the end.
    async fn flush(&mut self) {
        loop {
            self.finish_inflight().await;
            if self.give_up.is_cancelled() {
                return;
            }
            // A fenced commit may have left a remainder in flight; otherwise this takes
            // whatever was evaluated while the last commit ran.
            self.start_commit();
            if self.inflight.is_none() {
                return;
            }
        }
    }

    fn apply_outcome(&mut self, outcome: CommitOutcome) {
        let CommitOutcome { mut unit, result } = outcome;
        match result {
            CommitResult::Done(done) => {
                self.engine.committed(&unit);
                self.committed(&unit, done);
            }
            CommitResult::Fenced(partitions) => {
                for &partition in &partitions {
                    self.engine.revoke(partition);
                }
                unit.without(&partitions);
                if !unit.is_empty() {
                    self.spawn_commit(unit, Vec::new());
                }
            }
            CommitResult::GaveUp => {}
        }
    }

    fn committed(&mut self, unit: &CommitUnit, done: store::Committed) {
        for progress in &unit.progress {
            self.stored.set(progress.partition, progress.next);
        }
        if done.written > 0 {
            self.wake.notify_one();
        }
        if done.skipped > 0 {
            ::metrics::counter!(metrics::REPLAYED_TRANSITIONS).increment(done.skipped as u64);
        }
        let now = now_micros();
        let (mut count, mut sum, mut max) = (0u64, 0.0f64, 0.0f64);
        for t in &unit.transitions {
            ::metrics::counter!(metrics::TRANSITIONS, "to" => t.to.as_str()).increment(1);
            if let Some(received) = t.received_at {
                let seconds = (now - received).max(0) as f64 / 1e6;
                ::metrics::histogram!(metrics::ALERT_LATENCY).record(seconds);
                count += 1;
                sum += seconds;
                max = max.max(seconds);
            }
        }
        if count > 0 {
            self.stats.latency.record_many(count, sum, max);
        }
        self.stats
            .transitions
            .fetch_add(unit.transitions.len() as u64, Ordering::Relaxed);
        let open = self.engine.open_alerts() as u64;
        self.stats.open_alerts.store(open, Ordering::Relaxed);
        ::metrics::gauge!(metrics::OPEN_ALERTS).set(open as f64);
        ::metrics::gauge!(metrics::DEVICES).set(self.engine.devices() as f64);
    }

    fn publish_counters(&mut self) {
        let now = self.engine.counters();
        let before = std::mem::replace(&mut self.reported, now);
        ::metrics::counter!(metrics::MESSAGES).increment(now.messages - before.messages);
        ::metrics::counter!(metrics::EVALUATIONS).increment(now.evaluations - before.evaluations);
        ::metrics::counter!(metrics::LATE, "outcome" => "accepted")
            .increment(now.late_accepted - before.late_accepted);
        ::metrics::counter!(metrics::LATE, "outcome" => "dropped")
            .increment(now.late_dropped - before.late_dropped);
        self.stats.messages.store(now.messages, Ordering::Relaxed);
        self.stats
            .evaluations
            .store(now.evaluations, Ordering::Relaxed);
        self.stats
            .late_accepted
            .store(now.late_accepted, Ordering::Relaxed);
        self.stats
            .late_dropped
            .store(now.late_dropped, Ordering::Relaxed);
    }
}

/// What became of one commit unit.
struct CommitOutcome {
    unit: CommitUnit,
    result: CommitResult,
}

enum CommitResult {
    Done(store::Committed),
    /// These partitions' stored offsets moved: another instance owns them now.
    Fenced(Vec<i32>),
    /// The shutdown deadline passed: nothing stored, the next owner re-reads the messages.
    GaveUp,
}

/// Commits `unit`, retrying transient failures with backoff until it succeeds, the
/// partitions are fenced, or the shutdown deadline passes.
async fn commit_until_done(
    pool: PgPool,
    group: String,
    topic: String,
    framing: store::AlertFraming,
    give_up: Shutdown,
    mut unit: CommitUnit,
    traces: Vec<String>,
) -> CommitOutcome {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let span = info_span!(
            "commit",
            transitions = unit.transitions.len(),
            partitions = unit.progress.len()
        );
        for traceparent in &traces {
            plumbing::observability::link_traceparent(&span, traceparent);
        }
        let result = store::commit(&pool, &group, &topic, framing, &mut unit)
            .instrument(span)
            .await;
        match result {
            Ok(done) => {
                ::metrics::histogram!(metrics::COMMIT_DURATION)
                    .record(started.elapsed().as_secs_f64());
                return CommitOutcome {
                    unit,
                    result: CommitResult::Done(done),
                };
            }
            Err(store::StoreError::Fenced(partitions)) => {
                warn!(
                    ?partitions,
                    "commit fenced: partitions owned by another instance"
                );
                ::metrics::counter!(metrics::FENCED).increment(1);
                return CommitOutcome {
                    unit,
                    result: CommitResult::Fenced(partitions),
                };
            }
            Err(err) => {
                warn!(error = %err, "commit failed; retrying");
                ::metrics::counter!(metrics::DB_RETRIES).increment(1);
                tokio::select! {
                    _ = give_up.cancelled() => {
                        warn!("shutdown deadline passed; uncommitted work is left for the next owner");
                        return CommitOutcome { unit, result: CommitResult::GaveUp };
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The outcome of a spawned commit; a panic in it is re-raised here (the state it leaves is
/// unknown, so the process must not go on as if it had committed); `None` when the task was
/// cancelled (the runtime is shutting down).
async fn join_commit(handle: &mut tokio::task::JoinHandle<CommitOutcome>) -> Option<CommitOutcome> {
    match handle.await {
        Ok(outcome) => Some(outcome),
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_the_shared_variable_names() {
        let config = Config::try_parse_from([
            "evaluator-stream",
            "--database-url",
            "postgres://u:p@db/fleet",
            "--kafka-bootstrap-servers",
            "k:9092",
            "--admin-listen",
            "127.0.0.1:0",
            "--allowed-lateness",
            "2s",
        ])
        .unwrap();
        assert_eq!(config.database.database_url, "postgres://u:p@db/fleet");
        assert_eq!(config.kafka.bootstrap_servers, "k:9092");
        assert_eq!(config.kafka.telemetry_topic, "telemetry.v1");
        assert_eq!(config.group_id, "evaluator-stream");
        assert_eq!(config.allowed_lateness, Duration::from_secs(2));
        assert_eq!(config.start_from, consumer::StartFrom::Latest);
    }
}
