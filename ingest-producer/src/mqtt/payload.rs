//! MQTT topics and payloads: what a PUBLISH may be, and the readings it makes.
//!
//! | topic | token | payload |
//! |---|---|---|
//! | `v1/devices/me/telemetry` | device | ThingsBoard's: `{"k": v, …}` (server time), `{"ts": <epoch ms>, "values": {…}}`, or an array of those |
//! | `v1/gateway/telemetry` | gateway | ThingsBoard's: `{"<device>": [{"ts": …, "values": {…}} or {"k": v, …}, …], …}` |
//! | `fleet/v1/telemetry` | device or gateway | the JSON of `POST /v1/telemetry` (one object or an array) |
//!
//! A ThingsBoard reading becomes the message `POST /v1/telemetry` would take,
//! `{"seq": 0, "time": <ts as RFC 3339, to the millisecond>, "metrics": <values>}` (without
//! `time` for the server-time form, and with `device_id` on the gateway topic), and is then
//! validated by [`crate::message::validate`], the same function as HTTP's: a reading sent over
//! MQTT and the same reading sent over HTTP are the same record. ThingsBoard payloads carry
//! no sequence number: `seq` is 0, as for line protocol, so a re-sent reading is the same
//! reading (and the same point).
//!
//! JSON is read by the same checks as HTTP bodies (integers outside 64 bits, numbers a
//! double cannot hold, U+0000, duplicate keys are refused). Differences from ThingsBoard,
//! which stores whatever it is given: metric names must match the metric-name pattern,
//! values must be null, booleans, numbers or strings (ThingsBoard keeps JSON objects as
//! values), a `{ts, values}` object may hold no other key, and on the gateway topic a
//! device's entry that is not an array refuses the publish (ThingsBoard skips it silently).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::credentials::Principal;
use crate::error::Rejection;
use crate::json;
use crate::message::{read_body, validate, Format, Reading, TimeLimits};

/// ThingsBoard's device telemetry topic.
pub const DEVICE_TOPIC: &str = "v1/devices/me/telemetry";
/// ThingsBoard's gateway telemetry topic.
pub const GATEWAY_TOPIC: &str = "v1/gateway/telemetry";
/// Our own topic: the JSON of `POST /v1/telemetry`.
pub const FLEET_TOPIC: &str = "fleet/v1/telemetry";

/// The payload form a topic takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// [`DEVICE_TOPIC`].
    Device,
    /// [`GATEWAY_TOPIC`].
    Gateway,
    /// [`FLEET_TOPIC`].
    Fleet,
}

impl Topic {
    /// The topic a token may publish to (the ACL): a device token its own ThingsBoard topic,
    /// a gateway token the gateway topic, both our own; anything else is refused (`403`,
    /// PUBACK 0x87 on MQTT 5).
    pub fn of(name: &str, principal: &Principal) -> Result<Topic, Rejection> {
        let topic = match name {
            DEVICE_TOPIC => Topic::Device,
            GATEWAY_TOPIC => Topic::Gateway,
            FLEET_TOPIC => Topic::Fleet,
            _ => {
                return Err(Rejection::forbidden(
                    "topic",
                    format!(
                        "topic not allowed: publish to {DEVICE_TOPIC} (device token), \
                         {GATEWAY_TOPIC} (gateway token) or {FLEET_TOPIC}"
                    ),
                ))
            }
        };
        match (topic, principal) {
            (Topic::Device, Principal::Gateway { .. }) => Err(Rejection::forbidden(
                "topic",
                format!("a gateway token publishes to {GATEWAY_TOPIC}"),
            )),
            (Topic::Gateway, Principal::Device { .. }) => Err(Rejection::forbidden(
                "topic",
                format!("a device token publishes to {DEVICE_TOPIC}"),
            )),
            _ => Ok(topic),
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Topic::Device => "device",
            Topic::Gateway => "gateway",
            Topic::Fleet => "fleet",
        }
    }
}

/// The readings of a payload, each validated or refused with its index; `now` is the ingest
/// clock. A payload that is not JSON, or not of the topic's shape, is an `Err`.
pub fn readings(
    topic: Topic,
    payload: &[u8],
    now: DateTime<Utc>,
    limits: TimeLimits,
) -> Result<Vec<Result<Reading, Rejection>>, Rejection> {
    if topic == Topic::Fleet {
        return Ok(read_body(Format::Json, payload, now, limits)?.readings);
    }
    let document = json::checked(payload)?;
    let messages = match topic {
        Topic::Device => thingsboard(document, None)?,
        _ => gateway(document)?,
    };
    Ok(messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            message
                .and_then(|value| validate(value, now, limits))
                .map_err(|r| r.at(index))
        })
        .collect())
}

/// The messages of a device payload: an object or an array of objects.
fn thingsboard(
    document: &str,
    device: Option<&str>,
) -> Result<Vec<Result<Value, Rejection>>, Rejection> {
    if document.starts_with('[') {
        let items = json::elements(document)?;
        if items.is_empty() {
            return Err(Rejection::bad_request("empty batch"));
        }
        Ok(items
            .into_iter()
            .map(|item| json::message(item).and_then(|v| message(v, device)))
            .collect())
    } else {
        Ok(vec![
            json::message(document).and_then(|v| message(v, device))
        ])
    }
}

