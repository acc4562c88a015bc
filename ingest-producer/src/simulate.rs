//! `ingest-producer simulate`: N virtual devices sending readings at a steady rate, for demos
//! and load tests.
//!
//! Every device sends once per `--interval`, at a phase spread evenly over the interval plus
//! ±10 % jitter, so the offered rate is `devices / interval` msg/s. Readings follow simple
//! profiles: temperature as a random walk with rare spikes, humidity bounded around 50 %,
//! battery draining, signal strength with noise; now and then a device goes silent for a
//! while, so no-data and threshold alerts have something to trip on.
//!
//! `--via http --auth gateway` posts batches (`--batch`) to `POST /v1/telemetry` with one
//! gateway token per tenant; `--via http --auth device` gives every device its own device
//! token and request, one reading per request, as fleets without gateways send; `--via kafka`
//! encodes and produces directly, measuring the producer alone (in the Confluent wire format
//! when `SCHEMA_REGISTRY_URL` is set, registering `telemetry.v1` as ingest does); `--via mqtt` (with `--auth
//! device`) holds one MQTT connection per device with its token as the username and publishes
//! each reading on `fleet/v1/telemetry` at `--qos` (1: accepted at its PUBACK, which ingest
//! sends after Kafka's ack; the MQTT client itself re-sends what was not acknowledged after a
//! reconnect, so a reading is final once PUBACKed or after `--give-up-after`). Requests in flight are
//! bounded (`--concurrency`); when the target cannot keep up the simulator falls behind
//! instead of queueing without bound, and its progress line says by how much.
//!
//! Like a device, the simulator retries what was not accepted: `429`, `503` (and other
//! `5xx`, `408`, a connection that failed) after the reply's `Retry-After` or an exponential
//! backoff with jitter (200 ms doubling to 10 s), for at most `--give-up-after` from the
//! first attempt; other refusals are final. `--manifest FILE` records every reading with its
//! final outcome (see [`crate::manifest`]), so a checker can account for each one.
//!
//! `--provision` creates the tenants, gateway tokens and demo alert rules first (needs
//! `DATABASE_URL` of a role that may insert them); with `--auth device` each device is
//! created through query-api's provisioning endpoint (`POST /v1/devices`, or
//! `POST /v1/devices/{id}/rotate-token` when it exists), which returns its token once
//! (needs `--api-url` and an `operator_admin` `--api-key`); `--device-tokens FILE` keeps those
//! tokens for later runs without `--provision`. Gateway tokens are derived from
//! `--token-secret`: for demos and load tests, not for production tenants.
//!
//! `--first-device K` makes this run devices `K` to `K + devices - 1` (ids `<prefix>-dNNNNNN`,
//! tenant `number mod tenants`, tokens read from the file's lines of those numbers), so
//! several simulator processes can drive one fleet, each a disjoint slice of it (the MQTT
//! connection benchmark runs one per ingest process: a process holds at most ~20,000
//! connections here). `--latencies FILE` writes every attempt's latency, so their
//! percentiles can be computed over all the processes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::{Parser, ValueEnum};
use plumbing::config::{parse_duration, KafkaArgs, ObservabilityArgs};
use plumbing::Shutdown;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemas::{MetricValue, Telemetry};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::credentials::token_hash;
use crate::manifest::{self, ManifestWriter, Outcome, Record};
use crate::producer::{Outgoing, Producer};

/// How readings reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Through the ingest HTTP endpoint.
    Http,
    /// Straight to the telemetry topic.
    Kafka,
    /// Through the MQTT listener: one connection per device with its own token (`--auth
    /// device`), each reading a PUBLISH on `fleet/v1/telemetry` at `--qos`.
    Mqtt,
}

/// Whose token a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Auth {
    /// One gateway token per tenant; readings of many devices per request (`--batch`).
    Gateway,
    /// One device token per device; one reading per request.
    Device,
}

impl Auth {
    fn name(self) -> &'static str {
        match self {
            Auth::Gateway => "gateway",
            Auth::Device => "device",
        }
    }
}

