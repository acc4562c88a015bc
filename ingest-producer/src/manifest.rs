//! The simulator's manifest: one record per reading it sent, saying whether ingest
//! acknowledged it (`202`) or not, so a checker can account for every reading afterwards.
//!
//! # Format
//!
//! A text header line, then fixed-size little-endian records:
//!
//! ```text
//! FLEETSTREAM-MANIFEST 1 {"prefix":"sim","tenants":10,"devices":100000,"auth":"device"}\n
//! record := outcome u8 | status u16 | device u32 | time i64 (µs since the Unix epoch) | digest u64
//! ```
//!
//! `outcome` is [`Outcome::Accepted`] (1) or [`Outcome::NotAccepted`] (0); `status` is the
//! last HTTP status the reading got (`0` when the last attempt failed before a reply, such as
//! a reset connection); `device` is the simulator's device number (tenant and device ids
//! follow from the header: see [`Header::tenant_id`] and [`Header::device_id`]); `digest` is
//! [`metrics_digest`] of the metrics as sent. 23 bytes a reading: 12 million readings
//! (100,000 devices × 10 minutes at one reading per 5 s) take 276 MB.
//!
//! A reading is recorded once, with its final outcome after retries.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use schemas::MetricValue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &str = "FLEETSTREAM-MANIFEST 1 ";
/// Bytes of one record.
pub const RECORD_BYTES: usize = 23;

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a fleetstream manifest (header {0:?})")]
    Header(String),
    #[error("manifest header: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest ends inside a record ({0} trailing bytes)")]
    Truncated(usize),
    #[error("unknown outcome byte {0}")]
    Outcome(u8),
}

/// What the run was: enough to turn device numbers back into ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub prefix: String,
    pub tenants: u32,
    pub devices: u32,
    /// `device` or `gateway`.
    pub auth: String,
}

impl Header {
    /// Tenant id of device number `device` (devices are spread round-robin over tenants).
    pub fn tenant_id(&self, device: u32) -> String {
        tenant_id(&self.prefix, device % self.tenants.max(1))
    }

    /// Device id of device number `device`.
    pub fn device_id(&self, device: u32) -> String {
        device_id(&self.prefix, device)
    }
}

/// Id of simulated tenant number `tenant` (`<prefix>-t<n>`; the simulator's provisioning SQL
/// builds the same ids).
pub fn tenant_id(prefix: &str, tenant: u32) -> String {
    format!("{prefix}-t{tenant}")
}

/// Id of simulated device number `device` (`<prefix>-d<6 digits>`).
pub fn device_id(prefix: &str, device: u32) -> String {
    format!("{prefix}-d{device:06}")
}

/// A reading's final outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ingest answered `202` for it.
    Accepted,
    /// Refused, or retried until the simulator gave up.
    NotAccepted,
}

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub outcome: Outcome,
    /// Last HTTP status (0: no reply).
    pub status: u16,
    pub device: u32,
    /// Device time, µs since the Unix epoch.
    pub time_us: i64,
    pub digest: u64,
}

impl Record {
    fn encode(&self, out: &mut [u8; RECORD_BYTES]) {
        out[0] = match self.outcome {
            Outcome::Accepted => 1,
            Outcome::NotAccepted => 0,
        };
        out[1..3].copy_from_slice(&self.status.to_le_bytes());
        out[3..7].copy_from_slice(&self.device.to_le_bytes());
        out[7..15].copy_from_slice(&self.time_us.to_le_bytes());
        out[15..23].copy_from_slice(&self.digest.to_le_bytes());
    }

    fn decode(raw: &[u8; RECORD_BYTES]) -> Result<Self, ManifestError> {
        let outcome = match raw[0] {
            1 => Outcome::Accepted,
            0 => Outcome::NotAccepted,
            other => return Err(ManifestError::Outcome(other)),
        };
        let mut u16b = [0u8; 2];
        let mut u32b = [0u8; 4];
        let mut i64b = [0u8; 8];
        let mut u64b = [0u8; 8];
        u16b.copy_from_slice(&raw[1..3]);
        u32b.copy_from_slice(&raw[3..7]);
        i64b.copy_from_slice(&raw[7..15]);
        u64b.copy_from_slice(&raw[15..23]);
        Ok(Record {
            outcome,
            status: u16::from_le_bytes(u16b),
            device: u32::from_le_bytes(u32b),
            time_us: i64::from_le_bytes(i64b),
            digest: u64::from_le_bytes(u64b),
        })
    }
}

/// Appends records to a manifest file.
#[derive(Debug)]
pub struct ManifestWriter {
    out: BufWriter<File>,
    records: u64,
}

impl ManifestWriter {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, header: &Header) -> Result<Self, ManifestError> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(MAGIC.as_bytes())?;
        serde_json::to_writer(&mut out, header)?;
        out.write_all(b"\n")?;
        Ok(ManifestWriter { out, records: 0 })
    }

    /// Appends one record.
    pub fn push(&mut self, record: &Record) -> Result<(), ManifestError> {
        let mut raw = [0u8; RECORD_BYTES];
        record.encode(&mut raw);
        self.out.write_all(&raw)?;
        self.records += 1;
        Ok(())
    }

    /// Flushes and closes the file; returns the number of records.
    pub fn finish(mut self) -> Result<u64, ManifestError> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(self.records)
    }
}

/// Reads a manifest: its header, then its records one by one.
#[derive(Debug)]
pub struct ManifestReader {
    pub header: Header,
    input: BufReader<File>,
}

