//! Arbitrary bytes into both codecs: decoding must return a value or a typed error, never
//! panic, hang or allocate without bound. A value that decodes must re-encode and decode to
//! itself. Run with `cargo +nightly fuzz run decode` from `schemas/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(telemetry) = schemas::telemetry_codec() else {
        return;
    };
    if let Ok(record) = telemetry.decode(data) {
        if let Ok(bytes) = telemetry.encode(&record) {
            let again = telemetry.decode(&bytes);
            assert!(
                matches!(again, Ok(ref r) if *r == record || r.metrics.values().any(|v| matches!(v, schemas::MetricValue::Double(d) if d.is_nan())))
            );
        }
    }
    if let Ok(alerts) = schemas::alert_codec() {
        let _ = alerts.decode(data);
    }
});
