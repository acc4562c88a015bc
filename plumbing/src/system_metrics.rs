//! Key figures written to the `system_metrics` table, so dashboards see the pipeline without
//! scraping Prometheus. Services keep their counters; this module turns them into rows.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::warn;

use crate::Shutdown;

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    count: u64,
    sum: f64,
    max: f64,
}

/// Latency observations since the last report.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    window: Mutex<Window>,
}

impl LatencyWindow {
    /// An empty window (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                count: 0,
                sum: 0.0,
                max: 0.0,
            }),
        }
    }

    /// One observation.
    pub fn record(&self, seconds: f64) {
        self.record_many(1, seconds, seconds);
    }

    /// `count` observations summing to `sum` with largest `max` (one lock for a whole batch).
    pub fn record_many(&self, count: u64, sum: f64, max: f64) {
        if let Ok(mut w) = self.window.lock() {
            w.count += count;
            w.sum += sum;
            w.max = w.max.max(max);
        }
    }

    /// `(average, max)` since the last call (zeros when empty), and starts a new window.
    pub fn take(&self) -> (f64, f64) {
        let w = match self.window.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => Window::default(),
        };
        if w.count == 0 {
            (0.0, 0.0)
        } else {
            (w.sum / w.count as f64, w.max)
        }
    }
}

/// Per-second rate of a running total between successive reports.
#[derive(Debug)]
pub struct Rate {
    last: u64,
    at: Instant,
}

impl Rate {
    /// Starts from `total` now.
    pub fn new(total: u64) -> Self {
        Self {
            last: total,
            at: Instant::now(),
        }
    }

    /// Increase per second since the previous call.
    pub fn per_second(&mut self, total: u64) -> f64 {
        let elapsed = self.at.elapsed().as_secs_f64().max(0.001);
        let rate = total.saturating_sub(self.last) as f64 / elapsed;
        self.last = total;
        self.at = Instant::now();
        rate
    }
}

/// Inserts one row per figure, stamped now, tagged with the service.
pub async fn write(
    pool: &PgPool,
    service: &str,
    instance: &str,
    figures: &[(&str, f64)],
) -> Result<(), sqlx::Error> {
    let names: Vec<&str> = figures.iter().map(|(n, _)| *n).collect();
    let values: Vec<f64> = figures.iter().map(|(_, v)| *v).collect();
    sqlx::query(
        "INSERT INTO system_metrics (time, metric_name, instance, tags, value) \
         SELECT now(), n, $1, jsonb_build_object('service', $2::text), v \
         FROM unnest($3::text[], $4::float8[]) AS u(n, v)",
    )
    .bind(instance)
    .bind(service)
    .bind(&names)
    .bind(&values)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every `interval` until `shutdown`, writes what `collect` returns. A failed write is
/// logged and skipped: figures are for dashboards, never worth stopping a service for.
pub fn spawn_reporter<F>(
    pool: PgPool,
    service: &'static str,
    instance: String,
    interval: Duration,
    shutdown: Shutdown,
    mut collect: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Vec<(&'static str, f64)> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let figures = collect();
            if let Err(err) = write(&pool, service, &instance, &figures).await {
                warn!(service, error = %err, "cannot write system_metrics");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reports_average_and_max_then_starts_over() {
        let w = LatencyWindow::new();
        w.record(0.1);
        w.record_many(3, 0.9, 0.5);
        let (avg, max) = w.take();
        assert!((avg - 0.25).abs() < 1e-9);
        assert!((max - 0.5).abs() < 1e-9);
        assert_eq!(w.take(), (0.0, 0.0));
    }
}
