//! From request bodies to validated readings.
//!
//! A body is one JSON object, a JSON array of objects, or NDJSON (one object per line). A
//! malformed JSON document or array fails the whole request; in NDJSON each line stands on
//! its own, so a malformed line is that message's error only. Each message is then checked
//! against the `Telemetry` schema and the ingest limits below; every refusal names the
//! field and the message index.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use schemas::telemetry::DEFAULT_MSG_TYPE;
use schemas::MetricValue;
use serde_json::{Map, Value};

use crate::error::Rejection;

/// At most this many metrics in one message.
pub const MAX_METRICS: usize = 256;
/// Longest string metric value, in bytes.
pub const MAX_STRING_BYTES: usize = 1024;
/// Pattern of metric names and identifiers (the `fleet_id` domain).
pub const NAME_PATTERN: &str = "[A-Za-z0-9_.:-]{1,64}";

/// Body formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One object or an array of objects.
    Json,
    /// One object per line.
    NdJson,
}

impl Format {
    /// The format named by a `Content-Type` (absent means JSON).
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, Rejection> {
        let Some(value) = content_type else {
            return Ok(Format::Json);
        };
        let essence = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" | "" => Ok(Format::Json),
            "application/x-ndjson" | "application/jsonl" | "application/jsonlines" => {
                Ok(Format::NdJson)
            }
            _ => Err(Rejection::unsupported_media_type()),
        }
    }
}

/// The messages of a body, each parsed or refused, and whether it was a batch.
#[derive(Debug)]
pub struct Parsed {
    pub messages: Vec<Result<Value, Rejection>>,
    /// False for a single JSON object.
    pub batch: bool,
}

/// Splits and parses a body. Whole-body failures (malformed JSON, empty body) are an `Err`.
pub fn parse_body(format: Format, body: &[u8]) -> Result<Parsed, Rejection> {
    match format {
        Format::Json => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|err| Rejection::malformed(format!("malformed json: {err}")))?;
            match value {
                Value::Array(items) => {
                    if items.is_empty() {
                        return Err(Rejection::bad_request("empty batch"));
                    }
                    Ok(Parsed {
                        messages: items.into_iter().map(Ok).collect(),
                        batch: true,
                    })
                }
                other => Ok(Parsed {
                    messages: vec![Ok(other)],
                    batch: false,
                }),
            }
        }
        Format::NdJson => {
            let messages: Vec<Result<Value, Rejection>> = body
                .split(|b| *b == b'\n')
                .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                .enumerate()
                .map(|(index, line)| {
                    serde_json::from_slice(line).map_err(|err| {
                        Rejection::malformed(format!("malformed json: {err}")).at(index)
                    })
                })
                .collect();
            if messages.is_empty() {
                return Err(Rejection::bad_request("empty batch"));
            }
            Ok(Parsed {
                messages,
                batch: true,
            })
        }
    }
}

/// Time window a reading's `time` must fall in.
#[derive(Debug, Clone, Copy)]
pub struct TimeLimits {
    /// How far ahead of the ingest clock a device clock may be.
    pub max_future: Duration,
    /// Readings older than this would be dropped by retention at once.
    pub retention: Duration,
}

/// A message that passed validation; tenant and device are not yet checked against the token.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub tenant_id: Option<String>,
    pub device_id: Option<String>,
    pub site_id: Option<String>,
    pub msg_type: String,
    pub seq: i64,
    pub time: DateTime<Utc>,
    pub metrics: BTreeMap<String, MetricValue>,
}

/// True for `[A-Za-z0-9_.:-]{1,64}`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Checks one message against the schema and limits; `now` is the ingest clock.
pub fn validate(
    value: Value,
    now: DateTime<Utc>,
    limits: TimeLimits,
) -> Result<Reading, Rejection> {
    let Value::Object(mut object) = value else {
        return Err(Rejection::bad_request("expected a json object"));
    };
    let tenant_id = take_id(&mut object, "tenant_id")?;
    let device_id = take_id(&mut object, "device_id")?;
    let site_id = take_id(&mut object, "site_id")?;
    let msg_type = match object.remove("msg_type") {
        None | Some(Value::Null) => DEFAULT_MSG_TYPE.to_owned(),
        Some(Value::String(s)) if is_valid_name(&s) => s,
        Some(Value::String(_)) => {
            return Err(Rejection::invalid(
                "msg_type",
                format!("must match {NAME_PATTERN}"),
            ))
        }
        Some(_) => return Err(Rejection::invalid("msg_type", "expected a string")),
    };
    let seq = match object.remove("seq") {
        None | Some(Value::Null) => return Err(Rejection::invalid("seq", "missing")),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| Rejection::invalid("seq", "expected a 64-bit integer"))?,
        Some(_) => return Err(Rejection::invalid("seq", "expected a 64-bit integer")),
    };
    let time = match object.remove("time") {
        None | Some(Value::Null) => now,
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(&s)
            .map_err(|_| Rejection::invalid("time", "expected an rfc 3339 timestamp"))?
            .with_timezone(&Utc),
        Some(_) => return Err(Rejection::invalid("time", "expected an rfc 3339 timestamp")),
    };
    check_time(time, now, limits)?;
    let metrics = match object.remove("metrics") {
        None | Some(Value::Null) => return Err(Rejection::invalid("metrics", "missing")),
        Some(Value::Object(map)) => metrics(map)?,
        Some(_) => return Err(Rejection::invalid("metrics", "expected an object")),
    };
    if let Some(field) = object.keys().next() {
        return Err(Rejection::invalid(truncate(field), "unknown field"));
    }
    Ok(Reading {
        tenant_id,
        device_id,
        site_id,
        msg_type,
        seq,
        time,
        metrics,
    })
}

