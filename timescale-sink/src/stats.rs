//! Running figures of this instance, written to `system_metrics` every interval so the
//! dashboard sees the pipeline without scraping Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::warn;

/// Counters since start, plus a latency window since the last report.
#[derive(Debug, Default)]
pub struct Stats {
    rows: AtomicU64,
    duplicates: AtomicU64,
    dead_letters: AtomicU64,
    fenced: AtomicU64,
    lag: AtomicU64,
    window: Mutex<LatencyWindow>,
}

#[derive(Debug, Default)]
struct LatencyWindow {
    count: u64,
    sum: f64,
    max: f64,
}

impl Stats {
    pub fn committed(&self, rows: u64, duplicates: u64, dead_letters: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.dead_letters.fetch_add(dead_letters, Ordering::Relaxed);
    }

    pub fn fenced(&self) {
        self.fenced.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_lag(&self, lag: u64) {
        self.lag.store(lag, Ordering::Relaxed);
    }

    pub fn latency(&self, seconds: f64) {
        if let Ok(mut w) = self.window.lock() {
            w.count += 1;
            w.sum += seconds;
            w.max = w.max.max(seconds);
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

    /// Duplicate rows skipped since start.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

/// Writes the figures every `interval` until `shutdown`.
pub async fn report(
    pool: PgPool,
    stats: std::sync::Arc<Stats>,
    instance: String,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last_rows = stats.rows();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let rows = stats.rows();
        let elapsed = last.elapsed().as_secs_f64().max(0.001);
        let rate = (rows - last_rows) as f64 / elapsed;
        last_rows = rows;
        last = Instant::now();
        let (avg, max) = match stats.window.lock() {
            Ok(mut w) => {
                let figures = if w.count > 0 {
                    (w.sum / w.count as f64, w.max)
                } else {
                    (0.0, 0.0)
                };
                *w = LatencyWindow::default();
                figures
            }
            Err(_) => (0.0, 0.0),
        };
        let figures: [(&str, f64); 6] = [
            ("sink_rows_per_second", rate),
            (
                "sink_consumer_lag_messages",
                stats.lag.load(Ordering::Relaxed) as f64,
            ),
            ("sink_ingest_to_commit_avg_seconds", avg),
            ("sink_ingest_to_commit_max_seconds", max),
            ("sink_duplicate_rows_total", stats.duplicates() as f64),
            (
                "sink_dead_letters_total",
                stats.dead_letters.load(Ordering::Relaxed) as f64,
            ),
        ];
        let names: Vec<&str> = figures.iter().map(|(n, _)| *n).collect();
        let values: Vec<f64> = figures.iter().map(|(_, v)| *v).collect();
        let result = sqlx::query(
            "INSERT INTO system_metrics (time, metric_name, instance, tags, value) \
             SELECT now(), n, $1, '{\"service\": \"timescale-sink\"}', v FROM unnest($2::text[], $3::float8[]) AS u(n, v)",
        )
        .bind(&instance)
        .bind(&names)
        .bind(&values)
        .execute(&pool)
        .await;
        if let Err(err) = result {
            warn!(error = %err, "cannot write system_metrics");
        }
    }
}
