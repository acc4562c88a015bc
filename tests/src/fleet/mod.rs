//! The fleet-scale proof: the four services as real processes on real Kafka and PostgreSQL,
//! a simulated fleet driving ingest, faults injected at random moments, and at the end an
//! exact account of every reading plus the figures of the run.
//!
//! [`run`] does it all; the `fleet_e2e` binary is its command line and `tests/fleet_smoke.rs`
//! runs a small profile in CI. Steps:
//!
//! 1. a database of its own (TimescaleDB layout when the server offers the extension, with
//!    `--chunk-interval` chunks compressed after `--compress-after`, so compression runs
//!    *during* the run) and topics of its own, on the shared broker or, when the broker is to
//!    be restarted, on a private one;
//! 2. query-api, ingest, sink and evaluator started from their binaries (`--bin-dir`); an
//!    `operator_admin` key from `query-api create-key`;
//! 3. `ingest-producer simulate --provision --manifest` as a process of its own: every reading
//!    it sends is recorded with its final outcome; meanwhile a probe device sends one reading
//!    a second and polls query-api until it is visible (ingest→queryable latency), and every
//!    second the services' `/metrics`, the topic's end offsets, the offsets stored in
//!    PostgreSQL and the CPU time of every process are sampled;
//! 4. faults at random moments: SIGKILL of sink, evaluator and ingest (each restarted at
//!    once), a stop and start of the broker, a restart of PostgreSQL;
//! 5. after the simulator stops: wait until both groups' stored offsets reach the end
//!    offsets, then [`check::account`] the readings, compare the alerts with
//!    [`crate::reference`], and write the report (markdown, JSON and a PNG chart).

pub mod check;
pub mod procs;
pub mod prom;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use plumbing::config::{parse_duration, KafkaArgs};
use plumbing::testing::{PrivateKafka, TestDb, TestTopics};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use schemas::{Layout, LayoutChoice, StorageOptions};
use serde::Serialize;
use sqlx::{ConnectOptions, Row};
use tokio::sync::Mutex;

use crate::report::{Fault, Sample};
use procs::{CpuAccount, Service, ServiceSpec};

/// Whose tokens the simulated fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum AuthMode {
    /// A device token per device, a request per reading.
    Device,
    /// A gateway token per tenant, `--batch` readings per request.
    Gateway,
}

/// Storage layout of the run's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum LayoutArg {
    /// TimescaleDB when the server offers it.
    Auto,
    Timescaledb,
    Postgres,
}

/// The run's settings (`fleet_e2e --help`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fleet_e2e",
    about = "Fleet-scale proof: every service as a process, a simulated fleet, faults, and an exact account of every reading"
)]
pub struct Options {
    /// Simulated devices.
    #[arg(long, default_value_t = 100_000)]
    pub devices: u32,
    /// Each device sends one reading per interval.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// How long the fleet sends.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Tenants the devices are spread over.
    #[arg(long, default_value_t = 10)]
    pub tenants: u32,
    /// Device tokens (a request per reading) or gateway tokens (batches).
    #[arg(long, value_enum, default_value_t = AuthMode::Device)]
    pub auth: AuthMode,
    /// Readings per request with `--auth gateway`.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Simulator requests in flight (default: 2,048 with device tokens, where every device
    /// has a connection of its own and waits for its `202`; 32 with gateway batches).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Inject the full fault plan: SIGKILL sink ×5, evaluator ×3, ingest ×2, one broker
    /// restart, one PostgreSQL restart (each count can be set on its own below).
    #[arg(long)]
    pub faults: bool,
    #[arg(long)]
    pub sink_kills: Option<u32>,
    #[arg(long)]
    pub evaluator_kills: Option<u32>,
    #[arg(long)]
    pub ingest_kills: Option<u32>,
    /// Stops and starts of the Kafka broker (a private broker is used then).
    #[arg(long)]
    pub kafka_restarts: Option<u32>,
    /// Restarts of the PostgreSQL cluster (`pg_ctlcluster`; needs root on the server's host).
    #[arg(long)]
    pub postgres_restarts: Option<u32>,
    /// Storage layout.
    #[arg(long, value_enum, default_value_t = LayoutArg::Auto)]
    pub layout: LayoutArg,
    /// TimescaleDB: chunk interval of telemetry in the run's database.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub chunk_interval: Duration,
    /// TimescaleDB: chunks are compressed this long after their end (policy checked every
    /// minute).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub compress_after: Duration,
    /// The sink's `SINK_LATEST_INTERVAL`: `device_latest` written behind the telemetry, once
    /// per this interval (0: with every batch). The drain then also waits for every
    /// partition's `device_latest` to catch up (`latest_next_offset` NULL).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub sink_latest_interval: Duration,
    /// Partitions of the run's telemetry topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Directory holding the service binaries (default: this program's own directory).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Report directory (default: a new directory under the system's temp dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the fault moments and the fleet's readings.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Longest wait for both consumer groups to store the end offsets after the fleet
    /// stopped.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Keep the run's database afterwards (it is dropped by default).
    #[arg(long)]
    pub keep_database: bool,
}

impl Options {
    fn count(&self, explicit: Option<u32>, full_plan: u32) -> u32 {
        explicit.unwrap_or(if self.faults { full_plan } else { 0 })
    }

    /// The kills and restarts to inject.
    pub fn plan(&self) -> BTreeMap<FaultKind, u32> {
        [
            (FaultKind::KillSink, self.count(self.sink_kills, 5)),
            (
                FaultKind::KillEvaluator,
                self.count(self.evaluator_kills, 3),
            ),
            (FaultKind::KillIngest, self.count(self.ingest_kills, 2)),
            (FaultKind::RestartKafka, self.count(self.kafka_restarts, 1)),
            (
                FaultKind::RestartPostgres,
                self.count(self.postgres_restarts, 1),
            ),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum FaultKind {
    KillSink,
    KillEvaluator,
    KillIngest,
    RestartKafka,
    RestartPostgres,
}

impl FaultKind {
    fn label(self) -> &'static str {
        match self {
            FaultKind::KillSink => "SIGKILL sink",
            FaultKind::KillEvaluator => "SIGKILL evaluator",
            FaultKind::KillIngest => "SIGKILL ingest",
            FaultKind::RestartKafka => "Kafka restart",
            FaultKind::RestartPostgres => "PostgreSQL restart",
        }
    }
}

/// Quantiles of a latency, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
}

impl Quantiles {
    fn of_histogram(h: &prom::Histogram) -> Self {
        let ms = |q| h.quantile(q).map(|s| s * 1000.0);
        Quantiles {
            count: h.count() as u64,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
        }
    }

    fn of_samples(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let q = |q: f64| {
            (!v.is_empty()).then(|| v[(((v.len() - 1) as f64) * q).round() as usize] * 1000.0)
        };
        Quantiles {
            count: v.len() as u64,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
        }
    }
}

/// Storage used by the run's telemetry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StorageFigures {
    /// Per chunk or partition: (range start, bytes now, compressed).
    pub parts: Vec<(String, i64, bool)>,
    /// Bytes of telemetry (tables and indexes) at the end.
    pub total_bytes: i64,
    /// TimescaleDB: bytes of the compressed chunks before and after compression.
    pub before_compression_bytes: Option<i64>,
    pub after_compression_bytes: Option<i64>,
    /// TimescaleDB: readings in the chunks compressed during the run.
    pub compressed_readings: Option<i64>,
}

