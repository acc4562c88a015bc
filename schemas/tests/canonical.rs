//! Parsing Canonical Form and fingerprints against the Avro project's shared test cases
//! (`share/test/data/schema-tests.txt` of apache/avro, the data Java's `SchemaNormalization`
//! tests use; Apache License 2.0, header kept in the fixture), and the fingerprints our shipped
//! schemas have in every other Avro SDK.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use schemas::avro::{legacy_fingerprint, SINGLE_OBJECT_MAGIC};
use schemas::canonical::{crc64_avro, fingerprint_of, parsing_canonical_form};
use schemas::{alert_codec, telemetry_codec, DecodeError};

struct Case {
    id: String,
    input: String,
    canonical: String,
    fingerprint: Option<i64>,
}

/// The fixture's format: `// NNN` opens a case; `<<INPUT text` or `<<INPUT` + lines + `INPUT`;
/// `<<canonical text`; optional `<<fingerprint n` (a Java long).
fn cases() -> Vec<Case> {
    let text = include_str!("fixtures/avro-schema-tests.txt");
    let mut cases = Vec::new();
    let mut lines = text.lines();
    let mut id = String::new();
    while let Some(line) = lines.next() {
        if let Some(n) = line.strip_prefix("// ").filter(|n| n.len() == 3) {
            id = n.to_owned();
        } else if line == "<<INPUT" {
            let input: Vec<&str> = lines.by_ref().take_while(|l| *l != "INPUT").collect();
            cases.push(Case {
                id: id.clone(),
                input: input.join("\n"),
                canonical: String::new(),
                fingerprint: None,
            });
        } else if let Some(input) = line.strip_prefix("<<INPUT ") {
            cases.push(Case {
                id: id.clone(),
                input: input.to_owned(),
                canonical: String::new(),
                fingerprint: None,
            });
        } else if let Some(canonical) = line.strip_prefix("<<canonical ") {
            cases.last_mut().unwrap().canonical = canonical.to_owned();
        } else if let Some(fp) = line.strip_prefix("<<fingerprint ") {
            cases.last_mut().unwrap().fingerprint = Some(fp.parse().unwrap());
        }
    }
    cases
}

#[test]
fn every_shared_test_case_has_its_canonical_form_and_fingerprint() {
    let cases = cases();
    assert_eq!(cases.len(), 34, "cases 000 to 033");
    let mut fingerprints = 0;
    for case in &cases {
        let canonical = parsing_canonical_form(&case.input)
            .unwrap_or_else(|err| panic!("case {}: {err}", case.id));
        assert_eq!(canonical, case.canonical, "case {}", case.id);
        if let Some(fp) = case.fingerprint {
            // Java's long is the same 64 bits.
            assert_eq!(
                crc64_avro(canonical.as_bytes()),
                fp as u64,
                "case {}",
                case.id
            );
            fingerprints += 1;
        }
    }
    assert_eq!(fingerprints, 26);
}

#[test]
fn logical_types_are_stripped_as_the_specification_says() {
    assert_eq!(
        parsing_canonical_form(r#"{"type":"long","logicalType":"timestamp-micros"}"#).unwrap(),
        r#""long""#
    );
    assert_eq!(
        parsing_canonical_form(
            r#"{"type":"record","name":"r","namespace":"n","fields":[
                {"name":"t","type":{"type":"long","logicalType":"timestamp-micros"},"doc":"d"},
                {"name":"d","type":{"type":"fixed","name":"dec","size":"016",
                                    "logicalType":"decimal","precision":4}},
                {"name":"again","type":"dec"},
                {"name":"full","type":"n.dec"}]}"#
        )
        .unwrap(),
        r#"{"name":"n.r","type":"record","fields":[{"name":"t","type":"long"},{"name":"d","type":{"name":"n.dec","type":"fixed","size":16}},{"name":"again","type":"n.dec"},{"name":"full","type":"n.dec"}]}"#
    );
}

#[test]
fn schemas_without_a_canonical_form_say_where_and_why() {
    let err = parsing_canonical_form(
        r#"{"type":"record","name":"r","fields":[{"name":"x","type":"Nope"}]}"#,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "r.x: unknown type `Nope`");
    let err = parsing_canonical_form(r#"{"type":"enum","name":"e"}"#).unwrap_err();
    assert_eq!(err.to_string(), "e: an enum needs an array `symbols`");
    assert!(parsing_canonical_form("{").is_err());
}

/// What fastavro (`fastavro.schema.fingerprint(parse_schema(s), "CRC-64-AVRO")`), Java's
/// `SchemaNormalization.parsingFingerprint64` and the other SDKs give for our schemas, against
/// what the `apache-avro` crate gives (its canonical form keeps `logicalType`).
#[test]
fn shipped_schemas_have_the_fingerprints_other_sdks_compute() {
    let telemetry = telemetry_codec().unwrap();
    assert_eq!(telemetry.current_fingerprint(), 0xf135_2aba_2ac8_b156);
    assert_eq!(
        telemetry.current_legacy_fingerprint(),
        0x8b40_9160_0935_dcbd
    );
    assert_eq!(
        legacy_fingerprint(telemetry.current_schema()),
        telemetry.current_legacy_fingerprint()
    );
    assert_eq!(
        fingerprint_of(include_str!("../avro/telemetry.v1.avsc")).unwrap(),
        telemetry.current_fingerprint()
    );
    let alerts = alert_codec().unwrap();
    assert_eq!(
        fingerprint_of(include_str!("../avro/alert_event.v1.avsc")).unwrap(),
        alerts.current_fingerprint()
    );
    assert_ne!(
        alerts.current_fingerprint(),
        alerts.current_legacy_fingerprint()
    );
}

/// Messages are written with the specification's fingerprint; messages written before
/// (the legacy fingerprint) still decode to the same record.
#[test]
fn spec_fingerprints_are_written_and_legacy_ones_still_read() {
    let codec = telemetry_codec().unwrap();
    let reading = schemas::Telemetry {
        tenant_id: "acme".into(),
        device_id: "dev-1".into(),
        site_id: None,
        msg_type: "telemetry".into(),
        seq: 7,
        time: chrono::DateTime::from_timestamp_micros(1_764_000_000_000_000).unwrap(),
        received_at: chrono::DateTime::from_timestamp_micros(1_764_000_000_100_000).unwrap(),
        metrics: [("t".to_owned(), schemas::MetricValue::Double(21.5))].into(),
    };
    let bytes = codec.encode(&reading).unwrap();
    assert_eq!(&bytes[..2], &SINGLE_OBJECT_MAGIC);
    assert_eq!(
        &bytes[2..10],
        &[0x56, 0xb1, 0xc8, 0x2a, 0xba, 0x2a, 0x35, 0xf1]
    );
    let mut legacy = bytes.clone();
    legacy[2..10].copy_from_slice(&codec.current_legacy_fingerprint().to_le_bytes());
    assert_eq!(
        &legacy[2..10],
        &[0xbd, 0xdc, 0x35, 0x09, 0x60, 0x91, 0x40, 0x8b]
    );
    assert_eq!(codec.decode(&bytes).unwrap(), reading);
    assert_eq!(codec.decode(&legacy).unwrap(), reading);
    let mut unknown = bytes.clone();
    unknown[2] ^= 0xff;
    assert!(matches!(
        codec.decode(&unknown),
        Err(DecodeError::UnknownFingerprint(_))
    ));
}
