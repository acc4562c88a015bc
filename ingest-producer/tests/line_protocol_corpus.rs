//! Conformance of ingest's line-protocol reading with the public decode corpus of
//! `influxdata/line-protocol-corpus` (commit aa28ccfb, MIT, `line_protocol_corpus/LICENSE`):
//! 6,615 inputs with the output of InfluxData's reference decoder
//! (`github.com/influxdata/line-protocol/v2`), an error or the points.
//!
//! Each input goes through `lineproto::parse` (the `influxdb-line-protocol` parser plus our
//! line splitting, CRLF, UTF-8 and precision handling); an input is refused when any of its
//! lines is. Every disagreement must fall under one of the documented [`Disagreement`]s, and
//! each of those is asserted to occur exactly as often as counted here, so a parser upgrade
//! that changes them fails this test. Then every point the corpus accepts goes through the
//! mapping: it is stored with every field under its documented name and value, or refused
//! with a reason (never altered).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use base64::Engine as _;
use ingest_producer::lineproto::{self, Field, Mapping, Point, Precision};
use schemas::MetricValue;
use serde_json::Value;

const CORPUS: &str = include_str!("line_protocol_corpus/decode.json");

/// Why our reading differs from the reference decoder's, where it does. None of them changes
/// what is stored: each input of the first three kinds is refused by the mapping either way
/// (metric names and device/site ids are `[A-Za-z0-9_.:-]`), and the last makes us refuse
/// lines InfluxDB accepts (with their line numbers), never store something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Disagreement {
    /// The reference refuses control characters in names and comment lines (its
    /// "non-printable ASCII" change); the IOx parser accepts them in names and skips
    /// comments whole.
    NonPrintable,
    /// A backslash before a backslash: the reference keeps both (`\\` escapes nothing in
    /// tag values), the IOx parser reads one escaped backslash, and refuses a name that
    /// ends in one.
    Backslashes,
    /// Leading tabs: the reference refuses a line starting with a tab, the IOx parser skips
    /// leading blanks.
    LeadingTab,
    /// Floats with nothing on one side of the point (`1.`, `.5`, `-0.`): the reference reads
    /// them, the IOx parser refuses the line. Telegraf and the InfluxDB clients never write
    /// them (Go's and the clients' float formatting always puts digits on both sides).
    BareDecimalPoint,
}

fn classify(text: &[u8]) -> Option<Disagreement> {
    let s = String::from_utf8_lossy(text);
    let control = text
        .iter()
        .any(|b| (*b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || *b == 0x7f);
    let bytes = s.as_bytes();
    let bare_point = bytes.iter().enumerate().any(|(i, b)| {
        *b == b'.'
            && (i + 1 == bytes.len()
                || !bytes[i + 1].is_ascii_digit()
                || i == 0
                || matches!(bytes[i - 1], b'=' | b'-'))
    });
    if control {
        Some(Disagreement::NonPrintable)
    } else if s.contains("\\\\") {
        Some(Disagreement::Backslashes)
    } else if s.starts_with('\t') || s.contains("\n\t") {
        Some(Disagreement::LeadingTab)
    } else if bare_point {
        Some(Disagreement::BareDecimalPoint)
    } else {
        None
    }
}

fn text(input: &Value) -> Vec<u8> {
    match &input["text"] {
        Value::String(s) => s.as_bytes().to_vec(),
        other => base64::engine::general_purpose::STANDARD
            .decode(other["binary"].as_str().unwrap())
            .unwrap(),
    }
}

fn string_or_binary(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => String::from_utf8_lossy(
            &base64::engine::general_purpose::STANDARD
                .decode(other["binary"].as_str().unwrap())
                .unwrap(),
        )
        .into_owned(),
    }
}

fn precision(name: &str) -> Precision {
    match name {
        "1ns" => Precision::Nanoseconds,
        "1µs" => Precision::Microseconds,
        "1ms" => Precision::Milliseconds,
        "1s" => Precision::Seconds,
        "1m" => Precision::Minutes,
        "1h" => Precision::Hours,
        other => panic!("precision {other}"),
    }
}

/// A point as the corpus writes it.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    time: i64,
    name: String,
    tags: Vec<(String, String)>,
    fields: Vec<(String, Field)>,
}

fn expected_points(result: &[Value]) -> Vec<Expected> {
    result
        .iter()
        .map(|p| Expected {
            time: p["time"].as_i64().unwrap(),
            name: string_or_binary(&p["name"]),
            tags: p["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (string_or_binary(&t["key"]), string_or_binary(&t["value"])))
                .collect(),
            fields: p["fields"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let v = &f["value"];
                    let value = if let Some(i) = v.get("int") {
                        Field::Int(i.as_i64().unwrap())
                    } else if let Some(u) = v.get("uint") {
                        Field::UInt(u.as_u64().unwrap())
                    } else if let Some(x) = v.get("float") {
                        Field::Float(x.as_f64().unwrap())
                    } else if let Some(b) = v.get("bool") {
                        Field::Bool(b.as_bool().unwrap())
                    } else if let Some(s) = v.get("string") {
                        Field::String(s.as_str().unwrap().to_owned())
                    } else {
                        Field::String(string_or_binary(&v["binary"]))
                    };
                    (string_or_binary(&f["key"]), value)
                })
                .collect(),
        })
        .collect()
}