fn take_id(
    object: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, Rejection> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if is_valid_name(&s) => Ok(Some(s)),
        Some(Value::String(_)) => Err(Rejection::invalid(
            field,
            format!("must match {NAME_PATTERN}"),
        )),
        Some(_) => Err(Rejection::invalid(field, "expected a string")),
    }
}

fn check_time(
    time: DateTime<Utc>,
    now: DateTime<Utc>,
    limits: TimeLimits,
) -> Result<(), Rejection> {
    let ahead = time.signed_duration_since(now);
    if ahead.to_std().is_ok_and(|ahead| ahead > limits.max_future) {
        return Err(Rejection::invalid(
            "time",
            format!("more than {}s in the future", limits.max_future.as_secs()),
        ));
    }
    let age = now.signed_duration_since(time);
    if age.to_std().is_ok_and(|age| age > limits.retention) {
        return Err(Rejection::invalid(
            "time",
            format!(
                "older than the retention window of {}s",
                limits.retention.as_secs()
            ),
        ));
    }
    Ok(())
}

fn metrics(map: Map<String, Value>) -> Result<BTreeMap<String, MetricValue>, Rejection> {
    if map.len() > MAX_METRICS {
        return Err(Rejection::invalid(
            "metrics",
            format!("more than {MAX_METRICS} metrics"),
        ));
    }
    let mut out = BTreeMap::new();
    for (name, value) in map {
        if !is_valid_name(&name) {
            return Err(Rejection::invalid(
                format!("metrics.{}", truncate(&name)),
                format!("metric name must match {NAME_PATTERN}"),
            ));
        }
        let value = match value {
            Value::Null => MetricValue::Null,
            Value::Bool(b) => MetricValue::Bool(b),
            Value::Number(n) => match n.as_i64() {
                Some(v) => MetricValue::Long(v),
                None => match n.as_f64() {
                    Some(v) if v.is_finite() => MetricValue::Double(v),
                    _ => {
                        return Err(Rejection::invalid(
                            format!("metrics.{name}"),
                            "number is not finite",
                        ))
                    }
                },
            },
            Value::String(s) if s.len() > MAX_STRING_BYTES => {
                return Err(Rejection::invalid(
                    format!("metrics.{name}"),
                    format!("string longer than {MAX_STRING_BYTES} bytes"),
                ))
            }
            Value::String(s) => MetricValue::String(s),
            Value::Array(_) | Value::Object(_) => {
                return Err(Rejection::invalid(
                    format!("metrics.{name}"),
                    "expected null, boolean, number or string",
                ))
            }
        };
        out.insert(name, value);
    }
    Ok(out)
}

