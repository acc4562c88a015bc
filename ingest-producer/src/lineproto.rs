//! InfluxDB line protocol: from a body (or an export file) to the readings ingest produces.
//!
//! Parsing is the InfluxDB project's own parser (`influxdb-line-protocol`, from InfluxDB
//! IOx); this module adds what it leaves to the caller: line numbers (a line is numbered by
//! the physical line it starts on, so a string field holding a newline does not shift the
//! numbers after it), CRLF line ends, bodies that are not UTF-8 (only the offending lines are
//! refused), the `precision` of timestamps, and then the mapping onto the `Telemetry` record:
//!
//! * **tenant**: the token's, never the payload's;
//! * **device**: the value of the first tag of [`Mapping::device_tags`] the line has
//!   (default `device_id`, `device`, `host`); without one, a device token's own device (a
//!   gateway token needs the tag);
//! * **site**: the value of the first of [`Mapping::site_tags`] (`site_id`, `site`), else the
//!   device's registered site;
//! * **time**: the line's timestamp in its precision, truncated to the microsecond (floor:
//!   PostgreSQL's `timestamptz` keeps microseconds), or the ingest clock without one;
//! * **metrics**: one per field, named `measurement.field`, followed by `:key:value` for each
//!   remaining tag in tag-key order (`cpu,host=h1,cpu=cpu0 usage_idle=99` on device `h1` is
//!   metric `cpu.usage_idle:cpu:cpu0`), so two series of one device never share a metric and
//!   the name can be rebuilt from measurement, tags and field to query it back. Names must
//!   fit the metric-name pattern (`[A-Za-z0-9_.:-]`, at most 64 characters) and measurement,
//!   field keys and tags may not contain `:` (the separator): a line that does not is refused
//!   with its line number rather than stored under a changed name;
//! * **values**: integer (`i`) → long, unsigned (`u`) → long (values above 2^63 - 1 are
//!   refused: the record and PostgreSQL's `jsonb`/`bigint` have no unsigned type), float →
//!   double, boolean → boolean, string → string (at most 1,024 bytes, no U+0000);
//! * **points**: lines of one device at one time are one point, merged field by field (a
//!   later line's field wins), as InfluxDB merges them; the sink merges across requests.
//!
//! The `seq` of a line-protocol reading is 0 (line protocol has none) and its `msg_type` the
//! default, so a re-sent line is the same reading and stored once.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, Utc};
use influxdb_line_protocol::FieldValue;
use schemas::telemetry::DEFAULT_MSG_TYPE;
use schemas::{MetricValue, Telemetry};

use crate::credentials::{Credentials, Principal};
use crate::error::Rejection;
use crate::message::{check_time, is_valid_name, TimeLimits, MAX_METRICS, MAX_STRING_BYTES};

/// Unit of the timestamps of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// `/api/v2/write`'s `precision`: `ns` (the default), `us`, `ms` or `s`.
    pub fn from_v2(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("ns") {
            "ns" | "" => Ok(Precision::Nanoseconds),
            "us" => Ok(Precision::Microseconds),
            "ms" => Ok(Precision::Milliseconds),
            "s" => Ok(Precision::Seconds),
            other => Err(format!(
                "invalid precision \"{}\": use ns, us, ms or s",
                echo(other)
            )),
        }
    }

    /// `/write`'s (InfluxDB 1.x) `precision`: `n`/`ns` (the default), `u`/`µ`, `ms`, `s`, `m`
    /// or `h`.
    pub fn from_v1(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("ns") {
            "n" | "ns" | "" => Ok(Precision::Nanoseconds),
            "u" | "µ" => Ok(Precision::Microseconds),
            "ms" => Ok(Precision::Milliseconds),
            "s" => Ok(Precision::Seconds),
            "m" => Ok(Precision::Minutes),
            "h" => Ok(Precision::Hours),
            other => Err(format!(
                "invalid precision \"{}\": use n, ns, u, µ, ms, s, m or h",
                echo(other)
            )),
        }
    }

    /// Nanoseconds in one unit.
    pub fn nanos(self) -> i64 {
        match self {
            Precision::Nanoseconds => 1,
            Precision::Microseconds => 1_000,
            Precision::Milliseconds => 1_000_000,
            Precision::Seconds => 1_000_000_000,
            Precision::Minutes => 60_000_000_000,
            Precision::Hours => 3_600_000_000_000,
        }
    }
}

