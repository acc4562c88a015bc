//! Avro framing and schema resolution for Kafka values.
//!
//! Two framings share one decoder, chosen by the first byte:
//!
//! * **single-object encoding** (no schema registry): `C3 01`, the 8-byte little-endian
//!   CRC-64-AVRO (Rabin) fingerprint of the writer schema's Parsing Canonical Form (as the
//!   specification defines it: [`crate::canonical`]), then the body. The writer schema is
//!   looked up by fingerprint among every version shipped in `schemas/avro`.
//!
//!   Until 2026-11-30 fleetstream wrote the `apache-avro` crate's fingerprint instead, which
//!   keeps `logicalType` in the canonical form ([`legacy_fingerprint`]); those fingerprints
//!   of the shipped versions are still accepted, so messages already on topics decode. They
//!   may stop being accepted once every topic's retention has passed over messages written
//!   before that date (see ARCHITECTURE.md).
//! * **Confluent wire format** (with a registry): `00`, a 4-byte big-endian schema id, then the
//!   body. [`Codec::decode`] knows only ids mapped to shipped versions with
//!   [`Codec::register_confluent_id`]; a service with a registry fetches the writer schema of an
//!   id, prepares it once with [`Codec::writer_schema`] (a shipped version when its canonical
//!   form is one, else any schema the current one can read) and decodes bodies with
//!   [`Codec::decode_body`].
//!
//! Data written with any known version is resolved to the codec's reader schema (the newest
//! version), so every schema change must stay backward compatible.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

use crate::error::{DecodeError, EncodeError, SchemaError};

/// First two bytes of Avro single-object encoding.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of the Confluent wire format.
pub const CONFLUENT_MAGIC: u8 = 0x00;

const SINGLE_OBJECT_HEADER: usize = 10;
const CONFLUENT_HEADER: usize = 5;
/// Upper bound for one allocation while decoding untrusted bytes: a corrupt length prefix must
/// not make the decoder reserve gigabytes. Far above any valid message (ingest caps bodies).
const MAX_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// A Rust type with an Avro record schema.
pub trait AvroRecord: Sized {
    /// Full name of the record (`namespace.name`), checked against every schema version.
    const FULL_NAME: &'static str;
    /// The record as an Avro value of the newest schema version.
    fn to_avro(&self) -> Value;
    /// The record from an Avro value already resolved to the newest schema version.
    fn from_avro(value: Value) -> Result<Self, DecodeError>;
    /// A hand-written encoder's hook: writes the record's body for the schema named
    /// `schema_name` straight into `out` and returns `true`, or returns `false` having written
    /// nothing when it has no fast path for that schema (the default), and the codec then
    /// writes [`AvroRecord::to_avro`] with the generic writer.
    ///
    /// An implementation must write exactly the generic writer's bytes for `to_avro()` (map
    /// entries may come in another order: the generic order is a `HashMap`'s) and may only
    /// take records the generic writer would take. See [`crate::fast_encode`].
    fn write_body_fast(&self, schema_name: &str, out: &mut Vec<u8>) -> bool {
        let _ = (schema_name, out);
        false
    }
}

/// The writer schema of registry-framed data, prepared for reading into the codec's record
/// (see [`Codec::writer_schema`]).
#[derive(Debug)]
pub struct WriterSchema {
    /// Where the schema came from, e.g. `schema registry id 7`.
    label: String,
    /// A shipped version (the specification's fingerprint) with the same canonical form.
    shipped: Option<u64>,
    /// Otherwise the schema itself, resolved against the current one on each read.
    foreign: Option<Schema>,
}

impl WriterSchema {
    /// The specification's fingerprint of the shipped version this schema is, if any.
    pub fn shipped_fingerprint(&self) -> Option<u64> {
        self.shipped
    }

    /// Where the schema came from.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Which framing a message used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `C3 01` + fingerprint.
    SingleObject { fingerprint: u64 },
    /// `00` + schema id.
    Confluent { schema_id: u32 },
}

