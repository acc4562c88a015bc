//! What one late reading costs the 1-minute rollup refresh, measured in one run: the range
//! invalidation the sink recorded until migration 0014 against the per-device-minute one it
//! records now (issue 14).
//!
//! 1. a fresh database (layout `BENCH_LAYOUT`, default: TimescaleDB when offered) with
//!    `BENCH_DEVICES` devices (default 20,000, 10 tenants) reporting every 5 s for
//!    `BENCH_MINUTES` minutes (default 20; 4 metrics per reading), ending 5 minutes ago;
//! 2. **build**: the rollups brought up to date by `fleet_refresh_rollup_1m(2)` calls, as the
//!    sink's maintenance task makes them: CPU per minute of the fleet and per reading;
//! 3. **range** (before): one batch with a 2-day-old reading of one device and a live reading of
//!    another records `fleet_rollup_1m_invalidate(oldest, newest)`; refresh until no work is
//!    left;
//! 4. **device minutes** (now): the same batch records the cutoff and
//!    `fleet_rollup_1m_invalidate_minutes()` for its late reading; refresh until no work is left.
//!
//! For 3 and 4: refresh calls, device minutes and whole minutes recomputed, rows written,
//! wall time and the refreshing backend's CPU (from `/proc`, so the server must run on this
//! machine), and the ratio between them.
//!
//! `cargo bench -p timescale-sink --bench rollup_late_data` with `DATABASE_URL` set (e.g.
//! `eval "$(deploy/local/deps.sh env)"`). Prints figures; asserts nothing.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use plumbing::testing::TestDb;
use schemas::LayoutChoice;
use sqlx::{Connection, PgConnection};

/// Minutes per refresh call, as the sink's maintenance task asks.
const STEP_MINUTES: i32 = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) a backend process has used so far.
fn backend_cpu(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is the server on this machine?)"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

#[derive(Debug, Default)]
struct Work {
    calls: u64,
    rows_written: i64,
    minutes_recomputed: i64,
    device_minutes_recomputed: i64,
    wall: Duration,
    cpu: f64,
}

/// Calls the refresh until it reports no work left.
async fn refresh_until_done(conn: &mut PgConnection, pid: i32) -> Result<Work> {
    let started = Instant::now();
    let cpu0 = backend_cpu(pid)?;
    let mut work = Work::default();
    loop {
        let (rows, minutes, device_minutes, more): (i64, i32, i32, bool) = sqlx::query_as(
            "SELECT rows_written, minutes_recomputed, device_minutes_recomputed, more \
             FROM fleet_refresh_rollup_1m($1)",
        )
        .bind(STEP_MINUTES)
        .fetch_one(&mut *conn)
        .await?;
        work.calls += 1;
        work.rows_written += rows;
        work.minutes_recomputed += i64::from(minutes);
        work.device_minutes_recomputed += i64::from(device_minutes);
        if !more {
            break;
        }
    }
    work.wall = started.elapsed();
    work.cpu = backend_cpu(pid)? - cpu0;
    Ok(work)
}

fn print_work(label: &str, w: &Work) {
    println!(
        "{label:<16} {:>6} calls  {:>9} device minutes  {:>6} whole minutes  {:>9} rows  {:>10.1} ms wall  {:>8.2} s CPU",
        w.calls,
        w.device_minutes_recomputed,
        w.minutes_recomputed,
        w.rows_written,
        w.wall.as_secs_f64() * 1e3,
        w.cpu
    );
}