/// The messages of a gateway payload: `{"<device>": [<device payload item>, …], …}`.
fn gateway(document: &str) -> Result<Vec<Result<Value, Rejection>>, Rejection> {
    let Value::Object(devices) = json::message(document)? else {
        return Err(Rejection::bad_request("expected a json object"));
    };
    if devices.is_empty() {
        return Err(Rejection::bad_request("empty batch"));
    }
    let mut out = Vec::new();
    for (device, items) in devices {
        let Value::Array(items) = items else {
            return Err(Rejection::invalid(
                truncate(&device),
                "expected an array of readings",
            ));
        };
        for item in items {
            out.push(message(item, Some(&device)));
        }
    }
    if out.is_empty() {
        return Err(Rejection::bad_request("empty batch"));
    }
    Ok(out)
}

/// One ThingsBoard reading as the message `POST /v1/telemetry` takes.
fn message(value: Value, device: Option<&str>) -> Result<Value, Rejection> {
    let Value::Object(mut object) = value else {
        return Err(Rejection::bad_request("expected a json object"));
    };
    let timed = object.contains_key("ts") && object.contains_key("values");
    let mut out = Map::new();
    out.insert("seq".to_owned(), json!(0));
    if let Some(device) = device {
        out.insert("device_id".to_owned(), json!(device));
    }
    if timed {
        let ts = object.remove("ts").and_then(|ts| ts.as_i64());
        let time = ts
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| Rejection::invalid("ts", "expected epoch milliseconds"))?;
        let values = object.remove("values");
        if let Some(field) = object.keys().next() {
            return Err(Rejection::invalid(truncate(field), "unknown field"));
        }
        let Some(Value::Object(values)) = values else {
            return Err(Rejection::invalid("values", "expected an object"));
        };
        out.insert(
            "time".to_owned(),
            json!(time.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        out.insert("metrics".to_owned(), Value::Object(values));
    } else {
        if object.is_empty() {
            return Err(Rejection::invalid("metrics", "no values"));
        }
        out.insert("metrics".to_owned(), Value::Object(object));
    }
    Ok(Value::Object(out))
}

fn truncate(name: &str) -> String {
    name.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> TimeLimits {
        TimeLimits {
            max_future: Duration::from_secs(300),
            retention: Duration::from_secs(90 * 86_400),
        }
    }

    fn device() -> Principal {
        Principal::Device {
            tenant_id: "acme".into(),
            device_id: "d1".into(),
        }
    }

    fn gateway_token() -> Principal {
        Principal::Gateway {
            tenant_id: "acme".into(),
        }
    }

    #[test]
    fn each_token_publishes_to_its_topics_only() {
        assert_eq!(Topic::of(DEVICE_TOPIC, &device()).unwrap(), Topic::Device);
        assert_eq!(Topic::of(FLEET_TOPIC, &device()).unwrap(), Topic::Fleet);
        assert_eq!(
            Topic::of(GATEWAY_TOPIC, &gateway_token()).unwrap(),
            Topic::Gateway
        );
        assert_eq!(
            Topic::of(GATEWAY_TOPIC, &device()).unwrap_err().code,
            "forbidden"
        );
        assert_eq!(
            Topic::of(DEVICE_TOPIC, &gateway_token()).unwrap_err().code,
            "forbidden"
        );
        assert_eq!(
            Topic::of("v1/devices/other/telemetry", &device())
                .unwrap_err()
                .code,
            "forbidden"
        );
    }

    #[test]
    fn thingsboard_forms_become_post_messages() {
        let now = Utc::now();
        let ts = now.timestamp_millis() - 1000;
        let time = DateTime::from_timestamp_millis(ts).unwrap();
        let one = readings(Topic::Device, br#"{"t": 1.5, "on": true}"#, now, limits()).unwrap();
        let one = one.into_iter().next().unwrap().unwrap();
        assert_eq!(one.time, now);
        assert_eq!(one.seq, 0);
        assert_eq!(one.metrics.len(), 2);
        let body = format!(r#"[{{"ts": {ts}, "values": {{"t": 2}}}}, {{"x": "s"}}]"#);
        let many = readings(Topic::Device, body.as_bytes(), now, limits()).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].as_ref().unwrap().time, time);
        assert_eq!(many[1].as_ref().unwrap().time, now);
        let body =
            format!(r#"{{"g1": [{{"ts": {ts}, "values": {{"t": 2}}}}], "g2": [{{"u": 1}}]}}"#);
        let gw = readings(Topic::Gateway, body.as_bytes(), now, limits()).unwrap();
        assert_eq!(gw[0].as_ref().unwrap().device_id.as_deref(), Some("g1"));
        assert_eq!(gw[1].as_ref().unwrap().device_id.as_deref(), Some("g2"));
    }

    #[test]
    fn malformed_thingsboard_payloads_are_refused() {
        let now = Utc::now();
        assert!(readings(Topic::Device, b"{", now, limits()).is_err());
        assert!(readings(Topic::Gateway, br#"{"g1": {"t": 1}}"#, now, limits()).is_err());
        let r = readings(
            Topic::Device,
            br#"{"ts": "x", "values": {}}"#,
            now,
            limits(),
        )
        .unwrap();
        assert_eq!(r[0].as_ref().unwrap_err().field.as_deref(), Some("ts"));
        let r = readings(Topic::Device, br#"{"t": {"nested": 1}}"#, now, limits()).unwrap();
        assert_eq!(
            r[0].as_ref().unwrap_err().field.as_deref(),
            Some("metrics.t")
        );
        let r = readings(
            Topic::Device,
            br#"{"ts": 1, "values": {}, "x": 1}"#,
            now,
            limits(),
        )
        .unwrap();
        assert_eq!(r[0].as_ref().unwrap_err().field.as_deref(), Some("x"));
    }
}
