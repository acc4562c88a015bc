//! Avro encoding of `telemetry.v1` readings (issue 18): the generic writer (a `Value` tree
//! through `apache_avro`'s `GenericDatumWriter`, what `Codec::encode` did before) against the
//! hand-written body writer (`schemas::fast_encode`, what `Codec::encode` does now). Prints
//! ns per reading for each and the ratio, and for scale what a `Telemetry::clone` costs;
//! asserts nothing.
//!
//! `cargo bench -p schemas --bench encode`. Settings: `ENCODE_BENCH_READINGS` (200,000
//! distinct readings, encoded `ENCODE_BENCH_ROUNDS` = 5 times each way, the best round is
//! reported). Readings look like the fleet's: 10 tenants, 100,000 devices, a site on most,
//! 5–7 metrics (temperature, humidity, battery as doubles, rssi as a long, a door boolean,
//! a firmware string, sometimes a null), single-object framing as ingest sends them.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use apache_avro::writer::datum::GenericDatumWriter;
use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng};
use schemas::{telemetry_codec, AvroRecord, MetricValue, Telemetry};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn reading(rng: &mut impl Rng, i: usize) -> Telemetry {
    let device = rng.random_range(0..100_000u32);
    let now = DateTime::<Utc>::from_timestamp_micros(1_796_000_000_000_000 + i as i64 * 50)
        .expect("in range");
    let mut metrics = BTreeMap::from([
        (
            "temperature".to_owned(),
            MetricValue::Double((rng.random_range(1500..3000) as f64) / 100.0),
        ),
        (
            "humidity".to_owned(),
            MetricValue::Double((rng.random_range(2000..9000) as f64) / 100.0),
        ),
        (
            "battery".to_owned(),
            MetricValue::Double((rng.random_range(0..10000) as f64) / 100.0),
        ),
        (
            "rssi".to_owned(),
            MetricValue::Long(rng.random_range(-110..-50)),
        ),
        ("door_open".to_owned(), MetricValue::Bool(rng.random())),
    ]);
    if rng.random_bool(0.5) {
        metrics.insert(
            "firmware".to_owned(),
            MetricValue::String("2.4.1-rc3".to_owned()),
        );
    }
    if rng.random_bool(0.3) {
        metrics.insert("error_code".to_owned(), MetricValue::Null);
    }
    Telemetry {
        tenant_id: format!("tenant-{:02}", device % 10),
        device_id: format!("device-{device:06}"),
        site_id: rng
            .random_bool(0.8)
            .then(|| format!("site-{:03}", device % 500)),
        msg_type: "telemetry".to_owned(),
        seq: i as i64,
        time: now - chrono::Duration::milliseconds(rng.random_range(0..500)),
        received_at: now,
        metrics,
    }
}

fn best_of(rounds: usize, mut run: impl FnMut() -> usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut bytes = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        bytes = run();
        best = best.min(start.elapsed());
    }
    (best, bytes)
}

fn main() {
    let count = env_usize("ENCODE_BENCH_READINGS", 200_000);
    let rounds = env_usize("ENCODE_BENCH_ROUNDS", 5);
    let codec = telemetry_codec().expect("shipped schema");
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let readings: Vec<Telemetry> = (0..count).map(|i| reading(&mut rng, i)).collect();
    let metrics: usize = readings.iter().map(|r| r.metrics.len()).sum();

    // The generic path exactly as `Codec::body` ran it before the fast path: the header,
    // then `write_value(out, record.to_avro())`, into a fresh `Vec` per reading.
    let writer = GenericDatumWriter::builder(codec.current_schema())
        .build()
        .expect("writer");
    let header: Vec<u8> = [0xC3, 0x01]
        .into_iter()
        .chain(codec.current_fingerprint().to_le_bytes())
        .collect();
    let (generic, generic_bytes) = best_of(rounds, || {
        let mut bytes = 0;
        for r in &readings {
            let mut out = Vec::with_capacity(128);
            out.extend_from_slice(&header);
            writer
                .write_value(&mut out, r.to_avro())
                .expect("encodable");
            bytes += black_box(out).len();
        }
        bytes
    });
    let (fast, fast_bytes) = best_of(rounds, || {
        let mut bytes = 0;
        for r in &readings {
            bytes += black_box(codec.encode(r).expect("encodable")).len();
        }
        bytes
    });
    assert_eq!(generic_bytes, fast_bytes, "same sizes either way");
    // For scale: a copy of a decoded reading, which the sink made of every stored reading
    // while `device_latest` is written behind, until it moved them instead (issue 18).
    let (cloned, _) = best_of(rounds, || {
        let mut metrics = 0;
        for r in &readings {
            metrics += black_box(r.clone()).metrics.len();
        }
        metrics
    });

    let per = |d: Duration| d.as_nanos() as f64 / count as f64;
    println!(
        "{count} readings, {:.2} metrics and {:.1} bytes each (single-object framing), best of {rounds} rounds",
        metrics as f64 / count as f64,
        fast_bytes as f64 / count as f64
    );
    println!(
        "generic (to_avro + GenericDatumWriter): {:>8.1} ns per reading",
        per(generic)
    );
    println!(
        "fast (fast_encode::write_v1_body):      {:>8.1} ns per reading",
        per(fast)
    );
    println!("generic / fast: {:.1}x", per(generic) / per(fast));
    println!(
        "for scale, Telemetry::clone:           {:>8.1} ns per reading",
        per(cloned)
    );
}
