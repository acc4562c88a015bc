//! Dead letters: the original bytes on `telemetry.v1.dlq` with headers saying why and from
//! where. Each is acknowledged by Kafka before the transaction that moves the offset past it
//! commits, so a dead letter is never lost.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::topics::{
    HEADER_ERROR, HEADER_ERROR_STAGE, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
};

use crate::batch::DeadLetter;

/// Produces dead letters and waits for their acknowledgement.
#[derive(Clone)]
pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
}

impl std::fmt::Debug for DeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetterQueue {
    pub fn new(producer: FutureProducer, topic: String, source_topic: String) -> Self {
        Self {
            producer,
            topic,
            source_topic,
        }
    }

    /// Sends every letter; returns after all are acknowledged, or the first error.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), rdkafka::error::KafkaError> {
        let sends = letters.iter().map(|letter| {
            let partition = letter.partition.to_string();
            let offset = letter.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_ERROR,
                    value: Some(letter.error.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_ERROR_STAGE,
                    value: Some(letter.stage.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_TOPIC,
                    value: Some(self.source_topic.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_PARTITION,
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_SOURCE_OFFSET,
                    value: Some(offset.as_bytes()),
                });
            let record = FutureRecord::<(), [u8]>::to(&self.topic)
                .payload(letter.payload.as_slice())
                .headers(headers);
            self.producer.send(record, Duration::from_secs(30))
        });
        for (letter, result) in letters.iter().zip(futures::future::join_all(sends).await) {
            result.map_err(|(err, _)| err)?;
            metrics::counter!(crate::metrics::DEAD_LETTERS, "stage" => letter.stage).increment(1);
        }
        Ok(())
    }
}
