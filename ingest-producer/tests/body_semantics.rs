//! Property: for every generated body, ingest's body layer (`message::read_body`, the function
//! the HTTP handler calls before the token is consulted) either produces exactly the record
//! the documented semantics give, field by field and through the Avro codec, or refuses the
//! message naming a field that is really at fault. Whole-body refusals only happen for
//! non-JSON numbers and name the line and column.
//!
//! The bodies are written by this file (not serde_json), so they can hold what serde_json
//! would never write: integers around the i64 and u64 bounds, doubles of every bit pattern,
//! exponents far outside a double's range, escaped and raw Unicode (astral characters, U+0000,
//! lone surrogates), duplicate keys, empty and overlong names, and sub-microsecond times. The
//! expected outcome is computed from the generated model, independently of the parser.
//!
//! No Kafka: 10,000 bodies through the real broker would take minutes; the HTTP path itself is
//! covered by `tests/ingest.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Duration as Span, FixedOffset, SecondsFormat, Utc};
use ingest_producer::message::{
    count_points, is_valid_name, read_body, Format, TimeLimits, MAX_STRING_BYTES,
};
use ingest_producer::Rejection;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use schemas::{MetricValue, Telemetry};

const LIMITS: TimeLimits = TimeLimits {
    max_future: Duration::from_secs(300),
    retention: Duration::from_secs(90 * 86_400),
};
const CASES: u32 = 10_000;

// ---------------------------------------------------------------------------------------------
// The model of a body.

/// A JSON string as written: its characters, how they are escaped, and maybe an escaped lone
/// surrogate inserted at a position.
#[derive(Debug, Clone)]
struct Text {
    chars: Vec<char>,
    escape: Escape,
    lone_surrogate: Option<(usize, u16)>,
}

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// Only what JSON requires (`"`, `\`, control characters).
    Required,
    /// Every non-ASCII character as `\u` (astral ones as a surrogate pair).
    NonAscii,
    /// Every character as `\u`.
    All,
}

impl Text {
    fn plain(s: &str) -> Self {
        Text {
            chars: s.chars().collect(),
            escape: Escape::Required,
            lone_surrogate: None,
        }
    }

    fn value(&self) -> String {
        self.chars.iter().collect()
    }

    fn render(&self, out: &mut String) {
        out.push('"');
        for (i, c) in self.chars.iter().enumerate() {
            if let Some((_, unit)) = self.lone_surrogate.filter(|(at, _)| *at == i) {
                let _ = write!(out, "\\u{unit:04x}");
            }
            let escape = match self.escape {
                Escape::Required => false,
                Escape::NonAscii => !c.is_ascii(),
                Escape::All => true,
            };
            match c {
                '"' if !escape => out.push_str("\\\""),
                '\\' if !escape => out.push_str("\\\\"),
                '\n' if !escape => out.push_str("\\n"),
                '\t' if !escape => out.push_str("\\t"),
                '\r' if !escape => out.push_str("\\r"),
                '\u{8}' if !escape => out.push_str("\\b"),
                '\u{c}' if !escape => out.push_str("\\f"),
                // As PHP's json_encode writes it; raw when only non-ASCII is escaped.
                '/' if matches!(self.escape, Escape::Required) => out.push_str("\\/"),
                c if escape || u32::from(*c) < 0x20 => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04X}");
                    }
                }
                c => out.push(*c),
            }
        }
        if let Some((_, unit)) = self
            .lone_surrogate
            .filter(|(at, _)| *at >= self.chars.len())
        {
            let _ = write!(out, "\\u{unit:04x}");
        }
        out.push('"');
    }
}

#[derive(Debug, Clone)]
enum FloatFormat {
    /// `{:?}`: the shortest text that reads back as the same double (`0.1`, `1e300`).
    Debug,
    /// `{:e}` / `{:E}`: the same digits in scientific notation.
    Exp,
    UpperExp,
}

/// A JSON value as written.
#[derive(Debug, Clone)]
enum Val {
    Null,
    Bool(bool),
    /// An integer literal, possibly outside i64.
    Int(i128),
    /// `-0`.
    NegativeZero,
    /// A finite double in one of its shortest spellings.
    Float(f64, FloatFormat),
    /// A number literal with an extreme exponent (`1e400`, `0.0e-999`, `2.4703282292062328e-324`).
    Extreme(String),
    /// `NaN`, `Infinity`, `-Infinity`: not JSON.
    NonJson(&'static str),
    Str(Text),
    /// A small array of harmless scalars.
    Array(Vec<bool>),
    /// An empty object.
    Object,
}

impl Val {
    fn render(&self, out: &mut String) {
        match self {
            Val::Null => out.push_str("null"),
            Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Val::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Val::NegativeZero => out.push_str("-0"),
            Val::Float(v, FloatFormat::Debug) => {
                let _ = write!(out, "{v:?}");
            }
            Val::Float(v, FloatFormat::Exp) => {
                let _ = write!(out, "{v:e}");
            }
            Val::Float(v, FloatFormat::UpperExp) => {
                let _ = write!(out, "{v:E}");
            }
            Val::Extreme(text) => out.push_str(text),
            Val::NonJson(text) => out.push_str(text),
            Val::Str(text) => text.render(out),
            Val::Array(items) => {
                out.push('[');
                for (i, b) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(if *b { "true" } else { "false" });
                }
                out.push(']');
            }
            Val::Object => out.push_str("{}"),
        }
    }

