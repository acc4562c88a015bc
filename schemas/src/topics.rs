//! Topic names and Kafka header names (DESIGN §4).

/// Telemetry readings, key `"{tenant_id}/{device_id}"`.
pub const TELEMETRY_TOPIC: &str = "telemetry.v1";
/// Alert lifecycle events, key `"{tenant_id}/{device_id}"`.
pub const ALERTS_TOPIC: &str = "alerts.v1";
/// Dead letters of `telemetry.v1`: the original bytes plus the headers below.
pub const TELEMETRY_DLQ_TOPIC: &str = "telemetry.v1.dlq";
/// Default partition count of `telemetry.v1` and `alerts.v1`.
pub const DEFAULT_PARTITIONS: i32 = 12;

/// W3C trace context, from ingest to sink and evaluator.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// DLQ: why the message was dead-lettered.
pub const HEADER_ERROR: &str = "error";
/// DLQ: the stage that rejected it (`decode`, `database`).
pub const HEADER_ERROR_STAGE: &str = "error_stage";
/// DLQ: where the message came from.
pub const HEADER_SOURCE_TOPIC: &str = "source_topic";
pub const HEADER_SOURCE_PARTITION: &str = "source_partition";
pub const HEADER_SOURCE_OFFSET: &str = "source_offset";