/// Simulator settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ingest-producer simulate",
    about = "Drive N virtual devices against the ingest endpoint or Kafka"
)]
pub struct SimulateArgs {
    /// Number of virtual devices.
    #[arg(long, default_value_t = 100_000)]
    pub devices: u32,
    /// Number of the first device: this run drives devices `first-device` to
    /// `first-device + devices - 1` (ids, tenants, tokens and MQTT client ids follow the
    /// number), so several simulators can share one fleet, each its own slice.
    #[arg(long, default_value_t = 0)]
    pub first_device: u32,
    /// Each device sends one reading per interval.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Devices are spread round-robin over this many tenants.
    #[arg(long, default_value_t = 1)]
    pub tenants: u32,
    /// Through the HTTP endpoint or straight to Kafka.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Gateway tokens (batches per tenant) or device tokens (a request per reading).
    #[arg(long, value_enum, default_value_t = Auth::Gateway)]
    pub auth: Auth,
    /// Stop after this long (default: until SIGTERM/SIGINT).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Base URL of the ingest endpoint.
    #[arg(long, env = "INGEST_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// `host:port` of the MQTT listener (`--via mqtt`), or several separated by commas (device
    /// `d` connects to the `d mod n`th: one client address reaches one server address from at
    /// most ~28,000 ports).
    #[arg(long, env = "INGEST_MQTT", default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    /// MQTT QoS of the readings (`--via mqtt`): 1 counts a reading accepted at its PUBACK
    /// (after Kafka's ack), 0 once written to the socket.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Readings per HTTP request with `--auth gateway` (per Kafka send round with
    /// `--via kafka`).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Requests in flight at once; bounds memory when the target is slower than the load.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// A reading not accepted is retried for at most this long after its first attempt.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub give_up_after: Duration,
    /// Record every reading sent and its final outcome in this file (whole fleets only: not
    /// with `--first-device`).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Write every attempt's latency (µs, one a line, ascending) to this file at the end, so
    /// the latencies of several simulators can be merged.
    #[arg(long)]
    pub latencies: Option<PathBuf>,
    /// Create tenants, devices, tokens and demo alert rules first.
    #[arg(long)]
    pub provision: bool,
    /// PostgreSQL URL for `--provision`.
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// query-api base URL, for provisioning devices with `--auth device`.
    #[arg(long, env = "QUERY_API_URL", default_value = "http://127.0.0.1:8081")]
    pub api_url: String,
    /// An operator_admin API key, for provisioning devices with `--auth device`.
    #[arg(long, env = "FLEETSTREAM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With `--auth device`: where device tokens are written by `--provision`, and read from
    /// without it (`device<TAB>token` lines, by device number; lines of devices outside this
    /// run's `--first-device` slice are skipped).
    #[arg(long)]
    pub device_tokens: Option<PathBuf>,
    /// Prefix of simulated tenant and device ids.
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Gateway tokens are `<secret>-<tenant>`.
    #[arg(long, env = "SIMULATOR_TOKEN_SECRET", default_value = "simulator")]
    pub token_secret: String,
    /// Chance per reading that a device goes silent for 30–120 s.
    #[arg(long, default_value_t = 0.0002)]
    pub silence_probability: f64,
    /// Chance per reading of a temperature spike.
    #[arg(long, default_value_t = 0.001)]
    pub spike_probability: f64,
    /// Seed of the readings' random profiles.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// `--via kafka` with `SCHEMA_REGISTRY_URL`: readings in the Confluent wire format with
    /// the id of `telemetry.v1` under `<TELEMETRY_TOPIC>-value`, as ingest writes them.
    #[command(flatten)]
    pub registry: plumbing::registry::RegistryArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

impl SimulateArgs {
    /// Id of simulated tenant number `tenant`.
    pub fn tenant_id(&self, tenant: u32) -> String {
        manifest::tenant_id(&self.prefix, tenant)
    }

    /// Id of simulated device number `device` (a number, not the index in this run: see
    /// [`SimulateArgs::number`]).
    fn device_id(&self, device: u32) -> String {
        manifest::device_id(&self.prefix, device)
    }

    /// Number of this run's device `index` (`--first-device` plus the index).
    pub fn number(&self, index: u32) -> u32 {
        self.first_device.saturating_add(index)
    }

    /// The gateway token of a simulated tenant.
    pub fn gateway_token(&self, tenant_id: &str) -> String {
        format!("{}-{tenant_id}", self.token_secret)
    }

