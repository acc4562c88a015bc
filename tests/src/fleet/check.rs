//! The exact accounting at the end of a run: every reading the simulator's manifest says was
//! acknowledged (`202`) is in `telemetry` once with its metrics as sent, nothing else is
//! there that nobody sent, and `device_latest` holds each device's newest stored reading.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ingest_producer::manifest::{metrics_digest, metrics_from_json, ManifestReader, Outcome};
use sqlx::{PgPool, Row};

/// What the check found. Counts are readings.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Accounting {
    /// Readings the simulator sent (manifest records).
    pub sent: u64,
    /// Acknowledged with `202`.
    pub accepted: u64,
    /// Refused, or given up after retries.
    pub not_accepted: u64,
    /// Acknowledged and stored with the metrics as sent.
    pub stored_as_sent: u64,
    /// Acknowledged but not in `telemetry`.
    pub lost: u64,
    /// Acknowledged, stored with other metrics.
    pub altered: u64,
    /// Never acknowledged but stored (its reply was lost after Kafka had it: allowed, once).
    pub stored_not_accepted: u64,
    /// Rows of the run's devices that no manifest record explains.
    pub phantom: u64,
    /// Rows whose (tenant, device, time) was already seen.
    pub duplicate_rows: u64,
    /// Manifest records repeating a (device, time) of an earlier record.
    pub manifest_duplicates: u64,
    /// Devices with stored readings.
    pub devices_with_readings: u64,
    /// Devices whose `device_latest` row is missing or is not their newest stored reading.
    pub latest_mismatches: u64,
    /// `device_latest` rows of devices with no stored reading.
    pub latest_extra: u64,
    /// The first few discrepancies, for the report.
    pub examples: Vec<String>,
}

impl Accounting {
    /// Nothing acknowledged was lost or changed, nothing was stored twice or from nowhere,
    /// and `device_latest` agrees with `telemetry`.
    pub fn is_exact(&self) -> bool {
        self.lost == 0
            && self.altered == 0
            && self.phantom == 0
            && self.duplicate_rows == 0
            && self.manifest_duplicates == 0
            && self.latest_mismatches == 0
            && self.latest_extra == 0
            && self.accepted == self.stored_as_sent
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    digest: u64,
    accepted: bool,
    stored: bool,
}

/// One stored row of a simulated device: (tenant, device id, device number, time µs, metrics
/// text, digest of the metrics typed back). `None` for another device (the latency probe's).
type StoredRow = (String, String, u32, i64, String, Option<u64>);

fn stored_row(
    row: &sqlx::postgres::PgRow,
    header: &ingest_producer::manifest::Header,
    device_prefix: &str,
) -> Result<Option<StoredRow>> {
    let tenant: String = row.try_get("tenant_id")?;
    let device_id: String = row.try_get("device_id")?;
    let time_us = row
        .try_get::<chrono::DateTime<chrono::Utc>, _>("time")?
        .timestamp_micros();
    let metrics: String = row.try_get("metrics")?;
    let Some(device) = device_id
        .strip_prefix(device_prefix)
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|d| *d < header.devices && header.tenant_id(*d) == tenant)
    else {
        return Ok(None);
    };
    let digest = serde_json::from_str(&metrics)
        .ok()
        .and_then(|v| metrics_from_json(&v))
        .map(|m| metrics_digest(&m));
    Ok(Some((tenant, device_id, device, time_us, metrics, digest)))
}

