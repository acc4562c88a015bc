//! `ingest-producer simulate`: N virtual devices sending readings at a steady rate, for demos
//! and load tests.
//!
//! Every device sends once per `--interval`, at a phase spread evenly over the interval plus
//! ±10 % jitter, so the offered rate is `devices / interval` msg/s. Readings follow simple
//! profiles: temperature as a random walk with rare spikes, humidity bounded around 50 %,
//! battery draining, signal strength with noise; now and then a device goes silent for a
//! while, so no-data and threshold alerts have something to trip on.
//!
//! `--via http` posts batches (`--batch`) to `POST /v1/telemetry` with one gateway token per
//! tenant; `--via kafka` encodes and produces directly, measuring the producer alone. Requests
//! in flight are bounded (`--concurrency`); when the target cannot keep up the simulator falls
//! behind instead of queueing without bound, and the achieved rate says so. `--provision`
//! creates the tenants, devices and gateway tokens first (needs `DATABASE_URL` of a role that
//! may insert them). Simulator tokens are derived from `--token-secret`: for demos and load
//! tests, not for production tenants.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Write;
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
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::credentials::token_hash;
use crate::producer::{Outgoing, Producer};

/// How readings reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Through the ingest HTTP endpoint.
    Http,
    /// Straight to the telemetry topic.
    Kafka,
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
    /// Each device sends one reading per interval.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Devices are spread round-robin over this many tenants.
    #[arg(long, default_value_t = 1)]
    pub tenants: u32,
    /// Through the HTTP endpoint or straight to Kafka.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Stop after this long (default: until SIGTERM/SIGINT).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Base URL of the ingest endpoint.
    #[arg(long, env = "INGEST_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Readings per HTTP request (per Kafka send round with `--via kafka`).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Requests in flight at once; bounds memory when the target is slower than the load.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Create tenants, devices and gateway tokens first.
    #[arg(long)]
    pub provision: bool,
    /// PostgreSQL URL for `--provision`.
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub database_url: Option<String>,
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
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

impl SimulateArgs {
    /// Id of simulated tenant number `tenant`.
    pub fn tenant_id(&self, tenant: u32) -> String {
        format!("{}-t{tenant}", self.prefix)
    }

    fn device_id(&self, device: u32) -> String {
        format!("{}-d{device:06}", self.prefix)
    }

    /// The gateway token of a simulated tenant.
    pub fn gateway_token(&self, tenant_id: &str) -> String {
        format!("{}-{tenant_id}", self.token_secret)
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
    #[error(transparent)]
    Service(#[from] crate::Error),
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
    /// Readings refused or failed.
    pub failed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Request latencies (HTTP) or send-round latencies (Kafka), sorted.
    pub latencies: Vec<Duration>,
}

impl Summary {
    /// Accepted readings per second.
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of the latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
        tokens: HashMap<u32, String>,
    },
    Kafka(Producer),
}

/// Provisions the simulated tenants, devices, gateway tokens and a few demo alert rules per
/// tenant (idempotent).
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
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id) \
         SELECT $1 || '-t' || (j % $2), $1 || '-d' || lpad(j::text, 6, '0') \
         FROM generate_series(0, $3 - 1) j ON CONFLICT DO NOTHING",
    )
    .bind(&args.prefix)
    .bind(i64::from(args.tenants))
    .bind(i64::from(args.devices))
    .execute(&mut *tx)
    .await?;
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
        "simulated fleet provisioned"
    );
    Ok(())
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
    let sink = Arc::new(match args.via {
        Via::Http => Sink::Http {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(args.concurrency)
                .build()?,
            url: format!("{}/v1/telemetry", args.url.trim_end_matches('/')),
            tokens: (0..args.tenants)
                .map(|t| (t, args.gateway_token(&args.tenant_id(t))))
                .collect(),
        },
        Via::Kafka => Sink::Kafka(Producer::new(
            &args.kafka,
            "fleetstream-simulator",
            Duration::from_secs(30),
        )?),
    });

    if args.provision {
        if let Sink::Http {
            client,
            url,
            tokens,
        } = sink.as_ref()
        {
            await_tokens_known(client, url, tokens, &shutdown).await;
        }
    }

    let mut rng = StdRng::seed_from_u64(0x5eed);
    let started = Instant::now();
    let interval_us = args.interval.as_micros().max(1) as u64;
    let mut devices: Vec<DeviceState> = (0..args.devices)
        .map(|d| DeviceState {
            tenant: d % args.tenants,
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
    let counters = Arc::new(Counters::default());
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut pending: HashMap<u32, Vec<(u32, Telemetry)>> = HashMap::new();
    let deadline = args.duration.map(|d| started + d);
    let mut report_at = started + Duration::from_secs(5);
    let mut reported = 0u64;
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
            // on time.
            if deadline.is_some_and(|d| Instant::now() >= d) || shutdown.is_cancelled() {
                break 'run;
            }
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
            let reading = next_reading(&args, d, device, &mut rng);
            let batch = pending.entry(device.tenant).or_default();
            batch.push((device.tenant, reading));
            if batch.len() >= args.batch {
                let full = std::mem::take(batch);
                if !dispatch(&sink, &permits, &counters, full, &shutdown).await {
                    break 'run;
                }
            }
        }
        // Flush what this tick produced, so a reading waits at most one tick.
        for batch in pending.values_mut() {
            if !batch.is_empty() {
                let part = std::mem::take(batch);
                if !dispatch(&sink, &permits, &counters, part, &shutdown).await {
                    break 'run;
                }
            }
        }
        if now >= report_at {
            let accepted = counters.accepted.load(Ordering::Relaxed);
            info!(
                rate = (accepted - reported) as f64 / 5.0,
                accepted,
                failed = counters.failed.load(Ordering::Relaxed),
                "simulator progress (msg/s over the last 5 s)"
            );
            reported = accepted;
            report_at += Duration::from_secs(5);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    // Wait for requests in flight.
    let _all = permits.acquire_many(args.concurrency as u32).await;
    let elapsed = started.elapsed();
    if let Sink::Kafka(producer) = sink.as_ref() {
        producer.flush(Duration::from_secs(30));
    }
    let mut latencies = match counters.latencies.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    latencies.sort_unstable();
    Ok(Summary {
        accepted: counters.accepted.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        elapsed,
        latencies,
    })
}

/// Writes the summary line to stdout (the simulator's output, not a log).
pub fn print_summary(args: &SimulateArgs, summary: &Summary) -> std::io::Result<()> {
    let offered = f64::from(args.devices) / args.interval.as_secs_f64();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "via={:?} devices={} interval={:?} batch={} concurrency={} offered={:.0} msg/s \
         accepted={} failed={} elapsed={:.1}s achieved={:.0} msg/s p50={:.1}ms p99={:.1}ms",
        args.via,
        args.devices,
        args.interval,
        args.batch,
        args.concurrency,
        offered,
        summary.accepted,
        summary.failed,
        summary.elapsed.as_secs_f64(),
        summary.rate(),
        summary.quantile(0.5).as_secs_f64() * 1000.0,
        summary.quantile(0.99).as_secs_f64() * 1000.0,
    )
}

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

