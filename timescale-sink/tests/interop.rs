//! Interoperability with other Avro SDKs: readings encoded by an independent client (Python
//! `fastavro`, single-object encoding with the fingerprint of the specification's Parsing
//! Canonical Form, produced with `confluent-kafka`) are stored exactly as sent. Before the
//! specification's fingerprints, every such message went to the DLQ as `unknown schema
//! fingerprint f1352aba2ac8b156`.
//!
//! Needs `FLEETSTREAM_PYTHON` (set by `deploy/local/deps.sh env`, which installs the clients).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use common::{micros, sent, sink_config, wait_for_stored, Sent, DEVICES, PER_DEVICE};
use plumbing::testing::{TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_written_by_fastavro_are_stored_exactly_as_sent() -> Result<()> {
    let python = std::env::var("FLEETSTREAM_PYTHON").context(
        "FLEETSTREAM_PYTHON is not set: run `eval \"$(deploy/local/deps.sh env)\"` after \
         `deploy/local/deps.sh up`, which installs fastavro and confluent-kafka",
    )?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(3).await?;
    for tenant in ["tenant-0", "tenant-1"] {
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
            .bind(tenant)
            .execute(&db.pool)
            .await?;
    }
    let base = DateTime::from_timestamp_micros(micros(Utc::now()) - 600_000_000).unwrap();
    let readings: Vec<Sent> = (0..PER_DEVICE)
        .flat_map(|seq| (0..DEVICES).map(move |device| sent(device, seq, base)))
        .collect();

    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/avro/telemetry.v1.avsc"
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/fastavro_produce.py"
    );
    let mut child = Command::new(&python)
        .args([
            script,
            &topics.args.bootstrap_servers,
            &topics.args.telemetry_topic,
            schema,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {python} {script}"))?;
    {
        let mut stdin = child.stdin.take().unwrap();
        for r in &readings {
            let line = json!({
                "key": r.key,
                "record": {
                    "tenant_id": r.tenant,
                    "device_id": r.device,
                    "site_id": r.site,
                    "msg_type": "telemetry",
                    "seq": r.seq,
                    "time": micros(r.time),
                    "received_at": micros(r.time) + 250_000,
                    "metrics": r.metrics,
                },
            });
            writeln!(stdin, "{line}")?;
        }
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fastavro producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // fastavro's fingerprint bytes, as the header carries them: the specification's value.
    assert_eq!(
        stdout.trim(),
        format!("56b1c82aba2a35f1 {}", readings.len()),
        "fingerprint and acknowledged messages"
    );

    let config = sink_config(&db, &topics, &[])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(
        &db.pool,
        &group,
        readings.len() as i64,
        Duration::from_secs(60),
    )
    .await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;

    type Row = (String, String, Option<String>, i64, DateTime<Utc>, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT tenant_id, device_id, site_id, seq, time, metrics::text FROM telemetry \
         ORDER BY tenant_id, device_id, time",
    )
    .fetch_all(&db.pool)
    .await?;
    let mut want: Vec<&Sent> = readings.iter().collect();
    want.sort_by(|a, b| (&a.tenant, &a.device, a.time).cmp(&(&b.tenant, &b.device, b.time)));
    assert_eq!(
        rows.len(),
        want.len(),
        "one row per reading, none dead-lettered"
    );
    for (row, r) in rows.iter().zip(want) {
        let stored: Value = serde_json::from_str(&row.5)?;
        assert_eq!(
            (&row.0, &row.1, &row.2, row.3, row.4, &stored),
            (&r.tenant, &r.device, &r.site, r.seq, r.time, &r.metrics),
            "stored as sent"
        );
    }
    Ok(())
}