    fn manifest_header(&self) -> manifest::Header {
        manifest::Header {
            prefix: self.prefix.clone(),
            tenants: self.tenants,
            devices: self.devices,
            auth: self.auth.name().to_owned(),
        }
    }
}

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("--provision needs --database-url / DATABASE_URL")]
    NoDatabase,
    #[error("invalid settings: {0}")]
    Settings(&'static str),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("provisioning device {device}: {status} {body}")]
    Provisioning {
        device: String,
        status: u16,
        body: String,
    },
    #[error("device tokens file {path}: {reason}")]
    Tokens { path: String, reason: String },
    #[error("latencies file {path}: {reason}")]
    Latencies { path: String, reason: String },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Service(#[from] crate::Error),
    #[error(transparent)]
    Registry(#[from] plumbing::registry::RegistryError),
}

/// `--via kafka` with a registry: registers `telemetry.v1` as ingest does (waiting while the
/// registry is away) and returns its id.
async fn register_schema(
    args: &SimulateArgs,
    shutdown: &Shutdown,
) -> Result<Option<u32>, SimulateError> {
    let Some(registry) = plumbing::registry::Registry::from_args(&args.registry)? else {
        return Ok(None);
    };
    let codec = schemas::telemetry_codec().map_err(crate::Error::from)?;
    let id = registry
        .register(
            &args.kafka.telemetry_topic,
            codec.current_name(),
            codec.current_json(),
            shutdown,
            |err| tracing::warn!(error = %err, url = registry.url(), "schema registry not reachable yet; retrying"),
        )
        .await?;
    Ok(Some(id))
}

/// One virtual device's state.
#[derive(Debug, Clone)]
struct DeviceState {
    tenant: u32,
    seq: i64,
    temperature: f64,
    humidity: f64,
    battery: f64,
    silent_until: Option<Instant>,
}

/// What the run achieved.
#[derive(Debug, Default)]
pub struct Summary {
    /// Readings the target accepted.
    pub accepted: u64,
    /// Readings refused, or retried until the simulator gave up.
    pub failed: u64,
    /// Attempts repeated after a retryable answer (one per reading per retry).
    pub retries: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Longest the schedule fell behind (a device's reading sent this late).
    pub max_behind: Duration,
    /// Request latencies (HTTP, each attempt), publish-to-PUBACK latencies (MQTT QoS 1) or
    /// send-round latencies (Kafka), µs, sorted.
    pub latencies_us: Vec<u32>,
    /// MQTT connections up at the end of the run (before the simulator disconnects them).
    pub connections: u64,
    /// MQTT reconnections during the run.
    pub reconnects: u64,
}

impl Summary {
    /// Accepted readings per second.
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of the latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        Duration::from_micros(u64::from(
            self.latencies_us[rank.min(self.latencies_us.len() - 1)],
        ))
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

impl Counters {
    fn latency(&self, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        match self.latencies_us.lock() {
            Ok(mut l) => l.push(us),
            Err(poisoned) => poisoned.into_inner().push(us),
        }
    }
}

/// The tokens requests carry.
#[derive(Debug)]
enum Tokens {
    /// By tenant number.
    Gateway(HashMap<u32, String>),
    /// By device index in this run.
    Device(Vec<String>),
}

impl Tokens {
    fn for_device(&self, device: u32, tenant: u32) -> Option<&str> {
        match self {
            Tokens::Gateway(by_tenant) => by_tenant.get(&tenant).map(String::as_str),
            Tokens::Device(by_device) => by_device.get(device as usize).map(String::as_str),
        }
    }
}

enum Target {
    Http {
        client: reqwest::Client,
        url: String,
        tokens: Tokens,
    },
    Kafka {
        producer: Producer,
        /// The registry's id of `telemetry.v1` (Confluent framing); `None`: single-object.
        schema_id: Option<u32>,
    },
    Mqtt(crate::simulate_mqtt::Fleet),
}

/// What the sending tasks share.
struct Ctx {
    target: Target,
    counters: Counters,
    permits: Arc<Semaphore>,
    manifest: Option<std::sync::mpsc::Sender<Record>>,
    give_up_after: Duration,
    shutdown: Shutdown,
    /// Each sending task holds a sender; the receiver sees the channel close when all ended.
    in_flight: Mutex<Option<tokio::sync::mpsc::Sender<()>>>,
}

/// A reading on its way: device index in this run (its number less `--first-device`), tenant
/// number, the reading.
pub(crate) struct Pending {
    pub(crate) device: u32,
    pub(crate) tenant: u32,
    pub(crate) reading: Telemetry,
}

impl Ctx {
    fn settle(&self, pending: &[Pending], outcome: Outcome, status: u16) {
        let counter = match outcome {
            Outcome::Accepted => &self.counters.accepted,
            Outcome::NotAccepted => &self.counters.failed,
        };
        counter.fetch_add(pending.len() as u64, Ordering::Relaxed);
        if let Some(manifest) = &self.manifest {
            for p in pending {
                // A closed channel means the writer failed; it reports that itself.
                let _ = manifest.send(Record {
                    outcome,
                    status,
                    device: p.device,
                    time_us: p.reading.time.timestamp_micros(),
                    digest: manifest::metrics_digest(&p.reading.metrics),
                });
            }
        }
    }
}

/// Provisions the simulated tenants, gateway tokens and a few demo alert rules per tenant,
/// and, with `--auth gateway`, the devices (idempotent).
pub async fn provision(args: &SimulateArgs, pool: &sqlx::PgPool) -> Result<(), SimulateError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO tenants (tenant_id, name) \
         SELECT $1 || '-t' || i, 'Simulated tenant ' || i FROM generate_series(0, $2 - 1) i \
         ON CONFLICT DO NOTHING",
    )
    .bind(&args.prefix)
    .bind(i64::from(args.tenants))
    .execute(&mut *tx)
    .await?;
    if args.auth == Auth::Gateway {
        sqlx::query(
            "INSERT INTO devices (tenant_id, device_id) \
             SELECT $1 || '-t' || (j % $2), $1 || '-d' || lpad(j::text, 6, '0') \
             FROM generate_series($4, $4 + $3 - 1) j ON CONFLICT DO NOTHING",
        )
        .bind(&args.prefix)
        .bind(i64::from(args.tenants))
        .bind(i64::from(args.devices))
        .bind(i64::from(args.first_device))
        .execute(&mut *tx)
        .await?;
    }
    for tenant in 0..args.tenants {
        let tenant_id = args.tenant_id(tenant);
        sqlx::query(
            "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ($1, 'simulator', $2) \
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(&tenant_id)
        .bind(token_hash(&args.gateway_token(&tenant_id)))
        .execute(&mut *tx)
        .await?;
        // Demo alert rules the profiles trip: temperature spikes, slow warming, silent devices.
        sqlx::query(
            "INSERT INTO alert_rules (tenant_id, name, kind, metric, agg, op, threshold, window_s, \
                                      for_s, no_data_s, resolve_threshold, severity) \
             SELECT $1, r.name, r.kind, r.metric, r.agg, r.op, r.threshold, r.window_s, r.for_s, \
                    r.no_data_s, r.resolve_threshold, r.severity \
             FROM (VALUES \
                 ('Temperature spike', 'threshold', 'temperature', NULL, '>', 45.0, NULL, 0, NULL, NULL, 'critical'), \
                 ('Warm for a minute', 'window', 'temperature', 'avg', '>', 30.0, 60, 0, NULL, 28.0, 'warning'), \
                 ('Device silent', 'no_data', NULL, NULL, NULL, NULL, NULL, 0, 60, NULL, 'warning'), \
                 ('Weak signal', 'window', 'rssi', 'avg', '<', -95.0, 60, 0, NULL, -90.0, 'info') \
             ) AS r(name, kind, metric, agg, op, threshold, window_s, for_s, no_data_s, resolve_threshold, severity) \
             WHERE NOT EXISTS (SELECT 1 FROM alert_rules a WHERE a.tenant_id = $1 AND a.name = r.name)",
        )
        .bind(&tenant_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    info!(
        tenants = args.tenants,
        devices = args.devices,
        "simulated tenants provisioned"
    );
    Ok(())
}

/// Creates every simulated device through query-api (`POST /v1/devices`; an existing one
/// gets a new token from `POST /v1/devices/{id}/rotate-token`) and returns the device tokens
/// by index in this run.
pub async fn provision_devices(
    args: &SimulateArgs,
    client: &reqwest::Client,
) -> Result<Vec<String>, SimulateError> {
    let key = args.api_key.as_deref().ok_or(SimulateError::Settings(
        "--auth device --provision needs --api-key / FLEETSTREAM_API_KEY (operator_admin)",
    ))?;
    let base = args.api_url.trim_end_matches('/').to_owned();
    let started = Instant::now();
    let mut tokens = vec![String::new(); args.devices as usize];
    let mut tasks = tokio::task::JoinSet::new();
    let permits = Arc::new(Semaphore::new(args.concurrency.clamp(1, 32)));
    for d in 0..args.devices {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SimulateError::Settings("provisioning interrupted"))?;
        let (client, key, base) = (client.clone(), key.to_owned(), base.clone());
        let number = args.number(d);
        let (tenant, device) = (
            args.tenant_id(number % args.tenants),
            args.device_id(number),
        );
        tasks.spawn(async move {
            let _permit = permit;
            create_device(&client, &base, &key, &tenant, &device)
                .await
                .map(|token| (d, token))
        });
        while let Some(done) = tasks.try_join_next() {
            let (d, token) =
                done.map_err(|_| SimulateError::Settings("provisioning panicked"))??;
            tokens[d as usize] = token;
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (d, token) = done.map_err(|_| SimulateError::Settings("provisioning panicked"))??;
        tokens[d as usize] = token;
    }
    info!(
        devices = args.devices,
        seconds = started.elapsed().as_secs_f64(),
        "simulated devices provisioned through query-api"
    );
    Ok(tokens)
}

async fn create_device(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    tenant: &str,
    device: &str,
) -> Result<String, SimulateError> {
    let created = client
        .post(format!("{base}/v1/devices?tenant={tenant}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(json!({ "device_id": device }).to_string())
        .send()
        .await?;
    let response = if created.status().as_u16() == 409 {
        client
            .post(format!(
                "{base}/v1/devices/{device}/rotate-token?tenant={tenant}"
            ))
            .bearer_auth(key)
            .send()
            .await?
    } else {
        created
    };
    let status = response.status().as_u16();
    let body = response.bytes().await?;
    let token = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_owned));
    match token {
        Some(token) if status == 200 || status == 201 => Ok(token),
        _ => Err(SimulateError::Provisioning {
            device: device.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).chars().take(300).collect(),
        }),
    }
}

/// Writes `device<TAB>token` lines, the device by number (`first` is the number of
/// `tokens[0]`).
fn write_device_tokens(
    path: &std::path::Path,
    first: u32,
    tokens: &[String],
) -> Result<(), SimulateError> {
    let err = |e: std::io::Error| SimulateError::Tokens {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    for (d, token) in tokens.iter().enumerate() {
        writeln!(out, "{}\t{token}", u64::from(first) + d as u64).map_err(err)?;
    }
    out.flush().map_err(err)
}

/// The tokens of devices `first` to `first + devices - 1` (by index in this run) from a
/// `device<TAB>token` file; other devices' lines are skipped.
fn read_device_tokens(
    path: &std::path::Path,
    first: u32,
    devices: u32,
) -> Result<Vec<String>, SimulateError> {
    let fail = |reason: String| SimulateError::Tokens {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let mut tokens = vec![String::new(); devices as usize];
    for (n, line) in text.lines().enumerate() {
        let parsed = line
            .split_once('\t')
            .and_then(|(d, t)| Some((d.parse::<u64>().ok()?, t)));
        match parsed {
            Some((d, token)) => {
                let slot = d
                    .checked_sub(u64::from(first))
                    .and_then(|i| tokens.get_mut(usize::try_from(i).ok()?));
                if let Some(slot) = slot {
                    token.clone_into(slot);
                }
            }
            None => return Err(fail(format!("line {}: expected device<TAB>token", n + 1))),
        }
    }
    if let Some(missing) = tokens.iter().position(String::is_empty) {
        return Err(fail(format!(
            "no token for device {}",
            u64::from(first) + missing as u64
        )));
    }
    Ok(tokens)
}

/// Writes the latencies (µs, ascending), one a line.
fn write_latencies(path: &std::path::Path, latencies_us: &[u32]) -> Result<(), SimulateError> {
    let err = |e: std::io::Error| SimulateError::Latencies {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    for us in latencies_us {
        writeln!(out, "{us}").map_err(err)?;
    }
    out.flush().map_err(err)
}

/// Runs the simulation until `--duration` passed or `shutdown`, and returns what it achieved.
pub async fn run(args: SimulateArgs, shutdown: Shutdown) -> Result<Summary, SimulateError> {
    if args.devices == 0 || args.tenants == 0 || args.batch == 0 || args.concurrency == 0 {
        return Err(SimulateError::Settings(
            "devices, tenants, batch and concurrency must be positive",
        ));
    }
    if args.interval.is_zero() {
        return Err(SimulateError::Settings("interval must be positive"));
    }
    if args.first_device.checked_add(args.devices).is_none() {
        return Err(SimulateError::Settings(
            "--first-device plus --devices must stay below 2^32",
        ));
    }
    if args.first_device > 0 && args.manifest.is_some() {
        return Err(SimulateError::Settings(
            "--manifest records a whole fleet: not with --first-device",
        ));
    }
    if args.auth == Auth::Device && args.via == Via::Kafka {
        return Err(SimulateError::Settings(
            "--auth device needs --via http or mqtt (tokens are an ingest matter)",
        ));
    }
    if args.via == Via::Mqtt && args.auth != Auth::Device {
        return Err(SimulateError::Settings(
            "--via mqtt needs --auth device (one connection and token per device)",
        ));
    }
    if args.provision {
        let url = args
            .database_url
            .as_deref()
            .ok_or(SimulateError::NoDatabase)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await?;
        provision(&args, &pool).await?;
        pool.close().await;
    }
    let target = match args.via {
        Via::Http => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(args.concurrency)
                .timeout(Duration::from_secs(30))
                .build()?;
            let tokens = match args.auth {
                Auth::Gateway => Tokens::Gateway(
                    (0..args.tenants)
                        .map(|t| (t, args.gateway_token(&args.tenant_id(t))))
                        .collect(),
                ),
                Auth::Device if args.provision => {
                    let tokens = provision_devices(&args, &client).await?;
                    if let Some(path) = &args.device_tokens {
                        write_device_tokens(path, args.first_device, &tokens)?;
                    }
                    Tokens::Device(tokens)
                }
                Auth::Device => match &args.device_tokens {
                    Some(path) => {
                        Tokens::Device(read_device_tokens(path, args.first_device, args.devices)?)
                    }
                    None => {
                        return Err(SimulateError::Settings(
                            "--auth device needs --provision or --device-tokens FILE",
                        ))
                    }
                },
            };
            let url = format!("{}/v1/telemetry", args.url.trim_end_matches('/'));
            if args.provision {
                await_tokens_known(&client, &url, &tokens, args.concurrency, &shutdown).await;
            }
            Target::Http {
                client,
                url,
                tokens,
            }
        }
        Via::Mqtt => {
            let tokens = match &args.device_tokens {
                _ if args.provision => {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()?;
                    let tokens = provision_devices(&args, &client).await?;
                    if let Some(path) = &args.device_tokens {
                        write_device_tokens(path, args.first_device, &tokens)?;
                    }
                    tokens
                }
                Some(path) => read_device_tokens(path, args.first_device, args.devices)?,
                None => {
                    return Err(SimulateError::Settings(
                        "--auth device needs --provision or --device-tokens FILE",
                    ))
                }
            };
            Target::Mqtt(crate::simulate_mqtt::Fleet::connect(&args, tokens, &shutdown).await?)
        }
        Via::Kafka => Target::Kafka {
            producer: Producer::new(
                &args.kafka,
                "fleetstream-simulator",
                Duration::from_secs(30),
            )?,
            schema_id: register_schema(&args, &shutdown).await?,
        },
    };

    let (manifest_tx, manifest_writer) = match &args.manifest {
        Some(path) => {
            let mut writer = ManifestWriter::create(path, &args.manifest_header())?;
            let (tx, rx) = std::sync::mpsc::channel::<Record>();
            let handle = std::thread::spawn(move || -> Result<u64, manifest::ManifestError> {
                for record in rx {
                    writer.push(&record)?;
                }
                writer.finish()
            });
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };
    let (in_flight_tx, mut in_flight_rx) = tokio::sync::mpsc::channel::<()>(1);
    let ctx = Arc::new(Ctx {
        target,
        counters: Counters::default(),
        permits: Arc::new(Semaphore::new(args.concurrency)),
        manifest: manifest_tx,
        give_up_after: args.give_up_after,
        shutdown: shutdown.clone(),
        in_flight: Mutex::new(Some(in_flight_tx)),
    });

    let mut rng = StdRng::seed_from_u64(args.seed);
    let started = Instant::now();
    let interval_us = args.interval.as_micros().max(1) as u64;
    let mut devices: Vec<DeviceState> = (0..args.devices)
        .map(|d| DeviceState {
            tenant: args.number(d) % args.tenants,
            seq: 0,
            temperature: rng.random_range(18.0..26.0),
            humidity: rng.random_range(35.0..65.0),
            battery: rng.random_range(60.0..100.0),
            silent_until: None,
        })
        .collect();
    // (due time in µs since start, device index), earliest first.
    let mut due: BinaryHeap<Reverse<(u64, u32)>> = (0..args.devices)
        .map(|d| Reverse((u64::from(d) * interval_us / u64::from(args.devices), d)))
        .collect();
    let per_request = match args.auth {
        Auth::Device if args.via != Via::Kafka => 1,
        _ => args.batch,
    };
    let mut pending: HashMap<u32, Vec<Pending>> = HashMap::new();
    let deadline = args.duration.map(|d| started + d);
    let mut progress = Progress::new(started);
    let mut max_behind = Duration::ZERO;
    let tick = Duration::from_millis(10);

    'run: loop {
        let now = Instant::now();
        if shutdown.is_cancelled() || deadline.is_some_and(|d| now >= d) {
            break;
        }
        let now_us = now.duration_since(started).as_micros() as u64;
        while let Some(Reverse((at, d))) = due.peek().copied() {
            if at > now_us {
                break;
            }
            // A simulator that fell behind works through its backlog here; it still stops
            // on time, and says how far behind it is.
            let late = Instant::now();
            if deadline.is_some_and(|d| late >= d) || shutdown.is_cancelled() {
                break 'run;
            }
            let behind = Duration::from_micros(
                (late.duration_since(started).as_micros() as u64).saturating_sub(at),
            );
            max_behind = max_behind.max(behind);
            progress.maybe_report(late, &ctx.counters, behind);
            due.pop();
            let jitter = rng.random_range(0.9..1.1);
            due.push(Reverse((at + (interval_us as f64 * jitter) as u64, d)));
            let device = &mut devices[d as usize];
            if let Some(until) = device.silent_until {
                if now < until {
                    continue;
                }
                device.silent_until = None;
            }
            if rng.random_bool(args.silence_probability.clamp(0.0, 1.0)) {
                device.silent_until = Some(now + Duration::from_secs(rng.random_range(30..120)));
                continue;
            }
            let reading = next_reading(&args, args.number(d), device, &mut rng);
            let key = match args.auth {
                Auth::Gateway => device.tenant,
                Auth::Device => d,
            };
            let batch = pending.entry(key).or_default();
            batch.push(Pending {
                device: d,
                tenant: device.tenant,
                reading,
            });
            if batch.len() >= per_request {
                let full = std::mem::take(batch);
                if !dispatch(&ctx, full).await {
                    break 'run;
                }
            }
        }
        // Flush what this tick produced, so a reading waits at most one tick.
        for batch in pending.values_mut() {
            if !batch.is_empty() {
                let part = std::mem::take(batch);
                if !dispatch(&ctx, part).await {
                    break 'run;
                }
            }
        }
        pending.clear();
        progress.maybe_report(Instant::now(), &ctx.counters, Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    // Wait for requests in flight, retries included (each gives up after --give-up-after):
    // every sending task holds a clone of `ctx.in_flight`'s sender.
    drop(match ctx.in_flight.lock() {
        Ok(mut tx) => tx.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    });
    while in_flight_rx.recv().await.is_some() {}
    let elapsed = started.elapsed();
    if let Target::Kafka { producer, .. } = &ctx.target {
        producer.flush(Duration::from_secs(30));
    }
    let (connections, reconnects) = match &ctx.target {
        Target::Mqtt(fleet) => {
            let counts = fleet.connections();
            fleet.disconnect();
            counts
        }
        _ => (0, 0),
    };
    let counters = &ctx.counters;
    let mut latencies_us = match counters.latencies_us.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    latencies_us.sort_unstable();
    if let Some(path) = &args.latencies {
        write_latencies(path, &latencies_us)?;
    }
    let summary = Summary {
        accepted: counters.accepted.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        retries: counters.retries.load(Ordering::Relaxed),
        elapsed,
        max_behind,
        latencies_us,
        connections,
        reconnects,
    };
    drop(ctx);
    if let Some(handle) = manifest_writer {
        let records = handle
            .join()
            .map_err(|_| SimulateError::Settings("manifest writer panicked"))??;
        info!(records, "manifest written");
    }
    Ok(summary)
}

/// The progress line: the accepted rate over the time that really passed since the last
/// line, and how far the schedule is behind.
struct Progress {
    last_at: Instant,
    last_accepted: u64,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    fn new(started: Instant) -> Self {
        Progress {
            last_at: started,
            last_accepted: 0,
        }
    }

    fn maybe_report(&mut self, now: Instant, counters: &Counters, behind: Duration) {
        let span = now.duration_since(self.last_at);
        if span < Self::EVERY {
            return;
        }
        let accepted = counters.accepted.load(Ordering::Relaxed);
        let rate = (accepted - self.last_accepted) as f64 / span.as_secs_f64();
        let failed = counters.failed.load(Ordering::Relaxed);
        let retries = counters.retries.load(Ordering::Relaxed);
        if behind > Duration::from_secs(1) {
            warn!(
                rate = rate.round(),
                over_s = span.as_secs_f64(),
                accepted,
                failed,
                retries,
                behind_s = behind.as_secs_f64(),
                "simulator progress: behind schedule (the target or the simulator cannot keep up)"
            );
        } else {
            info!(
                rate = rate.round(),
                over_s = span.as_secs_f64(),
                accepted,
                failed,
                retries,
                "simulator progress (accepted msg/s over the last over_s seconds)"
            );
        }
        self.last_at = now;
        self.last_accepted = accepted;
    }
}

/// Writes the summary line to stdout (the simulator's output, not a log).
pub fn print_summary(args: &SimulateArgs, summary: &Summary) -> std::io::Result<()> {
    let offered = f64::from(args.devices) / args.interval.as_secs_f64();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "via={:?} auth={} devices={} interval={:?} batch={} concurrency={} offered={:.0} msg/s \
         accepted={} failed={} retries={} elapsed={:.1}s achieved={:.0} msg/s \
         max_behind={:.1}s p50={:.1}ms p99={:.1}ms{}",
        args.via,
        args.auth.name(),
        args.devices,
        args.interval,
        if args.auth == Auth::Device {
            1
        } else {
            args.batch
        },
        args.concurrency,
        offered,
        summary.accepted,
        summary.failed,
        summary.retries,
        summary.elapsed.as_secs_f64(),
        summary.rate(),
        summary.max_behind.as_secs_f64(),
        summary.quantile(0.5).as_secs_f64() * 1000.0,
        summary.quantile(0.99).as_secs_f64() * 1000.0,
        match args.via {
            Via::Mqtt => format!(
                " connections={} reconnects={}",
                summary.connections, summary.reconnects
            ),
            _ => String::new(),
        },
    )
}

/// The next reading of device number `d`.
fn next_reading(
    args: &SimulateArgs,
    d: u32,
    device: &mut DeviceState,
    rng: &mut StdRng,
) -> Telemetry {
    device.seq += 1;
    device.temperature = (device.temperature + rng.random_range(-0.2..0.2)).clamp(-20.0, 60.0);
    device.humidity =
        (device.humidity + rng.random_range(-1.0..1.0) + (50.0 - device.humidity) * 0.02)
            .clamp(0.0, 100.0);
    device.battery = (device.battery - rng.random_range(0.0..0.01)).max(0.0);
    if device.battery <= 0.0 {
        device.battery = 100.0; // replaced
    }
    let spike = rng.random_bool(args.spike_probability.clamp(0.0, 1.0));
    let temperature = if spike {
        device.temperature + rng.random_range(20.0..40.0)
    } else {
        device.temperature
    };
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert(
        "temperature".to_owned(),
        MetricValue::Double(round2(temperature)),
    );
    metrics.insert(
        "humidity".to_owned(),
        MetricValue::Double(round2(device.humidity)),
    );
    metrics.insert(
        "battery".to_owned(),
        MetricValue::Double(round2(device.battery)),
    );
    metrics.insert(
        "rssi".to_owned(),
        MetricValue::Long(rng.random_range(-110..-50)),
    );
    let now = Utc::now();
    Telemetry {
        tenant_id: args.tenant_id(device.tenant),
        device_id: args.device_id(d),
        site_id: None,
        msg_type: schemas::telemetry::DEFAULT_MSG_TYPE.to_owned(),
        seq: device.seq,
        time: now,
        received_at: now,
        metrics,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Sends one request's readings on their own task once a permit is free; false when
/// shutting down.
async fn dispatch(ctx: &Arc<Ctx>, batch: Vec<Pending>) -> bool {
    let permit = tokio::select! {
        _ = ctx.shutdown.cancelled() => return false,
        permit = ctx.permits.clone().acquire_owned() => match permit {
            Ok(permit) => permit,
            Err(_) => return false,
        },
    };
    let ctx = ctx.clone();
    let in_flight = match ctx.in_flight.lock() {
        Ok(tx) => tx.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    tokio::spawn(async move {
        deliver(ctx, batch, permit).await;
        drop(in_flight);
    });
    true
}

/// What became of each reading of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accepted,
    /// Worth another attempt (status 0: no reply).
    Retry(u16),
    /// Final refusal.
    Refused(u16),
}

fn retryable(status: u16) -> bool {
    matches!(status, 0 | 408 | 429 | 500 | 502 | 503 | 504)
}

fn verdict_for(status: u16) -> Verdict {
    if status == 202 {
        Verdict::Accepted
    } else if retryable(status) {
        Verdict::Retry(status)
    } else {
        Verdict::Refused(status)
    }
}

/// Sends `batch`, retrying what may be retried, and settles every reading.
async fn deliver(ctx: Arc<Ctx>, mut batch: Vec<Pending>, mut permit: OwnedSemaphorePermit) {
    let first_attempt = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = Instant::now();
        let (verdicts, retry_after) = match &ctx.target {
            Target::Http {
                client,
                url,
                tokens,
            } => send_http(client, url, tokens, &batch).await,
            Target::Kafka {
                producer,
                schema_id,
            } => send_kafka(producer, *schema_id, &batch).await,
            Target::Mqtt(fleet) => fleet.send(&batch, ctx.give_up_after).await,
        };
        ctx.counters.latency(attempt.elapsed());
        let mut retry = Vec::new();
        let mut last_status = 0;
        for (p, verdict) in batch.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Accepted => ctx.settle(std::slice::from_ref(&p), Outcome::Accepted, 202),
                Verdict::Refused(status) => {
                    ctx.settle(std::slice::from_ref(&p), Outcome::NotAccepted, status)
                }
                Verdict::Retry(status) => {
                    last_status = status;
                    retry.push(p);
                }
            }
        }
        if retry.is_empty() {
            return;
        }
        let jitter = rand::random_range(0.8..1.2);
        let wait = retry_after.unwrap_or(backoff).mul_f64(jitter);
        backoff = (backoff * 2).min(Duration::from_secs(10));
        if first_attempt.elapsed() + wait > ctx.give_up_after || ctx.shutdown.is_cancelled() {
            ctx.settle(&retry, Outcome::NotAccepted, last_status);
            return;
        }
        ctx.counters
            .retries
            .fetch_add(retry.len() as u64, Ordering::Relaxed);
        // Nothing in flight while waiting: the permit goes back meanwhile.
        drop(permit);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                ctx.settle(&retry, Outcome::NotAccepted, last_status);
                return;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        permit = match ctx.permits.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => {
                ctx.settle(&retry, Outcome::NotAccepted, last_status);
                return;
            }
        };
        batch = retry;
    }
}

/// Freshly provisioned tokens reach ingest's credential cache through NOTIFY a moment later:
/// until each token stops being refused with 401 (at most 60 s in all), sending would only
/// count refusals.
async fn await_tokens_known(
    client: &reqwest::Client,
    url: &str,
    tokens: &Tokens,
    concurrency: usize,
    shutdown: &Shutdown,
) {
    let all: Vec<String> = match tokens {
        Tokens::Gateway(by_tenant) => by_tenant.values().cloned().collect(),
        Tokens::Device(by_device) => by_device.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe = |token: String| {
        let client = client.clone();
        let url = url.to_owned();
        let shutdown = shutdown.clone();
        async move {
            loop {
                let reply = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body("[]")
                    .send()
                    .await;
                let unknown = match &reply {
                    Ok(response) => response.status().as_u16() == 401,
                    Err(_) => true,
                };
                if !unknown || Instant::now() >= deadline || shutdown.is_cancelled() {
                    return !unknown;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    use futures::StreamExt;
    let known = futures::stream::iter(all.into_iter().map(probe))
        .buffer_unordered(concurrency.clamp(1, 64))
        .filter(|known| std::future::ready(*known))
        .count()
        .await;
    info!(known, "tokens known to ingest");
}

/// A reading as the JSON of `POST /v1/telemetry` (and of MQTT topic `fleet/v1/telemetry`).
pub(crate) fn post_message(t: &Telemetry) -> Value {
    json!({
        "device_id": t.device_id,
        "seq": t.seq,
        "time": t.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "metrics": t.metrics_json(),
    })
}

/// One attempt over HTTP: a verdict per reading, and the reply's `Retry-After`.
async fn send_http(
    client: &reqwest::Client,
    url: &str,
    tokens: &Tokens,
    batch: &[Pending],
) -> (Vec<Verdict>, Option<Duration>) {
    let refuse_all = |status: u16| (vec![verdict_for(status); batch.len()], None);
    let Some(first) = batch.first() else {
        return (Vec::new(), None);
    };
    let Some(token) = tokens.for_device(first.device, first.tenant) else {
        return refuse_all(401);
    };
    let encode = post_message;
    let body = if let [one] = batch {
        encode(&one.reading)
    } else {
        Value::Array(batch.iter().map(|p| encode(&p.reading)).collect())
    };
    let Ok(body) = serde_json::to_vec(&body) else {
        return refuse_all(400);
    };
    let response = match client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(err) => {
            warn!(error = %err, "request failed");
            return refuse_all(0);
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(err) => {
            // The reply was lost: the readings may or may not have been accepted.
            warn!(error = %err, "cannot read reply");
            return refuse_all(0);
        }
    };
    let reply: Option<Value> = serde_json::from_slice(&bytes).ok();
    let errors = reply
        .as_ref()
        .filter(|_| batch.len() > 1)
        .and_then(|v| v.get("errors"))
        .and_then(Value::as_array);
    let verdicts = match errors {
        // A batch reply: every reading accepted but those listed.
        Some(errors) => {
            let mut verdicts = vec![Verdict::Accepted; batch.len()];
            for error in errors {
                let index = error.get("index").and_then(Value::as_u64);
                let code = error
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(status);
                if let Some(slot) = index.and_then(|i| verdicts.get_mut(i as usize)) {
                    *slot = verdict_for(code);
                }
            }
            verdicts
        }
        None => vec![verdict_for(status); batch.len()],
    };
    if status != 202 && !retryable(status) {
        warn!(status, body = %String::from_utf8_lossy(&bytes), "readings refused");
    }
    (verdicts, retry_after)
}

/// One attempt straight to Kafka: a reading that cannot be encoded is refused (400), one the
/// producer could not deliver is retried (503).
async fn send_kafka(
    producer: &Producer,
    schema_id: Option<u32>,
    batch: &[Pending],
) -> (Vec<Verdict>, Option<Duration>) {
    let Ok(codec) = schemas::telemetry_codec() else {
        return (vec![Verdict::Refused(500); batch.len()], None);
    };
    let mut verdicts = vec![Verdict::Refused(400); batch.len()];
    let mut sent = Vec::with_capacity(batch.len());
    let mut outgoing = Vec::with_capacity(batch.len());
    for (i, p) in batch.iter().enumerate() {
        let payload = match schema_id {
            Some(id) => codec.encode_confluent(&p.reading, id),
            None => codec.encode(&p.reading),
        };
        if let Ok(payload) = payload {
            sent.push(i);
            outgoing.push(Outgoing {
                key: p.reading.key(),
                payload,
            });
        }
    }
    let traceparent = format!(
        "00-{:032x}-{:016x}-01",
        rand::random::<u128>() | 1,
        rand::random::<u64>() | 1
    );
    let results = producer.send_all(&outgoing, &traceparent).await;
    for (i, result) in sent.into_iter().zip(results) {
        verdicts[i] = if result.is_ok() {
            Verdict::Accepted
        } else {
            Verdict::Retry(503)
        };
    }
    (verdicts, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_defaults_follow_the_design_profile() {
        let args = SimulateArgs::try_parse_from(["simulate"]).unwrap();
        assert_eq!(args.devices, 100_000);
        assert_eq!(args.interval, Duration::from_secs(5));
        assert_eq!(args.via, Via::Http);
        let args = SimulateArgs::try_parse_from([
            "simulate",
            "--devices",
            "10",
            "--via",
            "kafka",
            "--duration",
            "1m",
            "--tenants",
            "2",
        ])
        .unwrap();
        assert_eq!(args.via, Via::Kafka);
        assert_eq!(args.duration, Some(Duration::from_secs(60)));
        assert_eq!(args.device_id(7), "sim-d000007");
        assert_eq!(args.tenant_id(1), "sim-t1");
    }

    #[test]
    fn a_slice_reads_its_own_tokens_and_names_its_devices_by_number() {
        let dir = std::env::temp_dir().join(format!("sim_tokens_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.tsv");
        let all: Vec<String> = (0..10).map(|d| format!("tok-{d}")).collect();
        write_device_tokens(&path, 0, &all).unwrap();
        assert_eq!(
            read_device_tokens(&path, 6, 3).unwrap(),
            ["tok-6", "tok-7", "tok-8"]
        );
        let err = read_device_tokens(&path, 8, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "device tokens file {}: no token for device 10",
                path.display()
            )
        );
        // A slice written by number reads back the same.
        write_device_tokens(&path, 4, &all[4..6]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "4\ttok-4\n5\ttok-5\n"
        );
        assert_eq!(read_device_tokens(&path, 4, 2).unwrap(), ["tok-4", "tok-5"]);
        std::fs::remove_dir_all(&dir).unwrap();

        let args = SimulateArgs::try_parse_from(["simulate", "--first-device", "1000"]).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut device = DeviceState {
            tenant: 0,
            seq: 0,
            temperature: 20.0,
            humidity: 50.0,
            battery: 50.0,
            silent_until: None,
        };
        let reading = next_reading(&args, args.number(7), &mut device, &mut rng);
        assert_eq!(reading.device_id, "sim-d001007");
    }

    #[test]
    fn readings_stay_within_their_profiles() {
        let args = SimulateArgs::try_parse_from(["simulate", "--spike-probability", "0"]).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut device = DeviceState {
            tenant: 0,
            seq: 0,
            temperature: 20.0,
            humidity: 50.0,
            battery: 50.0,
            silent_until: None,
        };
        for _ in 0..10_000 {
            let t = next_reading(&args, 3, &mut device, &mut rng);
            let MetricValue::Double(h) = t.metrics["humidity"] else {
                panic!()
            };
            assert!((0.0..=100.0).contains(&h));
            let MetricValue::Long(rssi) = t.metrics["rssi"] else {
                panic!()
            };
            assert!((-110..-50).contains(&rssi));
        }
        assert_eq!(device.seq, 10_000);
    }
}