    fn non_json(&self) -> bool {
        matches!(self, Val::NonJson(_))
    }
}

/// A `time` as written.
#[derive(Debug, Clone)]
enum TimeVal {
    /// An instant written with `digits` fractional digits (0, 3, 6, or 9 with the last three
    /// `extra`) and an offset in minutes.
    Written {
        instant: DateTime<Utc>,
        digits: usize,
        extra: u32,
        offset_minutes: i32,
    },
    /// Second 60 of the minute of `instant`.
    LeapSecond(DateTime<Utc>),
    /// Not a timestamp at all.
    Other(Val),
}

impl TimeVal {
    fn render(&self, out: &mut String) {
        match self {
            TimeVal::Written {
                instant,
                digits,
                extra,
                offset_minutes,
            } => {
                let offset = FixedOffset::east_opt(offset_minutes * 60).unwrap();
                let local = instant.with_timezone(&offset);
                let mut text = local.format("%Y-%m-%dT%H:%M:%S").to_string();
                let micros = instant.timestamp_subsec_micros();
                match digits {
                    0 => {}
                    3 => {
                        let _ = write!(text, ".{:03}", micros / 1000);
                    }
                    6 => {
                        let _ = write!(text, ".{micros:06}");
                    }
                    _ => {
                        let _ = write!(text, ".{micros:06}{extra:03}");
                    }
                }
                if *offset_minutes == 0 {
                    text.push('Z');
                } else {
                    text.push_str(&local.format("%:z").to_string());
                }
                Text::plain(&text).render(out);
            }
            TimeVal::LeapSecond(instant) => {
                Text::plain(&instant.format("%Y-%m-%dT%H:%M:60Z").to_string()).render(out)
            }
            TimeVal::Other(val) => val.render(out),
        }
    }
}

/// `metrics`: `Ok` is an object, entries in order (names may repeat); `Err` another value.
type Metrics = Result<Vec<(Text, Val)>, Val>;

/// One message: its fields in order (a field may come twice).
#[derive(Debug, Clone)]
struct Msg {
    seq: Option<Val>,
    time: Option<TimeVal>,
    tenant_id: Option<Val>,
    device_id: Option<Val>,
    site_id: Option<Val>,
    msg_type: Option<Val>,
    metrics: Option<Metrics>,
    unknown: Option<(Text, Val)>,
    /// Writes this top-level field a second time.
    repeat: Option<&'static str>,
}