/// Seconds from the run's start before the rollup lag counts: the first minutes cannot be
/// rolled up before they are a settle time old.
pub const ROLLUP_WARMUP_S: f64 = 180.0;

/// Now − the 1-minute rollup's watermark, in seconds (`None` before the first refresh or
/// when the database does not answer).
async fn rollup_lag(pool: &sqlx::PgPool) -> Option<f64> {
    sqlx::query_scalar::<_, Option<f64>>(
        "SELECT extract(epoch FROM clock_timestamp() - watermark)::float8 FROM telemetry_1m_state",
    )
    .fetch_one(pool)
    .await
    .ok()
    .flatten()
}

/// One statement's cost over the run, from pg_stat_statements.
#[derive(Debug, Clone, Serialize)]
pub struct StatementCost {
    /// The normalised statement, shortened to one line.
    pub query: String,
    pub calls: i64,
    pub rows: i64,
    /// Execution time (wall clock in the backend, ms): close to CPU for the statements of a
    /// CPU-bound run, but it also counts lock and I/O waits.
    pub total_ms: f64,
    /// `total_ms` as µs per accepted reading.
    pub us_per_reading: f64,
}

/// Everything a run found and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: u32,
    pub interval_s: f64,
    pub duration_s: f64,
    pub tenants: u32,
    pub auth: AuthMode,
    pub layout: String,
    /// The sink's `SINK_LATEST_INTERVAL` (s; 0: `device_latest` with every batch).
    pub sink_latest_interval_s: f64,
    pub offered_per_s: f64,
    /// The simulator's own summary line.
    pub simulator: String,
    pub accepted_per_s: f64,
    pub accounting: check::Accounting,
    pub alerts_expected: usize,
    pub alerts_actual: usize,
    pub alerts_missing: Vec<String>,
    pub alerts_unexpected: Vec<String>,
    pub offsets_at_end: bool,
    pub offsets_detail: Vec<String>,
    pub commit_latency: Quantiles,
    pub alert_latency: Quantiles,
    pub queryable_latency: Quantiles,
    /// Probes that never became visible within 60 s.
    pub probes_lost: u64,
    pub max_sink_lag: f64,
    pub max_evaluator_lag: f64,
    /// Largest rollup lag (now − watermark, s) once the run is past its first
    /// [`ROLLUP_WARMUP_S`], and the rollup lag when the fleet stopped sending.
    pub max_rollup_lag_s: Option<f64>,
    pub end_rollup_lag_s: Option<f64>,
    /// CPU seconds per process group over the run.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// CPU µs per accepted reading per process group.
    pub cpu_us_per_reading: BTreeMap<String, f64>,
    /// Backends seen waiting by the 1-s samples, by what they serve and what they waited
    /// for (`wait_event_type: wait_event`), summed over the samples: a rough measure of
    /// seconds spent waiting.
    pub postgres_waits: Vec<(String, String, u64)>,
    pub storage: StorageFigures,
    /// The run database's statements by total execution time (pg_stat_statements), most
    /// expensive first; empty when the server does not preload pg_stat_statements.
    pub statements: Vec<StatementCost>,
    pub faults: Vec<(f64, String)>,
    pub drain_s: f64,
    pub samples: usize,
    pub out_dir: PathBuf,
}

impl Report {
    /// The exact accounting held: no acknowledged reading lost, changed or duplicated,
    /// `device_latest` right, offsets at the end, alerts equal to the reference.
    pub fn is_exact(&self) -> bool {
        self.accounting.is_exact()
            && self.offsets_at_end
            && self.alerts_missing.is_empty()
            && self.alerts_unexpected.is_empty()
    }
}

/// The evaluator's allowed lateness in the run, and the reference's.
const EVALUATOR_LATENESS: Duration = Duration::from_secs(5);

/// The simulator process, killed if the run ends early (an error) while it still sends.
struct SimulatorProcess(std::process::Child);

impl Drop for SimulatorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Where the run's Kafka is.
enum Broker {
    Shared,
    Private(Box<PrivateKafka>),
}

