//! Database upkeep done by the sink in the background:
//!
//! * plain-PostgreSQL partitions: daily partitions ahead, partitions past retention dropped.
//!   A session advisory lock lets one sink instance at a time do it; in the TimescaleDB layout
//!   the SQL function is a no-op (policies do this there);
//! * the 1-minute rollups (`telemetry_1m`, migration 0009): a step every rollup interval, or
//!   sooner when the next minute becomes final before that ([`next_rollup_wait`]), repeated
//!   at once while it reports work left (catching up after downtime or a backlog of late
//!   data). A step is one short transaction (at most two minutes of readings):
//!   `fleet_refresh_rollup_1m_plan()` (migration 0016) takes a transaction-level advisory
//!   lock (with several sink instances one refreshes and the others return at once),
//!   recomputes invalidated minutes and moves the watermark; the new minutes are then
//!   aggregated here ([`crate::rollup`]).
//!
//! Late readings reach the rollups through the invalidation each batch transaction records
//! (see [`crate::writer`]); the migration explains why the two together are exact.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::metrics as m;
use crate::rollup::{self, RollupError};
use crate::stats::Stats;

/// Calls in a row while the refresh reports work left, before yielding to the next tick (so a
/// long catch-up still lets partition upkeep and shutdown in between).
const MAX_CALLS_PER_TICK: usize = 1_000;

/// Minutes one rollup step aggregates at most (new minutes and recomputed late ones): a
/// minute of 100,000 devices is ~100 MB of hash table, and a step must fit the function's
/// `work_mem` (migration 0013) or it spills to disk and a refresh that fell behind falls
/// further behind. Steps repeat while work is left.
const STEP_MINUTES: i32 = 2;

/// Device minutes one rollup step recomputes at most (late readings' minutes, migration
/// 0014): a device minute is one primary-key range scan of a few readings, so this bounds a
/// step that follows a backfill to a few seconds; the rest waits for the next steps.
const STEP_DEVICE_MINUTES: i32 = 20_000;

/// How often a shutdown repeats its cancel of a rollup step that has not ended yet.
const CANCEL_REPEAT: Duration = Duration::from_millis(200);

/// What one `fleet_refresh_rollup_1m()` call did.
#[derive(Debug, Clone, Copy, PartialEq, sqlx::FromRow)]
pub struct Refresh {
    /// End of the rolled-up range (`None` before the first refresh).
    pub watermark: Option<DateTime<Utc>>,
    /// Rollup rows written (new minutes and recomputed ones).
    pub rows_written: i64,
    /// Minutes (of every device) recomputed because a writer invalidated a whole range.
    pub minutes_recomputed: i32,
    /// Device minutes recomputed because late readings arrived in them.
    pub device_minutes_recomputed: i32,
    /// Device minutes that could not be aggregated (data errors; `telemetry_1m_rejected`).
    pub device_minutes_rejected: i32,
    /// Invalidated device minutes left for later steps.
    pub device_minutes_pending: i64,
    /// Whether more work is left (call again).
    pub more: bool,
}

/// One rollup step, one transaction, aggregated at normal priority (the sink's steps:
/// [`refresh_rollup_until_done`]).
pub async fn refresh_rollup(pool: &PgPool) -> Result<Refresh, RollupError> {
    refresh_rollup_on(&mut *pool.acquire().await?, 0).await
}

/// The step's plan (migration 0016): everything but the new minutes, and their range.
#[derive(Debug, sqlx::FromRow)]
struct Plan {
    #[sqlx(flatten)]
    refresh: Refresh,
    new_from: Option<DateTime<Utc>>,
    new_to: Option<DateTime<Utc>>,
}

