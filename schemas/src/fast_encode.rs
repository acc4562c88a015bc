//! Encoding `telemetry.v1` bodies on ingest's hot path: the mirror of [`crate::fast_decode`].
//!
//! The generic encoder ([`crate::Codec::encode`] over [`crate::AvroRecord::to_avro`]) builds an
//! `apache_avro` `Value` tree for every reading — a `Vec` of named fields, a `HashMap` of boxed
//! unions, every string cloned — validates it against the schema and then walks it: about 3 µs
//! and 6.7 % of ingest's CPU per reading in the MQTT profile (issue 18). The body layout of
//! `telemetry.v1` is fixed, so [`write_v1_body`] writes a [`Telemetry`] straight into the
//! output buffer following the Avro specification's binary encoding: fields in schema order,
//! zigzag varint longs (`seq`, the `timestamp-micros` fields), strings as a length and UTF-8
//! bytes, the nullable `site_id` and each metric as a union branch index then the value
//! (`null | boolean | long | double | string`, doubles as 8 little-endian bytes), and the
//! metrics map as one block (entry count, then key and value of each entry) ended by a zero
//! count, or a lone zero count when empty.
//!
//! **Equivalence.** The bytes are the generic writer's, with one deliberate difference: the
//! generic path collects metrics into a `HashMap`, so its map entries come out in an arbitrary
//! order, while the fast path writes them in the `Telemetry`'s own (key) order, so equal
//! readings give equal bytes. Any Avro reader reads both to the same map. Tests check, on
//! random readings with every metric kind and edge values (NaN and infinite doubles, extreme
//! longs and timestamps, empty and non-ASCII strings), that the fast bytes are exactly the
//! generic writer's bytes with the entries in key order, and that both the generic decoder and
//! [`crate::TelemetryDecoder`] read them back to the reading.
//!
//! **What falls back.** [`Telemetry`]'s [`crate::AvroRecord::write_body_fast`] takes this path
//! only while the codec's current schema is `telemetry.v1` (as the decoder gates its own);
//! once a newer version is current every reading goes through the generic writer, until this
//! module learns that layout. There is no error to reproduce: the generic writer only refuses
//! a `Value` that does not validate against the schema, and `to_avro` always builds a valid
//! `telemetry.v1` record (every field present, union branches in range, timestamps as
//! `timestamp-micros` longs, any `f64` including NaN), while writing into a `Vec` cannot fail.
//! The tests encode every random reading through the generic writer too, so a change there
//! that began refusing readings would show.

use crate::{MetricValue, Telemetry};

/// Name of the schema whose body layout [`write_v1_body`] writes.
pub(crate) const FAST_SCHEMA: &str = "telemetry.v1";

/// Union branch indexes of a metric value in `telemetry.v1`
/// (`["null", "boolean", "long", "double", "string"]`).
const BRANCH_NULL: i64 = 0;
const BRANCH_BOOLEAN: i64 = 1;
const BRANCH_LONG: i64 = 2;
const BRANCH_DOUBLE: i64 = 3;
const BRANCH_STRING: i64 = 4;

/// Writes the `telemetry.v1` body of `reading` (no framing header) at the end of `out`.
pub fn write_v1_body(reading: &Telemetry, out: &mut Vec<u8>) {
    out.reserve(body_size_hint(reading));
    string(out, &reading.tenant_id);
    string(out, &reading.device_id);
    match &reading.site_id {
        None => long(out, 0),
        Some(site) => {
            long(out, 1);
            string(out, site);
        }
    }
    string(out, &reading.msg_type);
    long(out, reading.seq);
    long(out, reading.time.timestamp_micros());
    long(out, reading.received_at.timestamp_micros());
    if !reading.metrics.is_empty() {
        // One block, as the generic writer writes it: a positive count, no byte size.
        long(out, reading.metrics.len() as i64);
        for (name, value) in &reading.metrics {
            string(out, name);
            metric(out, value);
        }
    }
    long(out, 0);
}

/// Enough room for most bodies in one allocation: strings at their length plus a short
/// prefix, longs at their usual size. Only a hint; `Vec` grows if it is short.
fn body_size_hint(reading: &Telemetry) -> usize {
    let strings = reading.tenant_id.len()
        + reading.device_id.len()
        + reading.site_id.as_ref().map_or(0, String::len)
        + reading.msg_type.len();
    let metrics: usize = reading
        .metrics
        .iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    MetricValue::String(s) => s.len() + 4,
                    _ => 12,
                }
        })
        .sum();
    strings + metrics + 48
}