/// Sends one batch on its own task once a permit is free; false when shutting down.
async fn dispatch(
    sink: &Arc<Sink>,
    permits: &Arc<Semaphore>,
    counters: &Arc<Counters>,
    batch: Vec<(u32, Telemetry)>,
    shutdown: &Shutdown,
) -> bool {
    let permit = tokio::select! {
        _ = shutdown.cancelled() => return false,
        permit = permits.clone().acquire_owned() => match permit {
            Ok(permit) => permit,
            Err(_) => return false,
        },
    };
    let sink = sink.clone();
    let counters = counters.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let n = batch.len() as u64;
        let accepted = match sink.as_ref() {
            Sink::Http {
                client,
                url,
                tokens,
            } => send_http(client, url, tokens, &batch).await,
            Sink::Kafka(producer) => send_kafka(producer, &batch).await,
        };
        counters.accepted.fetch_add(accepted, Ordering::Relaxed);
        counters
            .failed
            .fetch_add(n.saturating_sub(accepted), Ordering::Relaxed);
        if let Ok(mut latencies) = counters.latencies.lock() {
            latencies.push(started.elapsed());
        }
        drop(permit);
    });
    true
}

/// Freshly provisioned gateway tokens reach ingest's credential cache through NOTIFY a moment
/// later: until each token stops being refused with 401 (at most 30 s), sending would only
/// count refusals.
async fn await_tokens_known(
    client: &reqwest::Client,
    url: &str,
    tokens: &HashMap<u32, String>,
    shutdown: &Shutdown,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for token in tokens.values() {
        loop {
            let probe = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body("[]")
                .send()
                .await;
            let unknown = match &probe {
                Ok(response) => response.status().as_u16() == 401,
                Err(_) => true,
            };
            if !unknown || Instant::now() >= deadline || shutdown.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn send_http(
    client: &reqwest::Client,
    url: &str,
    tokens: &HashMap<u32, String>,
    batch: &[(u32, Telemetry)],
) -> u64 {
    let Some((tenant, _)) = batch.first() else {
        return 0;
    };
    let Some(token) = tokens.get(tenant) else {
        return 0;
    };
    let body: Vec<Value> = batch
        .iter()
        .map(|(_, t)| {
            json!({
                "device_id": t.device_id,
                "seq": t.seq,
                "time": t.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "metrics": t.metrics_json(),
            })
        })
        .collect();
    let body = match serde_json::to_vec(&body) {
        Ok(body) => body,
        Err(_) => return 0,
    };
    let response = client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(bytes) if status.as_u16() == 202 => serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("accepted").and_then(Value::as_u64))
                    .unwrap_or(0),
                Ok(bytes) => {
                    warn!(%status, body = %String::from_utf8_lossy(&bytes), "batch refused");
                    0
                }
                Err(err) => {
                    warn!(error = %err, "cannot read reply");
                    0
                }
            }
        }
        Err(err) => {
            warn!(error = %err, "request failed");
            0
        }
    }
}

async fn send_kafka(producer: &Producer, batch: &[(u32, Telemetry)]) -> u64 {
    let Ok(codec) = schemas::telemetry_codec() else {
        return 0;
    };
    let outgoing: Vec<Outgoing> = batch
        .iter()
        .filter_map(|(_, t)| {
            codec.encode(t).ok().map(|payload| Outgoing {
                key: t.key(),
                payload,
            })
        })
        .collect();
    let traceparent = format!(
        "00-{:032x}-{:016x}-01",
        rand::random::<u128>() | 1,
        rand::random::<u64>() | 1
    );
    producer
        .send_all(&outgoing, &traceparent)
        .await
        .iter()
        .filter(|r| r.is_ok())
        .count() as u64
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
