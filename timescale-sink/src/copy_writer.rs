//! PostgreSQL binary `COPY` encoding of telemetry rows.
//!
//! No maintained crate writes PostgreSQL's binary COPY format for sqlx, so this is the one
//! hand-written encoder in the project. Binary COPY skips the server's text parsing, which is
//! what makes the sink's bulk load fast; the format (PostgreSQL docs, "COPY — Binary Format"):
//!
//! * header: the 11-byte signature `PGCOPY\n\377\r\n\0`, a 32-bit flags field (0) and a 32-bit
//!   header-extension length (0);
//! * per tuple: a 16-bit field count, then per field a 32-bit byte length (`-1` for NULL)
//!   followed by the value in the type's binary send format;
//! * trailer: a 16-bit `-1`.
//!
//! All integers are big-endian. The value formats used here: `timestamptz` is an `int8` of
//! microseconds since 2000-01-01 00:00:00 UTC; `text` is its UTF-8 bytes; `int8` is 8 bytes;
//! `jsonb` is a version byte `1` followed by the JSON text.

use chrono::{DateTime, Utc};
use schemas::Telemetry;

use crate::merge::LatestState;

/// The statement the encoder's output is written to.
pub const COPY_TELEMETRY_SQL: &str = "COPY telemetry (time, tenant_id, device_id, site_id, \
     msg_type, seq, metrics) FROM STDIN (FORMAT binary)";

/// Number of columns in [`COPY_TELEMETRY_SQL`].
const TELEMETRY_COLUMNS: i16 = 7;

/// Number of columns of a `device_latest` staging row: the telemetry columns, then
/// `received_at`, `metric_times` and `metric_keys` (see [`CopyEncoder::push_latest`]).
const LATEST_COLUMNS: i16 = 10;

/// `{}` as JSON.
const EMPTY_OBJECT: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();