/// One batch transaction as the sink writes it: a 2-day-old reading of `late_device`, a live
/// reading of another device, and the rollup invalidation of the given kind.
async fn late_batch(db: &TestDb, late_device: &str, per_device: bool) -> Result<()> {
    let now = Utc::now();
    let old = now - chrono::Duration::days(2);
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) VALUES \
         ($1, 't0', $2, 1000000, '{\"temperature\": 21.5}'), \
         ($3, 't1', 'dev-1', 1000001, '{\"temperature\": 22.5}')",
    )
    .bind(old)
    .bind(late_device)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if per_device {
        let cutoff: DateTime<Utc> = sqlx::query_scalar("SELECT fleet_rollup_1m_cutoff()")
            .fetch_one(&mut *tx)
            .await?;
        assert!(old < cutoff && now >= cutoff);
        sqlx::query(
            "SELECT fleet_rollup_1m_invalidate_minutes(ARRAY['t0'], ARRAY[$1], ARRAY[$2::timestamptz])",
        )
        .bind(late_device)
        .bind(old)
        .execute(&mut *tx)
        .await?;
    } else {
        sqlx::query("SELECT fleet_rollup_1m_invalidate($1, $2)")
            .bind(old)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let devices: i64 = env_or("BENCH_DEVICES", 20_000);
    let minutes: i64 = env_or("BENCH_MINUTES", 20);
    let layout = match std::env::var("BENCH_LAYOUT").as_deref() {
        Ok("postgres") => LayoutChoice::Postgres,
        Ok("timescaledb") => LayoutChoice::TimescaleDb,
        _ => LayoutChoice::Auto,
    };
    let db = TestDb::new(layout).await?;
    println!(
        "rollup_late_data: {} layout, {devices} devices × {minutes} minutes, a reading every 5 s (4 metrics)",
        db.layout
    );
    sqlx::query(
        "INSERT INTO tenants (tenant_id, name) SELECT 't' || i, 'tenant ' || i FROM generate_series(0, 9) i",
    )
    .execute(&db.pool)
    .await?;
    let end = Utc::now() - chrono::Duration::minutes(5);
    let load = Instant::now();
    let readings = sqlx::query(
        "INSERT INTO telemetry (time, tenant_id, device_id, seq, metrics) \
         SELECT $1 - make_interval(secs => s * 5 + (d % 5)), 't' || (d % 10), 'dev-' || d, s, \
                jsonb_build_object('temperature', round((20 + random() * 10)::numeric, 2), \
                                   'humidity', round((40 + random() * 20)::numeric, 2), \
                                   'battery', round((3 + random())::numeric, 2), \
                                   'rssi', (-110 + floor(random() * 60))::int) \
         FROM generate_series(0, $2 - 1) d, generate_series(1, $3 * 12) s",
    )
    .bind(end)
    .bind(devices)
    .bind(minutes)
    .execute(&db.pool)
    .await?
    .rows_affected();
    sqlx::query("ANALYZE telemetry").execute(&db.pool).await?;
    println!(
        "loaded {readings} readings in {:.1} s",
        load.elapsed().as_secs_f64()
    );

    let mut conn = PgConnection::connect(&db.url).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let build = refresh_until_done(&mut conn, pid).await?;
    print_work("build", &build);
    println!(
        "build: {:.2} s CPU per minute of the fleet, {:.2} µs CPU per reading",
        build.cpu / minutes as f64,
        build.cpu * 1e6 / readings as f64
    );

    late_batch(&db, "dev-0", false).await?;
    let range = refresh_until_done(&mut conn, pid).await?;
    print_work("range (before)", &range);
    late_batch(&db, "dev-10", true).await?;
    let per_device = refresh_until_done(&mut conn, pid).await?;
    print_work("device minutes", &per_device);
    // /proc counts CPU in 10 ms ticks: below one tick, the wall time bounds it instead.
    let per_device_cost = per_device.cpu.max(per_device.wall.as_secs_f64()).max(1e-6);
    println!(
        "one late reading: ≥ {:.0}× less refresh time, {:.0}× fewer rows written, {:.0}× fewer calls with per-device-minute invalidation",
        range.cpu / per_device_cost,
        range.rows_written as f64 / per_device.rows_written.max(1) as f64,
        range.calls as f64 / per_device.calls.max(1) as f64
    );
    conn.close().await?;
    Ok(())
}
