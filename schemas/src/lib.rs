//! The contracts of fleetstream: what crosses a process boundary.
//!
//! # Layout
//!
//! * [`avro`]: framing (single-object encoding and the Confluent wire format), schema lookup by
//!   fingerprint or registry id, resolution of older versions to the newest.
//! * [`canonical`]: the specification's Parsing Canonical Form and CRC-64-AVRO fingerprints.
//! * [`fast_decode`]: `telemetry.v1` single-object bodies read straight into a `Telemetry`,
//!   equivalent to the generic decoder (the sink's and the evaluator's hot path).
//! * [`fast_encode`]: its mirror, a `Telemetry` written straight into a `telemetry.v1` body,
//!   the generic writer's bytes with metrics in key order (ingest's hot path; taken by
//!   [`Codec::encode`] and [`Codec::encode_confluent`] through [`AvroRecord::write_body_fast`]).
//! * [`telemetry`] and [`alert`]: the `Telemetry` and `AlertEvent` records and their codecs over
//!   every shipped `.avsc` version under `schemas/avro`.
//! * [`storage`]: the embedded SQL migrations (`schemas/migrations`), the two storage layouts
//!   (TimescaleDB, plain PostgreSQL) and their policies, partition upkeep.
//! * [`topics`]: default topic names and the header names on the wire.
//!
//! Every service depends on this crate; it depends on no service.

pub mod alert;
pub mod avro;
pub mod canonical;
pub mod error;
pub mod fast_decode;
pub mod fast_encode;
pub mod storage;
pub mod telemetry;
pub mod topics;

pub use alert::{alert_codec, AlertEvent};
pub use avro::{AvroRecord, Codec, Framing, SchemaSource, WriterSchema};
pub use error::{DecodeError, EncodeError, SchemaError, StorageError};
pub use fast_decode::TelemetryDecoder;
pub use storage::{migrate, Layout, LayoutChoice, StorageOptions};
pub use telemetry::{message_key, telemetry_codec, MetricValue, Telemetry};
