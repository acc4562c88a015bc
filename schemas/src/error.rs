//! Errors of the contracts crate.

/// Why a Kafka value could not be decoded.
///
/// Decoding never panics: every malformed input maps to one of these.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the framing header needs.
    #[error("truncated message: {len} bytes, the header needs {needed}")]
    Truncated { len: usize, needed: usize },
    /// Neither single-object (`C3 01`) nor Confluent (`00`) framing.
    #[error("unknown framing: first bytes {0:02x?}")]
    BadMagic(Vec<u8>),
    /// Single-object encoding with a fingerprint of no shipped schema.
    #[error("unknown schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    /// Confluent wire format with a schema id this codec was not given.
    #[error("unknown confluent schema id {0}")]
    UnknownSchemaId(u32),
    /// Confluent wire format with a schema id the schema registry does not hold.
    #[error("schema id {0} is not in the schema registry")]
    NotInRegistry(u32),
    /// The registry's schema for this id cannot be read into the current schema.
    #[error("schema id {id} from the schema registry cannot be read: {reason}")]
    UnreadableWriter { id: u32, reason: String },
    /// The Avro body does not match the writer schema (truncated, bad lengths, bad union index).
    #[error("invalid avro body: {0}")]
    Body(String),
    /// Bytes left over after the record: the writer schema was not the one the header names.
    #[error("{0} trailing bytes after the record")]
    TrailingBytes(usize),
    /// The decoded record does not have the shape the Rust type needs.
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The value does not validate against the writer schema (for example a non-finite timestamp).
    #[error("value does not match schema {schema}: {reason}")]
    Schema { schema: String, reason: String },
    /// No schema id was configured for Confluent framing.
    #[error("confluent framing needs a schema id for {0}")]
    NoSchemaId(String),
}

/// Why a schema file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("invalid avro schema {name}: {reason}")]
    Parse { name: String, reason: String },
    #[error("schema {name} is not a record named {expected}")]
    WrongRecord { name: String, expected: String },
    #[error("reader schema {reader} cannot read data written with {writer}: {reason}")]
    Incompatible {
        reader: String,
        writer: String,
        reason: String,
    },
}

/// Errors of migrations and storage-layout handling.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("layout `timescaledb` was requested but the server does not offer the extension")]
    TimescaleUnavailable,
    #[error("unknown storage layout `{0}` (expected auto, timescaledb or postgres)")]
    UnknownLayout(String),
    #[error("{setting}: {reason}")]
    InvalidSetting {
        setting: &'static str,
        reason: String,
    },
}
