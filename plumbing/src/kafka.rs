//! librdkafka client settings shared by every service, and topic administration.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::KafkaArgs;
use crate::Error;

/// Brokers, client id and the user's extra options (applied last, so they win).
pub fn base_config(args: &KafkaArgs, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("client.id", client_id);
    for (key, value) in &args.options {
        config.set(key, value);
    }
    config
}

/// A durable producer: idempotent, `acks=all`, lz4, and librdkafka's `murmur2_random`
/// partitioner, which places keyed messages exactly where the Java client's default
/// partitioner does (murmur2 of the key), so every producer agrees on a device's partition.
///
/// `linger.ms` 20: the broker's cost is mostly per record batch and per request, and keyed
/// messages spread over every partition, so at 20,000 msg/s on 12 partitions 5 ms made
/// batches of ~8 records. fleet_e2e measured the broker at 15.6 µs of CPU per reading with
/// 5 ms and 10.5 µs with 25 ms (together with [`bulk_consumer_config`]'s fetch sizes), for
/// ~15 ms more per acknowledged request.
pub fn producer_config(args: &KafkaArgs, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("batch.size", "1000000");
    merge(config, base_config(args, client_id))
}

/// A consumer in `group` that never auto-commits: services store offsets themselves
/// (in PostgreSQL, in the transaction that covers the data).
pub fn consumer_config(args: &KafkaArgs, client_id: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    merge(config, base_config(args, client_id))
}

/// [`consumer_config`] for a consumer that works in large batches (the sink): fetches wait
/// for 64 KiB or 100 ms instead of returning with the first message, so the broker answers
/// far fewer, fuller fetch requests under load. Latency-bound consumers (the evaluator) keep
/// librdkafka's immediate fetches.
pub fn bulk_consumer_config(args: &KafkaArgs, client_id: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("fetch.min.bytes", "65536")
        .set("fetch.wait.max.ms", "100");
    merge(config, consumer_config(args, client_id, group))
}

fn merge(mut defaults: ClientConfig, overrides: ClientConfig) -> ClientConfig {
    for (key, value) in overrides.config_map() {
        defaults.set(key, value);
    }
    defaults
}

/// Creates each `(topic, partitions)` that does not exist yet (replication factor from the
/// broker's default). Existing topics are left as they are.
pub async fn ensure_topics(args: &KafkaArgs, topics: &[(&str, i32)]) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> =
        base_config(args, "fleetstream-admin").create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Topic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// How long one start-up metadata request may take, and the wait before the next while the
/// brokers cannot be reached.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until the brokers answer, then fails with [`Error::MissingTopics`] if any of
/// `topics` does not exist.
///
/// Brokers that cannot be reached are not an error: the check is retried (the readiness probe
/// reports them meanwhile) until they answer or `shutdown` is cancelled, since services may
/// start before Kafka. A topic the brokers say does not exist is: consuming or producing to it
/// would otherwise retry for ever. The metadata request lists all topics, so it never
/// auto-creates one.
pub async fn require_topics(
    args: &KafkaArgs,
    topics: &[&str],
    shutdown: &crate::Shutdown,
) -> Result<(), Error> {
    let client: Arc<BaseConsumer> =
        Arc::new(base_config(args, "fleetstream-startup-check").create()?);
    loop {
        let probe = client.clone();
        let listed = tokio::task::spawn_blocking(move || {
            probe
                .fetch_metadata(None, METADATA_TIMEOUT)
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .filter(|topic| topic.error().is_none())
                        .map(|topic| topic.name().to_owned())
                        .collect::<Vec<_>>()
                })
        })
        .await
        .map_err(|err| Error::Io(std::io::Error::other(err)))?;
        match listed {
            Ok(existing) => {
                let missing: Vec<String> = topics
                    .iter()
                    .filter(|topic| !existing.iter().any(|name| name == *topic))
                    .map(|topic| (*topic).to_owned())
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                return Err(Error::MissingTopics {
                    topics: missing,
                    brokers: args.bootstrap_servers.clone(),
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, brokers = %args.bootstrap_servers,
                    "kafka unreachable at start-up; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(METADATA_TIMEOUT) => {}
                }
            }
        }
    }
}

