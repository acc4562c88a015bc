//! The Avro specification's Parsing Canonical Form, and the CRC-64-AVRO fingerprint of it.
//!
//! Source: Avro specification, "Parsing Canonical Form for Schemas" and "Schema
//! Fingerprints". The transformation rules:
//!
//! * PRIMITIVES: `{"type":"int"}` becomes `"int"`;
//! * FULLNAMES: names become fullnames (the `namespace` attribute or the enclosing
//!   namespace), and `namespace` attributes go;
//! * STRIP: only `type, name, fields, symbols, items, values, size` stay. Everything else goes,
//!   `logicalType` included: `{"type":"long","logicalType":"timestamp-micros"}` is `"long"`;
//! * ORDER: `name, type, fields, symbols, items, values, size`;
//! * STRINGS: string literals without escapes (names are plain identifiers anyway);
//! * INTEGERS: `size` without quotes or leading zeros;
//! * WHITESPACE: none outside string literals.
//!
//! A named type is written in full where it is defined, and as its quoted fullname wherever it
//! is used after that (as Java's `SchemaNormalization` does).
//!
//! Why our own: the `apache-avro` crate's `canonical_form()` keeps `logicalType` (AVRO-4004,
//! apache/avro PR #2976, unmerged), so its fingerprints of schemas with logical types are ones
//! that Java's `SchemaNormalization`, `fastavro` and the other SDKs never produce. The Avro
//! project's shared test cases (`schemas/tests/fixtures/avro-schema-tests.txt`) check this
//! module.

use std::collections::HashSet;

use apache_avro::rabin::Rabin;
use digest::Digest;
use serde_json::{Map, Value};

