//! librdkafka client settings shared by every service, and topic administration.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

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
pub fn producer_config(args: &KafkaArgs, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
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