/// A field value with its line-protocol type.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    String(String),
}

/// One parsed line, before the mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub measurement: String,
    /// In the order written (the parser refuses a repeated key).
    pub tags: Vec<(String, String)>,
    /// In the order written; a repeated key is kept twice (the later one wins when mapped).
    pub fields: Vec<(String, Field)>,
    /// Nanoseconds since the epoch, when the line has a timestamp.
    pub time_ns: Option<i64>,
}

/// One line of a body: its 1-based number and the point, or why it is not line protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub number: usize,
    pub point: Result<Point, String>,
}

/// Parses every non-empty, non-comment line of `body`.
pub fn parse(body: &[u8], precision: Precision) -> Vec<Line> {
    parse_from(body, 1, precision, false)
}

/// [`parse`] of a part of an export file whose first line is number `first_line`; the DDL
/// lines of 1.x exports (`CREATE DATABASE …`, `CREATE RETENTION POLICY …`) are skipped.
pub fn parse_export(body: &[u8], first_line: usize, precision: Precision) -> Vec<Line> {
    parse_from(body, first_line, precision, true)
}

fn parse_from(body: &[u8], first_line: usize, precision: Precision, skip_ddl: bool) -> Vec<Line> {
    let mut lines = Vec::new();
    match std::str::from_utf8(body) {
        Ok(text) => parse_text(text, first_line, precision, skip_ddl, &mut lines),
        Err(_) => {
            // Refuse only the physical lines that are not UTF-8; the rest keeps its numbers.
            let mut clean = String::with_capacity(body.len());
            for (index, raw) in body.split(|b| *b == b'\n').enumerate() {
                if index > 0 {
                    clean.push('\n');
                }
                match std::str::from_utf8(raw) {
                    Ok(text) => clean.push_str(text),
                    Err(_) => lines.push(Line {
                        number: first_line + index,
                        point: Err("line is not valid utf-8".to_owned()),
                    }),
                }
            }
            parse_text(&clean, first_line, precision, skip_ddl, &mut lines);
            lines.sort_by_key(|line| line.number);
        }
    }
    lines
}

fn parse_text(
    text: &str,
    first_line: usize,
    precision: Precision,
    skip_ddl: bool,
    out: &mut Vec<Line>,
) {
    let base = text.as_ptr() as usize;
    let mut newlines_before = 0;
    let mut scanned = 0;
    for raw in influxdb_line_protocol::split_lines(text) {
        // `split_lines` yields sub-slices of `text`: the offset is the distance between them.
        let start = raw.as_ptr() as usize - base;
        newlines_before += count_newlines(&text.as_bytes()[scanned..start]);
        scanned = start;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        // Leading blanks of a physical line are skipped; so are comment lines.
        let trimmed = line.trim_start_matches([' ', '\t']);
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if skip_ddl
            && (trimmed.starts_with("CREATE DATABASE ")
                || trimmed.starts_with("CREATE RETENTION POLICY "))
        {
            continue;
        }
        let skipped = count_newlines(&line.as_bytes()[..line.len() - trimmed.len()]);
        let number = first_line + newlines_before + skipped;
        out.push(Line {
            number,
            point: parse_line(trimmed, precision),
        });
    }
}

fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|b| **b == b'\n').count()
}

/// True when `text` ends with a backslash that escapes nothing after it (an odd run).
fn ends_escaped(text: &str) -> bool {
    text.bytes().rev().take_while(|b| *b == b'\\').count() % 2 == 1
}

