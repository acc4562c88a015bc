//! Plain-PostgreSQL layout upkeep: daily partitions ahead, partitions past retention dropped.
//! A session advisory lock lets one sink instance at a time do it; in the TimescaleDB layout
//! the SQL function is a no-op (policies do this there).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Runs upkeep now and every `interval` until `shutdown`.
pub async fn run(pool: PgPool, days_ahead: u32, interval: Duration, shutdown: CancellationToken) {
    loop {
        match pool.acquire().await {
            Ok(mut conn) => {
                match schemas::storage::maintain_partitions(&mut conn, days_ahead).await {
                    Ok(actions) => {
                        for action in actions {
                            info!(%action, "partition maintenance");
                        }
                    }
                    Err(err) => warn!(error = %err, "partition maintenance failed"),
                }
            }
            Err(err) => warn!(error = %err, "partition maintenance: no connection"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