/// Client-supplied names echoed in errors are cut to 64 characters.
fn truncate(name: &str) -> String {
    name.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: TimeLimits = TimeLimits {
        max_future: Duration::from_secs(300),
        retention: Duration::from_secs(90 * 86_400),
    };

    fn check(value: Value) -> Result<Reading, Rejection> {
        validate(value, Utc::now(), LIMITS)
    }

    fn refusal(value: Value) -> (Option<String>, String) {
        let rejection = check(value).unwrap_err();
        (rejection.field, rejection.error)
    }

    #[test]
    fn a_minimal_message_gets_defaults() {
        let now = Utc::now();
        let reading = validate(json!({"seq": 1, "metrics": {"t": 1.5}}), now, LIMITS).unwrap();
        assert_eq!(reading.msg_type, "telemetry");
        assert_eq!(reading.time, now);
        assert_eq!(reading.metrics["t"], MetricValue::Double(1.5));
        assert_eq!(reading.device_id, None);
    }

    #[test]
    fn metric_values_keep_their_types() {
        let reading = check(json!({"seq": 1, "metrics": {
            "n": null, "b": true, "i": -3, "d": 2.5, "s": "ok"
        }}))
        .unwrap();
        assert_eq!(reading.metrics["n"], MetricValue::Null);
        assert_eq!(reading.metrics["b"], MetricValue::Bool(true));
        assert_eq!(reading.metrics["i"], MetricValue::Long(-3));
        assert_eq!(reading.metrics["d"], MetricValue::Double(2.5));
        assert_eq!(reading.metrics["s"], MetricValue::String("ok".into()));
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        assert_eq!(
            refusal(json!({"metrics": {}})),
            (Some("seq".into()), "missing".into())
        );
        assert_eq!(
            refusal(json!({"seq": "1", "metrics": {}})),
            (Some("seq".into()), "expected a 64-bit integer".into())
        );
        assert_eq!(
            refusal(json!({"seq": 1})),
            (Some("metrics".into()), "missing".into())
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": []})),
            (Some("metrics".into()), "expected an object".into())
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {}, "time": 5})),
            (Some("time".into()), "expected an rfc 3339 timestamp".into())
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {}, "device_id": "a/b"})),
            (
                Some("device_id".into()),
                format!("must match {NAME_PATTERN}")
            )
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {}, "received_at": "x"})),
            (Some("received_at".into()), "unknown field".into())
        );
    }

    #[test]
    fn metric_limits_are_enforced() {
        let many: Map<String, Value> = (0..=MAX_METRICS)
            .map(|i| (format!("m{i}"), json!(i)))
            .collect();
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": many})),
            (Some("metrics".into()), "more than 256 metrics".into())
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {"bad name": 1}})),
            (
                Some("metrics.bad name".into()),
                format!("metric name must match {NAME_PATTERN}")
            )
        );
        let long_name = "x".repeat(65);
        assert!(check(json!({"seq": 1, "metrics": {long_name: 1}})).is_err());
        assert!(check(json!({"seq": 1, "metrics": {"x".repeat(64): 1}})).is_ok());
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {"s": "x".repeat(1025)}})),
            (
                Some("metrics.s".into()),
                "string longer than 1024 bytes".into()
            )
        );
        assert!(check(json!({"seq": 1, "metrics": {"s": "x".repeat(1024)}})).is_ok());
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {"o": {"a": 1}}})),
            (
                Some("metrics.o".into()),
                "expected null, boolean, number or string".into()
            )
        );
    }

    #[test]
    fn json_cannot_smuggle_non_finite_numbers() {
        // serde_json refuses out-of-range literals, so an overflowing number is malformed JSON.
        assert!(parse_body(Format::Json, br#"{"seq":1,"metrics":{"x":1e999}}"#).is_err());
        assert!(parse_body(Format::Json, br#"{"seq":1,"metrics":{"x":NaN}}"#).is_err());
    }

    #[test]
    fn time_window_is_enforced() {
        let now = Utc::now();
        let future = now + chrono::Duration::seconds(301);
        let rejection = validate(
            json!({"seq": 1, "metrics": {}, "time": future.to_rfc3339()}),
            now,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(rejection.error, "more than 300s in the future");
        let past = now - chrono::Duration::days(91);
        let rejection = validate(
            json!({"seq": 1, "metrics": {}, "time": past.to_rfc3339()}),
            now,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(
            rejection.error,
            "older than the retention window of 7776000s"
        );
        let near = now + chrono::Duration::seconds(299);
        assert!(validate(
            json!({"seq": 1, "metrics": {}, "time": near.to_rfc3339()}),
            now,
            LIMITS
        )
        .is_ok());
    }

    #[test]
    fn bodies_split_into_messages() {
        let single = parse_body(Format::Json, br#"{"seq":1}"#).unwrap();
        assert!(!single.batch);
        assert_eq!(single.messages.len(), 1);
        let array = parse_body(Format::Json, br#"[{"seq":1},{"seq":2}]"#).unwrap();
        assert!(array.batch);
        assert_eq!(array.messages.len(), 2);
        let nd = parse_body(Format::NdJson, b"{\"seq\":1}\n\n{oops\n{\"seq\":3}\n").unwrap();
        assert_eq!(nd.messages.len(), 3);
        assert_eq!(nd.messages[1].as_ref().unwrap_err().index, Some(1));
        assert!(parse_body(Format::Json, b"[]").is_err());
        let malformed = parse_body(Format::Json, b"{\"seq\":").unwrap_err();
        assert_eq!(
            malformed.error,
            "malformed json: EOF while parsing a value at line 1 column 7"
        );
    }

    #[test]
    fn content_types_choose_the_format() {
        assert_eq!(Format::from_content_type(None).unwrap(), Format::Json);
        assert_eq!(
            Format::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Format::Json
        );
        assert_eq!(
            Format::from_content_type(Some("application/x-ndjson")).unwrap(),
            Format::NdJson
        );
        assert!(Format::from_content_type(Some("text/plain")).is_err());
    }
}