/// Why a schema has no canonical form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CanonicalFormError {
    #[error("schema is not JSON: {0}")]
    Json(String),
    #[error("{at}: {reason}")]
    Invalid { at: String, reason: String },
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// The Parsing Canonical Form of the schema in `json`.
pub fn parsing_canonical_form(json: &str) -> Result<String, CanonicalFormError> {
    let schema: Value =
        serde_json::from_str(json).map_err(|err| CanonicalFormError::Json(err.to_string()))?;
    let mut out = String::with_capacity(json.len());
    Writer::default().schema(&schema, "", "schema", &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO (Rabin) of `bytes`, as the number the specification's test cases give (Java's
/// `SchemaNormalization.fingerprint64`; single-object encoding writes it little-endian).
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    let digest = Rabin::digest(bytes);
    let mut le = [0u8; 8];
    le.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(le)
}

/// The fingerprint of the schema in `json`: CRC-64-AVRO of its Parsing Canonical Form.
pub fn fingerprint_of(json: &str) -> Result<u64, CanonicalFormError> {
    Ok(crc64_avro(parsing_canonical_form(json)?.as_bytes()))
}

#[derive(Default)]
struct Writer {
    /// Fullnames defined so far: later uses are written as names.
    defined: HashSet<String>,
}

fn invalid(at: &str, reason: impl Into<String>) -> CanonicalFormError {
    CanonicalFormError::Invalid {
        at: at.to_owned(),
        reason: reason.into(),
    }
}

fn push_str(out: &mut String, s: &str) {
    // serde_json escapes only what JSON requires (quote, backslash, control characters) and
    // leaves other characters as UTF-8, which is the STRINGS rule.
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// The fullname of `name` in `namespace` (a name with a dot is already full).
fn fullname(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

/// The namespace a fullname defines for what is nested in it.
fn namespace_of(fullname: &str) -> &str {
    fullname.rsplit_once('.').map_or("", |(ns, _)| ns)
}

impl Writer {
    fn schema(
        &mut self,
        schema: &Value,
        namespace: &str,
        at: &str,
        out: &mut String,
    ) -> Result<(), CanonicalFormError> {
        match schema {
            Value::String(name) => self.reference(name, namespace, at, out),
            Value::Array(branches) => {
                out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.schema(branch, namespace, &format!("{at}[{i}]"), out)?;
                }
                out.push(']');
                Ok(())
            }
            Value::Object(object) => self.object(object, namespace, at, out),
            other => Err(invalid(
                at,
                format!("a schema is a string, an array or an object, not {other}"),
            )),
        }
    }

    fn reference(
        &mut self,
        name: &str,
        namespace: &str,
        at: &str,
        out: &mut String,
    ) -> Result<(), CanonicalFormError> {
        if PRIMITIVES.contains(&name) {
            push_str(out, name);
            return Ok(());
        }
        let full = fullname(name, namespace);
        if !self.defined.contains(&full) {
            return Err(invalid(at, format!("unknown type `{full}`")));
        }
        push_str(out, &full);
        Ok(())
    }

    fn object(
        &mut self,
        object: &Map<String, Value>,
        namespace: &str,
        at: &str,
        out: &mut String,
    ) -> Result<(), CanonicalFormError> {
        let Some(Value::String(kind)) = object.get("type") else {
            return Err(invalid(at, "`type` must be a string"));
        };
        match kind.as_str() {
            "record" | "error" | "enum" | "fixed" => self.named(object, kind, namespace, at, out),
            "array" => {
                out.push_str("{\"type\":\"array\",\"items\":");
                let items = object
                    .get("items")
                    .ok_or_else(|| invalid(at, "no `items`"))?;
                self.schema(items, namespace, &format!("{at}.items"), out)?;
                out.push('}');
                Ok(())
            }
            "map" => {
                out.push_str("{\"type\":\"map\",\"values\":");
                let values = object
                    .get("values")
                    .ok_or_else(|| invalid(at, "no `values`"))?;
                self.schema(values, namespace, &format!("{at}.values"), out)?;
                out.push('}');
                Ok(())
            }
            // A primitive (logical types are annotations: stripped) or a named type used
            // through `{"type": "Name"}`.
            name => self.reference(name, namespace, at, out),
        }
    }

    fn named(
        &mut self,
        object: &Map<String, Value>,
        kind: &str,
        namespace: &str,
        at: &str,
        out: &mut String,
    ) -> Result<(), CanonicalFormError> {
        let Some(Value::String(name)) = object.get("name") else {
            return Err(invalid(at, format!("a {kind} needs a string `name`")));
        };
        let own_namespace = match object.get("namespace") {
            Some(Value::String(ns)) => ns.as_str(),
            Some(Value::Null) | None => namespace,
            Some(other) => return Err(invalid(at, format!("`namespace` is {other}"))),
        };
        let full = fullname(name, own_namespace);
        if !self.defined.insert(full.clone()) {
            return Err(invalid(at, format!("`{full}` is defined twice")));
        }
        let at = full.as_str();
        out.push_str("{\"name\":");
        push_str(out, &full);
        out.push_str(",\"type\":");
        push_str(out, kind);
        match kind {
            "enum" => {
                let Some(Value::Array(symbols)) = object.get("symbols") else {
                    return Err(invalid(at, "an enum needs an array `symbols`"));
                };
                out.push_str(",\"symbols\":[");
                for (i, symbol) in symbols.iter().enumerate() {
                    let Value::String(symbol) = symbol else {
                        return Err(invalid(at, format!("symbol {i} is not a string")));
                    };
                    if i > 0 {
                        out.push(',');
                    }
                    push_str(out, symbol);
                }
                out.push(']');
            }
            "fixed" => {
                let size = match object.get("size") {
                    Some(Value::Number(n)) => n.as_u64(),
                    // INTEGERS: a quoted size loses its quotes and leading zeros.
                    Some(Value::String(s)) => s.parse::<u64>().ok(),
                    _ => None,
                }
                .ok_or_else(|| invalid(at, "a fixed needs a non-negative integer `size`"))?;
                out.push_str(&format!(",\"size\":{size}"));
            }
            _ => {
                let Some(Value::Array(fields)) = object.get("fields") else {
                    return Err(invalid(at, format!("a {kind} needs an array `fields`")));
                };
                let nested = namespace_of(&full).to_owned();
                out.push_str(",\"fields\":[");
                for (i, field) in fields.iter().enumerate() {
                    let Some(Value::String(field_name)) = field.get("name") else {
                        return Err(invalid(at, format!("field {i} needs a string `name`")));
                    };
                    let field_type = field.get("type").ok_or_else(|| {
                        invalid(at, format!("field `{field_name}` has no `type`"))
                    })?;
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str("{\"name\":");
                    push_str(out, field_name);
                    out.push_str(",\"type\":");
                    self.schema(field_type, &nested, &format!("{at}.{field_name}"), out)?;
                    out.push('}');
                }
                out.push(']');
            }
        }
        out.push('}');
        Ok(())
    }
}
