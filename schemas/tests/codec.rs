//! The Avro contract: round trips, schema evolution, and every malformed input as a typed
//! error (never a panic).

use std::collections::BTreeMap;

use apache_avro::Schema;
use chrono::{TimeZone, Utc};
use schemas::avro::{legacy_fingerprint, CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC};
use schemas::{
    alert_codec, telemetry_codec, AlertEvent, Codec, DecodeError, MetricValue, SchemaSource,
    Telemetry,
};

fn reading() -> Telemetry {
    let mut metrics = BTreeMap::new();
    metrics.insert("temperature".to_owned(), MetricValue::Double(21.5));
    metrics.insert("door_open".to_owned(), MetricValue::Bool(false));
    metrics.insert("rssi".to_owned(), MetricValue::Long(-71));
    metrics.insert(
        "firmware".to_owned(),
        MetricValue::String("1.4.2".to_owned()),
    );
    metrics.insert("error_code".to_owned(), MetricValue::Null);
    Telemetry {
        tenant_id: "acme".to_owned(),
        device_id: "dev-0001".to_owned(),
        site_id: Some("plant-7".to_owned()),
        msg_type: "telemetry".to_owned(),
        seq: 42,
        time: Utc.timestamp_micros(1_764_000_000_123_456).unwrap(),
        received_at: Utc.timestamp_micros(1_764_000_000_223_456).unwrap(),
        metrics,
    }
}

#[test]
fn telemetry_round_trips_in_single_object_encoding() {
    let codec = telemetry_codec().unwrap();
    let bytes = codec.encode(&reading()).unwrap();
    assert_eq!(&bytes[..2], &SINGLE_OBJECT_MAGIC);
    assert_eq!(&bytes[2..10], &codec.current_fingerprint().to_le_bytes());
    assert_eq!(codec.decode(&bytes).unwrap(), reading());
}

#[test]
fn telemetry_without_site_round_trips() {
    let codec = telemetry_codec().unwrap();
    let mut r = reading();
    r.site_id = None;
    r.metrics.clear();
    assert_eq!(codec.decode(&codec.encode(&r).unwrap()).unwrap(), r);
}

#[test]
fn telemetry_round_trips_in_confluent_wire_format() {
    let mut codec = Codec::<Telemetry>::new(schemas::telemetry::TELEMETRY_SCHEMAS[0], &[]).unwrap();
    assert!(codec.register_confluent_id(17, codec.current_fingerprint()));
    let bytes = codec.encode_confluent(&reading(), 17).unwrap();
    assert_eq!(bytes[0], CONFLUENT_MAGIC);
    assert_eq!(&bytes[1..5], &17u32.to_be_bytes());
    assert_eq!(codec.decode(&bytes).unwrap(), reading());
}

#[test]
fn confluent_id_of_an_unknown_schema_is_refused() {
    let mut codec = Codec::<Telemetry>::new(schemas::telemetry::TELEMETRY_SCHEMAS[0], &[]).unwrap();
    assert!(!codec.register_confluent_id(3, 0xdead_beef));
    let bytes = codec.encode_confluent(&reading(), 99).unwrap();
    assert!(matches!(
        codec.decode(&bytes),
        Err(DecodeError::UnknownSchemaId(99))
    ));
}

#[test]
fn alert_event_round_trips() {
    let event = AlertEvent {
        event_id: "7f1c2a8e-0000-4000-8000-000000000001".to_owned(),
        alert_id: 9,
        rule_id: 3,
        rule_name: "too hot".to_owned(),
        tenant_id: "acme".to_owned(),
        device_id: "dev-0001".to_owned(),
        site_id: None,
        status: "firing".to_owned(),
        previous_status: Some("pending".to_owned()),
        severity: "critical".to_owned(),
        metric: Some("temperature".to_owned()),
        value: Some(81.5),
        threshold: Some(80.0),
        time: Utc.timestamp_micros(1_764_000_000_000_000).unwrap(),
        emitted_at: Utc.timestamp_micros(1_764_000_000_010_000).unwrap(),
    };
    let codec = alert_codec().unwrap();
    assert_eq!(codec.decode(&codec.encode(&event).unwrap()).unwrap(), event);
}

#[test]
fn legacy_fingerprint_is_crc64_avro_of_the_crates_canonical_form() {
    // Reference value from the Avro specification's test vectors: "null" -> 0x63dd24e7cc258f8a
    // (schemas without logical types have the same canonical form either way).
    let null = Schema::parse_str("\"null\"").unwrap();
    assert_eq!(legacy_fingerprint(&null), 0x63dd_24e7_cc25_8f8a);
}

const V2: SchemaSource<'static> = SchemaSource {
    name: "telemetry.v2-test",
    json: include_str!("fixtures/telemetry.v2.avsc"),
};

