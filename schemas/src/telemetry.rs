//! The `Telemetry` record: one reading of one device on `telemetry.v1`.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::avro::{fields, AvroRecord, Codec, SchemaSource};
use crate::error::DecodeError;

/// Every shipped version of the telemetry schema, oldest first. The last one is current.
pub const TELEMETRY_SCHEMAS: &[SchemaSource<'static>] = &[SchemaSource {
    name: "telemetry.v1",
    json: include_str!("../avro/telemetry.v1.avsc"),
}];

/// Default `msg_type` of a reading.
pub const DEFAULT_MSG_TYPE: &str = "telemetry";

/// One metric value: the Avro union `null | boolean | long | double | string`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricValue {
    Null,
    Bool(bool),
    Long(i64),
    Double(f64),
    String(String),
}

impl MetricValue {
    fn to_avro(&self) -> Value {
        match self {
            MetricValue::Null => Value::Union(0, Box::new(Value::Null)),
            MetricValue::Bool(b) => Value::Union(1, Box::new(Value::Boolean(*b))),
            MetricValue::Long(v) => Value::Union(2, Box::new(Value::Long(*v))),
            MetricValue::Double(v) => Value::Union(3, Box::new(Value::Double(*v))),
            MetricValue::String(s) => Value::Union(4, Box::new(Value::String(s.clone()))),
        }
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        match fields::unwrap_union(value) {
            Value::Null => Ok(MetricValue::Null),
            Value::Boolean(b) => Ok(MetricValue::Bool(b)),
            Value::Long(v) => Ok(MetricValue::Long(v)),
            Value::Int(v) => Ok(MetricValue::Long(i64::from(v))),
            Value::Double(v) => Ok(MetricValue::Double(v)),
            Value::Float(v) => Ok(MetricValue::Double(f64::from(v))),
            Value::String(s) => Ok(MetricValue::String(s)),
            other => Err(fields::wrong(
                "metrics",
                "null, boolean, long, double or string",
                &other,
            )),
        }
    }

    /// The value as JSON (how it is stored in the `metrics jsonb` column).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            MetricValue::Null => serde_json::Value::Null,
            MetricValue::Bool(b) => serde_json::Value::Bool(*b),
            MetricValue::Long(v) => serde_json::Value::from(*v),
            // Non-finite doubles have no JSON form; ingest rejects them, so this is only
            // reached for data produced by other writers.
            MetricValue::Double(v) => serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            MetricValue::String(s) => serde_json::Value::String(s.clone()),
        }
    }
}

/// One reading of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub msg_type: String,
    /// Device-local sequence number.
    pub seq: i64,
    /// Device clock.
    pub time: DateTime<Utc>,
    /// Ingest clock, for end-to-end latency.
    pub received_at: DateTime<Utc>,
    /// Metric name → value. Ordered, so encoding is deterministic.
    pub metrics: BTreeMap<String, MetricValue>,
}

impl Telemetry {
    /// The Kafka key: `"{tenant_id}/{device_id}"`, so one device stays on one partition.
    pub fn key(&self) -> String {
        message_key(&self.tenant_id, &self.device_id)
    }

    /// The metrics map as a JSON object (the `metrics jsonb` column).
    pub fn metrics_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.metrics
                .iter()
                .map(|(name, value)| (name.clone(), value.to_json()))
                .collect(),
        )
    }
}

/// The Kafka key of a device's messages on `telemetry.v1` and `alerts.v1`.
pub fn message_key(tenant_id: &str, device_id: &str) -> String {
    let mut key = String::with_capacity(tenant_id.len() + device_id.len() + 1);
    key.push_str(tenant_id);
    key.push('/');
    key.push_str(device_id);
    key
}

impl AvroRecord for Telemetry {
    const FULL_NAME: &'static str = "io.fleetstream.Telemetry";