fn parse_line(text: &str, precision: Precision) -> Result<Point, String> {
    // Trailing blanks end a line in InfluxDB's parser; the IOx parser refuses them. An
    // escaped blank (`\ `) is part of the last key and stays.
    let full = text;
    let mut text = full.trim_end_matches(' ');
    if text.len() < full.len() && ends_escaped(text) {
        text = &full[..text.len() + 1];
    }
    if text.ends_with(',') && !ends_escaped(&text[..text.len() - 1]) {
        return Err("expected a field after the trailing comma".to_owned());
    }
    let mut parsed = influxdb_line_protocol::parse_lines(text);
    let line = match parsed.next() {
        Some(Ok(line)) => line,
        Some(Err(err)) => return Err(parse_error(&err)),
        None => return Err("empty line".to_owned()),
    };
    if parsed.next().is_some() {
        // `split_lines` already cut at the line end; a second line here means the parser
        // disagrees about quoting: refuse rather than guess.
        return Err("unterminated string field".to_owned());
    }
    let tags = line.series.tag_set.as_deref().unwrap_or_default();
    for (index, (key, _)) in tags.iter().enumerate() {
        if tags[..index].iter().any(|(earlier, _)| earlier == key) {
            return Err(format!("duplicate tag key \"{}\"", echo(key)));
        }
    }
    for (key, value) in &line.field_set {
        if let FieldValue::F64(v) = value {
            if !v.is_finite() {
                return Err(format!("field {}: float out of range", echo(key)));
            }
        }
    }
    let time_ns = match line.timestamp {
        None => None,
        Some(ts) => Some(
            ts.checked_mul(precision.nanos())
                .ok_or_else(|| format!("timestamp {ts} out of range"))?,
        ),
    };
    Ok(Point {
        measurement: line.series.measurement.to_string(),
        tags: line
            .series
            .tag_set
            .iter()
            .flatten()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fields: line
            .field_set
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    FieldValue::I64(v) => Field::Int(*v),
                    FieldValue::U64(v) => Field::UInt(*v),
                    FieldValue::F64(v) => Field::Float(*v),
                    FieldValue::Boolean(v) => Field::Bool(*v),
                    FieldValue::String(v) => Field::String(v.to_string()),
                };
                (k.to_string(), value)
            })
            .collect(),
        time_ns,
    })
}

/// The parser's message, lowercased at its start like every ingest error.
fn parse_error(err: &influxdb_line_protocol::Error) -> String {
    let text = err.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "malformed line".to_owned(),
    }
}

/// Client-supplied text echoed in an error is cut to 64 characters.
fn echo(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Which tags name the device and the site.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The first of these tags a line has names its device.
    pub device_tags: Vec<String>,
    /// The first of these tags a line has names its site.
    pub site_tags: Vec<String>,
}

impl Default for Mapping {
    fn default() -> Self {
        Mapping {
            device_tags: vec!["device_id".into(), "device".into(), "host".into()],
            site_tags: vec!["site_id".into(), "site".into()],
        }
    }
}

/// A line mapped onto the record's fields (before the token decides tenant and device).
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub device_id: Option<String>,
    pub site_id: Option<String>,
    /// Nanoseconds, as written (truncated to microseconds in [`Mapped::time`]).
    pub time_ns: Option<i64>,
    pub metrics: BTreeMap<String, MetricValue>,
}

