//! Publishes the outbox to `alerts.v1`: rows committed with the offsets are sent (key
//! `tenant/device`, header `event_id`), and marked sent once Kafka acknowledged them. The
//! payload is sent as the commit encoded it ([`crate::store::AlertFraming`]): single-object,
//! or the Confluent wire format with the registry's id when `SCHEMA_REGISTRY_URL` is set.
//!
//! Delivery is at least once: a crash between the acknowledgement and the mark sends a row
//! again, with the same `event_id`. Rows are claimed with `FOR UPDATE SKIP LOCKED`, so
//! several evaluator instances publish side by side without sending a row twice in the
//! normal case. Sent rows are purged after `retention`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use plumbing::Shutdown;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Rows claimed per round.
const BATCH: i64 = 1_000;

/// The publisher's settings.
#[derive(Clone)]
pub struct Publisher {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub topic: String,
    /// Sent rows older than this are deleted.
    pub retention: Duration,
    /// Round interval when nobody wakes the publisher.
    pub poll_interval: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl Publisher {
    /// Publishes until `shutdown`, woken by `wake` after each commit with transitions.
    pub fn spawn(self, wake: Arc<Notify>, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut rounds: u64 = 0;
            loop {
                match self.round().await {
                    Ok(sent) => {
                        backoff = Duration::from_millis(100);
                        if sent as i64 == BATCH {
                            continue;
                        }
                    }
                    Err(err) => {
                        warn!(error = %err, "alert outbox: publishing failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
                rounds += 1;
                if rounds.is_multiple_of(600) {
                    self.purge().await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        })
    }

    /// Sends one batch of unsent rows; returns how many.
    async fn round(&self) -> Result<usize, PublishError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, String, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT outbox_id, event_id, tenant_id::text, device_id, payload FROM alert_outbox \
             WHERE sent_at IS NULL ORDER BY outbox_id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            metrics::gauge!(crate::metrics::OUTBOX_PENDING).set(0.0);
            return Ok(0);
        }
        let sends = rows.iter().map(|(_, event_id, tenant, device, payload)| {
            let key = schemas::message_key(tenant, device);
            let headers = OwnedHeaders::new().insert(Header {
                key: "event_id",
                value: Some(event_id.as_bytes()),
            });
            let producer = &self.producer;
            let topic = &self.topic;
            async move {
                let record = FutureRecord::to(topic)
                    .key(&key)
                    .payload(payload)
                    .headers(headers);
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(err, _)| err)
            }
        });
        for result in join_all(sends).await {
            result?;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        sqlx::query("UPDATE alert_outbox SET sent_at = now() WHERE outbox_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!(crate::metrics::OUTBOX_PUBLISHED).increment(ids.len() as u64);
        debug!(events = ids.len(), "alert events published");
        Ok(ids.len())
    }

    async fn purge(&self) {
        let result = sqlx::query(
            "DELETE FROM alert_outbox WHERE sent_at IS NOT NULL \
             AND sent_at < now() - make_interval(secs => $1)",
        )
        .bind(self.retention.as_secs_f64())
        .execute(&self.pool)
        .await;
        if let Err(err) = result {
            warn!(error = %err, "alert outbox: purge failed");
        }
    }
}
