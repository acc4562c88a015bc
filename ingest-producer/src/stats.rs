//! Key figures of this instance, written to `system_metrics` every interval (see
//! `plumbing::system_metrics`). Counted from [`crate::metrics`], the one place that also feeds
//! Prometheus, so the two never drift.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use plumbing::system_metrics::{LatencyWindow, Rate};
use plumbing::Shutdown;
use sqlx::PgPool;

/// Counters since start, and a request-latency window since the last report.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    rejected: AtomicU64,
    requests: LatencyWindow,
    mqtt_connections: AtomicI64,
    mqtt_publishes: AtomicU64,
    pubacks: LatencyWindow,
}

/// The process-wide figures.
pub static STATS: Stats = Stats {
    accepted: AtomicU64::new(0),
    rejected: AtomicU64::new(0),
    requests: LatencyWindow::new(),
    mqtt_connections: AtomicI64::new(0),
    mqtt_publishes: AtomicU64::new(0),
    pubacks: LatencyWindow::new(),
};

impl Stats {
    pub(crate) fn accepted(&self, n: u64) {
        self.accepted.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, n: u64) {
        self.rejected.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn request(&self, seconds: f64) {
        self.requests.record(seconds);
    }

    pub(crate) fn mqtt_connection(&self, delta: i64) {
        self.mqtt_connections.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn mqtt_publish(&self, seconds: f64) {
        self.mqtt_publishes.fetch_add(1, Ordering::Relaxed);
        self.pubacks.record(seconds);
    }

    /// Open MQTT sessions.
    pub fn mqtt_connections(&self) -> i64 {
        self.mqtt_connections.load(Ordering::Relaxed)
    }

    /// MQTT publishes handled since start.
    pub fn mqtt_publishes_total(&self) -> u64 {
        self.mqtt_publishes.load(Ordering::Relaxed)
    }

    /// Messages accepted since start.
    pub fn accepted_total(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Messages rejected since start.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// Writes the figures every `interval` until `shutdown` (the role needs INSERT on
/// `system_metrics`; `fleet_writer` has it).
pub fn spawn_reporter(
    pool: PgPool,
    instance: String,
    interval: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let mut accepted_rate = Rate::new(STATS.accepted_total());
    let mut rejected_rate = Rate::new(STATS.rejected_total());
    let mut publish_rate = Rate::new(STATS.mqtt_publishes_total());
    plumbing::system_metrics::spawn_reporter(
        pool,
        crate::SERVICE,
        instance,
        interval,
        shutdown,
        move || {
            let accepted = STATS.accepted_total();
            let rejected = STATS.rejected_total();
            let (avg, max) = STATS.requests.take();
            let (puback_avg, puback_max) = STATS.pubacks.take();
            let publishes = STATS.mqtt_publishes_total();
            vec![
                (
                    "ingest_accepted_per_second",
                    accepted_rate.per_second(accepted),
                ),
                (
                    "ingest_rejected_per_second",
                    rejected_rate.per_second(rejected),
                ),
                ("ingest_request_avg_seconds", avg),
                ("ingest_request_max_seconds", max),
                ("ingest_accepted_total", accepted as f64),
                ("ingest_rejected_total", rejected as f64),
                ("mqtt_connections", STATS.mqtt_connections() as f64),
                (
                    "mqtt_publishes_per_second",
                    publish_rate.per_second(publishes),
                ),
                ("mqtt_puback_avg_seconds", puback_avg),
                ("mqtt_puback_max_seconds", puback_max),
            ]
        },
    )
}