/// A zigzag varint `long`: at most 10 bytes.
fn long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A `string`: its byte length as a `long`, then its UTF-8 bytes.
fn string(out: &mut Vec<u8>, value: &str) {
    long(out, value.len() as i64);
    out.extend_from_slice(value.as_bytes());
}

fn metric(out: &mut Vec<u8>, value: &MetricValue) {
    match value {
        MetricValue::Null => long(out, BRANCH_NULL),
        MetricValue::Bool(b) => {
            long(out, BRANCH_BOOLEAN);
            out.push(u8::from(*b));
        }
        MetricValue::Long(v) => {
            long(out, BRANCH_LONG);
            long(out, *v);
        }
        MetricValue::Double(v) => {
            long(out, BRANCH_DOUBLE);
            out.extend_from_slice(&v.to_le_bytes());
        }
        MetricValue::String(s) => {
            long(out, BRANCH_STRING);
            string(out, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use apache_avro::writer::datum::GenericDatumWriter;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::fast_decode::tests::{random_reading, same};
    use crate::{AvroRecord, TelemetryDecoder};

    /// Single-object header length: `C3 01` and the 8-byte fingerprint.
    const HEADER: usize = 10;

    /// The body the generic writer writes for `reading` (what `Codec::body` did before).
    fn generic_body(reading: &Telemetry) -> Vec<u8> {
        let codec = crate::telemetry_codec().expect("shipped schema");
        let mut out = Vec::new();
        GenericDatumWriter::builder(codec.current_schema())
            .build()
            .expect("the shipped schema builds a writer")
            .write_value(&mut out, reading.to_avro())
            .expect("the generic writer takes every Telemetry");
        out
    }

    fn fast_body(reading: &Telemetry) -> Vec<u8> {
        let mut out = Vec::new();
        write_v1_body(reading, &mut out);
        out
    }

    fn with_metrics(reading: &Telemetry, metrics: BTreeMap<String, MetricValue>) -> Telemetry {
        Telemetry {
            metrics,
            ..reading.clone()
        }
    }

    #[test]
    fn varint_longs_match_the_specification() {
        // The specification's zigzag table, plus the extremes (10 bytes).
        for (value, bytes) in [
            (0, vec![0x00]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (-2, vec![0x03]),
            (2, vec![0x04]),
            (-64, vec![0x7F]),
            (64, vec![0x80, 0x01]),
            (
                i64::MAX,
                vec![0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            ),
            (
                i64::MIN,
                vec![0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            long(&mut out, value);
            assert_eq!(out, bytes, "{value}");
        }
    }

    #[test]
    fn codec_encode_takes_the_fast_path_for_telemetry_v1() {
        let codec = crate::telemetry_codec().expect("shipped schema");
        assert_eq!(codec.current_name(), FAST_SCHEMA);
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for _ in 0..500 {
            let reading = random_reading(&mut rng);
            let fast = fast_body(&reading);
            let single = codec.encode(&reading).expect("encodable");
            assert_eq!(single[..2], [0xC3, 0x01]);
            assert_eq!(single[2..HEADER], codec.current_fingerprint().to_le_bytes());
            assert_eq!(single[HEADER..], fast[..]);
            let confluent = codec.encode_confluent(&reading, 42).expect("encodable");
            assert_eq!(confluent[..5], [0, 0, 0, 0, 42]);
            assert_eq!(confluent[5..], fast[..]);
        }
    }

    #[test]
    fn other_schema_names_get_the_generic_writer() {
        let reading = random_reading(&mut rand::rngs::StdRng::seed_from_u64(4));
        let mut out = vec![7];
        assert!(!reading.write_body_fast("telemetry.v2", &mut out));
        assert_eq!(out, [7], "nothing written when the hook declines");
        assert!(reading.write_body_fast(FAST_SCHEMA, &mut out));

        // A codec whose current schema has another name writes through the generic writer:
        // with at most one metric its bytes are the same.
        let json = crate::telemetry::TELEMETRY_SCHEMAS[0].json;
        let codec = crate::Codec::<Telemetry>::new(
            crate::SchemaSource {
                name: "telemetry.v1-copy",
                json,
            },
            &[],
        )
        .expect("the shipped schema under another name");
        let one: BTreeMap<_, _> = reading.metrics.clone().into_iter().take(1).collect();
        let reading = with_metrics(&reading, one);
        let bytes = codec.encode(&reading).expect("encodable");
        assert_eq!(bytes[HEADER..], generic_body(&reading)[..]);
    }

    /// Where the map entry order cannot differ, the bytes are the generic writer's.
    #[test]
    fn bytes_equal_the_generic_writers_for_zero_or_one_metric() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for _ in 0..5_000 {
            let reading = random_reading(&mut rng);
            let keep = rng.random_range(0..=1);
            let metrics = reading.metrics.clone().into_iter().take(keep).collect();
            let reading = with_metrics(&reading, metrics);
            assert_eq!(fast_body(&reading), generic_body(&reading), "{reading:?}");
        }
    }

    /// With several metrics: exactly the generic writer's bytes, with the entries in key
    /// order. Built from the generic writer's own pieces: the body of the reading without
    /// metrics (its last byte is the empty map's zero count), then the count, then each
    /// entry as the generic writer writes it alone, then the closing zero.
    #[test]
    fn bytes_are_the_generic_writers_with_entries_in_key_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut several = 0;
        for _ in 0..3_000 {
            let reading = random_reading(&mut rng);
            let empty = generic_body(&with_metrics(&reading, BTreeMap::new()));
            let prefix = &empty[..empty.len() - 1];
            let mut expected = prefix.to_vec();
            if !reading.metrics.is_empty() {
                long(&mut expected, reading.metrics.len() as i64);
                for (name, value) in &reading.metrics {
                    let alone = generic_body(&with_metrics(
                        &reading,
                        BTreeMap::from([(name.clone(), value.clone())]),
                    ));
                    // After the prefix: count 1 (one byte, 0x02), the entry, the closing 0.
                    assert_eq!(alone[prefix.len()], 0x02);
                    assert_eq!(alone[alone.len() - 1], 0x00);
                    expected.extend_from_slice(&alone[prefix.len() + 1..alone.len() - 1]);
                }
                several += usize::from(reading.metrics.len() > 1);
            }
            expected.push(0);
            let fast = fast_body(&reading);
            assert_eq!(fast, expected, "{reading:?}");
            assert_eq!(fast.len(), generic_body(&reading).len());
        }
        assert!(several > 1_000, "{several} readings with several metrics");
    }

    /// The fast bytes read back to the reading with both decoders, framed either way, and to
    /// what the generic bytes read back to.
    #[test]
    fn fast_bytes_decode_to_the_reading_with_both_decoders() {
        let codec = crate::telemetry_codec().expect("shipped schema");
        let decoder = TelemetryDecoder::new(codec);
        let mut codec_with_id =
            crate::Codec::<Telemetry>::new(crate::telemetry::TELEMETRY_SCHEMAS[0], &[])
                .expect("shipped schema");
        assert!(codec_with_id.register_confluent_id(42, codec.current_fingerprint()));
        let writer = codec
            .writer_schema("id 42", codec.current_json())
            .expect("the current schema");
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        for _ in 0..5_000 {
            let reading = random_reading(&mut rng);
            let bytes = codec.encode(&reading).expect("encodable");
            let generic = codec.decode(&bytes).expect("the generic decoder reads it");
            let fast = decoder.fast(&bytes).expect("the fast decoder reads it");
            assert!(same(&generic, &reading), "{generic:?} != {reading:?}");
            assert!(same(&fast, &reading), "{fast:?} != {reading:?}");

            let mut from_generic_writer = bytes[..HEADER].to_vec();
            from_generic_writer.extend_from_slice(&generic_body(&reading));
            assert!(same(
                &codec.decode(&from_generic_writer).expect("decodable"),
                &generic
            ));

            let confluent = codec_with_id
                .encode_confluent(&reading, 42)
                .expect("encodable");
            let generic = codec_with_id.decode(&confluent).expect("decodable");
            let fast = decoder
                .decode_body(&writer, &confluent[5..])
                .expect("decodable");
            assert!(same(&generic, &reading) && same(&fast, &reading));
        }
    }
}
