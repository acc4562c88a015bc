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
}
