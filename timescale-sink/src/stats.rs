//! Running figures of this instance, written to `system_metrics` every interval (see
//! `plumbing::system_metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Seconds between now and the rollup watermark at the last refresh, as `f64` bits.
    rollup_lag: AtomicU64,
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

    pub fn set_rollup_lag(&self, seconds: f64) {
        self.rollup_lag.store(seconds.to_bits(), Ordering::Relaxed);
    }

    /// Rollup lag at the last refresh, seconds (0 before the first).
    pub fn rollup_lag(&self) -> f64 {
        f64::from_bits(self.rollup_lag.load(Ordering::Relaxed))
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
            vec![
                ("sink_rows_per_second", rate.per_second(stats.rows())),
                (
                    "sink_consumer_lag_messages",
                    stats.lag.load(Ordering::Relaxed) as f64,
                ),
                ("sink_rollup_lag_seconds", stats.rollup_lag()),
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
