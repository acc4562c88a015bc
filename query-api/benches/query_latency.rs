//! query-api latency benchmark (issue 7): bulk-loads telemetry with COPY, serves the API
//! in-process as `fleet_api`, and measures p50/p99 under concurrent HTTP load for
//!
//! * `latest`: `GET /v1/devices/{id}/latest` of a random device;
//! * `series_24h_1m`: one random device's last 24 h in 1-minute `avg` buckets;
//! * `fleet_page_1000`: `GET /v1/fleet/latest?limit=1000` of a random 1,000-device tenant;
//!
//! each once on a quiet database and once while a writer ingests telemetry with the sink's
//! transaction shape (COPY of a batch, `device_latest` upsert, the rollup cutoff call,
//! commit; every 200 ms) and a refresher brings the 1-minute rollups up to date every 10 s, as
//! the sink's maintenance task does.
//!
//! After the bulk load (or when reusing a dataset) it builds the rollups with
//! `fleet_refresh_rollup_1m()` calls (ten minutes of readings each, as the sink makes them) and
//! reports how long that took.
//!
//! ```text
//! DATABASE_URL=postgres://fleet:fleet@127.0.0.1:5432/fleetstream \
//!   cargo bench -p query-api --bench query_latency -- --devices 10000 --readings 5000
//! ```
//!
//! The dataset is kept in database `--db` (default `fleet_bench`) and reused by the next run
//! with the same size; `--drop` removes it at the end. 50M rows need about 11 GB of disk, their
//! rollups (3 metrics × 1,440 minutes × 10,000 devices) about 6 GB more.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use query_api::auth::Role;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