impl ManifestReader {
    /// Opens `path` and reads the header.
    pub fn open(path: &Path) -> Result<Self, ManifestError> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut line = String::new();
        input.read_line(&mut line)?;
        let Some(json) = line.strip_prefix(MAGIC) else {
            return Err(ManifestError::Header(line.chars().take(40).collect()));
        };
        let header = serde_json::from_str(json.trim_end())?;
        Ok(ManifestReader { header, input })
    }
}

impl Iterator for ManifestReader {
    type Item = Result<Record, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut raw = [0u8; RECORD_BYTES];
        let mut filled = 0;
        while filled < RECORD_BYTES {
            match self.input.read(&mut raw[filled..]) {
                Ok(0) if filled == 0 => return None,
                Ok(0) => return Some(Err(ManifestError::Truncated(filled))),
                Ok(n) => filled += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Some(Err(err.into())),
            }
        }
        Some(Record::decode(&raw))
    }
}

/// A digest of a reading's metrics that the stored `jsonb` reproduces: SHA-256 over the
/// metrics in name order (name, a type tag, the value: doubles by their bits, longs as
/// integers, strings by their bytes), truncated to 64 bits. A double and a long of the same
/// number differ, so a value stored with another type does not match.
pub fn metrics_digest(metrics: &BTreeMap<String, MetricValue>) -> u64 {
    let mut hasher = Sha256::new();
    for (name, value) in metrics {
        hasher.update((name.len() as u32).to_le_bytes());
        hasher.update(name.as_bytes());
        match value {
            MetricValue::Null => hasher.update([0u8]),
            MetricValue::Bool(b) => hasher.update([1u8, u8::from(*b)]),
            MetricValue::Long(v) => {
                hasher.update([2u8]);
                hasher.update(v.to_le_bytes());
            }
            MetricValue::Double(v) => {
                hasher.update([3u8]);
                hasher.update(v.to_bits().to_le_bytes());
            }
            MetricValue::String(s) => {
                hasher.update([4u8]);
                hasher.update((s.len() as u32).to_le_bytes());
                hasher.update(s.as_bytes());
            }
        }
    }
    let out = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_le_bytes(first)
}

/// The metrics of a stored `jsonb` object, typed as the sink wrote them: integers (no
/// fraction or exponent in the text) are longs, other numbers doubles. `None` if the value
/// is not an object of scalars.
pub fn metrics_from_json(value: &serde_json::Value) -> Option<BTreeMap<String, MetricValue>> {
    let object = value.as_object()?;
    let mut metrics = BTreeMap::new();
    for (name, v) in object {
        let metric = match v {
            serde_json::Value::Null => MetricValue::Null,
            serde_json::Value::Bool(b) => MetricValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => MetricValue::Long(i),
                None => MetricValue::Double(n.as_f64()?),
            },
            serde_json::Value::String(s) => MetricValue::String(s.clone()),
            _ => return None,
        };
        metrics.insert(name.clone(), metric);
    }
    Some(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_a_file() {
        let dir = std::env::temp_dir().join(format!("manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.bin");
        let header = Header {
            prefix: "sim".into(),
            tenants: 3,
            devices: 10,
            auth: "device".into(),
        };
        let records = [
            Record {
                outcome: Outcome::Accepted,
                status: 202,
                device: 7,
                time_us: 1_764_000_000_123_456,
                digest: u64::MAX - 1,
            },
            Record {
                outcome: Outcome::NotAccepted,
                status: 0,
                device: 0,
                time_us: -5,
                digest: 3,
            },
        ];
        let mut writer = ManifestWriter::create(&path, &header).unwrap();
        for r in &records {
            writer.push(r).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), 2);
        let reader = ManifestReader::open(&path).unwrap();
        assert_eq!(reader.header, header);
        assert_eq!(reader.header.tenant_id(7), "sim-t1");
        assert_eq!(reader.header.device_id(7), "sim-d000007");
        let read: Vec<Record> = reader.map(Result::unwrap).collect();
        assert_eq!(read, records);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            MAGIC.len() + serde_json::to_string(&header).unwrap().len() + 1 + 2 * RECORD_BYTES
        );
        // A torn last record is reported, not silently dropped.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, bytes).unwrap();
        let results: Vec<_> = ManifestReader::open(&path).unwrap().collect();
        assert!(matches!(results[1], Err(ManifestError::Truncated(22))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn digest_survives_the_jsonb_round_trip_and_tells_types_apart() {
        let mut metrics = BTreeMap::new();
        metrics.insert("temperature".to_owned(), MetricValue::Double(25.0));
        metrics.insert("humidity".to_owned(), MetricValue::Double(51.37));
        metrics.insert("rssi".to_owned(), MetricValue::Long(-80));
        metrics.insert("state".to_owned(), MetricValue::String("ok".into()));
        metrics.insert("door".to_owned(), MetricValue::Bool(true));
        metrics.insert("fault".to_owned(), MetricValue::Null);
        // What the sink writes (serde_json) is what jsonb gives back as text.
        let text = serde_json::to_string(&serde_json::Value::Object(
            metrics
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        ))
        .unwrap();
        let back = metrics_from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(metrics_digest(&back), metrics_digest(&metrics));

        let mut as_long = metrics.clone();
        as_long.insert("temperature".to_owned(), MetricValue::Long(25));
        assert_ne!(metrics_digest(&as_long), metrics_digest(&metrics));
        let mut fewer = metrics.clone();
        fewer.remove("fault");
        assert_ne!(metrics_digest(&fewer), metrics_digest(&metrics));
        // Names and values are delimited: ("ab","c") is not ("a","bc").
        let one: BTreeMap<_, _> = [("ab".to_owned(), MetricValue::String("c".into()))].into();
        let two: BTreeMap<_, _> = [("a".to_owned(), MetricValue::String("bc".into()))].into();
        assert_ne!(metrics_digest(&one), metrics_digest(&two));
    }
}
