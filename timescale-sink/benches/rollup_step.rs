//! What the 1-minute rollup's new minutes cost: aggregated in SQL (migrations 0009–0015,
//! `fleet_refresh_rollup_1m()`) against read out and aggregated by the sink (migration 0016,
//! `timescale_sink::maintenance::refresh_rollup`), on the same readings in one run.
//!
//! 1. a fresh database (layout `BENCH_LAYOUT`, default: TimescaleDB when offered) with
//!    `BENCH_DEVICES` devices (default 100,000, 10 tenants) reporting every 5 s for
//!    `BENCH_MINUTES` minutes (default 4), ending 5 minutes ago; 4 metrics per reading as the
//!    fleet simulator sends them (two decimals, a voltage, an integer);
//! 2. `BENCH_ROUNDS` rounds (default 2) of: the rollups built from nothing by the SQL path,
//!    then again (rows and watermark removed) by the sink's path, in steps of 2 minutes as
//!    the sink's maintenance task makes them.
//!
//! For each: steps, rows written, wall time, the database backend's CPU (from `/proc`, so the
//! server must run on this machine) and, for the sink's path, this process's CPU; then µs of
//! CPU per reading and the ratio against the SQL path of the same round. The two paths' rows
//! are compared too (they must be equal; `tests/rollup.rs` checks that value for value).
//!
//! `cargo bench -p timescale-sink --bench rollup_step` with `DATABASE_URL` set (e.g.
//! `eval "$(deploy/local/deps.sh env)"`). Prints figures; asserts nothing.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use plumbing::testing::TestDb;
use schemas::LayoutChoice;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// Minutes per step, as the sink's maintenance task asks.
const STEP_MINUTES: i32 = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is the server on this machine?)"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

#[derive(Debug, Default, Clone, Copy)]
struct Work {
    steps: u64,
    rows_written: i64,
    wall: Duration,
    backend_cpu: f64,
    sink_cpu: f64,
}

impl Work {
    fn cpu(&self) -> f64 {
        self.backend_cpu + self.sink_cpu
    }
}

async fn backend_pid(conn: &mut PgConnection) -> Result<String> {
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?;
    Ok(pid.to_string())
}

async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::query("DELETE FROM telemetry_1m")
        .execute(pool)
        .await?;
    sqlx::query("UPDATE telemetry_1m_state SET watermark = NULL")
        .execute(pool)
        .await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

async fn by_sql(db: &TestDb) -> Result<Work> {
    reset(&db.pool).await?;
    let mut conn = PgConnection::connect(&db.url).await?;
    let pid = backend_pid(&mut conn).await?;
    let started = Instant::now();
    let cpu0 = cpu_seconds(&pid)?;
    let mut work = Work::default();
    loop {
        let (rows, more): (i64, bool) =
            sqlx::query_as("SELECT rows_written, more FROM fleet_refresh_rollup_1m($1)")
                .bind(STEP_MINUTES)
                .fetch_one(&mut conn)
                .await?;
        work.steps += 1;
        work.rows_written += rows;
        if !more {
            break;
        }
    }
    work.wall = started.elapsed();
    work.backend_cpu = cpu_seconds(&pid)? - cpu0;
    Ok(work)
}

async fn by_sink(db: &TestDb) -> Result<Work> {
    reset(&db.pool).await?;
    // One connection, so every step runs on the backend measured.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await?;
    let pid = backend_pid(&mut *pool.acquire().await?).await?;
    let started = Instant::now();
    let cpu0 = cpu_seconds(&pid)?;
    let own0 = cpu_seconds("self")?;
    let mut work = Work::default();
    loop {
        let step = timescale_sink::maintenance::refresh_rollup(&pool).await?;
        work.steps += 1;
        work.rows_written += step.rows_written;
        if !step.more {
            break;
        }
    }
    work.wall = started.elapsed();
    work.backend_cpu = cpu_seconds(&pid)? - cpu0;
    work.sink_cpu = cpu_seconds("self")? - own0;
    pool.close().await;
    Ok(work)
}

fn print_work(label: &str, w: &Work, readings: u64) {
    println!(
        "{label:<6} {:>3} steps {:>9} rows {:>8.2} s wall  backend {:>6.2} s  sink {:>6.2} s  = {:>5.2} µs CPU per reading (backend {:.2}, sink {:.2})",
        w.steps,
        w.rows_written,
        w.wall.as_secs_f64(),
        w.backend_cpu,
        w.sink_cpu,
        w.cpu() * 1e6 / readings as f64,
        w.backend_cpu * 1e6 / readings as f64,
        w.sink_cpu * 1e6 / readings as f64,
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let devices: i64 = env_or("BENCH_DEVICES", 100_000);
    let minutes: i64 = env_or("BENCH_MINUTES", 4);
    let rounds: usize = env_or("BENCH_ROUNDS", 2);
    let layout = match std::env::var("BENCH_LAYOUT").as_deref() {
        Ok("postgres") => LayoutChoice::Postgres,
        Ok("timescaledb") => LayoutChoice::TimescaleDb,
        _ => LayoutChoice::Auto,
    };
    let db = TestDb::new(layout).await?;
    println!(
        "rollup_step: {} layout, {devices} devices × {minutes} minutes, a reading every 5 s (4 metrics)",
        db.layout
    );
    sqlx::query(
        "INSERT INTO tenants (tenant_id, name) SELECT 't' || i, 'tenant ' || i FROM generate_series(0, 9) i",
    )
    .execute(&db.pool)
    .await?;
    // Whole minutes, so every step aggregates full minutes of the fleet.
    let end = Utc::now() - chrono::Duration::minutes(5);
    let load = Instant::now();
    let readings = sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
         SELECT date_trunc('minute', $1) - make_interval(secs => s * 5 - (d % 5)) \
                    + make_interval(secs => d / 1000000.0), \
                't' || (d % 10), 'dev-' || d, s, \
                jsonb_build_object('temperature', round((20 + random() * 10)::numeric, 2), \
                                   'humidity', round((40 + random() * 20)::numeric, 2), \
                                   'battery', round((3 + random())::numeric, 3), \
                                   'rssi', (-110 + floor(random() * 60))::int) \
         FROM generate_series(0, $2 - 1) d, generate_series(1, $3 * 12) s",
    )
    .bind(end)
    .bind(devices)
    .bind(minutes)
    .execute(&db.pool)
    .await?
    .rows_affected();
    sqlx::query("VACUUM ANALYZE telemetry")
        .execute(&db.pool)
        .await?;
    println!(
        "loaded {readings} readings in {:.1} s",
        load.elapsed().as_secs_f64()
    );

    for round in 1..=rounds {
        let sql = by_sql(&db).await?;
        let sql_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_1m")
            .fetch_one(&db.pool)
            .await?;
        let sink = by_sink(&db).await?;
        let sink_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_1m")
            .fetch_one(&db.pool)
            .await?;
        println!("round {round}:");
        print_work("sql", &sql, readings);
        print_work("sink", &sink, readings);
        println!(
            "sink / sql: {:.2}× the CPU, {:.2}× the wall time; rows {sql_rows} / {sink_rows}",
            sink.cpu() / sql.cpu().max(f64::MIN_POSITIVE),
            sink.wall.as_secs_f64() / sql.wall.as_secs_f64().max(f64::MIN_POSITIVE),
        );
    }
    Ok(())
}