/// Why a line was not mapped (its message is what the client reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError(pub String);

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Mapping {
    /// Maps one point (see the module doc); refuses what would not be stored as written.
    pub fn map(&self, point: &Point) -> Result<Mapped, MappingError> {
        let refuse = |message: String| Err(MappingError(message));
        let pick = |names: &[String]| {
            names.iter().find_map(|name| {
                point
                    .tags
                    .iter()
                    .position(|(key, _)| key == name)
                    .map(|index| (index, point.tags[index].1.clone()))
            })
        };
        let device = pick(&self.device_tags);
        let site = pick(&self.site_tags);
        for (what, picked) in [("device", &device), ("site", &site)] {
            if let Some((index, value)) = picked {
                if !is_valid_name(value) {
                    return refuse(format!(
                        "{what} tag {}={} must match [A-Za-z0-9_.:-]{{1,64}}",
                        echo(&point.tags[*index].0),
                        echo(value)
                    ));
                }
            }
        }
        let used = |index: usize| {
            device.as_ref().is_some_and(|(i, _)| *i == index)
                || site.as_ref().is_some_and(|(i, _)| *i == index)
        };
        let mut rest: Vec<&(String, String)> = point
            .tags
            .iter()
            .enumerate()
            .filter(|(index, _)| !used(*index))
            .map(|(_, tag)| tag)
            .collect();
        rest.sort();
        if point.measurement.contains(':') {
            return refuse(format!(
                "measurement {} contains ':', which separates tags in metric names",
                echo(&point.measurement)
            ));
        }
        let mut suffix = String::new();
        for (key, value) in &rest {
            if key.contains(':') || value.contains(':') {
                return refuse(format!(
                    "tag {}={} contains ':', which separates tags in metric names",
                    echo(key),
                    echo(value)
                ));
            }
            suffix.push(':');
            suffix.push_str(key);
            suffix.push(':');
            suffix.push_str(value);
        }
        if point.fields.len() > MAX_METRICS {
            return refuse(format!("more than {MAX_METRICS} fields"));
        }
        let mut metrics = BTreeMap::new();
        for (key, field) in &point.fields {
            if key.contains(':') {
                return refuse(format!(
                    "field {} contains ':', which separates tags in metric names",
                    echo(key)
                ));
            }
            let name = format!("{}.{key}{suffix}", point.measurement);
            if !is_valid_name(&name) {
                return refuse(format!(
                    "metric name {} (measurement.field:tag:value) must match [A-Za-z0-9_.:-]{{1,64}}",
                    echo(&name)
                ));
            }
            let value = match field {
                Field::Int(v) => MetricValue::Long(*v),
                Field::UInt(v) => match i64::try_from(*v) {
                    Ok(v) => MetricValue::Long(v),
                    Err(_) => {
                        return refuse(format!(
                            "field {}: unsigned {v} above 9223372036854775807 cannot be stored",
                            echo(key)
                        ))
                    }
                },
                Field::Float(v) if v.is_finite() => MetricValue::Double(*v),
                Field::Float(_) => {
                    return refuse(format!("field {}: number is not finite", echo(key)))
                }
                Field::Bool(v) => MetricValue::Bool(*v),
                Field::String(s) if s.len() > MAX_STRING_BYTES => {
                    return refuse(format!(
                        "field {}: string longer than {MAX_STRING_BYTES} bytes",
                        echo(key)
                    ))
                }
                Field::String(s) if s.contains('\0') => {
                    return refuse(format!(
                        "field {}: string contains U+0000, which PostgreSQL cannot store",
                        echo(key)
                    ))
                }
                Field::String(s) => MetricValue::String(s.clone()),
            };
            metrics.insert(name, value);
        }
        Ok(Mapped {
            device_id: device.map(|(_, value)| value),
            site_id: site.map(|(_, value)| value),
            time_ns: point.time_ns,
            metrics,
        })
    }
}

impl Mapped {
    /// The reading's time: the timestamp truncated (floor) to the microsecond, or `now`.
    pub fn time(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>, MappingError> {
        match self.time_ns {
            None => Ok(now),
            Some(ns) => DateTime::from_timestamp_micros(ns.div_euclid(1_000))
                .ok_or_else(|| MappingError(format!("timestamp {ns} out of range"))),
        }
    }
}

/// The readings of one body, merged into points, and its refused lines.
#[derive(Debug, Default)]
pub struct Batch {
    /// Non-empty lines read.
    pub lines: usize,
    /// One record per (tenant, device, time), in the order of first appearance, each with the
    /// lines merged into it (a point with more than [`MAX_METRICS`] fields is split into
    /// several records of the same point).
    pub readings: Vec<(Telemetry, Vec<usize>)>,
    /// Refused lines: number and reason (status 400, 403 or 422 inside).
    pub refused: Vec<(usize, Rejection)>,
}

/// Who the readings are for and what they may be.
#[derive(Debug)]
pub struct Context<'a> {
    pub credentials: &'a Credentials,
    pub principal: &'a Principal,
    pub mapping: &'a Mapping,
    pub limits: TimeLimits,
    /// Ingest clock: `received_at`, and `time` of lines without a timestamp.
    pub now: DateTime<Utc>,
}

/// Tenant, device and registered site, as the token resolved them.
type Authorized = (String, String, Option<String>);

