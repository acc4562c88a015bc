//! Batches: decoded rows of several partitions, with the offset range each partition covers.
//!
//! A batch closes on size or age. For each partition it records the offset its rows start
//! from (`expected`: what `consumer_offsets` must hold for the batch to apply, `None` when no
//! row may exist yet) and the offset after its last message (`next`).

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use schemas::{DecodeError, Telemetry};

use crate::copy_writer::{CopyEncodeError, CopyEncoder};

/// One message as it left the consumer.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub traceparent: Option<String>,
}

/// A row with where it came from (for the DLQ and bisection).
#[derive(Debug, Clone)]
pub struct SourcedRow {
    pub row: Telemetry,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

/// A message that cannot be stored, with the reason and stage.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub error: String,
    /// `decode` or `database`.
    pub stage: &'static str,
}

/// Offsets one partition contributes to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// The stored `next_offset` this batch requires (`None`: no row may exist yet).
    pub expected: Option<i64>,
    /// Offset of the batch's first message of this partition.
    pub first: i64,
    /// Offset after the batch's last message of this partition.
    pub next: i64,
    /// The newest ingest time (`received_at`) of the partition's rows in the batch (`None`:
    /// dead letters only). Stored with the offset, so the rollup refresh never aggregates
    /// minutes this sink has not written yet (migration 0015).
    pub stored_through: Option<DateTime<Utc>>,
}

/// Rows on their way to one transaction.
#[derive(Debug)]
pub struct Batch {
    pub rows: Vec<SourcedRow>,
    pub encoder: CopyEncoder,
    pub dead_letters: Vec<DeadLetter>,
    pub partitions: BTreeMap<i32, PartitionRange>,
    pub opened_at: Instant,
    /// `traceparent` of the first traced message, to link the batch span.
    pub traceparent: Option<String>,
    /// Time spent decoding, validating and encoding the batch's messages.
    pub decode_time: std::time::Duration,
    /// Readings stored before but not yet applied to `device_latest` (read again after an
    /// assignment from `latest_next_offset`): for `device_latest` only, never stored again.
    pub replayed: Vec<(i32, Telemetry)>,
    /// Partitions whose replay ended in this batch, with the stored `next_offset` it reached.
    pub replayed_through: BTreeMap<i32, i64>,
}

impl Batch {
    /// An empty batch sized for `rows` rows.
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            rows: Vec::with_capacity(rows),
            encoder: CopyEncoder::with_capacity(rows * 160),
            dead_letters: Vec::new(),
            partitions: BTreeMap::new(),
            opened_at: Instant::now(),
            traceparent: None,
            decode_time: std::time::Duration::ZERO,
            replayed: Vec::new(),
            replayed_through: BTreeMap::new(),
        }
    }

    /// Adds one message read again for `device_latest` only (see [`Batch::replayed`]). One
    /// that was a dead letter when it was stored is skipped again.
    pub fn push_replayed(&mut self, partition: i32, decoded: Result<Telemetry, DecodeError>) {
        let Ok(row) = decoded else { return };
        if validate(&row).is_err() {
            return;
        }
        let mut check = CopyEncoder::with_capacity(256);
        if check.push_telemetry(&row).is_ok() {
            self.replayed.push((partition, row));
        }
    }

    /// True when the batch has nothing for `device_latest` to replay.
    pub fn nothing_replayed(&self) -> bool {
        self.replayed.is_empty() && self.replayed_through.is_empty()
    }

    /// Messages (rows, dead letters and readings replayed for `device_latest`) in the batch.
    pub fn messages(&self) -> usize {
        self.rows.len() + self.dead_letters.len() + self.replayed.len()
    }

    /// True when the batch covers no offsets at all.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// True when the batch has nothing for the committer: no offsets, nothing replayed.
    pub fn is_idle(&self) -> bool {
        self.is_empty() && self.nothing_replayed()
    }

    /// Adds one message: decoded and encoded as a row, or kept as a dead letter. `expected`
    /// is the partition's stored-offset expectation, used when the partition is new to the
    /// batch.
    pub fn push(
        &mut self,
        message: RawMessage,
        expected: Option<i64>,
        decoded: Result<Telemetry, DecodeError>,
    ) {
        let range = self
            .partitions
            .entry(message.partition)
            .or_insert(PartitionRange {
                expected,
                first: message.offset,
                next: message.offset + 1,
                stored_through: None,
            });
        range.next = message.offset + 1;
        if self.traceparent.is_none() {
            self.traceparent.clone_from(&message.traceparent);
        }
        let checked = decoded
            .map_err(|err| err.to_string())
            .and_then(|row| validate(&row).map(|()| row));
        match checked {
            Ok(row) => match self.encoder.push_telemetry(&row) {
                Ok(()) => {
                    range.stored_through = range.stored_through.max(Some(row.received_at));
                    self.rows.push(SourcedRow {
                        row,
                        partition: message.partition,
                        offset: message.offset,
                        payload: message.payload,
                    });
                }
                Err(err) => self.dead_letters.push(dead_letter(message, &err, "decode")),
            },
            Err(error) => self.dead_letters.push(DeadLetter {
                partition: message.partition,
                offset: message.offset,
                payload: message.payload,
                error,
                stage: "decode",
            }),
        }
    }

    /// Drops everything of `partition` (it was revoked: its new owner re-reads it from the
    /// stored offset).
    pub fn remove_partition(&mut self, partition: i32) {
        self.replayed.retain(|(p, _)| *p != partition);
        self.replayed_through.remove(&partition);
        if self.partitions.remove(&partition).is_none() {
            return;
        }
        self.rows.retain(|r| r.partition != partition);
        self.dead_letters.retain(|d| d.partition != partition);
        let mut encoder = CopyEncoder::with_capacity(self.rows.len() * 160);
        for row in &self.rows {
            // Rows were encodable when added; re-encoding the same values cannot fail.
            let _ = encoder.push_telemetry(&row.row);
        }
        self.encoder = encoder;
    }
}

fn dead_letter(message: RawMessage, err: &CopyEncodeError, stage: &'static str) -> DeadLetter {
    DeadLetter {
        partition: message.partition,
        offset: message.offset,
        payload: message.payload,
        error: err.to_string(),
        stage,
    }
}

/// Rejects what PostgreSQL would refuse for data reasons, before it reaches a COPY: NUL in
/// text (text and jsonb cannot hold U+0000) and identifiers the schema does not allow.
fn validate(row: &Telemetry) -> Result<(), String> {
    for (field, value) in [
        ("tenant_id", row.tenant_id.as_str()),
        ("device_id", row.device_id.as_str()),
        ("msg_type", row.msg_type.as_str()),
    ] {
        if value.is_empty() {
            return Err(format!("field `{field}`: empty"));
        }
        if value.contains('\0') {
            return Err(format!("field `{field}`: contains NUL"));
        }
    }
    if row.site_id.as_deref().is_some_and(|s| s.contains('\0')) {
        return Err("field `site_id`: contains NUL".to_owned());
    }
    for (name, value) in &row.metrics {
        let nul_value = matches!(value, schemas::MetricValue::String(s) if s.contains('\0'));
        if name.contains('\0') || nul_value {
            return Err(format!(
                "metric `{}`: contains NUL",
                name.replace('\0', "\\0")
            ));
        }
    }
    Ok(())
}