impl Msg {
    fn render(&self, out: &mut String, spaced: bool) {
        let sep = if spaced { ",\n  " } else { "," };
        let colon = if spaced { ": " } else { ":" };
        out.push('{');
        let mut first = true;
        let mut field = |out: &mut String, name: &Text, render: &dyn Fn(&mut String)| {
            if !first {
                out.push_str(sep);
            }
            first = false;
            name.render(out);
            out.push_str(colon);
            render(out);
        };
        let mut fields: Vec<&'static str> = [
            "seq",
            "time",
            "tenant_id",
            "device_id",
            "site_id",
            "msg_type",
            "metrics",
        ]
        .into_iter()
        .filter(|f| self.has(f))
        .collect();
        if let Some(repeat) = self.repeat.filter(|f| self.has(f)) {
            fields.push(repeat);
        }
        for name in fields {
            field(out, &Text::plain(name), &|out| {
                self.render_field(name, out, spaced)
            });
        }
        if let Some((name, val)) = &self.unknown {
            field(out, name, &|out| val.render(out));
        }
        out.push('}');
    }

    fn has(&self, field: &str) -> bool {
        match field {
            "seq" => self.seq.is_some(),
            "time" => self.time.is_some(),
            "tenant_id" => self.tenant_id.is_some(),
            "device_id" => self.device_id.is_some(),
            "site_id" => self.site_id.is_some(),
            "msg_type" => self.msg_type.is_some(),
            "metrics" => self.metrics.is_some(),
            _ => false,
        }
    }

    fn render_field(&self, field: &str, out: &mut String, spaced: bool) {
        let val = |v: &Option<Val>, out: &mut String| {
            if let Some(v) = v {
                v.render(out);
            }
        };
        match field {
            "seq" => val(&self.seq, out),
            "time" => {
                if let Some(t) = &self.time {
                    t.render(out);
                }
            }
            "tenant_id" => val(&self.tenant_id, out),
            "device_id" => val(&self.device_id, out),
            "site_id" => val(&self.site_id, out),
            "msg_type" => val(&self.msg_type, out),
            "metrics" => match &self.metrics {
                Some(Ok(entries)) => {
                    out.push('{');
                    for (i, (name, v)) in entries.iter().enumerate() {
                        if i > 0 {
                            out.push_str(if spaced { ", " } else { "," });
                        }
                        name.render(out);
                        out.push(':');
                        v.render(out);
                    }
                    out.push('}');
                }
                Some(Err(v)) => v.render(out),
                None => {}
            },
            _ => {}
        }
    }

    fn non_json(&self) -> bool {
        let vals = [
            &self.seq,
            &self.tenant_id,
            &self.device_id,
            &self.site_id,
            &self.msg_type,
        ];
        vals.iter().any(|v| v.as_ref().is_some_and(Val::non_json))
            || matches!(&self.time, Some(TimeVal::Other(v)) if v.non_json())
            || match &self.metrics {
                Some(Ok(entries)) => entries.iter().any(|(_, v)| v.non_json()),
                Some(Err(v)) => v.non_json(),
                None => false,
            }
            || self.unknown.as_ref().is_some_and(|(_, v)| v.non_json())
    }
}

#[derive(Debug, Clone)]
struct Body {
    format: Format,
    /// For `Format::Json`: a single object (one message) rather than an array.
    single: bool,
    spaced: bool,
    messages: Vec<Msg>,
}