    fn to_avro(&self) -> Value {
        let metrics: HashMap<String, Value> = self
            .metrics
            .iter()
            .map(|(name, value)| (name.clone(), value.to_avro()))
            .collect();
        Value::Record(vec![
            ("tenant_id".into(), Value::String(self.tenant_id.clone())),
            ("device_id".into(), Value::String(self.device_id.clone())),
            (
                "site_id".into(),
                fields::nullable(self.site_id.clone().map(Value::String)),
            ),
            ("msg_type".into(), Value::String(self.msg_type.clone())),
            ("seq".into(), Value::Long(self.seq)),
            (
                "time".into(),
                Value::TimestampMicros(self.time.timestamp_micros()),
            ),
            (
                "received_at".into(),
                Value::TimestampMicros(self.received_at.timestamp_micros()),
            ),
            ("metrics".into(), Value::Map(metrics)),
        ])
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let Value::Record(record) = value else {
            return Err(fields::wrong("<record>", "record", &value));
        };
        let mut tenant_id = None;
        let mut device_id = None;
        let mut site_id = None;
        let mut msg_type = None;
        let mut seq = None;
        let mut time = None;
        let mut received_at = None;
        let mut metrics = None;
        for (name, value) in record {
            match name.as_str() {
                "tenant_id" => tenant_id = Some(fields::string("tenant_id", value)?),
                "device_id" => device_id = Some(fields::string("device_id", value)?),
                "site_id" => site_id = fields::opt_string("site_id", value)?,
                "msg_type" => msg_type = Some(fields::string("msg_type", value)?),
                "seq" => seq = Some(fields::long("seq", value)?),
                "time" => time = Some(fields::timestamp_micros("time", value)?),
                "received_at" => {
                    received_at = Some(fields::timestamp_micros("received_at", value)?)
                }
                "metrics" => {
                    let Value::Map(map) = value else {
                        return Err(fields::wrong("metrics", "map", &value));
                    };
                    let mut out = BTreeMap::new();
                    for (metric, v) in map {
                        out.insert(metric, MetricValue::from_avro(v)?);
                    }
                    metrics = Some(out);
                }
                // Fields added by newer versions are ignored by this type.
                _ => {}
            }
        }
        let missing = |field: &'static str| DecodeError::Field {
            field,
            reason: "missing".to_owned(),
        };
        Ok(Telemetry {
            tenant_id: tenant_id.ok_or_else(|| missing("tenant_id"))?,
            device_id: device_id.ok_or_else(|| missing("device_id"))?,
            site_id,
            msg_type: msg_type.unwrap_or_else(|| DEFAULT_MSG_TYPE.to_owned()),
            seq: seq.ok_or_else(|| missing("seq"))?,
            time: time.ok_or_else(|| missing("time"))?,
            received_at: received_at.ok_or_else(|| missing("received_at"))?,
            metrics: metrics.ok_or_else(|| missing("metrics"))?,
        })
    }

    /// `telemetry.v1` bodies are written by [`crate::fast_encode`], metrics in key order.
    fn write_body_fast(&self, schema_name: &str, out: &mut Vec<u8>) -> bool {
        if schema_name != crate::fast_encode::FAST_SCHEMA {
            return false;
        }
        crate::fast_encode::write_v1_body(self, out);
        true
    }
}

static TELEMETRY_CODEC: LazyLock<Result<Codec<Telemetry>, String>> = LazyLock::new(|| {
    let (current, older) = TELEMETRY_SCHEMAS
        .split_last()
        .ok_or_else(|| "no telemetry schema shipped".to_owned())?;
    Codec::new(*current, older).map_err(|err| err.to_string())
});

/// The process-wide codec over every shipped telemetry schema version.
///
/// The shipped schemas are compiled in and checked by this crate's tests, so this only fails
/// if a broken schema was shipped; the error says which.
pub fn telemetry_codec() -> Result<&'static Codec<Telemetry>, crate::error::SchemaError> {
    TELEMETRY_CODEC
        .as_ref()
        .map_err(|reason| crate::error::SchemaError::Parse {
            name: "telemetry".to_owned(),
            reason: reason.clone(),
        })
}