/// Deletes topics; missing ones are not an error.
pub async fn delete_topics(args: &KafkaArgs, topics: &[&str]) -> Result<(), Error> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        base_config(args, "fleetstream-admin").create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => {
                return Err(Error::Topic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Where a partition with no stored offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// Whether the caller runs off the async runtime: rebalance callbacks block (on the service's
/// tasks and the database), which is only allowed on the consumer's own thread, not in a task
/// that happens to drop the consumer.
pub fn on_consumer_thread() -> bool {
    tokio::runtime::Handle::try_current().is_err()
}

/// Replaces the assignment (eager protocol, inside the assign callback) with `partitions` of
/// `topic` starting at their `stored` next offsets, or at `start_from` where none is stored.
pub fn assign_at_stored<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    stored: impl Fn(i32) -> Option<i64>,
    start_from: StartFrom,
) {
    let mut assignment = TopicPartitionList::new();
    for &partition in partitions {
        let offset = match (stored(partition), start_from) {
            (Some(next), _) => Offset::Offset(next),
            (None, StartFrom::Earliest) => Offset::Beginning,
            (None, StartFrom::Latest) => Offset::End,
        };
        if let Err(err) = assignment.add_partition_offset(topic, partition, offset) {
            tracing::warn!(partition, error = %err, "cannot build assignment");
        }
    }
    if let Err(err) = consumer.assign(&assignment) {
        tracing::warn!(error = %err, "cannot re-assign at stored offsets");
    }
}

/// Leaves the group and polls (up to 5 s) until the revoke callback has run, so the other
/// members take the partitions over at once instead of after the session timeout.
pub fn leave_group<C: ConsumerContext>(consumer: &BaseConsumer<C>) {
    consumer.unsubscribe();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until
        && consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false)
    {
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// The offsets a consumer stored with its data (in PostgreSQL, in the transaction that wrote
/// the rows), by partition: where a restart would resume. Shared between the code that stores
/// them and the lag report, which must not trust the consumer's fetch position (that runs
/// ahead of what is stored by everything buffered in between).
#[derive(Debug, Default, Clone)]
pub struct StoredOffsets(Arc<Mutex<BTreeMap<i32, i64>>>);

impl StoredOffsets {
    /// `partition`'s next offset is now `next` (stored, or loaded on assignment).
    pub fn set(&self, partition: i32, next: i64) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(partition, next);
        }
    }

    /// The partition is no longer this consumer's.
    pub fn remove(&self, partition: i32) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(&partition);
        }
    }

    /// The stored next offset of `partition`, if known.
    pub fn get(&self, partition: i32) -> Option<i64> {
        self.0.lock().ok()?.get(&partition).copied()
    }
}

/// How often services call [`commit_stored`] from their poll loop.
pub const KAFKA_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Commits to Kafka the offsets stored in PostgreSQL ([`StoredOffsets`]) of the partitions
/// assigned to `consumer` that moved since the last call (`committed` remembers what went
/// out), asynchronously and best effort. So `kafka-consumer-groups.sh --describe` and other
/// lag tools that read Kafka's committed offsets agree with the service's own lag. Kafka's
/// committed offsets are never read back: a service resumes from PostgreSQL.
pub fn commit_stored<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    stored: &StoredOffsets,
    committed: &mut BTreeMap<i32, i64>,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    let mut moved = Vec::new();
    for element in assignment.elements_for_topic(topic) {
        let partition = element.partition();
        let Some(next) = stored.get(partition) else {
            continue;
        };
        if committed.get(&partition) != Some(&next)
            && tpl
                .add_partition_offset(topic, partition, Offset::Offset(next))
                .is_ok()
        {
            moved.push((partition, next));
        }
    }
    if moved.is_empty() {
        return;
    }
    match consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
        Ok(()) => committed.extend(moved),
        Err(err) => tracing::debug!(error = %err, "kafka-side offset commit not queued"),
    }
}

