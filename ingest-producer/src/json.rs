//! JSON as PostgreSQL stores it.
//!
//! A body is read in two passes. serde_json checks the syntax first: its errors carry the line
//! and column, and a non-JSON number (`NaN`, `Infinity`, `-Infinity`, as Python's
//! `json.dumps` writes them) is named as such, with the advice to send `null`. This module
//! then reads each message of the checked text into a `serde_json::Value`, refusing, with the
//! path of the offending field, whatever would not reach the `Telemetry` record and
//! PostgreSQL's `jsonb` as sent:
//!
//! * an integer outside the signed 64-bit range (serde_json would turn it into a rounded
//!   double; the record's metric is a `long`);
//! * a number whose double is infinite, or 0 while the literal is not (`1e400`, `1e-400`;
//!   `jsonb`'s `numeric` would have kept them exactly, the record cannot);
//! * U+0000 in a string or a key (`text` and `jsonb` cannot hold it);
//! * an escaped lone surrogate (`"\ud800"`), which is not Unicode (`jsonb` refuses it);
//! * a key twice in one object (serde_json and `jsonb` both keep the last value, so the first
//!   would be lost without a word).
//!
//! Why a second pass rather than serde_json's `Value`: by the time a `Value` exists, an
//! integer above `u64::MAX` and a float that underflowed are plain doubles, and the first of
//! two duplicate keys is gone. Numbers are parsed here by the standard library, which rounds
//! correctly, so the shortest representation of any double reads back bit for bit (serde_json
//! without its `float_roundtrip` feature may be one unit in the last place off).
//!
//! The second pass only ever sees text serde_json accepted; were it to meet anything else, it
//! refuses the message as malformed rather than guess.

use std::fmt::Write as _;

use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use crate::error::Rejection;

/// Objects and arrays nest at most this deep inside one message (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// Client-supplied keys echoed in a field path are cut to this many characters.
const MAX_ECHOED_KEY: usize = 64;

/// Checks the syntax of one JSON text and returns it without surrounding whitespace.
pub(crate) fn checked(text: &[u8]) -> Result<&str, Rejection> {
    let raw: &RawValue = serde_json::from_slice(text).map_err(|err| syntax_error(text, &err))?;
    Ok(raw.get())
}

/// The raw text of each element of a checked JSON array.
pub(crate) fn elements(array: &str) -> Result<Vec<&str>, Rejection> {
    let items: Vec<&RawValue> =
        serde_json::from_str(array).map_err(|err| syntax_error(array.as_bytes(), &err))?;
    Ok(items.into_iter().map(RawValue::get).collect())
}

/// Reads one checked message, which must be an object, refusing what would not be stored as
/// sent (see the module doc); the refusal names the field's path (`metrics.temp`).
pub(crate) fn message(raw: &str) -> Result<Value, Rejection> {
    if !raw.starts_with('{') {
        return Err(Rejection::bad_request("expected a json object"));
    }
    let mut reader = Reader {
        text: raw,
        pos: 0,
        path: Vec::new(),
    };
    let value = reader.value(0)?;
    reader.skip_whitespace();
    if reader.pos != raw.len() {
        return Err(unchecked());
    }
    Ok(value)
}

/// A serde_json syntax error, with a hint when it is a non-JSON number.
fn syntax_error(text: &[u8], err: &serde_json::Error) -> Rejection {
    let message = err.to_string();
    let at_a_value = message.starts_with("expected value") || message.starts_with("invalid number");
    match non_json_number(text, err.line(), err.column()).filter(|_| at_a_value) {
        Some((literal, column)) => Rejection::malformed(format!(
            "malformed json: {literal} at line {} column {column} is not a json number; \
             send null instead",
            err.line()
        )),
        None => Rejection::malformed(format!("malformed json: {message}")),
    }
}

/// The non-JSON number (`NaN`, `Infinity`, with an optional `-`) at serde_json's error
/// position (1-based line, 1-based byte column of the byte it stopped at), and the column
/// where that literal starts.
fn non_json_number(text: &[u8], line: usize, column: usize) -> Option<(&'static str, usize)> {
    if line == 0 || column == 0 {
        return None;
    }
    let line_start = if line == 1 {
        0
    } else {
        text.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)?
            .0
            + 1
    };
    let at = line_start + column - 1;
    let rest = text.get(at..)?;
    let literal = ["NaN", "Infinity"]
        .into_iter()
        .find(|literal| rest.starts_with(literal.as_bytes()))?;
    // serde_json stops after a `-` when no digit follows it.
    let negative = at > line_start && text.get(at - 1) == Some(&b'-');
    Some(match (literal, negative) {
        ("NaN", true) => ("-NaN", column - 1),
        (_, true) => ("-Infinity", column - 1),
        ("NaN", false) => ("NaN", column),
        (_, false) => ("Infinity", column),
    })
}

