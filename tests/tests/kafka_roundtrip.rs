//! Avro telemetry through a real broker: produced with the shared producer settings, consumed
//! back, checked for key, partition (murmur2 of the key, as the Java client computes it: the
//! reference and its test vectors are in `plumbing::testing`) and the decoded record.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{TimeZone, Utc};
use plumbing::testing::TestTopics;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use schemas::{telemetry_codec, MetricValue, Telemetry};

fn java_partition(key: &str, partitions: i32) -> i32 {
    plumbing::testing::java_partition(key.as_bytes(), partitions)
}

fn reading(tenant: &str, device: usize, seq: i64) -> Telemetry {
    let mut metrics = BTreeMap::new();
    metrics.insert(
        "temperature".to_owned(),
        MetricValue::Double(20.0 + seq as f64 / 10.0),
    );
    metrics.insert("battery".to_owned(), MetricValue::Long(100 - seq));
    Telemetry {
        tenant_id: tenant.to_owned(),
        device_id: format!("dev-{device:05}"),
        site_id: device.is_multiple_of(2).then(|| "site-1".to_owned()),
        msg_type: "telemetry".to_owned(),
        seq,
        time: Utc
            .timestamp_micros(1_764_000_000_000_000 + seq * 1_000_000)
            .unwrap(),
        received_at: Utc
            .timestamp_micros(1_764_000_000_500_000 + seq * 1_000_000)
            .unwrap(),
        metrics,
    }
}

#[tokio::test]
async fn avro_telemetry_round_trips_through_the_broker_on_the_murmur2_partition() -> Result<()> {
    const PARTITIONS: i32 = 12;
    let topics = TestTopics::new(PARTITIONS).await?;
    let topic = topics.args.telemetry_topic.clone();
    let codec = telemetry_codec()?;
    let producer: FutureProducer =
        plumbing::kafka::producer_config(&topics.args, "roundtrip-test").create()?;

    let mut sent: HashMap<(i32, i64), Telemetry> = HashMap::new();
    for device in 0..40 {
        for seq in 0..3 {
            let record = reading(if device % 3 == 0 { "beta" } else { "acme" }, device, seq);
            let key = record.key();
            let payload = codec.encode(&record)?;
            let traceparent = format!("00-{:032x}-{:016x}-01", device + 1, seq + 1);
            let headers = OwnedHeaders::new().insert(Header {
                key: schemas::topics::HEADER_TRACEPARENT,
                value: Some(traceparent.as_bytes()),
            });
            let delivery = producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(err, _)| err)?;
            assert_eq!(
                delivery.partition,
                java_partition(&key, PARTITIONS),
                "key {key}"
            );
            sent.insert((delivery.partition, delivery.offset), record);
        }
    }

    let consumer: StreamConsumer =
        plumbing::kafka::consumer_config(&topics.args, "roundtrip-test", "roundtrip-test")
            .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut received = 0;
    while received < sent.len() {
        if Instant::now() > deadline {
            bail!(
                "received {received} of {} messages before the deadline",
                sent.len()
            );
        }
        let message = match tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            Ok(message) => message?,
            Err(_) => continue,
        };
        let expected = sent
            .get(&(message.partition(), message.offset()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unexpected message at {}:{}",
                    message.partition(),
                    message.offset()
                )
            })?;
        let key = std::str::from_utf8(message.key().unwrap_or_default())?;
        assert_eq!(
            key,
            format!("{}/{}", expected.tenant_id, expected.device_id)
        );
        assert_eq!(message.partition(), java_partition(key, PARTITIONS));
        let decoded = codec.decode(message.payload().unwrap_or_default())?;
        assert_eq!(&decoded, expected);
        let traceparent = message
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == schemas::topics::HEADER_TRACEPARENT)
            })
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        assert!(traceparent.is_some_and(|t| t.starts_with("00-")));
        received += 1;
    }
    assert_eq!(received, 120);
    Ok(())
}