async fn refresh_rollup_on(conn: &mut PgConnection, nice: i8) -> Result<Refresh, RollupError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let plan: Plan = sqlx::query_as(
        "SELECT watermark, rows_written, minutes_recomputed, device_minutes_recomputed, \
                device_minutes_rejected, device_minutes_pending, more, new_from, new_to \
         FROM fleet_refresh_rollup_1m_plan($1, $2)",
    )
    .bind(STEP_MINUTES)
    .bind(STEP_DEVICE_MINUTES)
    .fetch_one(&mut *tx)
    .await?;
    let mut refresh = plan.refresh;
    if let (Some(from), Some(to)) = (plan.new_from, plan.new_to) {
        if from < to {
            let started = Instant::now();
            let new = rollup::aggregate_new_minutes(&mut tx, from, to, nice)
                .instrument(info_span!("rollup_new_minutes", %from, %to))
                .await?;
            metrics::counter!(m::ROLLUP_READINGS_AGGREGATED).increment(new.readings);
            metrics::counter!(m::ROLLUP_DEVICE_MINUTES_TO_SQL)
                .increment(new.device_minutes_to_sql as u64);
            debug!(
                readings = new.readings,
                rows = new.rows_written,
                device_minutes_to_sql = new.device_minutes_to_sql,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rollup: new minutes aggregated"
            );
            refresh.rows_written += new.rows_written;
            refresh.device_minutes_rejected += new.device_minutes_rejected;
        }
    }
    tx.commit().await?;
    Ok(refresh)
}

/// A row of `telemetry_1m_rejected`: tenant, device, minute, SQLSTATE, error.
type Rejected = (String, String, DateTime<Utc>, String, String);

/// Logs the device minutes the last step rejected (the newest `count` rows of
/// `telemetry_1m_rejected`), with the tenant, device, minute and PostgreSQL's error.
async fn log_rejected(pool: &PgPool, count: i32) {
    let rows: Result<Vec<Rejected>, sqlx::Error> = sqlx::query_as(
        "SELECT tenant_id, device_id, bucket, sqlstate, left(error, 300) \
             FROM telemetry_1m_rejected ORDER BY recorded_at DESC LIMIT $1",
    )
    .bind(i64::from(count))
    .fetch_all(pool)
    .await;
    match rows {
        Ok(rows) => {
            for (tenant, device, minute, sqlstate, error) in rows {
                warn!(
                    tenant = %tenant,
                    device = %device,
                    minute = %minute,
                    sqlstate = %sqlstate,
                    error = %error,
                    "rollup: device minute not aggregated (data error); other devices' rollups go on"
                );
            }
        }
        Err(err) => {
            warn!(error = %err, rejected = count, "rollup: could not read the rejected device minutes")
        }
    }
}

/// One rollup step that gives way to `shutdown`: when it fires mid-step, the step's
/// statement is cancelled on the server (`pg_cancel_backend`), so its transaction rolls back
/// at once instead of holding the shutdown for as long as a catch-up step takes (minutes,
/// after a backlog). Nothing is lost: the next start redoes the step. `Ok(None)`: cancelled.
async fn refresh_rollup_or_stop(
    pool: &PgPool,
    shutdown: &CancellationToken,
    nice: i8,
) -> Result<Option<Refresh>, RollupError> {
    let mut conn = pool.acquire().await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    let step = refresh_rollup_on(&mut conn, nice);
    tokio::pin!(step);
    tokio::select! {
        result = &mut step => result.map(Some),
        _ = shutdown.cancelled() => {
            // A step is several statements: a cancel that lands between two of them cancels
            // nothing, so it is repeated until the step ends.
            loop {
                let cancelled: Result<bool, sqlx::Error> =
                    sqlx::query_scalar("SELECT pg_cancel_backend($1)")
                        .bind(pid)
                        .fetch_one(pool)
                        .await;
                if let Err(err) = cancelled {
                    // The step's connection is dropped with `step` below; the server ends it
                    // when it notices.
                    warn!(error = %err, "could not cancel the rollup step on shutdown");
                    return Ok(None);
                }
                // The statement ends with "canceling statement due to user request" (or had
                // just finished); either way the connection is clean again.
                match tokio::time::timeout(CANCEL_REPEAT, &mut step).await {
                    Ok(Ok(refresh)) => return Ok(Some(refresh)),
                    Ok(Err(_)) => {
                        info!("rollup step cancelled for shutdown (rolled back; redone on the next start)");
                        return Ok(None);
                    }
                    Err(_) => continue,
                }
            }
        }
    }
}