/// Text the first pass accepted but the second cannot read: a bug, refused rather than guessed.
fn unchecked() -> Rejection {
    Rejection::malformed("malformed json")
}

/// One step of a field's path.
#[derive(Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

/// What makes a string or key unstorable.
#[derive(Debug, Clone, Copy)]
enum Unstorable {
    Nul,
    LoneSurrogate,
}

impl Unstorable {
    fn describe(self, what: &str) -> String {
        match self {
            Unstorable::Nul => format!("{what} contains U+0000, which PostgreSQL cannot store"),
            Unstorable::LoneSurrogate => {
                format!("{what} contains a lone surrogate escape, which is not unicode")
            }
        }
    }
}

/// Reads checked JSON text, keeping the path to the value being read.
#[derive(Debug)]
struct Reader<'a> {
    text: &'a str,
    /// Byte offset of the next unread byte.
    pos: usize,
    /// Keys and indices from the message down to the value being read.
    path: Vec<Segment>,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// A refusal naming the current path.
    fn refuse(&self, error: impl Into<String>) -> Rejection {
        let mut field = String::new();
        for segment in &self.path {
            match segment {
                Segment::Key(key) => {
                    if !field.is_empty() {
                        field.push('.');
                    }
                    field.extend(key.chars().take(MAX_ECHOED_KEY));
                }
                Segment::Index(index) => {
                    let _ = write!(field, "[{index}]");
                }
            }
        }
        Rejection::invalid(field, error)
    }

    /// `depth` counts the objects and arrays around the value.
    fn value(&mut self, depth: usize) -> Result<Value, Rejection> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => match self.string()? {
                (_, Some(unstorable)) => Err(self.refuse(unstorable.describe("string"))),
                (s, None) => Ok(Value::String(s)),
            },
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(unchecked()),
        }
    }

    fn literal(&mut self, literal: &str, value: Value) -> Result<Value, Rejection> {
        if !self.text[self.pos..].starts_with(literal) {
            return Err(unchecked());
        }
        self.pos += literal.len();
        Ok(value)
    }

    fn object(&mut self, depth: usize) -> Result<Value, Rejection> {
        if depth > MAX_DEPTH {
            return Err(self.refuse(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        self.pos += 1;
        let mut map = Map::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_whitespace();
            let (key, unstorable) = self.string()?;
            let duplicate = map.contains_key(&key);
            self.path.push(Segment::Key(key));
            if let Some(unstorable) = unstorable {
                return Err(self.refuse(unstorable.describe("key")));
            }
            if duplicate {
                return Err(self.refuse("duplicate key"));
            }
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(unchecked());
            }
            self.pos += 1;
            let value = self.value(depth)?;
            let Some(Segment::Key(key)) = self.path.pop() else {
                return Err(unchecked());
            };
            map.insert(key, value);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(unchecked()),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, Rejection> {
        if depth > MAX_DEPTH {
            return Err(self.refuse(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.path.push(Segment::Index(items.len()));
            let value = self.value(depth)?;
            self.path.pop();
            items.push(value);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(unchecked()),
            }
        }
    }

    /// A string token, unescaped; a lone surrogate becomes U+FFFD (so the key can still be
    /// named) and is reported with any U+0000.
    fn string(&mut self) -> Result<(String, Option<Unstorable>), Rejection> {
        if self.peek() != Some(b'"') {
            return Err(unchecked());
        }
        self.pos += 1;
        let mut out = String::new();
        let mut unstorable = None;
        loop {
            let rest = &self.text[self.pos..];
            let run = rest
                .bytes()
                .position(|b| b == b'"' || b == b'\\')
                .ok_or_else(unchecked)?;
            // Both stops are ASCII, so `run` is a character boundary.
            out.push_str(&rest[..run]);
            self.pos += run + 1;
            if rest.as_bytes()[run] == b'"' {
                break;
            }
            let escape = self.peek().ok_or_else(unchecked)?;
            self.pos += 1;
            match escape {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let unit = self.hex4()?;
                    let decoded = match unit {
                        0xD800..=0xDBFF => self.low_surrogate().and_then(|low| {
                            char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                        }),
                        0xDC00..=0xDFFF => None,
                        _ => char::from_u32(unit),
                    };
                    match decoded {
                        Some(c) => out.push(c),
                        None => {
                            unstorable.get_or_insert(Unstorable::LoneSurrogate);
                            out.push(char::REPLACEMENT_CHARACTER);
                        }
                    }
                }
                _ => return Err(unchecked()),
            }
        }
        if unstorable.is_none() && out.contains('\0') {
            unstorable = Some(Unstorable::Nul);
        }
        Ok((out, unstorable))
    }

    /// Four hex digits of a `\u` escape.
    fn hex4(&mut self) -> Result<u32, Rejection> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .ok_or_else(unchecked)?;
        let unit = u32::from_str_radix(digits, 16).map_err(|_| unchecked())?;
        self.pos += 4;
        Ok(unit)
    }

    /// The low half of a surrogate pair, if the next escape is one (consumed only then).
    fn low_surrogate(&mut self) -> Option<u32> {
        let next = self.text.get(self.pos..self.pos + 6)?;
        let digits = next.strip_prefix("\\u")?;
        let unit = u32::from_str_radix(digits, 16).ok()?;
        if !(0xDC00..=0xDFFF).contains(&unit) {
            return None;
        }
        self.pos += 6;
        Some(unit)
    }

    /// An integer literal (no fraction, no exponent) is an `i64`, exactly; any other number
    /// is the double nearest to it.
    fn number(&mut self) -> Result<Value, Rejection> {
        let start = self.pos;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.pos += 1;
        }
        let literal = &self.text[start..self.pos];
        let integer = !literal.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
        if integer {
            return match literal.parse::<i64>() {
                Ok(v) => Ok(Value::Number(Number::from(v))),
                Err(_) => Err(self.refuse(format!(
                    "integer outside the signed 64-bit range ({} to {})",
                    i64::MIN,
                    i64::MAX
                ))),
            };
        }
        let value: f64 = literal.parse().map_err(|_| unchecked())?;
        if value.is_infinite() {
            return Err(self.refuse("number outside the range of a 64-bit float"));
        }
        let significant = literal
            .bytes()
            .take_while(|b| !matches!(b, b'e' | b'E'))
            .any(|b| matches!(b, b'1'..=b'9'));
        if value == 0.0 && significant {
            return Err(
                self.refuse("number too small for a 64-bit float (it would be stored as 0)")
            );
        }
        Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(unchecked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(text: &str) -> Result<Value, Rejection> {
        checked(text.as_bytes()).and_then(message)
    }

    fn refusal(text: &str) -> (Option<String>, String) {
        let rejection = read(text).unwrap_err();
        (rejection.field, rejection.error)
    }

    fn field(field: &str, error: &str) -> (Option<String>, String) {
        (Some(field.to_owned()), error.to_owned())
    }

    const OUT_OF_I64: &str =
        "integer outside the signed 64-bit range (-9223372036854775808 to 9223372036854775807)";

    #[test]
    fn integers_are_exact_within_i64_and_refused_outside() {
        assert_eq!(
            read(r#"{"a":9223372036854775807,"b":-9223372036854775808,"c":-0}"#).unwrap(),
            json!({"a": i64::MAX, "b": i64::MIN, "c": 0})
        );
        assert!(read(r#"{"a":-0}"#).unwrap()["a"].is_i64());
        for big in [
            "9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
        ] {
            assert_eq!(
                refusal(&format!(r#"{{"metrics":{{"c":{big}}}}}"#)),
                field("metrics.c", OUT_OF_I64),
                "{big}"
            );
        }
    }

    #[test]
    fn floats_read_back_bit_for_bit_and_never_overflow_or_vanish() {
        for v in [
            0.1,
            -0.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            1.7976931348623157e308,
            2.2250738585072014e-308,
            123456.789e-300,
        ] {
            let text = format!(r#"{{"x":{v:?}}}"#);
            let read = read(&text).unwrap()["x"].as_f64().unwrap();
            assert_eq!(read.to_bits(), v.to_bits(), "{text}");
        }
        assert_eq!(read(r#"{"x":1E3}"#).unwrap()["x"].as_f64(), Some(1000.0));
        assert!(read(r#"{"x":1.0}"#).unwrap()["x"].is_f64());
        assert_eq!(read(r#"{"x":0e999999}"#).unwrap()["x"].as_f64(), Some(0.0));
        for huge in ["1e400", "-1.5e309", "1e99999999999999999999"] {
            assert_eq!(
                refusal(&format!(r#"{{"x":{huge}}}"#)),
                field("x", "number outside the range of a 64-bit float"),
            );
        }
        for tiny in [
            "1.0e-400",
            "-2.4703282292062327e-324",
            "0.0001e-99999999999999999",
        ] {
            assert_eq!(
                refusal(&format!(r#"{{"x":{tiny}}}"#)),
                field(
                    "x",
                    "number too small for a 64-bit float (it would be stored as 0)"
                ),
            );
        }
    }

    #[test]
    fn nul_and_lone_surrogates_are_refused_in_strings_and_keys() {
        assert_eq!(
            refusal(r#"{"metrics":{"s":"a\u0000b"}}"#),
            field(
                "metrics.s",
                "string contains U+0000, which PostgreSQL cannot store"
            )
        );
        assert_eq!(
            refusal(r#"{"metrics":{"a\u0000":1}}"#),
            field(
                "metrics.a\0",
                "key contains U+0000, which PostgreSQL cannot store"
            )
        );
        for lone in [r"\ud800", r"\udc00", r"\ud800\u0041", r"x\ud800"] {
            assert_eq!(
                refusal(&format!(r#"{{"s":"{lone}"}}"#)),
                field(
                    "s",
                    "string contains a lone surrogate escape, which is not unicode"
                ),
                "{lone}"
            );
        }
        assert_eq!(
            refusal(r#"{"k\udfff":1}"#),
            field(
                "k\u{fffd}",
                "key contains a lone surrogate escape, which is not unicode"
            )
        );
        // A pair is one astral character, escaped or not.
        assert_eq!(
            read(r#"{"s":"\ud83d\ude00 😀 \u00e9\t\"\\\/"}"#).unwrap()["s"],
            json!("😀 😀 é\t\"\\/")
        );
    }

    #[test]
    fn duplicate_keys_are_refused_where_they_are() {
        assert_eq!(
            refusal(r#"{"seq":1,"seq":2}"#),
            field("seq", "duplicate key")
        );
        assert_eq!(
            refusal(r#"{"metrics":{"t":1,"h":2,"t":1}}"#),
            field("metrics.t", "duplicate key")
        );
        // The same key spelled with an escape is the same key.
        assert_eq!(
            refusal(r#"{"metrics":{"t":1,"\u0074":2}}"#),
            field("metrics.t", "duplicate key")
        );
        // The same name in different objects is fine.
        assert!(read(r#"{"t":{"t":1},"m":{"t":2}}"#).is_ok());
    }

    #[test]
    fn paths_name_array_elements_and_cut_long_keys() {
        assert_eq!(
            refusal(r#"{"metrics":{"o":[1,{"x":1e999}]}}"#),
            field(
                "metrics.o[1].x",
                "number outside the range of a 64-bit float"
            )
        );
        let long = "k".repeat(100);
        assert_eq!(
            refusal(&format!(r#"{{"{long}":1,"{long}":2}}"#)).0,
            Some("k".repeat(64))
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        let (field, error) = refusal(&deep);
        assert!(field.unwrap().starts_with("x[0][0]"));
        assert_eq!(error, "nested deeper than 128 levels");
        let fine = format!(r#"{{"x":{}{}}}"#, "[".repeat(127), "]".repeat(127));
        assert!(read(&fine).is_ok());
    }

    #[test]
    fn non_json_numbers_are_named_with_their_position() {
        let error = |text: &str| checked(text.as_bytes()).unwrap_err().error;
        assert_eq!(
            error(r#"{"seq":1,"metrics":{"x":NaN}}"#),
            "malformed json: NaN at line 1 column 25 is not a json number; send null instead"
        );
        assert_eq!(
            error("{\"metrics\": {\n  \"x\": 1,\n  \"y\": -Infinity}}"),
            "malformed json: -Infinity at line 3 column 8 is not a json number; send null instead"
        );
        assert_eq!(
            error("[1, Infinity]"),
            "malformed json: Infinity at line 1 column 5 is not a json number; send null instead"
        );
        assert_eq!(
            error(r#"{"é":-NaN}"#),
            "malformed json: -NaN at line 1 column 7 is not a json number; send null instead"
        );
        // Other syntax errors keep serde_json's wording.
        assert_eq!(
            error(r#"{"x":nan}"#),
            "malformed json: expected ident at line 1 column 7"
        );
        assert_eq!(
            error(r#"{NaN:1}"#),
            "malformed json: key must be a string at line 1 column 2"
        );
    }

    #[test]
    fn whitespace_and_literals_are_read() {
        assert_eq!(
            read(" {\n\t\"a\" : [ true , false , null ] ,\r\n \"b\" : { } } ").unwrap(),
            json!({"a": [true, false, null], "b": {}})
        );
        assert_eq!(read("[1]").unwrap_err().error, "expected a json object");
    }
}