/// One named schema version, e.g. `("telemetry.v1", "{...}")`.
#[derive(Debug, Clone, Copy)]
pub struct SchemaSource<'a> {
    /// File stem, used in errors and logs.
    pub name: &'a str,
    /// The `.avsc` text.
    pub json: &'a str,
}

struct Version {
    name: String,
    schema: &'static Schema,
    reader: GenericDatumReader<'static>,
}

/// Encoder and decoder of one record type over every known version of its schema.
///
/// Schemas are parsed once and kept for the life of the process (they are leaked so the
/// resolved readers can borrow them); build codecs once, at start-up, not per message.
pub struct Codec<T> {
    current_name: String,
    /// The current schema's `.avsc` text, exactly: what is registered with a schema registry
    /// (registries give ids per text).
    current_json: String,
    current_fingerprint: u64,
    current_legacy_fingerprint: u64,
    writer: GenericDatumWriter<'static>,
    /// By the specification's fingerprint.
    versions: HashMap<u64, Version>,
    /// Legacy fingerprint -> the specification's, for every known version.
    legacy: HashMap<u64, u64>,
    confluent_ids: HashMap<u32, u64>,
    _record: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Codec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut known: Vec<&str> = self.versions.values().map(|v| v.name.as_str()).collect();
        known.sort_unstable();
        f.debug_struct("Codec")
            .field("current", &self.current_name)
            .field(
                "fingerprint",
                &format_args!("{:016x}", self.current_fingerprint),
            )
            .field("known", &known)
            .field("confluent_ids", &self.confluent_ids)
            .finish()
    }
}

/// The fingerprint fleetstream wrote before 2026-11-30: CRC-64-AVRO of the `apache-avro`
/// crate's canonical form, which keeps `logicalType` (AVRO-4004), so no other Avro SDK
/// computes it for schemas with logical types. Accepted when reading, never written.
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(le)
}

/// The specification's fingerprint of a schema source.
fn spec_fingerprint(source: &SchemaSource<'_>) -> Result<u64, SchemaError> {
    crate::canonical::fingerprint_of(source.json).map_err(|err| SchemaError::Parse {
        name: source.name.to_owned(),
        reason: format!("no Parsing Canonical Form: {err}"),
    })
}

