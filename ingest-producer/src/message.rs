//! From request bodies to validated readings.
//!
//! A body is one JSON object, a JSON array of objects, or NDJSON (one object per line). A
//! malformed JSON document or array fails the whole request; in NDJSON each line stands on
//! its own, so a malformed line is that message's error only. Each message is read by the
//! `json` module, which refuses what PostgreSQL would not store as sent (integers outside
//! 64 bits, numbers a double cannot hold, U+0000, lone surrogates, duplicate keys), then
//! checked against the `Telemetry` schema and the ingest limits below; every refusal names
//! the field and the message index.
//!
//! What an accepted message becomes, field by field ([`Reading`], then [`Reading::into_telemetry`]):
//!
//! * a metric written as an integer literal (no fraction, no exponent) is a `long` with
//!   exactly that value; any other number is the `double` nearest to it (the shortest text of
//!   a double reads back bit for bit); `true`/`false`, `null` and strings are kept as they are;
//! * `time` is the instant written, kept to the microsecond (the precision of PostgreSQL's
//!   `timestamptz`), or the ingest clock when absent;
//! * readings of one tenant and device with the same `time` are one point: the sink merges
//!   them (union of metrics, last write wins per metric), and the reply counts them
//!   ([`count_points`]).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use schemas::telemetry::DEFAULT_MSG_TYPE;
use schemas::{MetricValue, Telemetry};
use serde_json::{Map, Value};

use crate::error::Rejection;
use crate::json;

/// At most this many metrics in one message.
pub const MAX_METRICS: usize = 256;
/// Longest string metric value, in bytes.
pub const MAX_STRING_BYTES: usize = 1024;
/// Pattern of metric names and identifiers (the `fleet_id` domain).
pub const NAME_PATTERN: &str = "[A-Za-z0-9_.:-]{1,64}";
/// Fractional-second digits of `time` that PostgreSQL's `timestamptz` keeps.
pub const TIME_DIGITS: usize = 6;

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