/// Ours, in the corpus's form: tags sorted by key (the reference sorts them), the default
/// time (truncated to the precision, as the reference does) where a line has none.
fn ours(points: &[Point], default_time: i64, precision: Precision) -> Vec<Expected> {
    let unit = precision.nanos();
    let default_time = default_time.div_euclid(unit) * unit;
    points
        .iter()
        .map(|p| {
            let mut tags = p.tags.clone();
            tags.sort();
            Expected {
                time: p.time_ns.unwrap_or(default_time),
                name: p.measurement.clone(),
                tags,
                fields: p.fields.clone(),
            }
        })
        .collect()
}

/// Equal, with floats compared to one unit in the last place (serde_json's float parsing,
/// used to read the corpus, may be off by one; the parser's is the standard library's).
fn same(a: &[Expected], b: &[Expected]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.time == y.time
                && x.name == y.name
                && x.tags == y.tags
                && x.fields.len() == y.fields.len()
                && x.fields.iter().zip(&y.fields).all(|((ka, va), (kb, vb))| {
                    ka == kb
                        && match (va, vb) {
                            (Field::Float(p), Field::Float(q)) => {
                                p == q || (p - q).abs() <= f64::EPSILON * p.abs().max(q.abs())
                            }
                            _ => va == vb,
                        }
                })
        })
}

#[test]
fn the_parser_agrees_with_the_reference_decoder_or_the_difference_is_documented() {
    let corpus: Value = serde_json::from_str(CORPUS).unwrap();
    let cases = corpus["decode"].as_object().unwrap();
    assert_eq!(cases.len(), 6615);
    let mut agreed_ok = 0;
    let mut agreed_err = 0;
    let mut disagreements: BTreeMap<Option<Disagreement>, Vec<String>> = BTreeMap::new();
    let mut accepted_points: Vec<Point> = Vec::new();
    for (key, case) in cases {
        let input = &case["input"];
        let bytes = text(input);
        let default_time = input["defaultTime"].as_i64().unwrap();
        let precision = precision(input["precision"].as_str().unwrap());
        let lines = lineproto::parse(&bytes, precision);
        let parsed: Result<Vec<Point>, String> =
            lines.iter().map(|line| line.point.clone()).collect();
        let expected = case["output"]["result"]
            .as_array()
            .map(|r| expected_points(r));
        match (&parsed, &expected) {
            (Ok(points), Some(expected))
                if same(&ours(points, default_time, precision), expected) =>
            {
                agreed_ok += 1;
                accepted_points.extend(points.iter().cloned());
            }
            (Err(_), None) => agreed_err += 1,
            _ => {
                let kind = classify(&bytes);
                disagreements.entry(kind).or_default().push(format!(
                    "{key}: input {:?}: corpus {}, ours {:?}",
                    String::from_utf8_lossy(&bytes),
                    case["output"],
                    parsed
                ));
            }
        }
    }
    let counts: BTreeMap<Option<Disagreement>, usize> =
        disagreements.iter().map(|(k, v)| (*k, v.len())).collect();
    eprintln!(
        "agreed: {agreed_ok} accepted, {agreed_err} refused; disagreements: {counts:?}\n{}",
        disagreements
            .iter()
            .rev()
            .flat_map(|(_, v)| v)
            .take(80)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        agreed_ok + agreed_err + counts.values().sum::<usize>(),
        6615
    );
    assert_eq!(
        counts,
        BTreeMap::from([
            (Some(Disagreement::NonPrintable), 35),
            (Some(Disagreement::Backslashes), 21),
            (Some(Disagreement::LeadingTab), 3),
            (Some(Disagreement::BareDecimalPoint), 11),
        ]),
        "every disagreement is one of the documented kinds, as often as counted"
    );
    assert_eq!((agreed_ok, agreed_err), (364, 6181));

    // The mapping either stores every field of an accepted point under its documented name
    // and value, or refuses the point; it never stores something else.
    let mapping = Mapping::default();
    let (mut mapped, mut refused) = (0, 0);
    for point in &accepted_points {
        match mapping.map(point) {
            Err(_) => refused += 1,
            Ok(m) => {
                mapped += 1;
                // The first of each list the point has names device and site.
                let pick = |names: &[&str]| {
                    names
                        .iter()
                        .find_map(|name| point.tags.iter().position(|(k, _)| k == name))
                };
                let used = [
                    pick(&["device_id", "device", "host"]),
                    pick(&["site_id", "site"]),
                ];
                let mut rest: Vec<&(String, String)> = point
                    .tags
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !used.contains(&Some(*i)))
                    .map(|(_, tag)| tag)
                    .collect();
                rest.sort();
                let suffix: String = rest.iter().map(|(k, v)| format!(":{k}:{v}")).collect();
                let mut expected = BTreeMap::new();
                for (key, value) in &point.fields {
                    let value = match value {
                        Field::Int(v) => MetricValue::Long(*v),
                        Field::UInt(v) => MetricValue::Long(i64::try_from(*v).unwrap()),
                        Field::Float(v) => MetricValue::Double(*v),
                        Field::Bool(v) => MetricValue::Bool(*v),
                        Field::String(v) => MetricValue::String(v.clone()),
                    };
                    expected.insert(format!("{}.{key}{suffix}", point.measurement), value);
                }
                assert_eq!(m.metrics, expected, "{point:?}");
            }
        }
    }
    eprintln!("mapping: {mapped} points stored as named, {refused} refused");
    assert!(mapped > 100, "{mapped}");
}