fn parse(source: &SchemaSource<'_>, expected: &str) -> Result<&'static Schema, SchemaError> {
    let schema = Schema::parse_str(source.json).map_err(|err| SchemaError::Parse {
        name: source.name.to_owned(),
        reason: err.to_string(),
    })?;
    match &schema {
        Schema::Record(record) if record.name.fullname(None) == expected => {}
        _ => {
            return Err(SchemaError::WrongRecord {
                name: source.name.to_owned(),
                expected: expected.to_owned(),
            })
        }
    }
    Ok(Box::leak(Box::new(schema)))
}

impl<T: AvroRecord> Codec<T> {
    /// A codec that writes with `current` and reads data written with `current` or any of
    /// `older`. Fails if a version is not a record of `T`'s name or cannot be read by `current`.
    pub fn new(current: SchemaSource<'_>, older: &[SchemaSource<'_>]) -> Result<Self, SchemaError> {
        let _ = apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        let reader_schema = parse(&current, T::FULL_NAME)?;
        let current_fingerprint = spec_fingerprint(&current)?;
        let current_legacy_fingerprint = legacy_fingerprint(reader_schema);
        let mut legacy = HashMap::from([(current_legacy_fingerprint, current_fingerprint)]);
        let build_err = |name: &str, err: apache_avro::Error| SchemaError::Parse {
            name: name.to_owned(),
            reason: err.to_string(),
        };
        let writer = GenericDatumWriter::builder(reader_schema)
            .build()
            .map_err(|err| build_err(current.name, err))?;
        let mut versions = HashMap::new();
        let own = GenericDatumReader::builder(reader_schema)
            .build()
            .map_err(|err| build_err(current.name, err))?;
        versions.insert(
            current_fingerprint,
            Version {
                name: current.name.to_owned(),
                schema: reader_schema,
                reader: own,
            },
        );
        for source in older {
            let writer_schema = parse(source, T::FULL_NAME)?;
            SchemaCompatibility::can_read(writer_schema, reader_schema).map_err(|err| {
                SchemaError::Incompatible {
                    reader: current.name.to_owned(),
                    writer: source.name.to_owned(),
                    reason: err.to_string(),
                }
            })?;
            let reader = GenericDatumReader::builder(writer_schema)
                .reader_schema(reader_schema)
                .build()
                .map_err(|err| build_err(source.name, err))?;
            let spec = spec_fingerprint(source)?;
            legacy.insert(legacy_fingerprint(writer_schema), spec);
            versions.insert(
                spec,
                Version {
                    name: source.name.to_owned(),
                    schema: writer_schema,
                    reader,
                },
            );
        }
        Ok(Self {
            current_name: current.name.to_owned(),
            current_json: current.json.to_owned(),
            current_fingerprint,
            current_legacy_fingerprint,
            writer,
            versions,
            legacy,
            confluent_ids: HashMap::new(),
            _record: PhantomData,
        })
    }

    /// The specification's fingerprint of the known version `fingerprint` names (a
    /// specification or a legacy fingerprint), if any.
    fn known(&self, fingerprint: u64) -> Option<u64> {
        if self.versions.contains_key(&fingerprint) {
            Some(fingerprint)
        } else {
            self.legacy.get(&fingerprint).copied()
        }
    }

    /// Maps a schema-registry id to a known schema version, by fingerprint.
    /// Returns `false` if no known version has that fingerprint.
    pub fn register_confluent_id(&mut self, schema_id: u32, fingerprint: u64) -> bool {
        if let Some(fingerprint) = self.known(fingerprint) {
            self.confluent_ids.insert(schema_id, fingerprint);
            true
        } else {
            false
        }
    }

    /// Prepares reading bodies written with the schema `json` (for example the one a schema
    /// registry holds for an id; `label` names it in errors). A schema whose Parsing Canonical
    /// Form is a shipped version's reads through that version; any other must be a record of
    /// `T`'s name that the current schema can read (schema resolution: added fields with
    /// defaults, removed fields, promotions), or this fails with the reason.
    pub fn writer_schema(&self, label: &str, json: &str) -> Result<WriterSchema, SchemaError> {
        let source = SchemaSource { name: label, json };
        if let Some(shipped) = spec_fingerprint(&source).ok().and_then(|fp| self.known(fp)) {
            return Ok(WriterSchema {
                label: label.to_owned(),
                shipped: Some(shipped),
                foreign: None,
            });
        }
        let schema = Schema::parse_str(json).map_err(|err| SchemaError::Parse {
            name: label.to_owned(),
            reason: err.to_string(),
        })?;
        match &schema {
            Schema::Record(record) if record.name.fullname(None) == T::FULL_NAME => {}
            _ => {
                return Err(SchemaError::WrongRecord {
                    name: label.to_owned(),
                    expected: T::FULL_NAME.to_owned(),
                })
            }
        }
        SchemaCompatibility::can_read(&schema, self.current_schema()).map_err(|err| {
            SchemaError::Incompatible {
                reader: self.current_name.clone(),
                writer: label.to_owned(),
                reason: err.to_string(),
            }
        })?;
        Ok(WriterSchema {
            label: label.to_owned(),
            shipped: None,
            foreign: Some(schema),
        })
    }

    /// Decodes a body (the bytes after the framing header) written with `writer`, resolved
    /// to the current schema.
    pub fn decode_body(&self, writer: &WriterSchema, mut body: &[u8]) -> Result<T, DecodeError> {
        let value = match (&writer.foreign, writer.shipped) {
            // Resolved per message: registry schemas other than the shipped ones are rare
            // (another team's producer) and not on the hot path.
            (Some(schema), _) => GenericDatumReader::builder(schema)
                .reader_schema(self.current_schema())
                .build()
                .and_then(|reader| reader.read_value(&mut body)),
            (None, Some(fingerprint)) => self
                .versions
                .get(&fingerprint)
                .ok_or(DecodeError::UnknownFingerprint(fingerprint))?
                .reader
                .read_value(&mut body),
            (None, None) => {
                return Err(DecodeError::Body(format!("{} has no schema", writer.label)))
            }
        }
        .map_err(|err| DecodeError::Body(err.to_string()))?;
        if !body.is_empty() {
            return Err(DecodeError::TrailingBytes(body.len()));
        }
        T::from_avro(value)
    }

    /// Whether `schema_id` is mapped with [`Codec::register_confluent_id`].
    pub fn maps_confluent_id(&self, schema_id: u32) -> bool {
        self.confluent_ids.contains_key(&schema_id)
    }

    /// Fingerprint of the schema this codec writes (the specification's).
    pub fn current_fingerprint(&self) -> u64 {
        self.current_fingerprint
    }

    /// The legacy fingerprint of the schema this codec writes, accepted when reading.
    pub fn current_legacy_fingerprint(&self) -> u64 {
        self.current_legacy_fingerprint
    }

    /// The schema this codec writes (and resolves every known version to).
    pub fn current_schema(&self) -> &Schema {
        self.versions[&self.current_fingerprint].schema
    }

    /// The `.avsc` text of the schema this codec writes, byte for byte as shipped.
    pub fn current_json(&self) -> &str {
        &self.current_json
    }

    /// Name of the schema this codec writes, e.g. `telemetry.v1`.
    pub fn current_name(&self) -> &str {
        &self.current_name
    }

    fn body(&self, record: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if record.write_body_fast(&self.current_name, out) {
            return Ok(());
        }
        self.writer
            .write_value(out, record.to_avro())
            .map(|_| ())
            .map_err(|err| EncodeError::Schema {
                schema: self.current_name.clone(),
                reason: err.to_string(),
            })
    }

    /// Single-object encoding with the current schema.
    pub fn encode(&self, record: &T) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&self.current_fingerprint.to_le_bytes());
        self.body(record, &mut out)?;
        Ok(out)
    }

    /// Confluent wire format with the current schema, registered under `schema_id`.
    pub fn encode_confluent(&self, record: &T, schema_id: u32) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(128);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&schema_id.to_be_bytes());
        self.body(record, &mut out)?;
        Ok(out)
    }

    /// Reads the framing header without decoding the body.
    pub fn framing(bytes: &[u8]) -> Result<Framing, DecodeError> {
        match bytes.first() {
            None => Err(DecodeError::Truncated {
                len: 0,
                needed: CONFLUENT_HEADER,
            }),
            Some(&CONFLUENT_MAGIC) => {
                let header = bytes
                    .get(1..CONFLUENT_HEADER)
                    .ok_or(DecodeError::Truncated {
                        len: bytes.len(),
                        needed: CONFLUENT_HEADER,
                    })?;
                let mut id = [0u8; 4];
                id.copy_from_slice(header);
                Ok(Framing::Confluent {
                    schema_id: u32::from_be_bytes(id),
                })
            }
            Some(&0xC3) => {
                if bytes.len() < 2 {
                    return Err(DecodeError::Truncated {
                        len: bytes.len(),
                        needed: SINGLE_OBJECT_HEADER,
                    });
                }
                if bytes[1] != SINGLE_OBJECT_MAGIC[1] {
                    return Err(DecodeError::BadMagic(bytes[..2].to_vec()));
                }
                let header = bytes
                    .get(2..SINGLE_OBJECT_HEADER)
                    .ok_or(DecodeError::Truncated {
                        len: bytes.len(),
                        needed: SINGLE_OBJECT_HEADER,
                    })?;
                let mut fp = [0u8; 8];
                fp.copy_from_slice(header);
                Ok(Framing::SingleObject {
                    fingerprint: u64::from_le_bytes(fp),
                })
            }
            Some(_) => Err(DecodeError::BadMagic(bytes[..bytes.len().min(2)].to_vec())),
        }
    }

    /// Decodes either framing, resolving older schema versions to the current one.
    pub fn decode(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        let (fingerprint, mut body) = match Self::framing(bytes)? {
            Framing::SingleObject { fingerprint } => (fingerprint, &bytes[SINGLE_OBJECT_HEADER..]),
            Framing::Confluent { schema_id } => (
                *self
                    .confluent_ids
                    .get(&schema_id)
                    .ok_or(DecodeError::UnknownSchemaId(schema_id))?,
                &bytes[CONFLUENT_HEADER..],
            ),
        };
        let version = self
            .known(fingerprint)
            .and_then(|spec| self.versions.get(&spec))
            .ok_or(DecodeError::UnknownFingerprint(fingerprint))?;
        let value = version
            .reader
            .read_value(&mut body)
            .map_err(|err| DecodeError::Body(err.to_string()))?;
        if !body.is_empty() {
            return Err(DecodeError::TrailingBytes(body.len()));
        }
        T::from_avro(value)
    }
}

