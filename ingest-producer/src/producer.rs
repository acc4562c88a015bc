//! Readings onto `telemetry.v1`: Avro single-object encoding, key `tenant/device`, a
//! `traceparent` header, and an answer only once Kafka acknowledged each message.
//!
//! Guarantee: a message reported delivered was acknowledged by all in-sync replicas
//! (`acks=all`, idempotent producer, so librdkafka's retries do not duplicate it). A message
//! that times out (`message.timeout.ms`, the bounded wait) or could not be queued is
//! reported failed and the client is told to retry; it may still have been written (a
//! timeout does not prove the broker did not store it), so clients get at-least-once across
//! their own retries, and never a `202` for an unacknowledged message.

use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use schemas::topics::HEADER_TRACEPARENT;
use tracing::warn;

use crate::error::{Error, Rejection};

/// One encoded message ready to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub key: String,
    pub payload: Vec<u8>,
}

/// The telemetry producer.
pub struct Producer {
    inner: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Producer {
    /// A producer from the shared durable settings; `delivery_timeout` bounds how long a
    /// request waits for an acknowledgement (`message.timeout.ms`).
    pub fn new(
        kafka: &plumbing::config::KafkaArgs,
        client_id: &str,
        delivery_timeout: Duration,
    ) -> Result<Self, Error> {
        let mut config = plumbing::kafka::producer_config(kafka, client_id);
        // Set before the user's options would be, unless they chose their own.
        if !kafka.options.iter().any(|(k, _)| k == "message.timeout.ms") {
            config.set(
                "message.timeout.ms",
                delivery_timeout.as_millis().max(1).to_string(),
            );
        }
        Ok(Producer {
            inner: config.create()?,
            topic: kafka.telemetry_topic.clone(),
        })
    }

    /// Sends every message and waits for each acknowledgement. The result at position `i` is
    /// message `i`'s outcome: queue full and delivery failures are `503` rejections.
    pub async fn send_all(
        &self,
        messages: &[Outgoing],
        traceparent: &str,
    ) -> Vec<Result<(), Rejection>> {
        let started = Instant::now();
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let headers = OwnedHeaders::new().insert(Header {
                key: HEADER_TRACEPARENT,
                value: Some(traceparent),
            });
            let record = FutureRecord::to(&self.topic)
                .key(message.key.as_bytes())
                .payload(&message.payload)
                .headers(headers);
            pending.push(self.inner.send_result(record).map_err(|(err, _)| err));
        }
        let results = join_all(pending.into_iter().map(|queued| async move {
            match queued {
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    Err(Rejection::queue_full())
                }
                Err(err) => {
                    warn!(error = %err, "cannot queue message");
                    Err(Rejection::unavailable())
                }
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((err, _))) => {
                        warn!(error = %err, "message not acknowledged");
                        Err(Rejection::unavailable())
                    }
                    Err(_canceled) => Err(Rejection::unavailable()),
                },
            }
        }))
        .await;
        crate::metrics::produce_duration(started.elapsed());
        results
    }

    /// Waits up to `timeout` for queued messages to be delivered (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(err) = self.inner.flush(timeout) {
            warn!(error = %err, "producer flush incomplete");
        }
    }
}
