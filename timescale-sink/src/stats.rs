//! Running figures of this instance, written to `system_metrics` every interval (see
//! `plumbing::system_metrics`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plumbing::system_metrics::{LatencyWindow, Rate};
use sqlx::PgPool;

/// Counters since start, plus an ingest→commit latency window since the last report.
#[derive(Debug, Default)]
pub struct Stats {
    rows: AtomicU64,
    merged: AtomicU64,
    duplicates: AtomicU64,
    dead_letters: AtomicU64,
    fenced: AtomicU64,
    lag: AtomicU64,
    /// The rollup watermark after the last completed refresh step, epoch µs (0: none yet).
    rollup_watermark_us: AtomicI64,
    /// Invalidated device minutes left after the last completed refresh step.
    rollup_device_minutes_pending: AtomicI64,
    /// Ingest→commit latency of committed rows.
    pub latency: LatencyWindow,
}

impl Stats {
    pub fn committed(&self, rows: u64, merged: u64, duplicates: u64, dead_letters: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.merged.fetch_add(merged, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.dead_letters.fetch_add(dead_letters, Ordering::Relaxed);
    }

    pub fn fenced(&self) {
        self.fenced.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_lag(&self, lag: u64) {
        self.lag.store(lag, Ordering::Relaxed);
    }

    pub fn set_rollup_watermark(&self, watermark: chrono::DateTime<chrono::Utc>) {
        self.rollup_watermark_us
            .store(watermark.timestamp_micros(), Ordering::Relaxed);
    }

    /// Rollup lag now: seconds from the watermark to the present (0 before the first
    /// refresh). Computed when read, so it keeps growing while a refresh step runs long,
    /// instead of showing the lag the last step ended with.
    pub fn set_rollup_device_minutes_pending(&self, pending: i64) {
        self.rollup_device_minutes_pending
            .store(pending, Ordering::Relaxed);
    }

    pub fn rollup_device_minutes_pending(&self) -> i64 {
        self.rollup_device_minutes_pending.load(Ordering::Relaxed)
    }

    pub fn rollup_lag(&self) -> f64 {
        match self.rollup_watermark_us.load(Ordering::Relaxed) {
            0 => 0.0,
            watermark => ((chrono::Utc::now().timestamp_micros() - watermark).max(0) as f64) / 1e6,
        }
    }

    /// Rows committed since start.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Fenced batches since start.
    pub fn fenced_batches(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Readings merged into an existing point since start.
    pub fn merged(&self) -> u64 {
        self.merged.load(Ordering::Relaxed)
    }

    /// Duplicate readings (exact re-sends) skipped since start.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

/// Writes the figures every `interval` until `shutdown`.
pub fn spawn_reporter(
    pool: PgPool,
    stats: Arc<Stats>,
    instance: String,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut rate = Rate::new(stats.rows());
    plumbing::system_metrics::spawn_reporter(
        pool,
        crate::SERVICE,
        instance,
        interval,
        shutdown,
        move || {
            let (avg, max) = stats.latency.take();
            let rollup_lag = stats.rollup_lag();
            metrics::gauge!(crate::metrics::ROLLUP_LAG).set(rollup_lag);
            vec![
                ("sink_rows_per_second", rate.per_second(stats.rows())),
                (
                    "sink_consumer_lag_messages",
                    stats.lag.load(Ordering::Relaxed) as f64,
                ),
                ("sink_rollup_lag_seconds", rollup_lag),
                (
                    "sink_rollup_device_minutes_pending",
                    stats.rollup_device_minutes_pending() as f64,
                ),
                ("sink_ingest_to_commit_avg_seconds", avg),
                ("sink_ingest_to_commit_max_seconds", max),
                ("sink_duplicate_rows_total", stats.duplicates() as f64),
                ("sink_merged_readings_total", stats.merged() as f64),
                (
                    "sink_dead_letters_total",
                    stats.dead_letters.load(Ordering::Relaxed) as f64,
                ),
            ]
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_lag_is_measured_when_read_not_when_the_refresh_ended() {
        let stats = Stats::default();
        assert_eq!(stats.rollup_lag(), 0.0);
        // A step that ended with the watermark 100 s behind, and nothing since: the lag read
        // now is at least those 100 s (it was 0 s behind "now" only if the clock stood still).
        stats.set_rollup_watermark(chrono::Utc::now() - chrono::Duration::seconds(100));
        let lag = stats.rollup_lag();
        assert!((100.0..160.0).contains(&lag), "{lag}");
    }
}