/// OID of PostgreSQL's `text` type (the element type of `text[]`).
const TEXT_OID: u32 = 25;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// End of the stream: a field count of -1.
const TRAILER: [u8; 2] = (-1i16).to_be_bytes();

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Why a row could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum CopyEncodeError {
    /// A field over PostgreSQL's 1 GiB field limit (or `i32::MAX` bytes).
    #[error("field `{field}` is {len} bytes, more than a COPY field can hold")]
    FieldTooLarge { field: &'static str, len: usize },
    /// The metrics map could not be serialised as JSON.
    #[error("metrics are not serialisable as json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Accumulates rows in binary COPY format in one buffer, ready for `copy_in_raw`.
#[derive(Debug, Clone)]
pub struct CopyEncoder {
    buf: Vec<u8>,
    rows: usize,
}

impl Default for CopyEncoder {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl CopyEncoder {
    /// An encoder with the header written and room for about `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(SIGNATURE.len() + 8 + 2));
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self { buf, rows: 0 }
    }

    /// Rows encoded so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes encoded so far (header included).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no row has been encoded.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one telemetry row in the column order of [`COPY_TELEMETRY_SQL`]. On error the
    /// buffer is left exactly as before the call.
    pub fn push_telemetry(&mut self, row: &Telemetry) -> Result<(), CopyEncodeError> {
        self.push(|e| e.encode_telemetry(TELEMETRY_COLUMNS, row, &row.metrics))
    }

    /// Appends one row for the `device_latest` staging table: the columns of
    /// [`COPY_TELEMETRY_SQL`] in the same order (from the state's newest reading, with the
    /// state's metrics), then `received_at` (`timestamptz`), `metric_times` (`jsonb`) and
    /// `metric_keys` (`text[]`, the metric names in the state's bytewise order). On error the
    /// buffer is left exactly as before the call.
    pub fn push_latest(&mut self, state: &LatestState<'_>) -> Result<(), CopyEncodeError> {
        self.push(|e| match &state.merged {
            None => {
                let row = state.newest;
                e.encode_telemetry(LATEST_COLUMNS, row, &row.metrics)?;
                e.timestamptz(row.received_at);
                e.jsonb("metric_times", &EMPTY_OBJECT)?;
                e.text_array("metric_keys", row.metrics.keys().map(String::as_str))
            }
            Some(merged) => {
                e.encode_telemetry(LATEST_COLUMNS, state.newest, &merged.metrics)?;
                e.timestamptz(state.newest.received_at);
                e.jsonb("metric_times", &merged.metric_times)?;
                e.text_array("metric_keys", merged.metrics.keys().copied())
            }
        })
    }

    fn push(
        &mut self,
        encode: impl FnOnce(&mut Self) -> Result<(), CopyEncodeError>,
    ) -> Result<(), CopyEncodeError> {
        let start = self.buf.len();
        let result = encode(self);
        match result {
            Ok(()) => {
                self.rows += 1;
                Ok(())
            }
            Err(err) => {
                self.buf.truncate(start);
                Err(err)
            }
        }
    }

    fn encode_telemetry<M: serde::Serialize>(
        &mut self,
        columns: i16,
        row: &Telemetry,
        metrics: &M,
    ) -> Result<(), CopyEncodeError> {
        self.buf.extend_from_slice(&columns.to_be_bytes());
        self.timestamptz(row.time);
        self.text("tenant_id", &row.tenant_id)?;
        self.text("device_id", &row.device_id)?;
        match &row.site_id {
            Some(site) => self.text("site_id", site)?,
            None => self.null(),
        }
        self.text("msg_type", &row.msg_type)?;
        self.int8(row.seq);
        self.jsonb("metrics", metrics)
    }

    /// The finished COPY stream: every row and the trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&TRAILER);
        self.buf
    }

    /// The finished stream without consuming the encoder (rows, then the trailer), so a
    /// retried transaction sends the same bytes without copying them.
    pub fn stream(&self) -> [&[u8]; 2] {
        [&self.buf, &TRAILER]
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn int8(&mut self, value: i64) {
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    fn timestamptz(&mut self, value: DateTime<Utc>) {
        self.int8(value.timestamp_micros() - PG_EPOCH_OFFSET_MICROS);
    }

    fn length(field: &'static str, len: usize) -> Result<[u8; 4], CopyEncodeError> {
        i32::try_from(len)
            .map(i32::to_be_bytes)
            .map_err(|_| CopyEncodeError::FieldTooLarge { field, len })
    }

    fn text(&mut self, field: &'static str, value: &str) -> Result<(), CopyEncodeError> {
        self.buf
            .extend_from_slice(&Self::length(field, value.len())?);
        self.buf.extend_from_slice(value.as_bytes());
        Ok(())
    }

    /// A one-dimensional `text[]` without NULLs, in `array_send` form: dimensions, a has-NULL
    /// flag, the element type, per dimension its length and lower bound (1), then each
    /// element as a length and its bytes. An empty array has no dimensions.
    fn text_array<'a>(
        &mut self,
        field: &'static str,
        items: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<(), CopyEncodeError> {
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let count = items.len();
        let dimensions: i32 = if count == 0 { 0 } else { 1 };
        self.buf.extend_from_slice(&dimensions.to_be_bytes());
        self.buf.extend_from_slice(&0i32.to_be_bytes()); // no NULLs
        self.buf.extend_from_slice(&TEXT_OID.to_be_bytes());
        if count > 0 {
            self.buf.extend_from_slice(&Self::length(field, count)?);
            self.buf.extend_from_slice(&1i32.to_be_bytes()); // lower bound
        }
        for item in items {
            self.text(field, item)?;
        }
        let len = Self::length(field, self.buf.len() - len_at - 4)?;
        self.buf[len_at..len_at + 4].copy_from_slice(&len);
        Ok(())
    }

    /// `jsonb` without an intermediate string: reserve the length, write the version byte and
    /// the JSON straight into the buffer, then patch the length in.
    fn jsonb<T: serde::Serialize>(
        &mut self,
        field: &'static str,
        value: &T,
    ) -> Result<(), CopyEncodeError> {
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.push(1); // jsonb binary format version
        serde_json::to_writer(&mut self.buf, value)?;
        let len = Self::length(field, self.buf.len() - len_at - 4)?;
        self.buf[len_at..len_at + 4].copy_from_slice(&len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;
    use schemas::MetricValue;

    use super::*;

    fn row() -> Telemetry {
        let mut metrics = BTreeMap::new();
        metrics.insert("t".to_owned(), MetricValue::Long(5));
        Telemetry {
            tenant_id: "a".to_owned(),
            device_id: "d".to_owned(),
            site_id: None,
            msg_type: "telemetry".to_owned(),
            seq: 7,
            time: Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap(),
            received_at: Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap(),
            metrics,
        }
    }

    #[test]
    fn empty_stream_is_header_and_trailer() {
        let bytes = CopyEncoder::default().finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn one_row_has_the_documented_byte_layout() {
        let mut encoder = CopyEncoder::default();
        encoder.push_telemetry(&row()).unwrap();
        assert_eq!(encoder.rows(), 1);
        let bytes = encoder.finish();
        let tuple = &bytes[19..bytes.len() - 2];
        let mut expected = vec![0, 7];
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&1_000_000i64.to_be_bytes()); // 1 s after the PG epoch
        expected.extend_from_slice(&[0, 0, 0, 1, b'a']);
        expected.extend_from_slice(&[0, 0, 0, 1, b'd']);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // site_id NULL
        expected.extend_from_slice(&[0, 0, 0, 9]);
        expected.extend_from_slice(b"telemetry");
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 8, 1]);
        expected.extend_from_slice(br#"{"t":5}"#);
        assert_eq!(tuple, expected.as_slice());
    }

    #[test]
    fn stream_equals_finish() {
        let mut encoder = CopyEncoder::default();
        encoder.push_telemetry(&row()).unwrap();
        let streamed = encoder.stream().concat();
        assert_eq!(streamed, encoder.finish());
    }

    #[test]
    fn latest_rows_are_telemetry_rows_plus_received_at_metric_times_and_keys() {
        let row = row();
        let mut telemetry = CopyEncoder::default();
        telemetry.push_telemetry(&row).unwrap();
        let mut latest = CopyEncoder::default();
        let states = crate::merge::latest_per_device(&[&row]);
        latest.push_latest(&states[0]).unwrap();
        let (telemetry, latest) = (telemetry.finish(), latest.finish());
        let t = &telemetry[19..telemetry.len() - 2];
        let l = &latest[19..latest.len() - 2];
        assert_eq!(&l[..2], &[0, 10]);
        assert_eq!(&l[2..t.len()], &t[2..]);
        let mut rest = vec![0, 0, 0, 8];
        rest.extend_from_slice(&1_000_000i64.to_be_bytes());
        rest.extend_from_slice(&[0, 0, 0, 3, 1]);
        rest.extend_from_slice(b"{}");
        // text[] {t}: length 25; 1 dimension, no NULLs, OID 25, 1 element from 1; "t".
        rest.extend_from_slice(&[0, 0, 0, 25, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 25]);
        rest.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, b't']);
        assert_eq!(&l[t.len()..], rest.as_slice());
    }

    #[test]
    fn times_before_the_postgres_epoch_are_negative() {
        let mut encoder = CopyEncoder::default();
        let mut r = row();
        r.time = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
        encoder.push_telemetry(&r).unwrap();
        let bytes = encoder.finish();
        assert_eq!(&bytes[25..33], &(-1_000_000i64).to_be_bytes());
    }
}