/// Maps, authorizes and merges parsed lines.
pub fn assemble(lines: Vec<Line>, context: &Context<'_>) -> Batch {
    let mut batch = Batch {
        lines: lines.len(),
        ..Batch::default()
    };
    let mut devices: HashMap<Option<String>, Result<Authorized, Rejection>> = HashMap::new();
    let mut points: HashMap<(String, i64), usize> = HashMap::new();
    let mut merged: Vec<(Telemetry, Vec<usize>)> = Vec::new();
    for line in lines {
        let number = line.number;
        let outcome = line
            .point
            .map_err(Rejection::malformed)
            .and_then(|point| {
                context
                    .mapping
                    .map(&point)
                    .map_err(|e| Rejection::bad_request(e.0))
            })
            .and_then(|mapped| {
                let time = mapped
                    .time(context.now)
                    .map_err(|e| Rejection::invalid("time", e.0))?;
                check_time(time, context.now, context.limits)?;
                let authorized = devices
                    .entry(mapped.device_id.clone())
                    .or_insert_with(|| {
                        context.credentials.authorize(
                            context.principal,
                            None,
                            mapped.device_id.as_deref(),
                        )
                    })
                    .clone()?;
                Ok((mapped, time, authorized))
            });
        let (mapped, time, (tenant_id, device_id, registered_site)) = match outcome {
            Ok(ok) => ok,
            Err(rejection) => {
                batch.refused.push((number, rejection));
                continue;
            }
        };
        let key = (device_id, time.timestamp_micros());
        match points.get(&key) {
            Some(&index) => {
                let (telemetry, numbers) = &mut merged[index];
                telemetry.metrics.extend(mapped.metrics);
                if mapped.site_id.is_some() {
                    telemetry.site_id = mapped.site_id;
                }
                numbers.push(number);
            }
            None => {
                points.insert(key.clone(), merged.len());
                merged.push((
                    Telemetry {
                        tenant_id,
                        device_id: key.0,
                        site_id: mapped.site_id.or(registered_site),
                        msg_type: DEFAULT_MSG_TYPE.to_owned(),
                        seq: 0,
                        time,
                        received_at: context.now,
                        metrics: mapped.metrics,
                    },
                    vec![number],
                ));
            }
        }
    }
    for (telemetry, numbers) in merged {
        if telemetry.metrics.len() <= MAX_METRICS {
            batch.readings.push((telemetry, numbers));
            continue;
        }
        // One point, several records: the sink merges them into one row.
        let mut rest = telemetry.metrics.clone().into_iter().peekable();
        while rest.peek().is_some() {
            let mut part = telemetry.clone();
            part.metrics = rest.by_ref().take(MAX_METRICS).collect();
            batch.readings.push((part, numbers.clone()));
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(text: &str) -> Point {
        let lines = parse(text.as_bytes(), Precision::Nanoseconds);
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines[0].point.clone().unwrap()
    }

    #[test]
    fn lines_are_numbered_as_written_with_crlf_comments_and_multiline_strings() {
        let body =
            "# comment\r\nm,host=a f=1i 10\r\n\r\n  m f=\"two\nlines\" 20\nbad line\nm f=2u\n";
        let lines = parse(body.as_bytes(), Precision::Nanoseconds);
        let numbers: Vec<usize> = lines.iter().map(|l| l.number).collect();
        assert_eq!(numbers, vec![2, 4, 6, 7]);
        assert_eq!(lines[0].point.as_ref().unwrap().time_ns, Some(10));
        assert_eq!(
            lines[1].point.as_ref().unwrap().fields,
            vec![("f".to_owned(), Field::String("two\nlines".to_owned()))]
        );
        assert!(lines[2].point.is_err());
        assert_eq!(
            lines[3].point.as_ref().unwrap().fields,
            vec![("f".to_owned(), Field::UInt(2))]
        );
    }

    #[test]
    fn lines_that_are_not_utf8_are_refused_alone() {
        let body = b"m f=1 1\nm f=\"\xff\" 2\nm f=3 3\n";
        let lines = parse(body, Precision::Nanoseconds);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[1].point,
            Err("line is not valid utf-8".to_owned()),
            "{lines:?}"
        );
        assert_eq!((lines[0].number, lines[2].number), (1, 3));
        assert!(lines[2].point.is_ok());
    }

    #[test]
    fn escapes_are_undone() {
        let p = point(r#"my\ m\,x,t\=k=v\ 1 f\,k="a\"b\\c" 5"#);
        assert_eq!(p.measurement, "my m,x");
        assert_eq!(p.tags, vec![("t=k".to_owned(), "v 1".to_owned())]);
        assert_eq!(
            p.fields,
            vec![("f,k".to_owned(), Field::String(r#"a"b\c"#.to_owned()))]
        );
    }

    #[test]
    fn precision_scales_timestamps_and_overflow_is_refused() {
        let at = |precision| {
            parse(b"m f=1 3", precision)[0]
                .point
                .as_ref()
                .unwrap()
                .time_ns
        };
        assert_eq!(at(Precision::Seconds), Some(3_000_000_000));
        assert_eq!(at(Precision::Hours), Some(3 * 3_600_000_000_000));
        assert_eq!(
            parse(b"m f=1 9223372036854775", Precision::Seconds)[0].point,
            Err("timestamp 9223372036854775 out of range".to_owned())
        );
        assert_eq!(Precision::from_v1(Some("µ")), Ok(Precision::Microseconds));
        assert_eq!(Precision::from_v2(None), Ok(Precision::Nanoseconds));
        assert_eq!(
            Precision::from_v2(Some("m")),
            Err("invalid precision \"m\": use ns, us, ms or s".to_owned())
        );
    }

    #[test]
    fn the_mapping_names_metrics_after_measurement_field_and_remaining_tags() {
        let mapping = Mapping::default();
        let mapped = mapping
            .map(&point(
                "cpu,host=h1,site=s1,cpu=cpu0,core=3 idle=99.5,n=3i,u=4u,ok=true,s=\"x\" 1500",
            ))
            .unwrap();
        assert_eq!(mapped.device_id.as_deref(), Some("h1"));
        assert_eq!(mapped.site_id.as_deref(), Some("s1"));
        let expected: BTreeMap<String, MetricValue> = [
            ("cpu.idle:core:3:cpu:cpu0", MetricValue::Double(99.5)),
            ("cpu.n:core:3:cpu:cpu0", MetricValue::Long(3)),
            ("cpu.u:core:3:cpu:cpu0", MetricValue::Long(4)),
            ("cpu.ok:core:3:cpu:cpu0", MetricValue::Bool(true)),
            ("cpu.s:core:3:cpu:cpu0", MetricValue::String("x".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(mapped.metrics, expected);
        // Microseconds, truncated towards the past.
        assert_eq!(
            mapped.time(Utc::now()).unwrap().timestamp_micros(),
            1,
            "1500 ns"
        );
        let before_epoch = Mapped {
            time_ns: Some(-1),
            ..mapped
        };
        assert_eq!(
            before_epoch.time(Utc::now()).unwrap().timestamp_micros(),
            -1
        );
        // `device_id` comes before `device` and `host`.
        let mapped = mapping
            .map(&point("m,host=h,device=d,device_id=x f=1"))
            .unwrap();
        assert_eq!(mapped.device_id.as_deref(), Some("x"));
        assert_eq!(
            mapped.metrics.keys().collect::<Vec<_>>(),
            vec!["m.f:device:d:host:h"]
        );
    }

    #[test]
    fn the_mapping_refuses_what_it_cannot_store_as_written() {
        let mapping = Mapping::default();
        let refusal = |text: &str| mapping.map(&point(text)).unwrap_err().0;
        assert_eq!(
            refusal("disk,host=h,path=/ used=1"),
            "metric name disk.used:path:/ (measurement.field:tag:value) must match [A-Za-z0-9_.:-]{1,64}"
        );
        assert_eq!(
            refusal("m,host=h,k=a:b f=1"),
            "tag k=a:b contains ':', which separates tags in metric names"
        );
        assert_eq!(
            refusal("m,host=h\\ x f=1"),
            "device tag host=h x must match [A-Za-z0-9_.:-]{1,64}"
        );
        assert_eq!(
            refusal("m,host=h f=18446744073709551615u"),
            "field f: unsigned 18446744073709551615 above 9223372036854775807 cannot be stored"
        );
        assert_eq!(
            refusal(&format!("m,host=h s=\"{}\"", "x".repeat(1025))),
            "field s: string longer than 1024 bytes"
        );
    }
}