impl Broker {
    fn pid(&mut self) -> Option<u32> {
        match self {
            Broker::Private(kafka) => kafka.running_pid(),
            Broker::Shared => {
                let state = std::env::var("FLEETSTREAM_STATE")
                    .unwrap_or_else(|_| "/var/lib/fleetstream".to_owned());
                std::fs::read_to_string(format!("{state}/kafka.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            }
        }
    }
}

/// What the sampling loop and the fault task share.
struct Shared {
    services: BTreeMap<&'static str, Service>,
    broker: Broker,
}

/// Runs the whole proof and writes the report; returns it. Fails only when the run could
/// not be carried out (a service that never became ready); an inexact account is a report
/// whose [`Report::is_exact`] is false.
pub async fn run(opts: Options) -> Result<Report> {
    let out_dir = match &opts.out {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(plumbing::testing::unique_name("fleet_e2e")),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let bin_dir = match &opts.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow!("no directory of the current executable"))?,
    };
    for bin in [
        "ingest-producer",
        "timescale-sink",
        "evaluator-stream",
        "query-api",
    ] {
        if !bin_dir.join(bin).is_file() {
            bail!(
                "{bin} not found in {}: build the services first (cargo build --release --bins) \
                 or pass --bin-dir",
                bin_dir.display()
            );
        }
    }
    let plan = opts.plan();
    let mut rng = StdRng::seed_from_u64(opts.seed);

    // Storage.
    let layout = match opts.layout {
        LayoutArg::Auto => LayoutChoice::Auto,
        LayoutArg::Timescaledb => LayoutChoice::TimescaleDb,
        LayoutArg::Postgres => LayoutChoice::Postgres,
    };
    let db = TestDb::with_options(StorageOptions {
        layout,
        compress_after: opts.compress_after,
        chunk_interval: opts.chunk_interval,
        ..StorageOptions::default()
    })
    .await?;
    if db.layout == Layout::TimescaleDb {
        let secs = |d: Duration| format!("{} seconds", d.as_secs().max(1));
        // Checked every minute, so that a chunk is compressed soon after `compress_after`.
        sqlx::query("SELECT remove_compression_policy('telemetry', if_exists => true)")
            .execute(&db.pool)
            .await?;
        sqlx::query(
            "SELECT add_compression_policy('telemetry', compress_after => $1::interval, \
                                           schedule_interval => INTERVAL '1 minute')",
        )
        .bind(secs(opts.compress_after))
        .execute(&db.pool)
        .await
        .context("adding the compression policy")?;
    }
    eprintln!(
        "[fleet_e2e] database {} ({}), report in {}",
        db.name,
        db.layout,
        out_dir.display()
    );

    // Kafka.
    let broker = if plan.contains_key(&FaultKind::RestartKafka) {
        Broker::Private(Box::new(PrivateKafka::new().await?))
    } else {
        Broker::Shared
    };
    let kafka_args = match &broker {
        Broker::Private(kafka) => kafka.kafka_args(),
        Broker::Shared => plumbing::testing::kafka_args().await?,
    };
    let topics = TestTopics::on(kafka_args, opts.partitions).await?;
    let kafka = topics.args.clone();

    // query-api connects as fleet_api, so row-level security applies (deploy/local/run.sh
    // does the same); the other services as the database owner, as run.sh starts them.
    let api_url: String = db
        .url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .username("fleet_api")
        .password("fleet_api")
        .to_url_lossy()
        .to_string();

    // API key.
    let key_out = std::process::Command::new(bin_dir.join("query-api"))
        .args([
            "create-key",
            "--role",
            "operator_admin",
            "--name",
            "fleet_e2e",
        ])
        .env("DATABASE_URL", &api_url)
        .env("RUST_LOG", "warn")
        .output()
        .context("query-api create-key")?;
    if !key_out.status.success() {
        bail!(
            "query-api create-key failed: {}",
            String::from_utf8_lossy(&key_out.stderr)
        );
    }
    let api_key = String::from_utf8_lossy(&key_out.stdout).trim().to_owned();

    // Services.
    let ingest_http = crate::free_addr()?;
    let api_http = crate::free_addr()?;
    let sink_group = format!("{}-sink", db.name);
    let evaluator_group = format!("{}-evaluator", db.name);
    let common = |name: &str, admin: std::net::SocketAddr| -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), db.url.clone()),
            (
                "KAFKA_BOOTSTRAP_SERVERS".into(),
                kafka.bootstrap_servers.clone(),
            ),
            ("TELEMETRY_TOPIC".into(), kafka.telemetry_topic.clone()),
            ("ALERTS_TOPIC".into(), kafka.alerts_topic.clone()),
            ("DLQ_TOPIC".into(), kafka.dlq_topic.clone()),
            ("ADMIN_LISTEN".into(), admin.to_string()),
            ("INSTANCE_ID".into(), format!("fleet-e2e-{name}")),
            (
                "RUST_LOG".into(),
                std::env::var("FLEET_E2E_LOG").unwrap_or_else(|_| "warn".into()),
            ),
            // A member killed without leaving is replaced after 6 s (the broker's minimum),
            // not the default 45 s.
            (
                "KAFKA_OPTIONS".into(),
                "session.timeout.ms=6000,heartbeat.interval.ms=1000".into(),
            ),
        ]
    };
    let ready_within = Duration::from_secs(120);
    let mut specs = Vec::new();
    let mut env = common("query-api", api_http);
    env.retain(|(k, _)| k != "ADMIN_LISTEN" && k != "KAFKA_OPTIONS" && k != "DATABASE_URL");
    env.push(("HTTP_LISTEN".into(), api_http.to_string()));
    env.push(("DATABASE_URL".into(), api_url.clone()));
    specs.push(ServiceSpec {
        name: "query-api",
        binary: bin_dir.join("query-api"),
        args: Vec::new(),
        env,
        admin: api_http,
        log: out_dir.join("query-api.log"),
    });
    let admin = crate::free_addr()?;
    let mut env = common("ingest", admin);
    env.retain(|(k, _)| k != "KAFKA_OPTIONS");
    env.push(("HTTP_LISTEN".into(), ingest_http.to_string()));
    // The fleet speaks HTTP; no MQTT listener on the default (fixed) port.
    env.push(("MQTT_LISTEN".into(), "off".into()));
    specs.push(ServiceSpec {
        name: "ingest",
        binary: bin_dir.join("ingest-producer"),
        args: Vec::new(),
        env,
        admin,
        log: out_dir.join("ingest.log"),
    });
    let admin = crate::free_addr()?;
    let mut env = common("sink", admin);
    env.push(("SINK_GROUP_ID".into(), sink_group.clone()));
    env.push((
        "SINK_LATEST_INTERVAL".into(),
        format!("{}ms", opts.sink_latest_interval.as_millis()),
    ));
    specs.push(ServiceSpec {
        name: "sink",
        binary: bin_dir.join("timescale-sink"),
        args: Vec::new(),
        env,
        admin,
        log: out_dir.join("sink.log"),
    });
    let admin = crate::free_addr()?;
    let mut env = common("evaluator", admin);
    env.push(("EVALUATOR_GROUP_ID".into(), evaluator_group.clone()));
    // From the first reading, as the reference evaluation reads the topic; the lateness the
    // reference applies; and no wall-clock moves of a partition's clock (a partition idle
    // during a fault would otherwise have its clock set to now − lateness, the one input a
    // replay of the topic cannot reproduce).
    env.push(("EVALUATOR_START_FROM".into(), "earliest".into()));
    env.push((
        "EVALUATOR_ALLOWED_LATENESS".into(),
        format!("{}ms", EVALUATOR_LATENESS.as_millis()),
    ));
    env.push(("EVALUATOR_IDLE_TIMEOUT".into(), "1h".into()));
    specs.push(ServiceSpec {
        name: "evaluator",
        binary: bin_dir.join("evaluator-stream"),
        args: Vec::new(),
        env,
        admin,
        log: out_dir.join("evaluator.log"),
    });
    let mut services = BTreeMap::new();
    for spec in specs {
        let name = spec.name;
        services.insert(name, Service::start(spec, ready_within).await?);
    }
    let shared = Arc::new(Mutex::new(Shared { services, broker }));

    // The fleet.
    let manifest = out_dir.join("manifest.bin");
    let simulator_log = out_dir.join("simulator.log");
    let simulator_out = out_dir.join("simulator.out");
    let mut sim_args: Vec<String> = vec![
        "simulate".into(),
        "--devices".into(),
        opts.devices.to_string(),
        "--interval".into(),
        format!("{}ms", opts.interval.as_millis()),
        "--duration".into(),
        format!("{}ms", opts.duration.as_millis()),
        "--tenants".into(),
        opts.tenants.to_string(),
        "--auth".into(),
        match opts.auth {
            AuthMode::Device => "device".into(),
            AuthMode::Gateway => "gateway".into(),
        },
        "--batch".into(),
        opts.batch.to_string(),
        "--concurrency".into(),
        opts.concurrency
            .unwrap_or(match opts.auth {
                AuthMode::Device => 2048,
                AuthMode::Gateway => 32,
            })
            .to_string(),
        "--url".into(),
        format!("http://{ingest_http}"),
        "--api-url".into(),
        format!("http://{api_http}"),
        "--provision".into(),
        "--manifest".into(),
        manifest.display().to_string(),
        "--seed".into(),
        opts.seed.to_string(),
    ];
    if opts.auth == AuthMode::Device {
        sim_args.push("--device-tokens".into());
        sim_args.push(out_dir.join("device-tokens.tsv").display().to_string());
    }
    let provisioned_at = Instant::now();
    let mut simulator = SimulatorProcess(
        std::process::Command::new(bin_dir.join("ingest-producer"))
            .args(&sim_args)
            .env("DATABASE_URL", &db.url)
            .env("FLEETSTREAM_API_KEY", &api_key)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&simulator_out)?)
            .stderr(std::fs::File::create(&simulator_log)?)
            .spawn()
            .context("starting the simulator")?,
    );
    let simulator_pid = simulator.0.id();

    // The probe device: its own token, created like any device.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let probe_tenant = format!("{}-probe", "sim");
    let probe = Probe::create(&client, api_http, ingest_http, &api_key, &probe_tenant).await?;

    // Wait for the simulator to begin sending (provisioning 100,000 devices takes a while):
    // the run's clock starts with its first accepted reading.
    let ingest_admin = shared.lock().await.services["ingest"].spec.admin;
    let mut accepted = prom::CounterTrack::default();
    let started_deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Some(status) = simulator.0.try_wait()? {
            bail!(
                "simulator exited before sending ({status}):\n{}",
                procs::tail(&simulator_log, 30)
            );
        }
        if let Ok((200, text)) = crate::http_get(ingest_admin, "/metrics").await {
            if prom::sum(
                &text,
                "fleetstream_ingest_messages_total",
                &[("outcome", "accepted")],
            ) > 0.0
            {
                break;
            }
        }
        if Instant::now() > started_deadline {
            bail!("the simulator did not start sending within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let provisioning_s = provisioned_at.elapsed().as_secs_f64();
    eprintln!("[fleet_e2e] fleet provisioned in {provisioning_s:.1}s; sending");
    let t0 = Instant::now();

    // Faults at random moments between 10 % and 85 % of the run.
    let mut schedule: Vec<(Duration, FaultKind)> = plan
        .iter()
        .flat_map(|(kind, n)| std::iter::repeat_n(*kind, *n as usize))
        .map(|kind| (opts.duration.mul_f64(rng.random_range(0.10..0.85)), kind))
        .collect();
    schedule.sort();
    let faults = Arc::new(std::sync::Mutex::new(Vec::<Fault>::new()));
    let fault_task = {
        let shared = shared.clone();
        let faults = faults.clone();
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for (at, kind) in schedule {
                tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + at)).await;
                let when = t0.elapsed().as_secs_f64();
                if let Ok(mut f) = faults.lock() {
                    f.push(Fault {
                        t_s: when,
                        label: kind.label().to_owned(),
                    });
                }
                eprintln!("[fleet_e2e] {:.1}s: {}", when, kind.label());
                let result = inject(kind, &shared, &pool, ready_within).await;
                if let Err(err) = result {
                    return Err(err.context(format!("injecting {}", kind.label())));
                }
            }
            Ok::<(), anyhow::Error>(())
        })
    };

    // Probe task.
    let probe_stop = plumbing::Shutdown::new();
    let probe_task = {
        let stop = probe_stop.clone();
        let client = client.clone();
        tokio::spawn(async move { probe.run(&client, stop).await })
    };

    // Sampling.
    let watermarks = watermark_consumer(&kafka)?;
    let mut samples: Vec<Sample> = Vec::new();
    let mut commit = prom::HistogramTrack::default();
    let mut alert = prom::HistogramTrack::default();
    let mut postgres_cpu: BTreeMap<String, CpuAccount> = BTreeMap::new();
    let mut postgres_waits: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut kafka_cpu = CpuAccount::default();
    let mut simulator_cpu = CpuAccount::default();
    let postmaster = postmaster_pid(&db.pool).await?;
    let statements_on = reset_statements(&db.pool).await;
    let mut last_tick = Instant::now();
    let mut last_scrape = Instant::now();
    let mut last_sink_scrape = Instant::now();
    let mut latest_devices = prom::CounterTrack::default();
    let mut rollup_readings = prom::CounterTrack::default();
    let mut machine_cpu = procs::MachineCpu::default();
    machine_cpu.busy_cores();
    let mut sink_lag_max: f64 = 0.0;
    let mut evaluator_lag_max: f64 = 0.0;
    let simulator_status = loop {
        let tick_at = last_tick + Duration::from_secs(1);
        tokio::time::sleep_until(tokio::time::Instant::from_std(tick_at)).await;
        last_tick = Instant::now();
        let mut sample = Sample {
            t_s: t0.elapsed().as_secs_f64(),
            ..Sample::default()
        };
        {
            let mut s = shared.lock().await;
            for service in s.services.values_mut() {
                service.sample_cpu();
            }
            if let Some(pid) = s.broker.pid() {
                kafka_cpu.sample(pid, false);
            }
            let admins: BTreeMap<&str, _> =
                s.services.iter().map(|(k, v)| (*k, v.spec.admin)).collect();
            drop(s);
            if let Ok((200, text)) = crate::http_get(admins["ingest"], "/metrics").await {
                // Over the time since the previous scrape (a fault holds the sampler up).
                let span = last_scrape.elapsed().as_secs_f64();
                last_scrape = Instant::now();
                let delta = accepted.update(prom::sum(
                    &text,
                    "fleetstream_ingest_messages_total",
                    &[("outcome", "accepted")],
                ));
                sample.accepted_per_s = delta / span.max(1e-3);
            }
            let (delta, sink_counters) =
                scrape_latencies(admins["sink"], admins["evaluator"], &mut commit, &mut alert)
                    .await;
            sample.commit_p99_ms = delta.and_then(|d| d.quantile(0.99)).map(|s| s * 1000.0);
            if let Some((latest, rollup)) = sink_counters {
                let span = last_sink_scrape.elapsed().as_secs_f64().max(1e-3);
                last_sink_scrape = Instant::now();
                sample.latest_devices_per_s = latest_devices.update(latest) / span;
                sample.rollup_readings_per_s = rollup_readings.update(rollup) / span;
            }
        }
        sample.busy_cores = machine_cpu.busy_cores();
        simulator_cpu.sample(simulator_pid, true);
        sample_postgres_cpu(&db.pool, postmaster, &mut postgres_cpu, false).await;
        sample_postgres_waits(&db.pool, &mut postgres_waits).await;
        // Stored offsets first, end offsets after: the other order could see a commit of
        // offsets past the end read a moment earlier.
        let sink_stored = stored_offsets(
            &db.pool,
            &sink_group,
            &kafka.telemetry_topic,
            opts.partitions,
        )
        .await;
        let evaluator_stored = stored_offsets(
            &db.pool,
            &evaluator_group,
            &kafka.telemetry_topic,
            opts.partitions,
        )
        .await;
        if let Ok(ends) = end_offsets(&watermarks, &kafka.telemetry_topic, opts.partitions).await {
            let total_end: i64 = ends.iter().sum();
            if let Ok(stored) = sink_stored {
                sample.sink_lag = (total_end - stored.iter().sum::<i64>()) as f64;
                sink_lag_max = sink_lag_max.max(sample.sink_lag);
            }
            if let Ok(stored) = evaluator_stored {
                sample.evaluator_lag = (total_end - stored.iter().sum::<i64>()) as f64;
                evaluator_lag_max = evaluator_lag_max.max(sample.evaluator_lag);
            }
        }
        sample.rollup_lag_s = rollup_lag(&db.pool).await;
        samples.push(sample);
        if samples.len().is_multiple_of(30) {
            if let Some(s) = samples.last() {
                eprintln!(
                    "[fleet_e2e] {:.0}s: accepted {:.0}/s, commit p99 {} ms, lag sink {:.0} evaluator {:.0}, rollup lag {} s",
                    s.t_s,
                    s.accepted_per_s,
                    s.commit_p99_ms.map_or("-".into(), |v| format!("{v:.0}")),
                    s.sink_lag,
                    s.evaluator_lag,
                    s.rollup_lag_s.map_or("-".into(), |v| format!("{v:.0}"))
                );
            }
        }
        if let Some(status) = simulator.0.try_wait()? {
            break status;
        }
    };
    let send_s = t0.elapsed().as_secs_f64();
    probe_stop.cancel();
    let probes = probe_task.await.map_err(|e| anyhow!("probe task: {e}"))?;
    match fault_task.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(err),
        Err(err) => bail!("fault task: {err}"),
    }
    if !simulator_status.success() {
        bail!(
            "simulator failed ({simulator_status}):\n{}",
            procs::tail(&simulator_log, 30)
        );
    }
    let simulator_summary = std::fs::read_to_string(&simulator_out)?.trim().to_owned();
    eprintln!("[fleet_e2e] {simulator_summary}");

    // Drain: both groups' stored offsets reach the end offsets.
    let drain_started = Instant::now();
    let mut offsets_detail = Vec::new();
    let mut offsets_at_end = false;
    while drain_started.elapsed() < opts.drain_timeout {
        let sink = stored_offsets(
            &db.pool,
            &sink_group,
            &kafka.telemetry_topic,
            opts.partitions,
        )
        .await?;
        let evaluator = stored_offsets(
            &db.pool,
            &evaluator_group,
            &kafka.telemetry_topic,
            opts.partitions,
        )
        .await?;
        // Read after the stored offsets, every round: a request whose client gave up during
        // a fault may still have been written since.
        let ends = end_offsets(&watermarks, &kafka.telemetry_topic, opts.partitions).await?;
        let latest_behind = latest_behind(&db.pool, &sink_group, &kafka.telemetry_topic).await?;
        offsets_detail = (0..opts.partitions as usize)
            .filter(|p| {
                sink.get(*p) != ends.get(*p)
                    || evaluator.get(*p) != ends.get(*p)
                    || latest_behind.contains(&(*p as i32))
            })
            .map(|p| {
                format!(
                    "partition {p}: end {:?}, sink {:?}, evaluator {:?}{}",
                    ends.get(p),
                    sink.get(p),
                    evaluator.get(p),
                    if latest_behind.contains(&(p as i32)) {
                        ", device_latest behind"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        if offsets_detail.is_empty() {
            offsets_at_end = true;
            break;
        }
        let mut s = shared.lock().await;
        for service in s.services.values_mut() {
            service.sample_cpu();
        }
        let (sink_admin, evaluator_admin) = (
            s.services["sink"].spec.admin,
            s.services["evaluator"].spec.admin,
        );
        drop(s);
        // The drain's readings belong in the latency figures too.
        scrape_latencies(sink_admin, evaluator_admin, &mut commit, &mut alert).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    {
        let s = shared.lock().await;
        let (sink_admin, evaluator_admin) = (
            s.services["sink"].spec.admin,
            s.services["evaluator"].spec.admin,
        );
        drop(s);
        scrape_latencies(sink_admin, evaluator_admin, &mut commit, &mut alert).await;
    }
    eprintln!("[fleet_e2e] drained in {drain_s:.1}s (offsets at end: {offsets_at_end})");
    {
        let mut s = shared.lock().await;
        for service in s.services.values_mut() {
            service.sample_cpu();
        }
        if let Some(pid) = s.broker.pid() {
            kafka_cpu.sample(pid, false);
        }
    }
    sample_postgres_cpu(&db.pool, postmaster, &mut postgres_cpu, false).await;

    // The account. TimescaleDB's job workers go on after the fleet stopped (a chunk is often
    // compressed while the account runs), and the storage figures count the readings they
    // compressed, so their CPU is sampled until those figures are read.
    let checks = async {
        let accounting = check::account(&db.pool, &manifest).await?;
        let rules = crate::reference::load_rules(&db.pool).await?;
        let no_data: Vec<i64> = rules
            .iter()
            .filter(|r| r.kind == "no_data")
            .map(|r| r.rule_id)
            .collect();
        let mut reference = crate::reference::Reference::new(rules, EVALUATOR_LATENESS);
        let replay_args = kafka.clone();
        let topic = kafka.telemetry_topic.clone();
        let reference = tokio::task::spawn_blocking(move || {
            crate::reference::replay_topic(&replay_args, &topic, &mut reference).map(|_| reference)
        })
        .await
        .map_err(|e| anyhow!("reference task: {e}"))??;
        let expected = reference.episodes();
        let actual = crate::reference::load_alert_episodes(&db.pool, &no_data).await?;
        let comparison = crate::reference::compare(&expected, &actual);
        let storage = match storage_figures(&db.pool, db.layout).await {
            Ok(storage) => storage,
            Err(err) => {
                eprintln!("[fleet_e2e] storage figures unavailable: {err:#}");
                StorageFigures::default()
            }
        };
        Ok::<_, anyhow::Error>((accounting, comparison, storage))
    };
    let (accounting, comparison, storage) = {
        tokio::pin!(checks);
        let mut jobs_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                out = &mut checks => break out?,
                _ = jobs_tick.tick() => {
                    sample_postgres_cpu(&db.pool, postmaster, &mut postgres_cpu, true).await;
                }
            }
        }
    };

    let statements = if statements_on {
        match statement_costs(&db.pool, accounting.accepted.max(1) as f64).await {
            Ok(statements) => statements,
            Err(err) => {
                eprintln!("[fleet_e2e] statement costs unavailable: {err:#}");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };

    // Stop the services.
    {
        let mut s = shared.lock().await;
        for service in s.services.values_mut() {
            service.terminate(Duration::from_secs(40)).await;
        }
    }

    let accepted_total = accounting.accepted.max(1) as f64;
    let mut cpu_seconds = BTreeMap::new();
    {
        let s = shared.lock().await;
        for (name, service) in &s.services {
            cpu_seconds.insert((*name).to_owned(), service.cpu.total());
        }
    }
    cpu_seconds.insert("kafka".to_owned(), kafka_cpu.total());
    cpu_seconds.insert("simulator".to_owned(), simulator_cpu.total());
    for (role, account) in &postgres_cpu {
        cpu_seconds.insert(format!("postgres: {role}"), account.total());
    }
    let cpu_us_per_reading = cpu_seconds
        .iter()
        .map(|(k, v)| (k.clone(), v * 1e6 / accepted_total))
        .collect();
    let faults = faults.lock().map(|f| f.clone()).unwrap_or_default();
    let show = |e: &crate::reference::Episode| format!("{e:?}");
    let report = Report {
        devices: opts.devices,
        interval_s: opts.interval.as_secs_f64(),
        duration_s: opts.duration.as_secs_f64(),
        tenants: opts.tenants,
        auth: opts.auth,
        layout: db.layout.to_string(),
        sink_latest_interval_s: opts.sink_latest_interval.as_secs_f64(),
        offered_per_s: f64::from(opts.devices) / opts.interval.as_secs_f64(),
        simulator: simulator_summary,
        accepted_per_s: accounting.accepted as f64 / send_s.max(1e-9),
        accounting,
        alerts_expected: comparison.expected,
        alerts_actual: comparison.actual,
        alerts_missing: comparison.missing.iter().take(20).map(show).collect(),
        alerts_unexpected: comparison.unexpected.iter().take(20).map(show).collect(),
        offsets_at_end,
        offsets_detail,
        commit_latency: Quantiles::of_histogram(&commit.total),
        alert_latency: Quantiles::of_histogram(&alert.total),
        queryable_latency: Quantiles::of_samples(probes.latencies),
        probes_lost: probes.lost,
        max_sink_lag: sink_lag_max,
        max_evaluator_lag: evaluator_lag_max,
        max_rollup_lag_s: samples
            .iter()
            .filter(|s| s.t_s >= ROLLUP_WARMUP_S)
            .filter_map(|s| s.rollup_lag_s)
            .reduce(f64::max),
        end_rollup_lag_s: samples.last().and_then(|s| s.rollup_lag_s),
        cpu_seconds,
        cpu_us_per_reading,
        postgres_waits: {
            let mut waits: Vec<(String, String, u64)> = postgres_waits
                .into_iter()
                .map(|((role, event), n)| (role, event, n))
                .collect();
            waits.sort_by_key(|b| std::cmp::Reverse(b.2));
            waits
        },
        storage,
        statements,
        faults: faults.iter().map(|f| (f.t_s, f.label.clone())).collect(),
        drain_s,
        samples: samples.len(),
        out_dir: out_dir.clone(),
    };
    write_report(&report, &samples, &faults, &out_dir)?;
    if opts.keep_database {
        eprintln!("[fleet_e2e] keeping database {}", db.name);
        std::mem::forget(db);
    }
    Ok(report)
}

/// Scrapes the sink's ingest→commit and the evaluator's alert-latency histograms into their
/// tracks; returns what the sink observed since the previous scrape.
async fn scrape_latencies(
    sink: std::net::SocketAddr,
    evaluator: std::net::SocketAddr,
    commit: &mut prom::HistogramTrack,
    alert: &mut prom::HistogramTrack,
) -> (Option<prom::Histogram>, Option<(f64, f64)>) {
    let mut delta = None;
    let mut counters = None;
    if let Ok((200, text)) = crate::http_get(sink, "/metrics").await {
        if let Some(h) = prom::histogram(&text, "fleetstream_sink_ingest_to_commit_seconds") {
            delta = Some(commit.update(h));
        }
        counters = Some((
            prom::sum(&text, "fleetstream_sink_latest_flushed_devices_total", &[]),
            prom::sum(
                &text,
                "fleetstream_sink_rollup_readings_aggregated_total",
                &[],
            ),
        ));
    }
    if let Ok((200, text)) = crate::http_get(evaluator, "/metrics").await {
        if let Some(h) = prom::histogram(&text, "fleetstream_evaluator_alert_latency_seconds") {
            alert.update(h);
        }
    }
    (delta, counters)
}

/// Carries out one fault.
async fn inject(
    kind: FaultKind,
    shared: &Arc<Mutex<Shared>>,
    pool: &sqlx::PgPool,
    ready_within: Duration,
) -> Result<()> {
    let service = match kind {
        FaultKind::KillSink => "sink",
        FaultKind::KillEvaluator => "evaluator",
        FaultKind::KillIngest => "ingest",
        FaultKind::RestartKafka => {
            let mut s = shared.lock().await;
            if let Broker::Private(kafka) = &mut s.broker {
                kafka.stop().await?;
                kafka.start().await?;
            }
            return Ok(());
        }
        FaultKind::RestartPostgres => {
            let row = sqlx::query("SELECT current_setting('cluster_name')")
                .fetch_one(pool)
                .await?;
            let cluster: String = row.try_get(0)?;
            let (version, name) = cluster
                .split_once('/')
                .ok_or_else(|| anyhow!("cluster_name {cluster:?} is not version/name"))?;
            let status = tokio::process::Command::new("pg_ctlcluster")
                .args([version, name, "restart", "-m", "fast"])
                .status()
                .await
                .context("pg_ctlcluster restart")?;
            if !status.success() {
                bail!("pg_ctlcluster {version} {name} restart: {status}");
            }
            return Ok(());
        }
    };
    // Kill and restart while holding the lock: the sampler waits for the restart.
    let mut s = shared.lock().await;
    let service = s
        .services
        .get_mut(service)
        .ok_or_else(|| anyhow!("no service {service}"))?;
    service.restart(ready_within).await
}

/// A device of its own that sends one reading a second and polls query-api until the
/// reading is visible: ingest→queryable latency.
struct Probe {
    api: std::net::SocketAddr,
    ingest: std::net::SocketAddr,
    api_key: String,
    tenant: String,
    device: String,
    token: String,
}

#[derive(Debug, Default)]
struct ProbeResults {
    /// Seconds from the POST to the first read that showed the reading.
    latencies: Vec<f64>,
    lost: u64,
}

impl Probe {
    async fn create(
        client: &reqwest::Client,
        api: std::net::SocketAddr,
        ingest: std::net::SocketAddr,
        api_key: &str,
        tenant: &str,
    ) -> Result<Probe> {
        let created = client
            .post(format!("http://{api}/v1/tenants"))
            .bearer_auth(api_key)
            .header("content-type", "application/json")
            .body(serde_json::json!({"tenant_id": tenant, "name": "latency probe"}).to_string())
            .send()
            .await?;
        if !created.status().is_success() && created.status().as_u16() != 409 {
            bail!("creating probe tenant: {}", created.text().await?);
        }
        let device = "probe-0001".to_owned();
        let created = client
            .post(format!("http://{api}/v1/devices?tenant={tenant}"))
            .bearer_auth(api_key)
            .header("content-type", "application/json")
            .body(serde_json::json!({"device_id": device}).to_string())
            .send()
            .await?;
        let status = created.status();
        let body: serde_json::Value =
            serde_json::from_slice(&created.bytes().await?).unwrap_or_default();
        let token = body
            .get("token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("creating probe device: {status} {body}"))?
            .to_owned();
        Ok(Probe {
            api,
            ingest,
            api_key: api_key.to_owned(),
            tenant: tenant.to_owned(),
            device,
            token,
        })
    }

    async fn run(self, client: &reqwest::Client, stop: plumbing::Shutdown) -> ProbeResults {
        let mut results = ProbeResults::default();
        let mut seq = 0i64;
        while !stop.is_cancelled() {
            let round = Instant::now();
            seq += 1;
            let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let body = serde_json::json!({"seq": seq, "time": time, "metrics": {"probe": seq}});
            let sent = Instant::now();
            let posted = client
                .post(format!("http://{}/v1/telemetry", self.ingest))
                .bearer_auth(&self.token)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            // Only acknowledged probes are timed (a fault may refuse one).
            if posted.is_ok_and(|r| r.status().as_u16() == 202) {
                let deadline = sent + Duration::from_secs(60);
                let url = format!(
                    "http://{}/v1/devices/{}/latest?tenant={}",
                    self.api, self.device, self.tenant
                );
                let mut seen = false;
                while Instant::now() < deadline && !stop.is_cancelled() {
                    let latest = client.get(&url).bearer_auth(&self.api_key).send().await;
                    if let Ok(response) = latest {
                        let body = response.bytes().await.unwrap_or_default();
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                            if v.get("seq").and_then(|s| s.as_i64()) >= Some(seq) {
                                results.latencies.push(sent.elapsed().as_secs_f64());
                                seen = true;
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !seen && !stop.is_cancelled() {
                    results.lost += 1;
                }
            }
            let next = round + Duration::from_secs(1);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {}
            }
        }
        results
    }
}

fn watermark_consumer(kafka: &KafkaArgs) -> Result<Arc<BaseConsumer>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", "fleet-e2e-watermarks")
        .set("enable.auto.commit", "false");
    Ok(Arc::new(config.create()?))
}

/// High watermarks (end offsets) of every partition.
async fn end_offsets(
    consumer: &Arc<BaseConsumer>,
    topic: &str,
    partitions: i32,
) -> Result<Vec<i64>> {
    let consumer = consumer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(2))
                    .map(|(_, high)| high)
                    .map_err(anyhow::Error::from)
            })
            .collect()
    })
    .await?
}

/// Offsets a group stored in PostgreSQL, by partition (0 where none yet).
async fn stored_offsets(
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<i64>> {
    let rows = sqlx::query(
        "SELECT partition, next_offset FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await?;
    let mut out = vec![0; partitions.max(0) as usize];
    for row in rows {
        let p: i32 = row.try_get(0)?;
        let next: i64 = row.try_get(1)?;
        let p = p as usize;
        if out.len() <= p {
            out.resize(p + 1, 0);
        }
        out[p] = next;
    }
    Ok(out)
}

/// Partitions whose `device_latest` is behind their stored rows (`latest_next_offset` set,
/// migration 0017).
async fn latest_behind(pool: &sqlx::PgPool, group: &str, topic: &str) -> Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT partition FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND latest_next_offset IS NOT NULL",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await?)
}

async fn postmaster_pid(pool: &sqlx::PgPool) -> Result<u32> {
    let row = sqlx::query("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await?;
    let backend: i32 = row.try_get(0)?;
    procs::parent_pid(backend as u32).ok_or_else(|| {
        anyhow!("PostgreSQL backend {backend} is not visible in /proc: the server must run on this machine")
    })
}

/// CPU of every PostgreSQL process, by what it serves: the service (application_name) of a
/// client backend, or the backend type (TimescaleDB jobs, autovacuum, checkpointer, WAL
/// writer, ...). With `jobs_only`, of TimescaleDB's job workers only.
async fn sample_postgres_cpu(
    pool: &sqlx::PgPool,
    postmaster: u32,
    accounts: &mut BTreeMap<String, CpuAccount>,
    jobs_only: bool,
) {
    let roles: BTreeMap<u32, String> = match sqlx::query(
        "SELECT pid, coalesce(nullif(application_name, ''), backend_type) FROM pg_stat_activity",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| {
                let pid: i32 = r.try_get(0).ok()?;
                let role: String = r.try_get(1).ok()?;
                Some((pid as u32, role))
            })
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    for pid in procs::children_of(postmaster) {
        let role = roles.get(&pid).map_or("other", String::as_str);
        let role = if role.starts_with("TimescaleDB")
            || role.contains(" Policy [")
            || role.starts_with("Compression")
        {
            "timescaledb jobs"
        } else if jobs_only {
            continue;
        } else {
            role
        };
        // Backends started during the run count from their start; those that were already
        // there (the server's own processes) from the first sample.
        accounts
            .entry(role.to_owned())
            .or_default()
            .sample(pid, false);
    }
}

/// Counts the run database's backends waiting right now, by what they serve and what they
/// wait for (locks, I/O, buffer pins, LWLocks; not idle clients or background sleeps).
async fn sample_postgres_waits(pool: &sqlx::PgPool, waits: &mut BTreeMap<(String, String), u64>) {
    let Ok(rows) = sqlx::query(
        "SELECT coalesce(nullif(application_name, ''), backend_type), \
                wait_event_type || ': ' || wait_event, count(*) \
         FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND wait_event_type IN ('Lock', 'LWLock', 'IO', 'BufferPin') \
         GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await
    else {
        return;
    };
    for row in rows {
        if let (Ok(role), Ok(event), Ok(n)) = (
            row.try_get::<String, _>(0),
            row.try_get::<String, _>(1),
            row.try_get::<i64, _>(2),
        ) {
            *waits.entry((role, event)).or_default() += n.max(0) as u64;
        }
    }
}

/// Starts pg_stat_statements afresh for the run's database. False (and a note) when the
/// server does not preload it (deps.sh does).
async fn reset_statements(pool: &sqlx::PgPool) -> bool {
    let result = async {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(pool)
            .await?;
        sqlx::query(
            "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database \
             WHERE datname = current_database()), 0)",
        )
        .execute(pool)
        .await?;
        Ok::<_, sqlx::Error>(())
    }
    .await;
    match result {
        Ok(()) => true,
        Err(err) => {
            eprintln!("[fleet_e2e] no statement costs (pg_stat_statements not preloaded?): {err}");
            false
        }
    }
}

/// The run database's 15 most expensive statements.
async fn statement_costs(pool: &sqlx::PgPool, accepted: f64) -> Result<Vec<StatementCost>> {
    let rows = sqlx::query(
        "SELECT query, calls, rows, total_exec_time FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         ORDER BY total_exec_time DESC LIMIT 15",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let query: String = row.try_get(0)?;
        let mut query = query.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some((cut, _)) = query.char_indices().nth(160) {
            query.truncate(cut);
            query.push('…');
        }
        let total_ms: f64 = row.try_get(3)?;
        out.push(StatementCost {
            query,
            calls: row.try_get(1)?,
            rows: row.try_get(2)?,
            total_ms,
            us_per_reading: total_ms * 1e3 / accepted,
        });
    }
    Ok(out)
}

/// Storage of the run's telemetry: per chunk (TimescaleDB) or partition.
async fn storage_figures(pool: &sqlx::PgPool, layout: Layout) -> Result<StorageFigures> {
    let mut figures = StorageFigures::default();
    if layout == Layout::TimescaleDb {
        let rows = sqlx::query(
            "SELECT c.range_start::text, s.total_bytes, c.is_compressed \
             FROM timescaledb_information.chunks c \
             JOIN chunks_detailed_size('telemetry') s \
               ON s.chunk_schema = c.chunk_schema AND s.chunk_name = c.chunk_name \
             WHERE c.hypertable_name = 'telemetry' ORDER BY c.range_start",
        )
        .fetch_all(pool)
        .await?;
        for row in rows {
            figures
                .parts
                .push((row.try_get(0)?, row.try_get::<i64, _>(1)?, row.try_get(2)?));
        }
        let stats = sqlx::query(
            "SELECT before_compression_total_bytes, after_compression_total_bytes \
             FROM hypertable_compression_stats('telemetry')",
        )
        .fetch_optional(pool)
        .await?;
        if let Some(row) = stats {
            figures.before_compression_bytes = row.try_get(0)?;
            figures.after_compression_bytes = row.try_get(1)?;
        }
        // The catalog holds each compressed chunk's row count from before compression.
        let row = sqlx::query(
            "SELECT sum(s.numrows_pre_compression)::int8 \
             FROM _timescaledb_catalog.compression_chunk_size s \
             JOIN _timescaledb_catalog.chunk c ON c.id = s.chunk_id \
             JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id \
             WHERE h.table_name = 'telemetry'",
        )
        .fetch_one(pool)
        .await?;
        figures.compressed_readings = row.try_get(0)?;
        let row = sqlx::query("SELECT hypertable_size('telemetry')")
            .fetch_one(pool)
            .await?;
        figures.total_bytes = row.try_get::<Option<i64>, _>(0)?.unwrap_or(0);
    } else {
        let rows = sqlx::query(
            "SELECT c.relname::text, pg_total_relation_size(c.oid) \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'telemetry'::regclass ORDER BY c.relname",
        )
        .fetch_all(pool)
        .await?;
        for row in rows {
            let bytes: i64 = row.try_get(1)?;
            figures.total_bytes += bytes;
            figures.parts.push((row.try_get(0)?, bytes, false));
        }
    }
    Ok(figures)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.1}"))
}

/// `report.md`, `report.json`, `samples.csv` (one line per sample) and `chart.png` in `dir`.
fn write_report(report: &Report, samples: &[Sample], faults: &[Fault], dir: &Path) -> Result<()> {
    let a = &report.accounting;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# fleet_e2e: {} devices every {} s for {} s ({} auth, {} layout, device_latest {})\n",
        report.devices,
        report.interval_s,
        report.duration_s,
        match report.auth {
            AuthMode::Device => "device",
            AuthMode::Gateway => "gateway",
        },
        report.layout,
        if report.sink_latest_interval_s > 0.0 {
            format!("every {} s", report.sink_latest_interval_s)
        } else {
            "with every batch".to_owned()
        }
    );
    let _ = writeln!(
        md,
        "**Exact: {}**\n\nSimulator: `{}`\n",
        if report.is_exact() { "yes" } else { "NO" },
        report.simulator
    );
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    let rows: Vec<(&str, String)> = vec![
        ("offered", format!("{:.0} msg/s", report.offered_per_s)),
        ("accepted", format!("{:.0} msg/s", report.accepted_per_s)),
        (
            "readings sent / accepted / not accepted",
            format!("{} / {} / {}", a.sent, a.accepted, a.not_accepted),
        ),
        ("accepted and stored as sent", a.stored_as_sent.to_string()),
        (
            "lost / altered / phantom / duplicate rows",
            format!(
                "{} / {} / {} / {}",
                a.lost, a.altered, a.phantom, a.duplicate_rows
            ),
        ),
        (
            "not accepted but stored (reply lost)",
            a.stored_not_accepted.to_string(),
        ),
        (
            "device_latest: devices / mismatches / extra",
            format!(
                "{} / {} / {}",
                a.devices_with_readings, a.latest_mismatches, a.latest_extra
            ),
        ),
        (
            "stored offsets = end offsets (both groups)",
            report.offsets_at_end.to_string(),
        ),
        (
            "alerts: reference / actual / missing / unexpected",
            format!(
                "{} / {} / {} / {}",
                report.alerts_expected,
                report.alerts_actual,
                report.alerts_missing.len(),
                report.alerts_unexpected.len()
            ),
        ),
        (
            "ingest→commit p50 / p99 / p99.9 (ms, sink histogram)",
            format!(
                "{} / {} / {}",
                ms(report.commit_latency.p50_ms),
                ms(report.commit_latency.p99_ms),
                ms(report.commit_latency.p999_ms)
            ),
        ),
        (
            "ingest→queryable p50 / p99 / p99.9 (ms, probe)",
            format!(
                "{} / {} / {} ({} probes, {} never visible)",
                ms(report.queryable_latency.p50_ms),
                ms(report.queryable_latency.p99_ms),
                ms(report.queryable_latency.p999_ms),
                report.queryable_latency.count,
                report.probes_lost
            ),
        ),
        (
            "alert latency p50 / p99 (ms, evaluator histogram)",
            format!(
                "{} / {}",
                ms(report.alert_latency.p50_ms),
                ms(report.alert_latency.p99_ms)
            ),
        ),
        (
            "max lag sink / evaluator (messages)",
            format!(
                "{:.0} / {:.0}",
                report.max_sink_lag, report.max_evaluator_lag
            ),
        ),
        (
            "rollup lag: largest after the first 3 min / when the fleet stopped (s)",
            format!(
                "{} / {}",
                report
                    .max_rollup_lag_s
                    .map_or("-".into(), |v| format!("{v:.0}")),
                report
                    .end_rollup_lag_s
                    .map_or("-".into(), |v| format!("{v:.0}"))
            ),
        ),
        (
            "drain after the fleet stopped",
            format!("{:.1} s", report.drain_s),
        ),
        (
            "telemetry size at end",
            format!("{:.1} MB", report.storage.total_bytes as f64 / 1e6),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    if let (Some(before), Some(after)) = (
        report.storage.before_compression_bytes,
        report.storage.after_compression_bytes,
    ) {
        let _ = writeln!(
            md,
            "| compressed chunks: before / after | {:.1} MB / {:.1} MB |",
            before as f64 / 1e6,
            after as f64 / 1e6
        );
    }
    let _ = writeln!(
        md,
        "\n## CPU per accepted reading\n\n| process | CPU s | µs/reading |\n|---|---|---|"
    );
    let mut total = 0.0;
    for (name, seconds) in &report.cpu_seconds {
        let per = report.cpu_us_per_reading.get(name).copied().unwrap_or(0.0);
        if name != "simulator" {
            total += per;
        }
        let _ = writeln!(md, "| {name} | {seconds:.1} | {per:.1} |");
    }
    let _ = writeln!(
        md,
        "| **pipeline (all but the simulator)** | | **{total:.1}** |"
    );
    // A run compresses only the chunks that ended early enough, so the jobs' CPU per
    // accepted reading understates what compressing every reading costs; per reading
    // compressed it does not.
    if let (Some(compressed), Some(jobs)) = (
        report.storage.compressed_readings.filter(|n| *n > 0),
        report.cpu_seconds.get("postgres: timescaledb jobs"),
    ) {
        let per_compressed = jobs * 1e6 / compressed as f64;
        let counted = report
            .cpu_us_per_reading
            .get("postgres: timescaledb jobs")
            .copied()
            .unwrap_or(0.0);
        let _ = writeln!(
            md,
            "\nTimescaleDB jobs (compression): {jobs:.1} CPU s for {compressed} readings \
             compressed, **{per_compressed:.1} µs per reading compressed**. Once every reading \
             is compressed, the pipeline costs **{:.1} µs per reading** ({total:.1} − {counted:.1} \
             + {per_compressed:.1}).",
            total - counted + per_compressed
        );
    }
    if !report.postgres_waits.is_empty() {
        let _ = writeln!(
            md,
            "\n## PostgreSQL waits (backends seen waiting by the 1-s samples)\n\n\
             | backend | wait | samples |\n|---|---|---|"
        );
        for (role, event, n) in report.postgres_waits.iter().take(15) {
            let _ = writeln!(md, "| {role} | {event} | {n} |");
        }
    }
    if !report.faults.is_empty() {
        let _ = writeln!(md, "\n## Faults\n");
        for (t, label) in &report.faults {
            let _ = writeln!(md, "- {t:.1} s: {label}");
        }
    }
    if !report.storage.parts.is_empty() {
        let _ = writeln!(md, "\n## Storage per chunk/partition\n\n| range start / name | MB | compressed |\n|---|---|---|");
        for (name, bytes, compressed) in &report.storage.parts {
            let _ = writeln!(md, "| {name} | {:.1} | {compressed} |", *bytes as f64 / 1e6);
        }
    }
    if !report.statements.is_empty() {
        let _ = writeln!(
            md,
            "\n## Statements by execution time (pg_stat_statements, the run's database)\n\n\
             On TimescaleDB a `COPY` into a hypertable (the sink's `COPY telemetry`) is not \
             listed: TimescaleDB runs it in its own utility hook, which pg_stat_statements \
             does not see; the sink's `fleetstream_sink_copy_duration_seconds` times it.\n\n\
             | µs per reading | total s | calls | rows | statement |\n|---|---|---|---|---|"
        );
        for st in &report.statements {
            let _ = writeln!(
                md,
                "| {:.1} | {:.1} | {} | {} | `{}` |",
                st.us_per_reading,
                st.total_ms / 1e3,
                st.calls,
                st.rows,
                st.query.replace('|', "\\|").replace('`', "'")
            );
        }
    }
    let problems: Vec<&String> = a
        .examples
        .iter()
        .chain(&report.alerts_missing)
        .chain(&report.alerts_unexpected)
        .chain(&report.offsets_detail)
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(md, "\n## Discrepancies (first ones)\n");
        for p in problems {
            let _ = writeln!(md, "- {p}");
        }
    }
    let _ = writeln!(md, "\n![run](chart.png)");
    std::fs::write(dir.join("report.md"), md)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    let mut csv = format!("{}\n", Sample::CSV_HEADER);
    for sample in samples {
        let _ = writeln!(csv, "{}", sample.csv_row());
    }
    std::fs::write(dir.join("samples.csv"), csv)?;
    crate::report::write_chart(
        &dir.join("chart.png"),
        &format!(
            "{} devices / {} s, {} layout",
            report.devices, report.interval_s, report.layout
        ),
        samples,
        faults,
    )?;
    Ok(())
}