/// Checks `telemetry` and `device_latest` of the run's devices (ids from the manifest's
/// header) against the manifest. `pool` is the database owner.
pub async fn account(pool: &PgPool, manifest: &Path) -> Result<Accounting> {
    let reader = ManifestReader::open(manifest)
        .with_context(|| format!("opening manifest {}", manifest.display()))?;
    let header = reader.header.clone();
    let mut acc = Accounting::default();
    let mut sent: HashMap<(u32, i64), Sent> = HashMap::new();
    for record in reader {
        let record = record?;
        acc.sent += 1;
        let accepted = record.outcome == Outcome::Accepted;
        if accepted {
            acc.accepted += 1;
        } else {
            acc.not_accepted += 1;
        }
        let entry = Sent {
            digest: record.digest,
            accepted,
            stored: false,
        };
        if sent
            .insert((record.device, record.time_us), entry)
            .is_some()
        {
            acc.manifest_duplicates += 1;
            acc.example(format!(
                "manifest: device {} time {} recorded twice",
                record.device, record.time_us
            ));
        }
    }

    let device_prefix = format!("{}-d", header.prefix);
    let tenant_pattern = format!("{}-t%", header.prefix);
    // Newest stored reading per device: (time µs, digest).
    let mut newest: Vec<Option<(i64, u64)>> = vec![None; header.devices as usize];
    {
        let mut rows = sqlx::query(
            "SELECT tenant_id, device_id, \
                    time, metrics::text AS metrics \
             FROM telemetry WHERE tenant_id LIKE $1",
        )
        .bind(&tenant_pattern)
        .fetch(pool);
        while let Some(row) = rows.try_next().await? {
            let Some((tenant, device_id, device, time_us, metrics, digest)) =
                stored_row(&row, &header, &device_prefix)?
            else {
                // Not a simulated device (the latency probe's, say): not the manifest's.
                continue;
            };
            if let Some(digest) = digest {
                let slot = &mut newest[device as usize];
                if slot.is_none_or(|(t, _)| time_us > t) {
                    *slot = Some((time_us, digest));
                }
            }
            match sent.get_mut(&(device, time_us)) {
                None => {
                    acc.phantom += 1;
                    acc.example(format!(
                        "{tenant}/{device_id} at {time_us}: stored, never sent"
                    ));
                }
                Some(s) if s.stored => {
                    acc.duplicate_rows += 1;
                    acc.example(format!("{tenant}/{device_id} at {time_us}: stored twice"));
                }
                Some(s) => {
                    s.stored = true;
                    if !s.accepted {
                        acc.stored_not_accepted += 1;
                    } else if digest == Some(s.digest) {
                        acc.stored_as_sent += 1;
                    } else {
                        acc.altered += 1;
                        acc.example(format!(
                            "{tenant}/{device_id} at {time_us}: stored metrics {metrics} differ from those sent"
                        ));
                    }
                }
            }
        }
    }
    for ((device, time_us), s) in &sent {
        if s.accepted && !s.stored {
            acc.lost += 1;
            acc.example(format!(
                "{}/{} at {time_us}: acknowledged, not stored",
                header.tenant_id(*device),
                header.device_id(*device)
            ));
        }
    }
    drop(sent);

    let mut latest_seen = vec![false; header.devices as usize];
    let mut rows = sqlx::query(
        "SELECT tenant_id, device_id, time, \
                metrics::text AS metrics \
         FROM device_latest WHERE tenant_id LIKE $1",
    )
    .bind(&tenant_pattern)
    .fetch(pool);
    while let Some(row) = rows.try_next().await? {
        let Some((tenant, device_id, device, time_us, metrics, digest)) =
            stored_row(&row, &header, &device_prefix)?
        else {
            continue;
        };
        latest_seen[device as usize] = true;
        match newest[device as usize] {
            None => {
                acc.latest_extra += 1;
                acc.example(format!(
                    "{tenant}/{device_id}: device_latest without readings"
                ));
            }
            Some((t, d)) if t == time_us && Some(d) == digest => {}
            Some((t, _)) => {
                acc.latest_mismatches += 1;
                acc.example(format!(
                    "{tenant}/{device_id}: device_latest at {time_us} {metrics}, newest reading at {t}"
                ));
            }
        }
    }
    for (device, newest) in newest.iter().enumerate() {
        if newest.is_some() {
            acc.devices_with_readings += 1;
            if !latest_seen[device] {
                acc.latest_mismatches += 1;
                acc.example(format!(
                    "{}: no device_latest row",
                    header.device_id(device as u32)
                ));
            }
        }
    }
    Ok(acc)
}