impl Body {
    fn render(&self) -> String {
        let mut out = String::new();
        match (self.format, self.single) {
            (Format::Json, true) => self.messages[0].render(&mut out, self.spaced),
            (Format::Json, false) => {
                out.push('[');
                for (i, m) in self.messages.iter().enumerate() {
                    if i > 0 {
                        out.push_str(if self.spaced { ",\n" } else { "," });
                    }
                    m.render(&mut out, self.spaced);
                }
                out.push(']');
            }
            (Format::NdJson, _) => {
                for m in &self.messages {
                    m.render(&mut out, false);
                    out.push('\n');
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The documented semantics, computed from the model.

/// What the body layer must do with one message.
#[derive(Debug)]
enum Expected {
    Accept(Telemetry),
    /// Refused; the rejection must name one of these fields.
    Refuse(BTreeSet<String>),
}

fn echoed(name: &str) -> String {
    name.chars().take(64).collect()
}

/// Problems of a string value: U+0000 and lone surrogates.
fn text_unstorable(text: &Text) -> bool {
    text.lone_surrogate.is_some() || text.chars.contains(&'\0')
}

/// The metric a value becomes, or `None` if it must be refused.
fn metric(val: &Val) -> Option<MetricValue> {
    match val {
        Val::Null => Some(MetricValue::Null),
        Val::Bool(b) => Some(MetricValue::Bool(*b)),
        Val::Int(v) => i64::try_from(*v).ok().map(MetricValue::Long),
        Val::NegativeZero => Some(MetricValue::Long(0)),
        Val::Float(v, _) => Some(MetricValue::Double(*v)),
        Val::Extreme(text) => {
            // The nearest double, unless it is infinite, or 0 for a non-zero literal.
            let v: f64 = text.parse().unwrap();
            let significant = text
                .split(['e', 'E'])
                .next()
                .unwrap()
                .bytes()
                .any(|b| (b'1'..=b'9').contains(&b));
            (v.is_finite() && !(v == 0.0 && significant)).then_some(MetricValue::Double(v))
        }
        Val::Str(text) if text_unstorable(text) || text.value().len() > MAX_STRING_BYTES => None,
        Val::Str(text) => Some(MetricValue::String(text.value())),
        Val::NonJson(_) | Val::Array(_) | Val::Object => None,
    }
}

/// A name-pattern identifier: `Ok(None)` when absent or null.
fn identifier(val: &Option<Val>) -> Result<Option<String>, ()> {
    match val {
        None | Some(Val::Null) => Ok(None),
        Some(Val::Str(text)) if !text_unstorable(text) && is_valid_name(&text.value()) => {
            Ok(Some(text.value()))
        }
        Some(_) => Err(()),
    }
}

fn expected(msg: &Msg, now: DateTime<Utc>) -> Expected {
    let mut problems = BTreeSet::new();
    if let Some(repeat) = msg.repeat.filter(|f| msg.has(f)) {
        problems.insert(repeat.to_owned());
    }
    let mut ids = BTreeMap::new();
    for (name, val) in [
        ("tenant_id", &msg.tenant_id),
        ("device_id", &msg.device_id),
        ("site_id", &msg.site_id),
        ("msg_type", &msg.msg_type),
    ] {
        match identifier(val) {
            Ok(id) => {
                ids.insert(name, id);
            }
            Err(()) => {
                problems.insert(name.to_owned());
            }
        }
    }
    let seq = match &msg.seq {
        Some(Val::Int(v)) => i64::try_from(*v).ok(),
        Some(Val::NegativeZero) => Some(0),
        _ => None,
    };
    if seq.is_none() {
        problems.insert("seq".to_owned());
    }
    let time = match &msg.time {
        None | Some(TimeVal::Other(Val::Null)) => Some(now),
        Some(TimeVal::Written {
            instant,
            digits,
            extra,
            ..
        }) => {
            let exact = *digits < 9 || *extra == 0;
            let ahead = *instant - now;
            let within = ahead <= Span::seconds(300) && -ahead <= Span::days(90);
            (exact && within).then_some(*instant)
        }
        Some(TimeVal::LeapSecond(_) | TimeVal::Other(_)) => None,
    };
    if time.is_none() {
        problems.insert("time".to_owned());
    }
    let mut metrics = BTreeMap::new();
    match &msg.metrics {
        // `{}` is an empty metrics object.
        Some(Err(Val::Object)) => {}
        None | Some(Err(_)) => {
            problems.insert("metrics".to_owned());
        }
        Some(Ok(entries)) => {
            let mut seen = HashSet::new();
            for (name, val) in entries {
                let field = format!("metrics.{}", echoed(&name.value()));
                let name_ok = !text_unstorable(name) && is_valid_name(&name.value());
                let first = seen.insert(name.value());
                match metric(val) {
                    Some(value) if name_ok && first => {
                        metrics.insert(name.value(), value);
                    }
                    _ => {
                        problems.insert(field);
                    }
                }
            }
        }
    }
    if let Some((name, _)) = &msg.unknown {
        problems.insert(echoed(&name.value()));
    }
    if !problems.is_empty() {
        return Expected::Refuse(problems);
    }
    let (Some(seq), Some(time)) = (seq, time) else {
        unreachable!("refused above");
    };
    Expected::Accept(Telemetry {
        tenant_id: ids["tenant_id"].clone().unwrap_or_else(|| "t0".to_owned()),
        device_id: ids["device_id"].clone().unwrap_or_else(|| "d0".to_owned()),
        site_id: ids["site_id"].clone(),
        msg_type: ids["msg_type"]
            .clone()
            .unwrap_or_else(|| "telemetry".to_owned()),
        seq,
        time,
        received_at: now,
        metrics,
    })
}

// ---------------------------------------------------------------------------------------------
// Generators.
//
// Half of the messages are "clean": only values that must be accepted, though still
// adversarial (integers at the i64 bounds, doubles of any bit pattern, astral and escaped
// strings, few devices and often no `time`, so readings share points). The other half are
// "wild": anything, including what must be refused.

fn any_char(clean: bool) -> BoxedStrategy<char> {
    prop_oneof![
        6 => prop::char::range('a', 'z'),
        3 => prop::char::range(' ', '~'),
        1 => prop::char::range('\u{0}', '\u{1f}'),
        1 => prop::sample::select(vec![
            '\u{0}', '\u{7f}', '\u{80}', 'é', 'ß', '\u{2028}', '\u{feff}', '\u{fffd}',
            '\u{fffe}', '\u{ffff}', '😀', '\u{10ffff}',
        ]),
        2 => prop::char::range('\u{10000}', '\u{10ffff}'),
        1 => any::<char>(),
    ]
    .prop_map(move |c| if clean && c == '\0' { '0' } else { c })
    .boxed()
}

fn escape() -> BoxedStrategy<Escape> {
    prop_oneof![
        4 => Just(Escape::Required),
        1 => Just(Escape::NonAscii),
        1 => Just(Escape::All),
    ]
    .boxed()
}

fn lone_surrogate(clean: bool) -> BoxedStrategy<Option<(usize, u16)>> {
    if clean {
        return Just(None).boxed();
    }
    prop_oneof![
        20 => Just(None),
        1 => (0usize..16, 0xD800u16..=0xDFFF).prop_map(Some),
    ]
    .boxed()
}

fn text(clean: bool) -> BoxedStrategy<Text> {
    let chars = prop_oneof![
        20 => prop::collection::vec(any_char(clean), 0..16),
        // Around the 1024-byte limit.
        1 => (1000usize..1030, prop::collection::vec(any_char(clean), 0..4)).prop_map(|(n, tail)| {
            let mut chars = vec!['x'; n];
            chars.extend(tail);
            chars
        }),
    ]
    .prop_map(move |mut chars| {
        while clean && chars.iter().map(|c| c.len_utf8()).sum::<usize>() > MAX_STRING_BYTES {
            chars.pop();
        }
        chars
    });
    (chars, escape(), lone_surrogate(clean))
        .prop_map(|(chars, escape, lone_surrogate)| Text {
            chars,
            escape,
            lone_surrogate,
        })
        .boxed()
}

const NAME_CHARS: &str = "abcxyzABZ0189_.:-";

/// Metric names and identifiers: valid ones, and when wild also empty, overlong or with a
/// character outside the pattern (U+0000, space, `/`, `é`, an astral one).
fn name(clean: bool) -> BoxedStrategy<Text> {
    let valid = prop::collection::vec(
        prop::sample::select(NAME_CHARS.chars().collect::<Vec<_>>()),
        1..10,
    );
    let chars = if clean {
        prop_oneof![
            20 => valid,
            1 => Just(vec!['n'; 64]),
        ]
        .boxed()
    } else {
        prop_oneof![
            4 => valid.clone(),
            1 => Just(Vec::new()),
            1 => (64usize..=66).prop_map(|n| vec!['n'; n]),
            2 => (valid, prop::sample::select(vec!['\u{0}', ' ', '/', 'é', '😀']), 0usize..10)
                .prop_map(|(mut chars, bad, at)| {
                    chars.insert(at.min(chars.len()), bad);
                    chars
                }),
        ]
        .boxed()
    };
    (chars, escape())
        .prop_map(|(chars, escape)| Text {
            chars,
            escape,
            lone_surrogate: None,
        })
        .boxed()
}

fn integer(clean: bool) -> BoxedStrategy<i128> {
    let near = |bound: i128| (-3i128..=3).prop_map(move |d| bound + d);
    let strategy = prop_oneof![
        4 => any::<i64>().prop_map(i128::from),
        2 => -1000i128..1000,
        2 => near(i128::from(i64::MAX)),
        2 => near(i128::from(i64::MIN)),
        2 => near(i128::from(u64::MAX)),
        1 => any::<i128>(),
    ];
    if clean {
        strategy
            .prop_map(|v| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)))
            .boxed()
    } else {
        strategy.boxed()
    }
}

fn float() -> BoxedStrategy<f64> {
    prop_oneof![
        4 => any::<u64>()
            .prop_map(f64::from_bits)
            .prop_filter("finite", |v| v.is_finite()),
        2 => any::<f64>().prop_filter("finite", |v| v.is_finite()),
        1 => prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            0.1,
            5e-324,
            -5e-324,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::MIN,
            1e300,
            9007199254740993.0,
        ]),
    ]
    .boxed()
}

fn extreme(clean: bool) -> BoxedStrategy<String> {
    let mantissa = prop::sample::select(vec![
        "0",
        "-0",
        "0.000",
        "1",
        "-1",
        "9.99",
        "1.0",
        "0.0001",
        "2.4703282292062328",
        "2.4703282292062327",
        "1.7976931348623157",
        "1.7976931348623159",
        "123456789012345678901234567890",
    ]);
    let exponent = prop::sample::select(vec![
        -99999i64, -400, -330, -325, -324, -323, -308, 0, 308, 309, 400, 99999,
    ]);
    (
        mantissa,
        exponent,
        prop::sample::select(vec!["e", "E", "e+"]),
    )
        .prop_map(|(m, e, mark)| {
            if e < 0 {
                format!("{m}{}{e}", &mark[..1])
            } else {
                format!("{m}{mark}{e}")
            }
        })
        .prop_filter("storable when clean", move |text| {
            !clean || metric(&Val::Extreme(text.clone())).is_some()
        })
        .boxed()
}

fn value(clean: bool) -> BoxedStrategy<Val> {
    let float = (float(), prop::sample::select(vec![0u8, 1, 2])).prop_map(|(v, f)| {
        Val::Float(
            v,
            match f {
                0 => FloatFormat::Debug,
                1 => FloatFormat::Exp,
                _ => FloatFormat::UpperExp,
            },
        )
    });
    let containers = if clean {
        Just(Val::Null).boxed()
    } else {
        prop_oneof![
            prop::collection::vec(any::<bool>(), 0..3).prop_map(Val::Array),
            Just(Val::Object),
        ]
        .boxed()
    };
    prop_oneof![
        2 => Just(Val::Null),
        2 => any::<bool>().prop_map(Val::Bool),
        6 => integer(clean).prop_map(Val::Int),
        1 => Just(Val::NegativeZero),
        6 => float,
        2 => extreme(clean).prop_map(Val::Extreme),
        6 => text(clean).prop_map(Val::Str),
        1 => containers,
    ]
    .boxed()
}

/// Rarely a non-JSON number, otherwise `value(false)`.
fn value_or_non_json() -> BoxedStrategy<Val> {
    prop_oneof![
        200 => value(false),
        1 => prop::sample::select(vec!["NaN", "Infinity", "-Infinity"]).prop_map(Val::NonJson),
    ]
    .boxed()
}

fn identifier_value(clean: bool) -> BoxedStrategy<Option<Val>> {
    if clean {
        return prop_oneof![
            1 => Just(None),
            1 => prop::sample::select(vec!["d1", "d2", "plant-1"])
                .prop_map(|id| Some(Val::Str(Text::plain(id)))),
            1 => name(true).prop_map(|t| Some(Val::Str(t))),
            1 => Just(Some(Val::Null)),
        ]
        .boxed();
    }
    prop_oneof![
        6 => Just(None),
        10 => name(false).prop_map(|t| Some(Val::Str(t))),
        1 => Just(Some(Val::Null)),
        1 => value(false).prop_map(Some),
    ]
    .boxed()
}

fn time(now: DateTime<Utc>, clean: bool) -> BoxedStrategy<Option<TimeVal>> {
    let offset_seconds = if clean {
        (-(89 * 86_400i64)..290).boxed()
    } else {
        prop_oneof![
            8 => -(89 * 86_400i64)..290,
            1 => 310i64..100_000,
            1 => -(200 * 86_400i64)..-(91 * 86_400),
        ]
        .boxed()
    };
    let extra = if clean {
        Just(0u32).boxed()
    } else {
        prop_oneof![3 => Just(0u32), 1 => 0u32..1000].boxed()
    };
    let written = (
        offset_seconds,
        0u32..1_000_000,
        prop::sample::select(vec![0usize, 3, 6, 9, 9]),
        extra,
        prop::sample::select(vec![0i32, 0, 120, -330, 840]),
    )
        .prop_map(move |(seconds, micros, digits, extra, offset_minutes)| {
            let micros = match digits {
                0 => 0,
                3 => micros / 1000 * 1000,
                _ => micros,
            };
            let instant =
                DateTime::from_timestamp(now.timestamp() + seconds, micros * 1000).unwrap();
            TimeVal::Written {
                instant,
                digits,
                extra,
                offset_minutes,
            }
        });
    if clean {
        return prop_oneof![
            // Without `time` (or `null`): the request's ingest time.
            4 => Just(None),
            1 => Just(Some(TimeVal::Other(Val::Null))),
            4 => written.prop_map(Some),
        ]
        .boxed();
    }
    prop_oneof![
        6 => Just(None),
        12 => written.prop_map(Some),
        1 => Just(Some(TimeVal::LeapSecond(now))),
        1 => value(false).prop_map(|v| Some(TimeVal::Other(v))),
    ]
    .boxed()
}

fn metrics(clean: bool) -> BoxedStrategy<Option<Metrics>> {
    if clean {
        return prop::collection::vec((name(true), value(true)), 0..6)
            .prop_map(|entries| {
                let mut seen = HashSet::new();
                let unique = entries
                    .into_iter()
                    .filter(|(name, _)| seen.insert(name.value()))
                    .collect();
                Some(Ok(unique))
            })
            .boxed();
    }
    let entries = (
        prop::collection::vec((name(false), value_or_non_json()), 0..6),
        prop_oneof![4 => Just(None), 1 => (0usize..6, escape(), value(false)).prop_map(Some)],
    )
        .prop_map(|(mut entries, duplicate)| {
            // The same name again, perhaps spelled with escapes, with another value.
            if let Some((at, escape, val)) = duplicate {
                if let Some((name, _)) = entries.get(at % entries.len().max(1)).cloned() {
                    entries.push((Text { escape, ..name }, val));
                }
            }
            entries
        });
    prop_oneof![
        20 => entries.prop_map(|e| Some(Ok(e))),
        1 => Just(None),
        1 => value(false).prop_map(|v| Some(Err(v))),
    ]
    .boxed()
}

fn message(now: DateTime<Utc>, clean: bool) -> BoxedStrategy<Msg> {
    let seq = if clean {
        integer(true).prop_map(|v| Some(Val::Int(v))).boxed()
    } else {
        prop_oneof![
            12 => integer(false).prop_map(|v| Some(Val::Int(v))),
            1 => Just(None),
            1 => value(false).prop_map(Some),
        ]
        .boxed()
    };
    let unknown = if clean {
        Just(None).boxed()
    } else {
        prop_oneof![
            10 => Just(None),
            1 => (name(false), value(false)).prop_map(Some),
        ]
        .boxed()
    };
    let repeat = if clean {
        Just(None).boxed()
    } else {
        prop_oneof![
            20 => Just(None),
            1 => prop::sample::select(vec!["seq", "time", "device_id", "metrics"]).prop_map(Some),
        ]
        .boxed()
    };
    (
        seq,
        time(now, clean),
        identifier_value(clean),
        identifier_value(clean),
        identifier_value(clean),
        identifier_value(clean),
        metrics(clean),
        unknown,
        repeat,
    )
        .prop_map(
            |(seq, time, tenant_id, device_id, site_id, msg_type, metrics, unknown, repeat)| Msg {
                seq,
                time,
                tenant_id,
                device_id,
                site_id,
                msg_type,
                metrics,
                unknown,
                repeat,
            },
        )
        .boxed()
}

fn body(now: DateTime<Utc>) -> BoxedStrategy<Body> {
    let message = prop_oneof![message(now, true), message(now, false)];
    (
        prop::sample::select(vec![Format::Json, Format::Json, Format::NdJson]),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(message, 1..5),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(format, single, spaced, mut messages, split)| {
            if format == Format::Json && single {
                messages.truncate(1);
            }
            // A device reporting its sensors in separate messages of one request, without
            // `time`: one point.
            if split {
                let (tenant_id, device_id) =
                    (messages[0].tenant_id.clone(), messages[0].device_id.clone());
                for message in &mut messages {
                    message.tenant_id = tenant_id.clone();
                    message.device_id = device_id.clone();
                    message.time = None;
                }
            }
            Body {
                format,
                single,
                spaced,
                messages,
            }
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// The property.

/// Counts over the run, to show the generators reach every kind of outcome.
#[derive(Debug, Default)]
struct Coverage {
    accepted: AtomicUsize,
    refused: AtomicUsize,
    malformed_bodies: AtomicUsize,
    exact_longs_beyond_2_53: AtomicUsize,
    refused_integers: AtomicUsize,
    subnormal_doubles: AtomicUsize,
    astral_strings: AtomicUsize,
    merged: AtomicUsize,
}

fn bump(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn same_metric(a: &MetricValue, b: &MetricValue) -> bool {
    match (a, b) {
        (MetricValue::Double(a), MetricValue::Double(b)) => a.to_bits() == b.to_bits(),
        (a, b) => a == b,
    }
}

fn assert_same_telemetry(
    actual: &Telemetry,
    expected: &Telemetry,
    what: &str,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&actual.tenant_id, &expected.tenant_id, "{}", what);
    prop_assert_eq!(&actual.device_id, &expected.device_id, "{}", what);
    prop_assert_eq!(&actual.site_id, &expected.site_id, "{}", what);
    prop_assert_eq!(&actual.msg_type, &expected.msg_type, "{}", what);
    prop_assert_eq!(actual.seq, expected.seq, "{}", what);
    prop_assert_eq!(actual.time, expected.time, "{}", what);
    prop_assert_eq!(actual.received_at, expected.received_at, "{}", what);
    prop_assert_eq!(
        actual.metrics.keys().collect::<Vec<_>>(),
        expected.metrics.keys().collect::<Vec<_>>(),
        "{}",
        what
    );
    for (name, value) in &expected.metrics {
        prop_assert!(
            same_metric(&actual.metrics[name], value),
            "{}: metric {:?} is {:?}, expected {:?}",
            what,
            name,
            actual.metrics[name],
            value
        );
    }
    Ok(())
}

fn check(body: &Body, now: DateTime<Utc>, coverage: &Coverage) -> Result<(), TestCaseError> {
    let text = body.render();
    let result = read_body(body.format, text.as_bytes(), now, LIMITS);
    let non_json = body.messages.iter().any(Msg::non_json);
    if body.format == Format::Json && non_json {
        // Not JSON: the whole body is refused, saying where and what to send instead.
        let rejection = result
            .err()
            .ok_or_else(|| TestCaseError::fail("non-JSON number accepted"))?;
        prop_assert_eq!(rejection.status.as_u16(), 400);
        prop_assert!(
            rejection.error.contains(" at line ")
                && rejection.error.contains(" column ")
                && rejection
                    .error
                    .ends_with("is not a json number; send null instead"),
            "{}",
            rejection.error
        );
        bump(&coverage.malformed_bodies);
        return Ok(());
    }
    let readings =
        result.map_err(|r| TestCaseError::fail(format!("body refused: {r:?}\n{text}")))?;
    prop_assert_eq!(readings.readings.len(), body.messages.len());
    prop_assert_eq!(
        readings.batch,
        !(body.format == Format::Json && body.single)
    );
    let codec = schemas::telemetry_codec().unwrap();
    let mut accepted = Vec::new();
    for (index, (msg, outcome)) in body.messages.iter().zip(readings.readings).enumerate() {
        let what = format!("message {index} of\n{text}");
        if body.format == Format::NdJson && msg.non_json() {
            let rejection: Rejection = outcome
                .err()
                .ok_or_else(|| TestCaseError::fail(format!("non-JSON line accepted: {what}")))?;
            prop_assert_eq!(rejection.index, Some(index));
            prop_assert!(
                rejection.error.ends_with("send null instead"),
                "{}",
                rejection.error
            );
            bump(&coverage.malformed_bodies);
            continue;
        }
        match (expected(msg, now), outcome) {
            (Expected::Accept(expected), Ok(reading)) => {
                // What the handler does once the token resolved tenant and device.
                let tenant = reading.tenant_id.clone().unwrap_or_else(|| "t0".to_owned());
                let device = reading.device_id.clone().unwrap_or_else(|| "d0".to_owned());
                let telemetry = reading.into_telemetry(tenant, device, None, now);
                assert_same_telemetry(&telemetry, &expected, &what)?;
                // And the Avro record the sink reads carries the same.
                let decoded = codec.decode(&codec.encode(&telemetry).unwrap()).unwrap();
                assert_same_telemetry(&decoded, &expected, &format!("avro of {what}"))?;
                bump(&coverage.accepted);
                for value in expected.metrics.values() {
                    match value {
                        MetricValue::Long(v) if v.unsigned_abs() > 1 << 53 => {
                            bump(&coverage.exact_longs_beyond_2_53)
                        }
                        MetricValue::Double(v) if v.is_subnormal() => {
                            bump(&coverage.subnormal_doubles)
                        }
                        MetricValue::String(s) if s.chars().any(|c| u32::from(c) > 0xFFFF) => {
                            bump(&coverage.astral_strings)
                        }
                        _ => {}
                    }
                }
                accepted.push(expected);
            }
            (Expected::Refuse(fields), Err(rejection)) => {
                prop_assert_eq!(rejection.status.as_u16(), 400, "{}: {:?}", what, rejection);
                prop_assert_eq!(rejection.index, Some(index), "{}", what);
                let field = rejection.field.clone().ok_or_else(|| {
                    TestCaseError::fail(format!("no field named: {rejection:?} for {what}"))
                })?;
                prop_assert!(
                    fields.contains(&field),
                    "{}: refused naming {:?} ({}), expected one of {:?}",
                    what,
                    field,
                    rejection.error,
                    fields
                );
                if rejection.error.starts_with("integer outside") {
                    bump(&coverage.refused_integers);
                }
                bump(&coverage.refused);
            }
            (Expected::Accept(expected), Err(rejection)) => {
                return Err(TestCaseError::fail(format!(
                    "{what}\nrefused {rejection:?}, expected {expected:?}"
                )));
            }
            (Expected::Refuse(fields), Ok(reading)) => {
                return Err(TestCaseError::fail(format!(
                    "{what}\naccepted {reading:?}, expected a refusal naming one of {fields:?}"
                )));
            }
        }
    }
    // Points: distinct (tenant, device, time) among the accepted readings.
    let points: HashSet<_> = accepted
        .iter()
        .map(|t| (t.tenant_id.clone(), t.device_id.clone(), t.time))
        .collect();
    prop_assert_eq!(count_points(&accepted), points.len());
    if points.len() < accepted.len() {
        bump(&coverage.merged);
    }
    Ok(())
}

#[test]
fn every_accepted_body_is_produced_as_documented_and_every_refusal_names_a_field() {
    // Whole seconds, so generated offsets keep their fraction.
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let coverage = Coverage::default();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&body(now), |body| check(&body, now, &coverage))
        .unwrap();
    let count = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let summary = format!(
        "{CASES} bodies: {coverage:?} (now {})",
        now.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    eprintln!("{summary}");
    // The generators must reach every kind of outcome, or the property proves little.
    assert!(count(&coverage.accepted) >= 3_000, "{summary}");
    assert!(count(&coverage.refused) >= 3_000, "{summary}");
    assert!(count(&coverage.malformed_bodies) >= 20, "{summary}");
    assert!(count(&coverage.exact_longs_beyond_2_53) >= 100, "{summary}");
    assert!(count(&coverage.refused_integers) >= 100, "{summary}");
    assert!(count(&coverage.subnormal_doubles) >= 10, "{summary}");
    assert!(count(&coverage.astral_strings) >= 100, "{summary}");
    assert!(count(&coverage.merged) >= 100, "{summary}");
}