/// Refreshes until no work is left (or `MAX_CALLS_PER_TICK` calls, or `shutdown`: no step
/// starts after it, and a step in progress is cancelled), recording metrics and the rollup
/// lag; the new minutes are aggregated at niceness `nice`. Returns the last completed call's
/// answer (`None`: none completed).
pub async fn refresh_rollup_until_done(
    pool: &PgPool,
    stats: &Stats,
    shutdown: &CancellationToken,
    nice: i8,
) -> Result<Option<Refresh>, RollupError> {
    let span = info_span!("refresh_rollup");
    async {
        let mut calls = 0usize;
        let mut last = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(last);
            }
            let started = Instant::now();
            let result = refresh_rollup_or_stop(pool, shutdown, nice).await;
            metrics::histogram!(m::ROLLUP_REFRESH_DURATION).record(started.elapsed().as_secs_f64());
            let refresh = match result {
                Ok(Some(refresh)) => refresh,
                Ok(None) => {
                    metrics::counter!(m::ROLLUP_REFRESHES, "outcome" => "cancelled").increment(1);
                    return Ok(last);
                }
                Err(err) => {
                    metrics::counter!(m::ROLLUP_REFRESHES, "outcome" => "error").increment(1);
                    return Err(err);
                }
            };
            metrics::counter!(m::ROLLUP_REFRESHES, "outcome" => "ok").increment(1);
            metrics::counter!(m::ROLLUP_ROWS_WRITTEN).increment(refresh.rows_written.max(0) as u64);
            metrics::counter!(m::ROLLUP_MINUTES_RECOMPUTED)
                .increment(refresh.minutes_recomputed.max(0) as u64);
            metrics::counter!(m::ROLLUP_DEVICE_MINUTES_RECOMPUTED)
                .increment(refresh.device_minutes_recomputed.max(0) as u64);
            metrics::gauge!(m::ROLLUP_DEVICE_MINUTES_PENDING)
                .set(refresh.device_minutes_pending as f64);
            stats.set_rollup_device_minutes_pending(refresh.device_minutes_pending);
            if refresh.device_minutes_rejected > 0 {
                metrics::counter!(m::ROLLUP_DEVICE_MINUTES_REJECTED)
                    .increment(refresh.device_minutes_rejected as u64);
                log_rejected(pool, refresh.device_minutes_rejected).await;
            }
            if let Some(watermark) = refresh.watermark {
                stats.set_rollup_watermark(watermark);
                metrics::gauge!(m::ROLLUP_LAG).set(stats.rollup_lag());
            }
            debug!(
                watermark = ?refresh.watermark,
                rows_written = refresh.rows_written,
                minutes_recomputed = refresh.minutes_recomputed,
                device_minutes_recomputed = refresh.device_minutes_recomputed,
                device_minutes_pending = refresh.device_minutes_pending,
                more = refresh.more,
                "rollup refreshed"
            );
            calls += 1;
            last = Some(refresh);
            if !refresh.more || calls >= MAX_CALLS_PER_TICK {
                return Ok(last);
            }
        }
    }
    .instrument(span)
    .await
}

/// Past the moment the database's cutoff reaches the end of the next minute, how long the
/// step waits more (the cutoff is read a round trip before the step reads it again).
const FINAL_MARGIN: Duration = Duration::from_millis(500);

/// How long to wait before the next rollup step, after a step that left the rollups at
/// `watermark` with nothing more to do, when the database's cutoff
/// (`fleet_rollup_1m_cutoff()`: its clock minus the settle time) is `cutoff`: until the
/// minute after the watermark becomes final (the cutoff reaches its end) plus
/// [`FINAL_MARGIN`], at most `interval`. A minute that is final already and was not rolled up
/// is held back by something else (a writer's open batch, another instance's step): then the
/// whole interval, not a busy loop. A step on a fixed tick added up to a whole interval to
/// the rollup lag (issue 18: settle + the minute + the interval + the step's own time).
pub fn next_rollup_wait(
    watermark: DateTime<Utc>,
    cutoff: DateTime<Utc>,
    interval: Duration,
) -> Duration {
    let due = watermark + chrono::Duration::minutes(1) - cutoff;
    match due.to_std() {
        Ok(until_final) if !until_final.is_zero() => (until_final + FINAL_MARGIN).min(interval),
        _ => interval,
    }
}

