//! Key figures of the API written to `system_metrics` for the pipeline-health page: request
//! rate, server-error rate, and latency average and maximum per reporting interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plumbing::system_metrics::{LatencyWindow, Rate};
use plumbing::Shutdown;
use sqlx::PgPool;

/// Counters shared by the request middleware and the reporter.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    server_errors: AtomicU64,
    latency: LatencyWindow,
}

impl Stats {
    /// One answered request.
    pub fn record(&self, seconds: f64, server_error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if server_error {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(seconds);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn server_errors(&self) -> u64 {
        self.server_errors.load(Ordering::Relaxed)
    }
}

/// Writes the figures every `interval` until `shutdown`.
pub fn spawn_reporter(
    pool: PgPool,
    stats: Arc<Stats>,
    instance: String,
    interval: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let mut requests = Rate::new(stats.requests());
    let mut errors = Rate::new(stats.server_errors());
    plumbing::system_metrics::spawn_reporter(
        pool,
        crate::SERVICE,
        instance,
        interval,
        shutdown,
        move || {
            let (avg, max) = stats.latency.take();
            vec![
                (
                    "query_api_requests_per_second",
                    requests.per_second(stats.requests()),
                ),
                (
                    "query_api_server_errors_per_second",
                    errors.per_second(stats.server_errors()),
                ),
                ("query_api_request_avg_seconds", avg),
                ("query_api_request_max_seconds", max),
            ]
        },
    )
}