/// Splits and parses a body. Whole-body failures (malformed JSON, empty body) are an `Err`;
/// a message that is not an object, or holds a value PostgreSQL would not store as sent, is
/// that message's `Err`, with its index.
pub fn parse_body(format: Format, body: &[u8]) -> Result<Parsed, Rejection> {
    match format {
        Format::Json => {
            let document = json::checked(body)?;
            if document.starts_with('[') {
                let items = json::elements(document)?;
                if items.is_empty() {
                    return Err(Rejection::bad_request("empty batch"));
                }
                Ok(Parsed {
                    messages: items
                        .into_iter()
                        .enumerate()
                        .map(|(index, item)| json::message(item).map_err(|r| r.at(index)))
                        .collect(),
                    batch: true,
                })
            } else {
                Ok(Parsed {
                    messages: vec![json::message(document).map_err(|r| r.at(0))],
                    batch: false,
                })
            }
        }
        Format::NdJson => {
            let messages: Vec<Result<Value, Rejection>> = body
                .split(|b| *b == b'\n')
                .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                .enumerate()
                .map(|(index, line)| {
                    json::checked(line)
                        .and_then(json::message)
                        .map_err(|r| r.at(index))
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

/// The readings of a body, each validated or refused with its index, and whether it was a
/// batch: everything ingest decides about a body before the token is consulted.
#[derive(Debug)]
pub struct Readings {
    pub readings: Vec<Result<Reading, Rejection>>,
    /// False for a single JSON object.
    pub batch: bool,
}

/// Parses and validates a body; `now` is the ingest clock (the `time` of readings without one).
pub fn read_body(
    format: Format,
    body: &[u8],
    now: DateTime<Utc>,
    limits: TimeLimits,
) -> Result<Readings, Rejection> {
    let parsed = parse_body(format, body)?;
    Ok(Readings {
        readings: parsed
            .messages
            .into_iter()
            .enumerate()
            .map(|(index, message)| {
                message
                    .and_then(|value| validate(value, now, limits))
                    .map_err(|r| r.at(index))
            })
            .collect(),
        batch: parsed.batch,
    })
}

/// Distinct points (tenant, device, `time` to the microsecond, as the sink keys them) among
/// accepted readings. Readings sharing a point are merged into one row by the sink.
pub fn count_points<'a>(accepted: impl IntoIterator<Item = &'a Telemetry>) -> usize {
    accepted
        .into_iter()
        .map(|t| {
            (
                t.tenant_id.as_str(),
                t.device_id.as_str(),
                t.time.timestamp_micros(),
            )
        })
        .collect::<HashSet<_>>()
        .len()
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

impl Reading {
    /// The record produced for this reading, once the token resolved its tenant and device
    /// (`registered_site` fills in a missing `site_id`).
    pub fn into_telemetry(
        self,
        tenant_id: String,
        device_id: String,
        registered_site: Option<String>,
        received_at: DateTime<Utc>,
    ) -> Telemetry {
        Telemetry {
            tenant_id,
            device_id,
            site_id: self.site_id.or(registered_site),
            msg_type: self.msg_type,
            seq: self.seq,
            time: self.time,
            received_at,
            metrics: self.metrics,
        }
    }
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
        Some(Value::String(s)) => parse_time(&s)?,
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

/// An RFC 3339 timestamp that PostgreSQL's `timestamptz` stores as written: no digits beyond
/// the microsecond (chrono would keep nanoseconds and drop further digits, the record and
/// PostgreSQL keep microseconds) and no leap second (`:60` would become the next minute's
/// first second, the same point as a reading sent for that second).
fn parse_time(text: &str) -> Result<DateTime<Utc>, Rejection> {
    let time = DateTime::parse_from_rfc3339(text)
        .map_err(|_| Rejection::invalid("time", "expected an rfc 3339 timestamp"))?
        .with_timezone(&Utc);
    if time.nanosecond() >= 1_000_000_000 {
        return Err(Rejection::invalid(
            "time",
            "leap second (second 60) cannot be stored as sent",
        ));
    }
    // The date and the offset hold no `.`; the fraction is the digits after the only one.
    let fraction = text
        .split_once('.')
        .map(|(_, rest)| rest.bytes().take_while(u8::is_ascii_digit))
        .into_iter()
        .flatten();
    if fraction.skip(TIME_DIGITS).any(|digit| digit != b'0') {
        return Err(Rejection::invalid(
            "time",
            format!("more precise than a microsecond (PostgreSQL stores {TIME_DIGITS} fractional digits)"),
        ));
    }
    Ok(time)
}

pub(crate) fn check_time(
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
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(v), _) => MetricValue::Long(v),
                (None, Some(v)) if n.is_f64() && v.is_finite() => MetricValue::Double(v),
                // The `json` module refuses these first; a `Value` built elsewhere may hold them.
                (None, _) if n.is_u64() => {
                    return Err(Rejection::invalid(
                        format!("metrics.{name}"),
                        "integer outside the signed 64-bit range",
                    ))
                }
                (None, _) => {
                    return Err(Rejection::invalid(
                        format!("metrics.{name}"),
                        "number is not finite",
                    ))
                }
            },
            Value::String(s) if s.len() > MAX_STRING_BYTES => {
                return Err(Rejection::invalid(
                    format!("metrics.{name}"),
                    format!("string longer than {MAX_STRING_BYTES} bytes"),
                ))
            }
            Value::String(s) if s.contains('\0') => {
                return Err(Rejection::invalid(
                    format!("metrics.{name}"),
                    "string contains U+0000, which PostgreSQL cannot store",
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
    use chrono::SecondsFormat;
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
        // An overflowing literal is that message's refusal, naming the metric.
        let parsed = parse_body(Format::Json, br#"{"seq":1,"metrics":{"x":1e999}}"#).unwrap();
        let rejection = parsed.messages[0].as_ref().unwrap_err();
        assert_eq!(
            (rejection.field.as_deref(), rejection.error.as_str()),
            (
                Some("metrics.x"),
                "number outside the range of a 64-bit float"
            )
        );
        assert_eq!(rejection.index, Some(0));
        // NaN and Infinity are not JSON: the body is malformed; the error says where and what
        // to send instead.
        let nan = parse_body(Format::Json, br#"{"seq":1,"metrics":{"x":NaN}}"#).unwrap_err();
        assert_eq!(
            nan.error,
            "malformed json: NaN at line 1 column 25 is not a json number; send null instead"
        );
        let nd = parse_body(Format::NdJson, b"{\"seq\":1,\"metrics\":{}}\n[Infinity]\n").unwrap();
        assert_eq!(
            nd.messages[1].as_ref().unwrap_err().error,
            "malformed json: Infinity at line 1 column 2 is not a json number; send null instead"
        );
    }

    #[test]
    fn values_built_in_code_are_held_to_the_same_rules() {
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {"c": u64::MAX}})),
            (
                Some("metrics.c".into()),
                "integer outside the signed 64-bit range".into()
            )
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {"s": "a\u{0}"}})),
            (
                Some("metrics.s".into()),
                "string contains U+0000, which PostgreSQL cannot store".into()
            )
        );
        assert_eq!(
            refusal(json!({"seq": 1, "metrics": {}, "device_id": "d\u{0}"})),
            (
                Some("device_id".into()),
                format!("must match {NAME_PATTERN}")
            )
        );
    }

    #[test]
    fn time_is_refused_when_postgresql_would_not_store_it_as_written() {
        let now: DateTime<Utc> = "2026-06-30T23:59:59.5Z".parse().unwrap();
        let at = |time: &str| validate(json!({"seq": 1, "metrics": {}, "time": time}), now, LIMITS);
        for exact in [
            "2026-06-30T23:59:59.123456Z",
            "2026-06-30T23:59:59.123456000Z",
            "2026-06-30T23:59:59.1Z",
            "2026-06-30T23:59:59Z",
            "2026-07-01T01:59:59.123456+02:00",
        ] {
            let time = at(exact).unwrap().time;
            assert_eq!(
                time,
                DateTime::parse_from_rfc3339(exact).unwrap(),
                "{exact}"
            );
        }
        for (text, error) in [
            (
                "2026-06-30T23:59:59.1234567Z",
                "more precise than a microsecond (PostgreSQL stores 6 fractional digits)",
            ),
            (
                "2026-06-30T23:59:59.1234560000001Z",
                "more precise than a microsecond (PostgreSQL stores 6 fractional digits)",
            ),
            (
                "2026-06-30T23:59:60Z",
                "leap second (second 60) cannot be stored as sent",
            ),
        ] {
            let rejection = at(text).unwrap_err();
            assert_eq!(
                (rejection.field.as_deref(), rejection.error.as_str()),
                (Some("time"), error),
                "{text}"
            );
        }
    }

    #[test]
    fn readings_of_one_device_and_time_are_one_point() {
        let now = Utc::now();
        let body = br#"[
            {"device_id":"a","seq":1,"metrics":{"t":1}},
            {"device_id":"a","seq":2,"metrics":{"h":1}},
            {"device_id":"b","seq":3,"metrics":{"t":1}},
            {"device_id":"a","seq":4,"metrics":{"t":1},"time":"2020-01-01T00:00:00Z"},
            {"device_id":"a","seq":5,"metrics":{"t":2}}
        ]"#;
        let readings = read_body(Format::Json, body, now, LIMITS).unwrap();
        assert!(readings.batch);
        let telemetry: Vec<Telemetry> = readings
            .readings
            .into_iter()
            .filter_map(Result::ok)
            .map(|r| {
                let device = r.device_id.clone().unwrap();
                r.into_telemetry("acme".into(), device, None, now)
            })
            .collect();
        // seq 4 is refused (outside retention): a, a, b, a are two points.
        assert_eq!(telemetry.len(), 4);
        assert_eq!(count_points(&telemetry), 2);
        // The same device in another tenant is another point.
        let mut other = telemetry[0].clone();
        other.tenant_id = "globex".into();
        assert_eq!(count_points(telemetry.iter().chain([&other])), 3);
        assert_eq!(count_points(&[]), 0);
    }

    #[test]
    fn time_window_is_enforced() {
        let now = Utc::now();
        let future = now + chrono::Duration::seconds(301);
        let rejection = validate(
            json!({"seq": 1, "metrics": {}, "time": future.to_rfc3339_opts(SecondsFormat::Micros, true)}),
            now,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(rejection.error, "more than 300s in the future");
        let past = now - chrono::Duration::days(91);
        let rejection = validate(
            json!({"seq": 1, "metrics": {}, "time": past.to_rfc3339_opts(SecondsFormat::Micros, true)}),
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
            json!({"seq": 1, "metrics": {}, "time": near.to_rfc3339_opts(SecondsFormat::Micros, true)}),
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