#[derive(Debug, Parser)]
struct Args {
    /// Devices in `devices` and `device_latest` (1,000 per tenant).
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Devices with telemetry history (default: all of them).
    #[arg(long)]
    telemetry_devices: Option<usize>,
    /// Readings per device with history, evenly over the last 24 h.
    #[arg(long, default_value_t = 5_000)]
    readings: usize,
    /// Load the history in time order across devices (as the sink writes it) instead of one
    /// device after another: a device's rows then sit on many pages, not a few.
    #[arg(long)]
    interleave: bool,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Measuring time per scenario, seconds.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Rows per second written by the ingesting writer.
    #[arg(long, default_value_t = 5_000)]
    ingest_rate: usize,
    /// Database holding the dataset.
    #[arg(long, default_value = "fleet_bench")]
    db: String,
    /// `postgres` or `timescaledb`.
    #[arg(long, default_value = "postgres")]
    layout: String,
    /// Drop the database afterwards.
    #[arg(long)]
    drop: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

const DEVICES_PER_TENANT: usize = 1_000;

fn tenant(i: usize) -> String {
    format!("t{:02}", i / DEVICES_PER_TENANT)
}

fn device(i: usize) -> String {
    format!("dev-{i:06}")
}

fn site(i: usize) -> String {
    format!("site-{}", i % 4)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let admin_url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let telemetry_devices = args
        .telemetry_devices
        .unwrap_or(args.devices)
        .min(args.devices);
    let dataset = format!(
        "{}x{}x{}{}",
        args.devices,
        telemetry_devices,
        args.readings,
        if args.interleave { " interleaved" } else { "" }
    );

    let mut admin = PgConnection::connect(&admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&args.db)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE \"{}\"", args.db))
            .execute(&mut admin)
            .await?;
    }
    let connect: PgConnectOptions = admin_url.parse::<PgConnectOptions>()?.database(&args.db);
    let owner = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await?;
    let layout = schemas::migrate(
        &owner,
        &schemas::StorageOptions {
            layout: args.layout.parse()?,
            ..Default::default()
        },
    )
    .await?;
    let loaded: Option<String> =
        sqlx::query_scalar("SELECT value FROM fleetstream_settings WHERE key = 'bench_dataset'")
            .fetch_optional(&owner)
            .await?;
    let now = Utc::now();
    if loaded.as_deref() != Some(dataset.as_str()) {
        load(&owner, &args, telemetry_devices, now).await?;
        sqlx::query(
            "INSERT INTO fleetstream_settings (key, value) VALUES ('bench_dataset', $1) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        )
        .bind(&dataset)
        .execute(&owner)
        .await?;
    } else {
        println!("reusing dataset {dataset} in database {}", args.db);
    }
    let (rows, bytes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM telemetry), pg_database_size(current_database())",
    )
    .fetch_one(&owner)
    .await?;
    // The history ends when it was loaded; queries ask for the 24 h before that.
    let data_end: DateTime<Utc> = sqlx::query_scalar("SELECT max(time) FROM telemetry")
        .fetch_one(&owner)
        .await?;

    build_rollups(&owner, data_end, rows).await?;

    let tenants = args.devices.div_ceil(DEVICES_PER_TENANT);
    let mut keys = Vec::new();
    for t in 0..tenants {
        keys.push(
            query_api::create_key(
                &owner,
                &query_api::CreateKeyArgs {
                    role: Role::Viewer,
                    tenant: Some(tenant(t * DEVICES_PER_TENANT)),
                    name: "bench".into(),
                },
            )
            .await?,
        );
    }

    // The service, in-process, as fleet_api.
    let api_url = format!(
        "{}{}options=-c%20role%3Dfleet_api",
        connect.to_url_lossy(),
        if connect.to_url_lossy().query().is_some() {
            '&'
        } else {
            '?'
        }
    );
    let cli = query_api::Cli::try_parse_from([
        "query-api",
        "--database-url",
        &api_url,
        "--database-max-connections",
        "16",
        "--admin-listen",
        "127.0.0.1:0",
        "--log",
        "warn",
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = plumbing::Shutdown::new();
    let server = tokio::spawn(query_api::serve(cli, listener, shutdown.clone()));

    println!(
        "\ndataset: {} telemetry rows ({} devices with history x {} readings over 24 h, {}), {} devices, layout {layout}, database {:.1} GB",
        rows,
        telemetry_devices,
        args.readings,
        if args.interleave { "interleaved" } else { "clustered by device" },
        args.devices,
        bytes as f64 / 1e9
    );
    println!(
        "load: {} concurrent clients, {} s per scenario\n",
        args.concurrency, args.seconds
    );
    println!("| scenario | ingesting | requests | req/s | p50 ms | p99 ms | max ms | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    for ingesting in [false, true] {
        let writer =
            ingesting.then(|| spawn_writer(connect.clone(), telemetry_devices, args.ingest_rate));
        let refresher = ingesting.then(|| spawn_refresher(owner.clone()));
        for scenario in ["latest", "series_24h_1m", "fleet_page_1000"] {
            let report = measure(
                &client,
                &base,
                &keys,
                &args,
                telemetry_devices,
                data_end,
                scenario,
            )
            .await;
            println!(
                "| {scenario} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
                if ingesting { "yes" } else { "no" },
                report.count,
                report.per_second,
                report.p50,
                report.p99,
                report.max,
                report.errors
            );
        }
        if let Some((stop, written, started, task)) = writer {
            stop.store(true, Ordering::Relaxed);
            task.await??;
            let rate = written.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
            println!(
                "|  | writer achieved {rate:.0} rows/s (target {}) | | | | | | |",
                args.ingest_rate
            );
        }
        if let Some((stop, task)) = refresher {
            stop.store(true, Ordering::Relaxed);
            let (calls, slowest, lag) = task.await??;
            println!(
                "|  | rollup refreshed by {calls} calls, slowest {:.0} ms, lag at the end {lag:.0} s | | | | | | |",
                slowest.as_secs_f64() * 1000.0
            );
        }
    }
    shutdown.cancel();
    server.await??;
    owner.close().await;
    if args.drop {
        sqlx::query(&format!("DROP DATABASE \"{}\" WITH (FORCE)", args.db))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}

/// One `fleet_refresh_rollup_1m()` call: (watermark, rollup rows written, work left).
async fn refresh_once(pool: &PgPool) -> Result<(Option<DateTime<Utc>>, i64, bool)> {
    Ok(
        sqlx::query_as("SELECT watermark, rows_written, more FROM fleet_refresh_rollup_1m()")
            .fetch_one(pool)
            .await?,
    )
}

/// Brings the 1-minute rollups up to date after a load, with the calls the sink would make
/// (ten minutes of readings each), and reports the time taken.
async fn build_rollups(owner: &PgPool, data_end: DateTime<Utc>, rows: i64) -> Result<()> {
    // Rollup partitions for the loaded days (plain layout; a no-op on TimescaleDB).
    sqlx::query(
        "SELECT fleet_create_daily_partition('telemetry_1m', d::date) \
         FROM generate_series(($1::timestamptz - interval '2 days') AT TIME ZONE 'UTC', \
                              ($1::timestamptz + interval '3 days') AT TIME ZONE 'UTC', interval '1 day') d \
         WHERE (SELECT value FROM fleetstream_settings WHERE key = 'storage_layout') = 'postgres'",
    )
    .bind(data_end)
    .execute(owner)
    .await?;
    let before: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT watermark FROM telemetry_1m_state")
            .fetch_one(owner)
            .await?;
    let started = Instant::now();
    let (mut calls, mut written, mut slowest) = (0u64, 0i64, Duration::ZERO);
    loop {
        let call = Instant::now();
        let (watermark, rows_written, more) = refresh_once(owner).await?;
        slowest = slowest.max(call.elapsed());
        calls += 1;
        written += rows_written;
        if calls % 20 == 0 {
            println!("  rollup: watermark {watermark:?}, {written} rows written");
        }
        if !more {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if before.is_none() {
        println!(
            "rollup built: {calls} calls (slowest {:.2} s), {written} rollup rows from {rows} readings in {secs:.0} s ({:.0} readings/s, {:.0} rollup rows/s)",
            slowest.as_secs_f64(),
            rows as f64 / secs,
            written as f64 / secs
        );
    } else {
        println!("rollup caught up: {calls} calls, {written} rows in {secs:.1} s");
    }
    if written > 0 {
        sqlx::query("VACUUM ANALYZE telemetry_1m")
            .execute(owner)
            .await?;
    }
    Ok(())
}

type Refresher = (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<Result<(u64, Duration, f64)>>,
);

/// Refreshes the rollups every 10 s (until no work is left each time), as the sink's
/// maintenance task does. Returns (calls, slowest call, lag at the end in seconds).
fn spawn_refresher(owner: PgPool) -> Refresher {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let (mut calls, mut slowest, mut lag) = (0u64, Duration::ZERO, 0.0);
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        while !stop2.load(Ordering::Relaxed) {
            tick.tick().await;
            loop {
                let call = Instant::now();
                let (watermark, _, more) = refresh_once(&owner).await?;
                slowest = slowest.max(call.elapsed());
                calls += 1;
                if let Some(watermark) = watermark {
                    lag = (Utc::now() - watermark).num_milliseconds() as f64 / 1000.0;
                }
                if !more {
                    break;
                }
            }
        }
        Ok((calls, slowest, lag))
    });
    (stop, task)
}

/// Tenants, sites, devices, latest values, then the history by COPY on two connections.
async fn load(
    owner: &PgPool,
    args: &Args,
    telemetry_devices: usize,
    now: DateTime<Utc>,
) -> Result<()> {
    let started = Instant::now();
    sqlx::query("TRUNCATE telemetry, device_latest, tenants CASCADE")
        .execute(owner)
        .await?;
    let tenants = args.devices.div_ceil(DEVICES_PER_TENANT);
    for t in 0..tenants {
        let id = tenant(t * DEVICES_PER_TENANT);
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
            .bind(&id)
            .execute(owner)
            .await?;
        sqlx::query("INSERT INTO sites (tenant_id, site_id, name) SELECT $1, 'site-' || s, 'site' FROM generate_series(0, 3) s")
            .bind(&id)
            .execute(owner)
            .await?;
    }
    let ids: Vec<usize> = (0..args.devices).collect();
    let tenants_col: Vec<String> = ids.iter().map(|&i| tenant(i)).collect();
    let devices_col: Vec<String> = ids.iter().map(|&i| device(i)).collect();
    let sites_col: Vec<String> = ids.iter().map(|&i| site(i)).collect();
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id, site_id) SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
    )
    .bind(&tenants_col)
    .bind(&devices_col)
    .bind(&sites_col)
    .execute(owner)
    .await?;
    sqlx::query(
        "INSERT INTO device_latest (tenant_id, device_id, site_id, time, msg_type, seq, metrics) \
         SELECT t, d, s, $4, 'telemetry', 0, jsonb_build_object('temp', 21.5, 'hum', 40, 'battery', 90) \
         FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, d, s)",
    )
    .bind(&tenants_col)
    .bind(&devices_col)
    .bind(&sites_col)
    .bind(now)
    .execute(owner)
    .await?;
    // Daily partitions for the loaded days (plain layout; a no-op answer on TimescaleDB).
    sqlx::query(
        "SELECT fleet_create_daily_partition('telemetry', d::date) \
         FROM generate_series(($1::timestamptz - interval '2 days') AT TIME ZONE 'UTC', \
                              ($1::timestamptz + interval '3 days') AT TIME ZONE 'UTC', interval '1 day') d \
         WHERE (SELECT value FROM fleetstream_settings WHERE key = 'storage_layout') = 'postgres'",
    )
    .bind(now)
    .execute(owner)
    .await?;

    let step_us = 86_400_000_000i64 / args.readings as i64;
    let total = telemetry_devices * args.readings;
    let copied = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    const STREAMS: usize = 2;
    const STEPS_PER_CHUNK: usize = 5;
    for stream in 0..STREAMS {
        let owner = owner.clone();
        let copied = copied.clone();
        let readings = args.readings;
        let interleave = args.interleave;
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::from_os_rng();
            let mut since_checkpoint = 0usize;
            // A chunk is one COPY: a device's whole history (clustered), or a few time steps
            // of every device (interleaved, the order in which the sink writes them).
            let chunks = if interleave {
                readings.div_ceil(STEPS_PER_CHUNK)
            } else {
                telemetry_devices
            };
            for chunk in (stream..chunks).step_by(STREAMS) {
                let pairs: Vec<(usize, usize)> = if interleave {
                    let first = chunk * STEPS_PER_CHUNK;
                    (first..(first + STEPS_PER_CHUNK).min(readings))
                        .flat_map(|r| (0..telemetry_devices).map(move |d| (d, r)))
                        .collect()
                } else {
                    (0..readings).map(|r| (chunk, r)).collect()
                };
                let mut conn = owner.acquire().await?;
                let mut copy = conn
                    .copy_in_raw("COPY telemetry (time, tenant_id, device_id, site_id, msg_type, seq, metrics) FROM STDIN")
                    .await?;
                let mut buf = String::with_capacity(pairs.len() * 120);
                for &(d, r) in &pairs {
                    let time = now - chrono::Duration::microseconds(step_us * (readings - r) as i64);
                    let temp = 20.0 + 5.0 * ((r as f64) / 200.0).sin() + rng.random::<f64>();
                    let hum = 40.0 + rng.random::<f64>() * 20.0;
                    buf.push_str(&format!(
                        "{}\t{}\t{}\t{}\ttelemetry\t{r}\t{{\"temp\": {temp:.3}, \"hum\": {hum:.2}, \"battery\": {}}}\n",
                        time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                        tenant(d),
                        device(d),
                        site(d),
                        100 - r % 100
                    ));
                }
                copy.send(buf.as_bytes()).await?;
                copy.finish().await?;
                let done = copied.fetch_add(pairs.len() as u64, Ordering::Relaxed) + pairs.len() as u64;
                since_checkpoint += pairs.len();
                // Bounded WAL on a small disk: recycle it every ~2M rows per stream.
                if since_checkpoint >= 2_000_000 {
                    sqlx::query("CHECKPOINT").execute(&owner).await?;
                    since_checkpoint = 0;
                    println!("  loaded {done} of {total} rows ({:.0} rows/s)", done as f64 / started.elapsed().as_secs_f64());
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    sqlx::query("CHECKPOINT").execute(owner).await?;
    sqlx::query("VACUUM ANALYZE telemetry, device_latest, devices")
        .execute(owner)
        .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "loaded {total} rows in {secs:.0} s ({:.0} rows/s by COPY, 2 streams)",
        total as f64 / secs
    );
    Ok(())
}

type Writer = (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Instant,
    tokio::task::JoinHandle<Result<()>>,
);

/// A writer with the sink's transaction shape, as `fleet_writer`. A batch picks devices at
/// random, so one device can occur twice: the upsert takes one row per device (two rows for
/// one key in one `ON CONFLICT DO UPDATE` are an error, which made every batch roll back
/// before).
fn spawn_writer(connect: PgConnectOptions, devices: usize, rate: usize) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let (stop2, written2) = (stop.clone(), written.clone());
    let task = tokio::spawn(async move {
        let mut conn = connect.connect().await?;
        sqlx::query("SET ROLE fleet_writer")
            .execute(&mut conn)
            .await?;
        let batch = (rate / 5).max(1);
        let mut seq = 1_000_000i64;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut rng = StdRng::from_os_rng();
        while !stop2.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = Utc::now();
            let mut buf = String::with_capacity(batch * 120);
            let (mut ts, mut ds, mut ss, mut ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut times = Vec::with_capacity(batch);
            for _ in 0..batch {
                let d = rng.random_range(0..devices);
                seq += 1;
                let metrics = format!(
                    "{{\"temp\": {:.3}, \"hum\": 50, \"battery\": 80}}",
                    20.0 + rng.random::<f64>()
                );
                let time = now - chrono::Duration::microseconds(rng.random_range(0..200_000));
                times.push(time);
                buf.push_str(&format!(
                    "{}\t{}\t{}\t{}\ttelemetry\t{seq}\t{metrics}\n",
                    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    tenant(d),
                    device(d),
                    site(d)
                ));
                ts.push(tenant(d));
                ds.push(device(d));
                ss.push(site(d));
                ms.push(metrics);
            }
            let (lo, hi) = (
                times.iter().min().copied().unwrap_or(now),
                times.iter().max().copied().unwrap_or(now),
            );
            let mut tx = conn.begin().await?;
            // The sink's transaction shape (timescale-sink/src/writer.rs, the usual case of its
            // device_latest merge: every reading newer than the stored row).
            let mut copy = tx
                .copy_in_raw("COPY telemetry (time, tenant_id, device_id, site_id, msg_type, seq, metrics) FROM STDIN")
                .await?;
            copy.send(buf.as_bytes()).await?;
            if copy.finish().await.is_err() {
                // A duplicate (tenant, device, time) in one batch: the sink would retry via
                // staging; the benchmark just drops that batch.
                continue;
            }
            sqlx::query(
                "INSERT INTO device_latest (tenant_id, device_id, site_id, time, msg_type, seq, metrics, updated_at) \
                 SELECT DISTINCT ON (t, d) t, d, s, $5, 'telemetry', $6, m::jsonb, now() \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(t, d, s, m) \
                 ON CONFLICT (tenant_id, device_id) DO UPDATE SET site_id = EXCLUDED.site_id, \
                     time = EXCLUDED.time, seq = EXCLUDED.seq, \
                     metrics = device_latest.metrics || EXCLUDED.metrics, \
                     metric_times = CASE WHEN device_latest.metrics || EXCLUDED.metrics = EXCLUDED.metrics \
                         THEN '{}'::jsonb ELSE (fleet_latest_merge(device_latest.time, device_latest.metrics, \
                         device_latest.metric_times, EXCLUDED.time, EXCLUDED.metrics, '{}')).latest_metric_times END, \
                     updated_at = now() \
                 WHERE device_latest.time <= EXCLUDED.time",
            )
            .bind(&ts)
            .bind(&ds)
            .bind(&ss)
            .bind(&ms)
            .bind(now)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            // The sink's rollup invalidation (migration 0014): the cutoff, then the device
            // minutes of readings older than it (live readings: none).
            let cutoff: DateTime<Utc> = sqlx::query_scalar("SELECT fleet_rollup_1m_cutoff()")
                .fetch_one(&mut *tx)
                .await?;
            if lo < cutoff {
                sqlx::query("SELECT fleet_rollup_1m_invalidate($1, $2)")
                    .bind(lo)
                    .bind(hi)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            written2.fetch_add(batch as u64, Ordering::Relaxed);
        }
        Ok(())
    });
    (stop, written, Instant::now(), task)
}

struct Report {
    count: usize,
    errors: u64,
    per_second: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

async fn measure(
    client: &reqwest::Client,
    base: &str,
    keys: &[String],
    args: &Args,
    telemetry_devices: usize,
    data_end: DateTime<Utc>,
    scenario: &'static str,
) -> Report {
    let errors = Arc::new(AtomicU64::new(0));
    let warmup = Duration::from_secs(2);
    let measure_for = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let base = base.to_owned();
        let keys = keys.to_vec();
        let errors = errors.clone();
        let devices = args.devices;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut rng = StdRng::from_os_rng();
            loop {
                let elapsed = started.elapsed();
                if elapsed >= warmup + measure_for {
                    return latencies;
                }
                let uri = match scenario {
                    "latest" => {
                        let d = rng.random_range(0..devices);
                        (format!("{base}/v1/devices/{}/latest", device(d)), d)
                    }
                    "series_24h_1m" => {
                        let d = rng.random_range(0..telemetry_devices);
                        let to = data_end + chrono::Duration::seconds(1);
                        let from = to - chrono::Duration::hours(24);
                        (
                            format!(
                                "{base}/v1/devices/{}/telemetry?metrics=temp&bucket=1m&agg=avg&from={}&to={}",
                                device(d),
                                from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                                to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                            ),
                            d,
                        )
                    }
                    _ => {
                        let d = rng.random_range(0..devices);
                        (format!("{base}/v1/fleet/latest?limit=1000"), d)
                    }
                };
                let (uri, d) = uri;
                let key = &keys[d / DEVICES_PER_TENANT];
                let sent = Instant::now();
                let ok = match client.get(&uri).bearer_auth(key).send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        ok && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                let took = sent.elapsed();
                if elapsed >= warmup {
                    if ok {
                        latencies.push(took.as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap_or_default());
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(all.len() - 1)]
    };
    Report {
        count: all.len(),
        errors: errors.load(Ordering::Relaxed),
        per_second: all.len() as f64 / measure_for.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
        max: all.last().copied().unwrap_or(f64::NAN),
    }
}
