//! Key figures of this instance, written to `system_metrics` every interval so the dashboard
//! sees ingest without scraping Prometheus. Counted from [`crate::metrics`], the one place
//! that also feeds Prometheus, so the two never drift.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use plumbing::Shutdown;
use sqlx::PgPool;
use tracing::warn;

/// Counters since start, and a request-latency window since the last report.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    rejected: AtomicU64,
    window: Mutex<LatencyWindow>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LatencyWindow {
    count: u64,
    sum: f64,
    max: f64,
}

/// The process-wide figures.
pub static STATS: Stats = Stats {
    accepted: AtomicU64::new(0),
    rejected: AtomicU64::new(0),
    window: Mutex::new(LatencyWindow {
        count: 0,
        sum: 0.0,
        max: 0.0,
    }),
};

impl Stats {
    pub(crate) fn accepted(&self, n: u64) {
        self.accepted.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, n: u64) {
        self.rejected.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn request(&self, seconds: f64) {
        if let Ok(mut w) = self.window.lock() {
            w.count += 1;
            w.sum += seconds;
            w.max = w.max.max(seconds);
        }
    }

    /// Messages accepted since start.
    pub fn accepted_total(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Messages rejected since start.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn take_window(&self) -> LatencyWindow {
        match self.window.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => LatencyWindow::default(),
        }
    }
}

/// Writes the figures every `interval` until `shutdown` (the role needs INSERT on
/// `system_metrics`; `fleet_writer` has it). A failed write is logged and skipped.
pub fn spawn_reporter(
    pool: PgPool,
    instance: String,
    interval: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_accepted = STATS.accepted_total();
        let mut last_rejected = STATS.rejected_total();
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let accepted = STATS.accepted_total();
            let rejected = STATS.rejected_total();
            let elapsed = last.elapsed().as_secs_f64().max(0.001);
            let window = STATS.take_window();
            let avg = if window.count > 0 {
                window.sum / window.count as f64
            } else {
                0.0
            };
            let figures: [(&str, f64); 6] = [
                (
                    "ingest_accepted_per_second",
                    (accepted - last_accepted) as f64 / elapsed,
                ),
                (
                    "ingest_rejected_per_second",
                    (rejected - last_rejected) as f64 / elapsed,
                ),
                ("ingest_request_avg_seconds", avg),
                ("ingest_request_max_seconds", window.max),
                ("ingest_accepted_total", accepted as f64),
                ("ingest_rejected_total", rejected as f64),
            ];
            last_accepted = accepted;
            last_rejected = rejected;
            last = Instant::now();
            if let Err(err) = write(&pool, &instance, &figures).await {
                warn!(error = %err, "cannot write system_metrics");
            }
        }
    })
}

async fn write(pool: &PgPool, instance: &str, figures: &[(&str, f64)]) -> Result<(), sqlx::Error> {
    let names: Vec<&str> = figures.iter().map(|(n, _)| *n).collect();
    let values: Vec<f64> = figures.iter().map(|(_, v)| *v).collect();
    sqlx::query(
        "INSERT INTO system_metrics (time, metric_name, instance, tags, value) \
         SELECT now(), n, $1, '{\"service\": \"ingest-producer\"}', v \
         FROM unnest($2::text[], $3::float8[]) AS u(n, v)",
    )
    .bind(instance)
    .bind(&names)
    .bind(&values)
    .execute(pool)
    .await?;
    Ok(())
}
