//! Errors of the plumbing crate.

/// What can go wrong while setting up or running shared mechanics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("storage: {0}")]
    Storage(#[from] schemas::StorageError),
    #[error("invalid setting `{name}`: {reason}")]
    Config { name: &'static str, reason: String },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("telemetry setup: {0}")]
    Telemetry(String),
    #[error("topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    /// The brokers answered and these topics do not exist: no retry will create them.
    #[error(
        "kafka topic(s) {} do not exist on {brokers}; create them (`deploy/local/deps.sh up` \
         creates the default ones, or kafka-topics.sh --create --topic NAME) or set the topic \
         variables (TELEMETRY_TOPIC, DLQ_TOPIC, ALERTS_TOPIC) to existing topics",
        topics.join(", ")
    )]
    MissingTopics {
        topics: Vec<String>,
        brokers: String,
    },
    /// The database answered but does not hold this build's schema.
    #[error(
        "database not migrated: schema version {} found, this build needs {expected}; \
         run `query-api migrate` against it first",
        found.map_or_else(|| "none".to_owned(), |v| v.to_string())
    )]
    NotMigrated { found: Option<i64>, expected: i64 },
    /// The role the service connects as lacks a right it needs.
    #[error(
        "database role `{role}` lacks {privilege}; connect as a member of `fleet_writer` \
         (the migrations grant it) or grant it"
    )]
    MissingPrivilege { role: String, privilege: String },
}