/// Messages a restart would have to read, per assigned partition: high watermark − the
/// offset stored with the data ([`StoredOffsets`]). A partition with nothing stored yet counts
/// from the consumer's position (where it started reading), or from the low watermark.
///
/// Runs on the consumer's poll thread, so it asks the broker once for every partition's end
/// offset (`ListOffsets` for the latest offset, batched per broker by `offsets_for_times`),
/// not once per partition: `fetch_watermarks` per partition is two requests each, and with 32
/// partitions on a loaded machine its ~64 round trips held the poll loop for 0.7–1 s every
/// report, seen as an ingest→commit spike every 10 s (BENCHMARKS.md).
pub fn stored_lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    stored: &StoredOffsets,
) -> Vec<(i32, u64)> {
    let Ok(assignment) = consumer.assignment() else {
        return Vec::new();
    };
    let partitions: Vec<(String, i32)> = assignment
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect();
    if partitions.is_empty() {
        return Vec::new();
    }
    let Some(high) = list_offsets(consumer, &partitions, Offset::End) else {
        return Vec::new();
    };
    let positions = consumer.position().ok();
    let position_of = |topic: &str, partition: i32| {
        positions
            .as_ref()
            .and_then(|p| p.find_partition(topic, partition))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
    };
    // The low watermark only where neither a stored offset nor a position says where to count
    // from (a partition assigned a moment ago).
    let unplaced: Vec<(String, i32)> = partitions
        .iter()
        .filter(|(topic, partition)| {
            stored.get(*partition).is_none() && position_of(topic, *partition).is_none()
        })
        .cloned()
        .collect();
    let low = if unplaced.is_empty() {
        BTreeMap::new()
    } else {
        list_offsets(consumer, &unplaced, Offset::Beginning).unwrap_or_default()
    };
    partitions
        .iter()
        .filter_map(|(topic, partition)| {
            let high = *high.get(&(topic.clone(), *partition))?;
            let from = stored
                .get(*partition)
                .or_else(|| position_of(topic, *partition))
                .or_else(|| low.get(&(topic.clone(), *partition)).copied())?;
            Some((*partition, (high - from).max(0) as u64))
        })
        .collect()
}

/// The earliest (`Offset::Beginning`) or latest (`Offset::End`) offset of each partition, in
/// one `ListOffsets` request per broker; `None` when the request failed. Partitions the
/// broker answered with an error are left out.
fn list_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[(String, i32)],
    which: Offset,
) -> Option<BTreeMap<(String, i32), i64>> {
    let mut query = TopicPartitionList::new();
    for (topic, partition) in partitions {
        query.add_partition_offset(topic, *partition, which).ok()?;
    }
    // A "timestamp" of -1 (latest) or -2 (earliest) is what ListOffsets takes for those.
    let answer = consumer
        .offsets_for_times(query, Duration::from_secs(1))
        .ok()?;
    Some(
        answer
            .elements()
            .iter()
            .filter(|e| e.error().is_ok())
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect(),
    )
}

/// The W3C `traceparent` header of a message, if it carries one (ingest sets it; the sink and
/// the evaluator link their spans to it).
pub fn traceparent<M: rdkafka::Message>(message: &M) -> Option<String> {
    use rdkafka::message::Headers;
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == schemas::topics::HEADER_TRACEPARENT)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// The partition of `key` among `partitions`, as the producers place it: librdkafka's
/// `murmur2_random` partitioner and the Java client's default both compute
/// `toPositive(murmur2(key)) % partitions`. Consumers use it to know which devices belong to
/// the partitions they own before those devices send anything.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's `Utils.murmur2` (seed `0x9747b28c`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ (data.len() as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_test_vectors() {
        // From Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58_897_971
        );
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }

    #[test]
    fn partitions_are_non_negative_and_in_range() {
        for key in [&b""[..], b"t/d", b"tenant-a/dev-000001"] {
            let p = partition_for_key(key, 12);
            assert!((0..12).contains(&p), "{p}");
        }
        assert_eq!(partition_for_key(b"x", 0), 0);
    }
}