#[test]
fn message_written_with_an_older_version_decodes_with_the_current_reader() {
    // The shipped v1 plays the old writer; the test-only v2 (one more optional field) plays
    // the current reader.
    let v1_writer = telemetry_codec().unwrap();
    let v2_reader = Codec::<Telemetry>::new(V2, schemas::telemetry::TELEMETRY_SCHEMAS).unwrap();
    assert_ne!(
        v1_writer.current_fingerprint(),
        v2_reader.current_fingerprint()
    );
    let bytes = v1_writer.encode(&reading()).unwrap();
    assert_eq!(v2_reader.decode(&bytes).unwrap(), reading());
}

#[test]
fn a_reader_that_does_not_know_the_writer_version_says_which_fingerprint() {
    // A v2 message: v2 fingerprint, the v1 fields, then `firmware` = null (union branch 0).
    let v2_writer = Codec::<Telemetry>::new(V2, schemas::telemetry::TELEMETRY_SCHEMAS).unwrap();
    let v1_only = telemetry_codec().unwrap();
    let mut bytes = SINGLE_OBJECT_MAGIC.to_vec();
    bytes.extend_from_slice(&v2_writer.current_fingerprint().to_le_bytes());
    bytes.extend_from_slice(&v1_only.encode(&reading()).unwrap()[10..]);
    bytes.push(0x00);
    assert_eq!(v2_writer.decode(&bytes).unwrap(), reading());
    match v1_only.decode(&bytes) {
        Err(DecodeError::UnknownFingerprint(fp)) => assert_eq!(fp, v2_writer.current_fingerprint()),
        other => panic!("expected UnknownFingerprint, got {other:?}"),
    }
}

#[test]
fn an_incompatible_version_is_refused_when_the_codec_is_built() {
    let incompatible = SchemaSource {
        name: "telemetry.bad",
        json: r#"{"type":"record","name":"Telemetry","namespace":"io.fleetstream","fields":[
            {"name":"tenant_id","type":"long"}]}"#,
    };
    let err = Codec::<Telemetry>::new(schemas::telemetry::TELEMETRY_SCHEMAS[0], &[incompatible])
        .unwrap_err();
    assert!(err.to_string().contains("telemetry.bad"), "{err}");
}

#[test]
fn malformed_inputs_are_typed_errors() {
    let codec = telemetry_codec().unwrap();
    let good = codec.encode(&reading()).unwrap();

    assert!(matches!(
        codec.decode(&[]),
        Err(DecodeError::Truncated { len: 0, .. })
    ));
    assert!(matches!(
        codec.decode(&[0xC3]),
        Err(DecodeError::Truncated { len: 1, .. })
    ));
    assert!(matches!(
        codec.decode(&good[..7]),
        Err(DecodeError::Truncated { len: 7, .. })
    ));
    assert!(matches!(
        codec.decode(&[0x00, 0x01]),
        Err(DecodeError::Truncated { len: 2, .. })
    ));
    assert!(matches!(
        codec.decode(b"{\"json\":1}"),
        Err(DecodeError::BadMagic(_))
    ));
    assert!(matches!(
        codec.decode(&[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(DecodeError::BadMagic(_))
    ));

    let mut unknown = good.clone();
    unknown[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    assert!(matches!(
        codec.decode(&unknown),
        Err(DecodeError::UnknownFingerprint(0x0123_4567_89ab_cdef))
    ));

    // Body cut short anywhere: never a panic, always an error.
    for cut in 10..good.len() {
        assert!(codec.decode(&good[..cut]).is_err(), "cut at {cut} decoded");
    }

    let mut trailing = good.clone();
    trailing.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        codec.decode(&trailing),
        Err(DecodeError::TrailingBytes(3))
    ));

    // Wrong types: a body whose first field is a long where a string length is expected is
    // caught, as is a huge length prefix (no giant allocation).
    let mut huge = good[..10].to_vec();
    huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(codec.decode(&huge), Err(DecodeError::Body(_))));

    // A union index outside the union (site_id has two branches).
    let mut bad_union = good[..10].to_vec();
    bad_union.extend_from_slice(&[0x08, b'a', b'c', b'm', b'e', 0x02, b'd', 0x0a]);
    assert!(matches!(
        codec.decode(&bad_union),
        Err(DecodeError::Body(_))
    ));
}

#[test]
fn arbitrary_bytes_never_panic() {
    let codec = telemetry_codec().unwrap();
    let good = codec.encode(&reading()).unwrap();
    // Deterministic pseudo-random corruption of a valid message: every byte flipped to a
    // few values, and random suffixes after a valid header.
    for i in 10..good.len() {
        for v in [0x00u8, 0x01, 0x7f, 0x80, 0xff] {
            let mut m = good.clone();
            m[i] = v;
            let _ = codec.decode(&m);
        }
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..512 {
        let mut m = good[..10].to_vec();
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            m.push(state as u8);
        }
        let _ = codec.decode(&m);
    }
}
