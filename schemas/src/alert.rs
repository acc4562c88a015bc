//! The `AlertEvent` record: one alert lifecycle transition on `alerts.v1`.

use std::sync::LazyLock;

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::avro::{fields, AvroRecord, Codec, SchemaSource};
use crate::error::DecodeError;

/// Every shipped version of the alert-event schema, oldest first. The last one is current.
pub const ALERT_EVENT_SCHEMAS: &[SchemaSource<'static>] = &[SchemaSource {
    name: "alert_event.v1",
    json: include_str!("../avro/alert_event.v1.avsc"),
}];

/// One alert lifecycle transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Stable across redeliveries: consumers deduplicate on it.
    pub event_id: String,
    pub alert_id: i64,
    pub rule_id: i64,
    pub rule_name: String,
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    /// `pending`, `firing` or `resolved`.
    pub status: String,
    pub previous_status: Option<String>,
    pub severity: String,
    pub metric: Option<String>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// Event time of the transition.
    pub time: DateTime<Utc>,
    pub emitted_at: DateTime<Utc>,
}

impl AvroRecord for AlertEvent {
    const FULL_NAME: &'static str = "io.fleetstream.AlertEvent";

    fn to_avro(&self) -> Value {
        Value::Record(vec![
            ("event_id".into(), Value::String(self.event_id.clone())),
            ("alert_id".into(), Value::Long(self.alert_id)),
            ("rule_id".into(), Value::Long(self.rule_id)),
            ("rule_name".into(), Value::String(self.rule_name.clone())),
            ("tenant_id".into(), Value::String(self.tenant_id.clone())),
            ("device_id".into(), Value::String(self.device_id.clone())),
            (
                "site_id".into(),
                fields::nullable(self.site_id.clone().map(Value::String)),
            ),
            ("status".into(), Value::String(self.status.clone())),
            (
                "previous_status".into(),
                fields::nullable(self.previous_status.clone().map(Value::String)),
            ),
            ("severity".into(), Value::String(self.severity.clone())),
            (
                "metric".into(),
                fields::nullable(self.metric.clone().map(Value::String)),
            ),
            (
                "value".into(),
                fields::nullable(self.value.map(Value::Double)),
            ),
            (
                "threshold".into(),
                fields::nullable(self.threshold.map(Value::Double)),
            ),
            (
                "time".into(),
                Value::TimestampMicros(self.time.timestamp_micros()),
            ),
            (
                "emitted_at".into(),
                Value::TimestampMicros(self.emitted_at.timestamp_micros()),
            ),
        ])
    }

    fn from_avro(value: Value) -> Result<Self, DecodeError> {
        let Value::Record(record) = value else {
            return Err(fields::wrong("<record>", "record", &value));
        };
        let mut fields_by_name: std::collections::HashMap<String, Value> =
            record.into_iter().collect();
        let mut take = |field: &'static str| {
            fields_by_name.remove(field).ok_or(DecodeError::Field {
                field,
                reason: "missing".to_owned(),
            })
        };
        Ok(AlertEvent {
            event_id: fields::string("event_id", take("event_id")?)?,
            alert_id: fields::long("alert_id", take("alert_id")?)?,
            rule_id: fields::long("rule_id", take("rule_id")?)?,
            rule_name: fields::string("rule_name", take("rule_name")?)?,
            tenant_id: fields::string("tenant_id", take("tenant_id")?)?,
            device_id: fields::string("device_id", take("device_id")?)?,
            site_id: fields::opt_string("site_id", take("site_id")?)?,
            status: fields::string("status", take("status")?)?,
            previous_status: fields::opt_string("previous_status", take("previous_status")?)?,
            severity: fields::string("severity", take("severity")?)?,
            metric: fields::opt_string("metric", take("metric")?)?,
            value: fields::opt_double("value", take("value")?)?,
            threshold: fields::opt_double("threshold", take("threshold")?)?,
            time: fields::timestamp_micros("time", take("time")?)?,
            emitted_at: fields::timestamp_micros("emitted_at", take("emitted_at")?)?,
        })
    }
}

static ALERT_CODEC: LazyLock<Result<Codec<AlertEvent>, String>> = LazyLock::new(|| {
    let (current, older) = ALERT_EVENT_SCHEMAS
        .split_last()
        .ok_or_else(|| "no alert-event schema shipped".to_owned())?;
    Codec::new(*current, older).map_err(|err| err.to_string())
});

/// The process-wide codec over every shipped alert-event schema version.
pub fn alert_codec() -> Result<&'static Codec<AlertEvent>, crate::error::SchemaError> {
    ALERT_CODEC
        .as_ref()
        .map_err(|reason| crate::error::SchemaError::Parse {
            name: "alert_event".to_owned(),
            reason: reason.clone(),
        })
}