/// Helpers for `AvroRecord` implementations: pull typed fields out of a resolved record.
pub(crate) mod fields {
    use apache_avro::types::Value;

    use crate::error::DecodeError;

    pub(crate) fn wrong(field: &'static str, expected: &str, got: &Value) -> DecodeError {
        DecodeError::Field {
            field,
            reason: format!("expected {expected}, got {got:?}"),
        }
    }

    /// Strips a union wrapper, if any.
    pub(crate) fn unwrap_union(value: Value) -> Value {
        match value {
            Value::Union(_, inner) => *inner,
            other => other,
        }
    }

    pub(crate) fn string(field: &'static str, value: Value) -> Result<String, DecodeError> {
        match unwrap_union(value) {
            Value::String(s) => Ok(s),
            other => Err(wrong(field, "string", &other)),
        }
    }

    pub(crate) fn opt_string(
        field: &'static str,
        value: Value,
    ) -> Result<Option<String>, DecodeError> {
        match unwrap_union(value) {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            other => Err(wrong(field, "null or string", &other)),
        }
    }

    pub(crate) fn long(field: &'static str, value: Value) -> Result<i64, DecodeError> {
        match unwrap_union(value) {
            Value::Long(v) => Ok(v),
            Value::Int(v) => Ok(i64::from(v)),
            other => Err(wrong(field, "long", &other)),
        }
    }

    pub(crate) fn opt_double(
        field: &'static str,
        value: Value,
    ) -> Result<Option<f64>, DecodeError> {
        match unwrap_union(value) {
            Value::Null => Ok(None),
            Value::Double(v) => Ok(Some(v)),
            Value::Float(v) => Ok(Some(f64::from(v))),
            Value::Long(v) => Ok(Some(v as f64)),
            Value::Int(v) => Ok(Some(f64::from(v))),
            other => Err(wrong(field, "null or double", &other)),
        }
    }

    pub(crate) fn timestamp_micros(
        field: &'static str,
        value: Value,
    ) -> Result<chrono::DateTime<chrono::Utc>, DecodeError> {
        let micros = match unwrap_union(value) {
            Value::TimestampMicros(v) | Value::Long(v) => v,
            other => return Err(wrong(field, "timestamp-micros", &other)),
        };
        chrono::DateTime::from_timestamp_micros(micros).ok_or_else(|| DecodeError::Field {
            field,
            reason: format!("timestamp {micros} µs is out of range"),
        })
    }

    pub(crate) fn nullable(value: Option<Value>) -> Value {
        match value {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(v) => Value::Union(1, Box::new(v)),
        }
    }
}