/// When the next rollup step is due after `refresh` (see [`next_rollup_wait`]); the interval
/// when the cutoff cannot be read.
async fn next_rollup_in(pool: &PgPool, refresh: Option<Refresh>, interval: Duration) -> Duration {
    let Some(watermark) = refresh.filter(|r| !r.more).and_then(|r| r.watermark) else {
        return interval;
    };
    match sqlx::query_scalar::<_, DateTime<Utc>>("SELECT fleet_rollup_1m_cutoff()")
        .fetch_one(pool)
        .await
    {
        Ok(cutoff) => next_rollup_wait(watermark, cutoff, interval),
        Err(err) => {
            debug!(error = %err, "rollup: cutoff not read; next step after the interval");
            interval
        }
    }
}

/// Intervals of the background upkeep.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    /// Partition upkeep (plain layout).
    pub partitions: Duration,
    /// Rollup refresh: the longest wait between steps (sooner when a minute becomes final).
    pub rollup: Duration,
    /// Niceness of the thread aggregating a rollup step's new minutes (0: normal priority;
    /// `SINK_ROLLUP_NICE`).
    pub rollup_nice: i8,
}

/// Runs partition upkeep and the rollup refresh now and then every interval until `shutdown`
/// (the service's signal: a refresh step in progress is cancelled, none starts after it).
pub async fn run(
    pool: PgPool,
    days_ahead: u32,
    intervals: Intervals,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let mut partitions = tokio::time::interval(intervals.partitions);
    partitions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rollup = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(rollup);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = partitions.tick() => maintain_partitions(&pool, days_ahead).await,
            _ = &mut rollup => {
                let done = refresh_rollup_until_done(&pool, &stats, &shutdown, intervals.rollup_nice).await;
                let wait = match done {
                    Ok(refresh) => next_rollup_in(&pool, refresh, intervals.rollup).await,
                    Err(err) => {
                        warn!(error = %err, "rollup refresh failed");
                        intervals.rollup
                    }
                };
                rollup.as_mut().reset(tokio::time::Instant::now() + wait);
            }
        }
    }
}

async fn maintain_partitions(pool: &PgPool, days_ahead: u32) {
    match pool.acquire().await {
        Ok(mut conn) => match schemas::storage::maintain_partitions(&mut conn, days_ahead).await {
            Ok(actions) => {
                for action in actions {
                    info!(%action, "partition maintenance");
                }
            }
            Err(err) => warn!(error = %err, "partition maintenance failed"),
        },
        Err(err) => warn!(error = %err, "partition maintenance: no connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_next_step_waits_until_the_next_minute_is_final_at_most_the_interval() {
        let watermark = Utc.with_ymd_and_hms(2026, 12, 1, 6, 0, 0).single();
        let watermark = watermark.expect("a valid time");
        let interval = Duration::from_secs(10);
        let cutoff = |seconds_after_watermark: i64, millis: i64| {
            watermark
                + chrono::Duration::seconds(seconds_after_watermark)
                + chrono::Duration::milliseconds(millis)
        };
        // The minute [06:00, 06:01) is final when the cutoff reaches 06:01.
        assert_eq!(
            next_rollup_wait(watermark, cutoff(57, 0), interval),
            Duration::from_millis(3_500)
        );
        assert_eq!(
            next_rollup_wait(watermark, cutoff(59, 900), interval),
            Duration::from_millis(600)
        );
        // Further away than the interval: the interval.
        assert_eq!(
            next_rollup_wait(watermark, cutoff(10, 0), interval),
            interval
        );
        // Final already but not rolled up (held back by a writer or another instance), or
        // exactly at the end: the interval, never a busy loop.
        assert_eq!(
            next_rollup_wait(watermark, cutoff(60, 0), interval),
            interval
        );
        assert_eq!(
            next_rollup_wait(watermark, cutoff(75, 0), interval),
            interval
        );
    }
}
