//! The rollup step's new minutes, aggregated by the sink (migration 0016).
//!
//! A step ([`crate::maintenance`]) asks `fleet_refresh_rollup_1m_plan()` for its range of new
//! minutes, then, in the same transaction:
//!
//! 1. reads the range's readings with one binary `COPY … TO STDOUT` (per tenant, an index
//!    range scan on `(tenant_id, time)`, as the SQL aggregation did);
//! 2. aggregates them here (on a thread of its own: see [`aggregate_new_minutes`]), per
//!    (tenant, device, metric, minute), exactly as the SQL of migration 0014 does: numbers and booleans (1/0) count, `sum` is the exact decimal sum
//!    of the values as stored (a jsonb number is a decimal), `min`, `max` and `last` (the
//!    value at the newest time) are those values rounded once to double precision;
//! 3. writes the rollup rows with one text `COPY telemetry_1m`, in key order;
//! 4. hands the device minutes it cannot aggregate exactly to the SQL path
//!    (`fleet_rollup_1m_write_device_minutes()`, which isolates data errors): a value of more
//!    than 38 significant digits (beyond double precision, or too small for it, or simply
//!    long) or a sum that leaves the 128-bit range. Devices do send such values (1.5e308 for
//!    "sensor absent"); they are rare, and the SQL path is exact for them.
//!
//! Why: the SQL aggregation (jsonb_each, a hash aggregate of numeric sums, a second pass for
//! the last values) cost ~10 µs of database CPU per reading, in bursts once a minute that
//! delayed the sink's batches; reading the rows out and aggregating here costs a fraction of
//! that (BENCHMARKS.md, "rollup step").

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use sqlx::PgConnection;

/// Microseconds in a minute: the rollup's bucket width.
const MINUTE_MICROS: i64 = 60_000_000;
/// PostgreSQL's epoch (2000-01-01, also the buckets' origin) in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
/// Largest number of significant digits kept exactly (10^38 < i128::MAX).
const MAX_DIGITS: usize = 38;
/// Rollup rows encoded per message of the COPY into `telemetry_1m`.
const COPY_SLICE_ROWS: usize = 8_192;

/// Errors of a step's aggregation.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("COPY stream of the readings: {0}")]
    Format(String),
}

/// An exact decimal, `mantissa × 10^-scale`, with `scale` the number of fraction digits
/// PostgreSQL shows (its display scale: a sum's is the largest of its terms').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    /// Parses PostgreSQL's `numeric` output (`-?digits(.digits)?`, as jsonb prints numbers).
    /// `None` for anything else and for more than 38 digits.
    pub fn parse(text: &str) -> Option<Self> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = match digits.split_once('.') {
            Some((int, frac)) if !frac.is_empty() => (int, frac),
            Some(_) => return None,
            None => (digits, ""),
        };
        if int.is_empty() {
            return None;
        }
        let mut mantissa: i128 = 0;
        let mut significant = 0usize;
        for b in int.bytes().chain(frac.bytes()) {
            if !b.is_ascii_digit() {
                return None;
            }
            if mantissa != 0 || b != b'0' {
                significant += 1;
            }
            if significant > MAX_DIGITS {
                return None;
            }
            mantissa = mantissa * 10 + i128::from(b - b'0');
        }
        Some(Self {
            mantissa: if negative { -mantissa } else { mantissa },
            scale: u32::try_from(frac.len()).ok()?,
        })
    }

    /// An integer (booleans count as 1 and 0).
    pub fn from_int(value: i64) -> Self {
        Self {
            mantissa: i128::from(value),
            scale: 0,
        }
    }

    /// The exact sum, with the larger display scale; `None` beyond 128 bits.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        let scale = self.scale.max(other.scale);
        let a = self
            .mantissa
            .checked_mul(10i128.checked_pow(scale - self.scale)?)?;
        let b = other
            .mantissa
            .checked_mul(10i128.checked_pow(scale - other.scale)?)?;
        Some(Self {
            mantissa: a.checked_add(b)?,
            scale,
        })
    }
}

impl std::fmt::Display for Decimal {
    /// As PostgreSQL prints a `numeric`: every fraction digit of the scale, no exponent.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        if self.mantissa < 0 {
            f.write_str("-")?;
        }
        if scale == 0 {
            return f.write_str(&digits);
        }
        if digits.len() > scale {
            let (int, frac) = digits.split_at(digits.len() - scale);
            write!(f, "{int}.{frac}")
        } else {
            write!(f, "0.{}{digits}", "0".repeat(scale - digits.len()))
        }
    }
}

/// One metric's aggregate over a device minute.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Aggregate {
    n: i64,
    sum: Decimal,
    min: f64,
    max: f64,
    last_time: i64,
    last: f64,
}

/// One device minute: its metrics' aggregates, or `exact: false` when it goes to SQL.
#[derive(Debug)]
struct DeviceMinute {
    bucket: i64,
    exact: bool,
    metrics: Vec<(Box<str>, Aggregate)>,
}

/// A value the rollup counts: a number (`None`: not exactly representable here) or a
/// boolean, as 1 and 0.
fn rollup_value(raw: &str) -> Option<Option<(Decimal, f64)>> {
    match raw.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => Some(Decimal::parse(raw).and_then(|exact| {
            // At most 38 significant digits: always finite. Rounding to zero is an error for
            // PostgreSQL's conversion (`float8in`), so that value goes to SQL, which rejects it.
            let float = raw.parse::<f64>().ok()?;
            (float != 0.0 || exact.mantissa == 0).then_some((exact, float))
        })),
        Some(b't') if raw == "true" => Some(Some((Decimal::from_int(1), 1.0))),
        Some(b'f') if raw == "false" => Some(Some((Decimal::from_int(0), 0.0))),
        _ => None,
    }
}

/// A metric name, borrowed from the COPY buffer unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a metric name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A reading's metrics object as (name, raw value) pairs; not an object: none (as the SQL's
/// `CASE WHEN jsonb_typeof(metrics) = 'object'`).
struct Entries<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a metrics object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// The aggregates of a range of readings.
#[derive(Debug, Default)]
pub struct RangeAggregator {
    /// By `tenant \0 device` (neither can hold NUL), that device's minutes.
    devices: HashMap<Box<str>, Vec<DeviceMinute>>,
    key: String,
    readings: u64,
}

impl RangeAggregator {
    /// Readings added so far.
    pub fn readings(&self) -> u64 {
        self.readings
    }

    /// Adds one reading: `time` in microseconds since 2000-01-01 UTC, `metrics` the jsonb's
    /// text.
    pub fn add(&mut self, tenant: &str, device: &str, time: i64, metrics: &str) {
        self.readings += 1;
        self.key.clear();
        self.key.push_str(tenant);
        self.key.push('\0');
        self.key.push_str(device);
        let minutes = match self.devices.get_mut(self.key.as_str()) {
            Some(minutes) => minutes,
            None => self.devices.entry(self.key.as_str().into()).or_default(),
        };
        let bucket = time.div_euclid(MINUTE_MICROS) * MINUTE_MICROS;
        let minute = match minutes.iter().position(|m| m.bucket == bucket) {
            Some(i) => &mut minutes[i],
            None => {
                minutes.push(DeviceMinute {
                    bucket,
                    exact: true,
                    metrics: Vec::new(),
                });
                let last = minutes.len() - 1;
                &mut minutes[last]
            }
        };
        if !minute.exact {
            return;
        }
        let Ok(Entries(entries)) = serde_json::from_str::<Entries<'_>>(metrics) else {
            return;
        };
        for (Key(name), raw) in entries {
            let Some(value) = rollup_value(raw.get()) else {
                continue;
            };
            let Some((exact, float)) = value else {
                minute.exact = false;
                minute.metrics.clear();
                return;
            };
            match minute.metrics.iter_mut().find(|(k, _)| **k == *name) {
                Some((_, agg)) => {
                    let Some(sum) = agg.sum.checked_add(exact) else {
                        minute.exact = false;
                        minute.metrics.clear();
                        return;
                    };
                    agg.n += 1;
                    agg.sum = sum;
                    agg.min = agg.min.min(float);
                    agg.max = agg.max.max(float);
                    // One point per (device, time): times within a device minute differ.
                    if time > agg.last_time {
                        agg.last_time = time;
                        agg.last = float;
                    }
                }
                None => minute.metrics.push((
                    name.into(),
                    Aggregate {
                        n: 1,
                        sum: exact,
                        min: float,
                        max: float,
                        last_time: time,
                        last: float,
                    },
                )),
            }
        }
    }

    /// The rollup rows in key order (bytewise, as `COLLATE "C"` sorts), and the device
    /// minutes left to SQL (tenants, devices, minutes).
    pub fn finish(&self) -> (Vec<RollupRow<'_>>, DeviceMinutes) {
        let mut rows = Vec::new();
        let mut inexact = DeviceMinutes::default();
        for (key, minutes) in &self.devices {
            let (tenant, device) = key.split_once('\0').unwrap_or((key, ""));
            for minute in minutes {
                if !minute.exact {
                    inexact.tenants.push(tenant.to_owned());
                    inexact.devices.push(device.to_owned());
                    inexact.buckets.push(from_pg_micros(minute.bucket));
                    continue;
                }
                for (metric, aggregate) in &minute.metrics {
                    rows.push(RollupRow {
                        tenant,
                        device,
                        metric,
                        bucket: minute.bucket,
                        aggregate,
                    });
                }
            }
        }
        rows.sort_unstable_by(|a, b| {
            (a.tenant, a.device, a.metric, a.bucket).cmp(&(b.tenant, b.device, b.metric, b.bucket))
        });
        (rows, inexact)
    }
}

/// One rollup row, borrowing from the aggregator.
#[derive(Debug, Clone, Copy)]
pub struct RollupRow<'a> {
    tenant: &'a str,
    device: &'a str,
    metric: &'a str,
    bucket: i64,
    aggregate: &'a Aggregate,
}

/// Appends `rows` to `out` in COPY text form, in the column order of [`COPY_ROLLUP_SQL`].
pub fn encode_rows(rows: &[RollupRow<'_>], out: &mut String) {
    for row in rows {
        let agg = row.aggregate;
        push_text(out, row.tenant);
        out.push('\t');
        push_text(out, row.device);
        out.push('\t');
        push_text(out, row.metric);
        out.push('\t');
        push_time(out, row.bucket);
        // f64's Display is the shortest text that reads back as the same double.
        let _ = write!(out, "\t{}\t{}\t{}\t{}\t", agg.n, agg.sum, agg.min, agg.max);
        push_time(out, agg.last_time);
        let _ = writeln!(out, "\t{}", agg.last);
    }
}

/// Device minutes by columns, for `unnest`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DeviceMinutes {
    pub tenants: Vec<String>,
    pub devices: Vec<String>,
    pub buckets: Vec<DateTime<Utc>>,
}

fn from_pg_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_UNIX_MICROS))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A timestamptz in COPY text form (UTC, microseconds).
fn push_time(out: &mut String, micros: i64) {
    let _ = write!(
        out,
        "{}",
        from_pg_micros(micros).format("%Y-%m-%d %H:%M:%S%.6f+00")
    );
}

/// Text in COPY text form: backslash, tab, newline and carriage return escaped.
fn push_text(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Transaction-local settings holding the range [`COPY_READINGS_SQL`] reads.
const RANGE_FROM_SETTING: &str = "fleetstream.rollup_new_from";
const RANGE_TO_SETTING: &str = "fleetstream.rollup_new_to";

/// The new minutes' readings, per tenant an index range scan on `(tenant_id, time)`.
const COPY_READINGS_SQL: &str = "COPY (SELECT r.time, r.tenant_id, r.device_id, r.metrics \
     FROM public.tenants tn \
     CROSS JOIN LATERAL ( \
         SELECT r.time, r.tenant_id, r.device_id, r.metrics FROM public.telemetry r \
         WHERE r.tenant_id = tn.tenant_id \
           AND r.time >= current_setting('fleetstream.rollup_new_from')::timestamptz \
           AND r.time < current_setting('fleetstream.rollup_new_to')::timestamptz \
         OFFSET 0) r) TO STDOUT (FORMAT binary)";

/// The rollup rows' COPY, in the column order [`encode_rows`] writes.
pub const COPY_ROLLUP_SQL: &str = "COPY telemetry_1m (tenant_id, device_id, metric, bucket, n, \
     sum, min, max, last_time, last) FROM STDIN";

/// Parses a binary COPY stream of `(time timestamptz, tenant_id text, device_id text,
/// metrics jsonb)` rows as it arrives, feeding each to an aggregator.
#[derive(Debug, Default)]
struct CopyRows {
    buf: Vec<u8>,
    pos: usize,
    header_done: bool,
    trailer_seen: bool,
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyRows {
    fn feed(&mut self, chunk: &[u8], into: &mut RangeAggregator) -> Result<(), RollupError> {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
        if !self.header_done {
            let fixed = SIGNATURE.len() + 8;
            if self.buf.len() < fixed {
                return Ok(());
            }
            if &self.buf[..SIGNATURE.len()] != SIGNATURE {
                return Err(RollupError::Format("not a binary COPY stream".into()));
            }
            let ext = be_i32(&self.buf[SIGNATURE.len() + 4..fixed]);
            let ext = usize::try_from(ext)
                .map_err(|_| RollupError::Format("negative header extension".into()))?;
            if self.buf.len() < fixed + ext {
                return Ok(());
            }
            self.pos = fixed + ext;
            self.header_done = true;
        }
        while let Some(used) = self.row(into)? {
            self.pos += used;
        }
        Ok(())
    }

    /// Consumes one complete row at `pos` (bytes used), or `None` when it is not all here.
    fn row(&mut self, into: &mut RangeAggregator) -> Result<Option<usize>, RollupError> {
        if self.trailer_seen {
            return Ok(None);
        }
        let data = &self.buf[self.pos..];
        if data.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([data[0], data[1]]);
        if fields == -1 {
            self.trailer_seen = true;
            return Ok(Some(2));
        }
        if fields != 4 {
            return Err(RollupError::Format(format!(
                "row of {fields} fields, not 4"
            )));
        }
        let mut at = 2usize;
        let mut values: [&[u8]; 4] = [&[]; 4];
        for value in &mut values {
            if data.len() < at + 4 {
                return Ok(None);
            }
            let len = be_i32(&data[at..at + 4]);
            at += 4;
            let len = usize::try_from(len)
                .map_err(|_| RollupError::Format("NULL in a NOT NULL column".into()))?;
            if data.len() < at + len {
                return Ok(None);
            }
            *value = &data[at..at + len];
            at += len;
        }
        let [time, tenant, device, metrics] = values;
        let time: [u8; 8] = time
            .try_into()
            .map_err(|_| RollupError::Format("timestamptz of other than 8 bytes".into()))?;
        // jsonb's binary form: a version byte (1), then the text.
        let metrics = match metrics.split_first() {
            Some((1, rest)) => text(rest, "metrics")?,
            _ => return Err(RollupError::Format("jsonb of an unknown version".into())),
        };
        into.add(
            text(tenant, "tenant_id")?,
            text(device, "device_id")?,
            i64::from_be_bytes(time),
            metrics,
        );
        Ok(Some(at))
    }
}

fn text<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, RollupError> {
    std::str::from_utf8(bytes).map_err(|_| RollupError::Format(format!("{what} is not UTF-8")))
}

fn be_i32(bytes: &[u8]) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    i32::from_be_bytes(b)
}

/// What [`aggregate_new_minutes`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NewMinutes {
    /// Readings read.
    pub readings: u64,
    /// Rollup rows written (by the COPY and by the SQL path).
    pub rows_written: i64,
    /// Device minutes handed to the SQL path.
    pub device_minutes_to_sql: usize,
    /// Device minutes the SQL path rejected (data errors).
    pub device_minutes_rejected: i32,
}

/// Aggregates the readings of `[from, to)` into `telemetry_1m`, in the caller's transaction
/// (which must have planned the step: see migration 0016).
///
/// The readings are parsed, aggregated, sorted and encoded on a thread of its own, so the
/// seconds a minute's step needs never hold one of the runtime's threads (the sink's
/// batches); the COPY streams wait for it (PostgreSQL's side waits on the socket). `nice`
/// above 0 lowers that thread's priority (`SINK_ROLLUP_NICE`).
pub async fn aggregate_new_minutes(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    nice: i8,
) -> Result<NewMinutes, RollupError> {
    // COPY takes no parameters. Literals would make each step's statement text new, and
    // pg_stat_statements would keep one entry per step (evicting real ones); the range goes
    // in transaction-local settings instead, read by a constant statement (`current_setting`
    // is stable: TimescaleDB excludes chunks and PostgreSQL prunes partitions at run time).
    sqlx::query("SELECT set_config($1, $2, true), set_config($3, $4, true)")
        .bind(RANGE_FROM_SETTING)
        .bind(from.to_rfc3339())
        .bind(RANGE_TO_SETTING)
        .bind(to.to_rfc3339())
        .execute(&mut *conn)
        .await?;
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(AGGREGATOR_QUEUE);
    let (text_tx, mut text_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(AGGREGATOR_QUEUE);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rollup-aggregate".into())
        .spawn(move || {
            if nice > 0 {
                lower_thread_priority(nice);
            }
            let _ = done_tx.send(aggregate_on_thread(chunks_rx, text_tx));
        })
        .map_err(|e| RollupError::Format(format!("cannot start the aggregation thread: {e}")))?;

    let streamed = async {
        // PostgreSQL sends a COPY row per message: they go to the thread in batches, as a
        // hand-over per row (a wake-up of the thread) cost more than parsing the row.
        let mut stream = conn.copy_out_raw(COPY_READINGS_SQL).await?;
        let mut batch = Vec::with_capacity(AGGREGATOR_BATCH_BYTES);
        while let Some(chunk) = stream.try_next().await? {
            batch.extend_from_slice(&chunk);
            if batch.len() >= AGGREGATOR_BATCH_BYTES {
                let full =
                    std::mem::replace(&mut batch, Vec::with_capacity(AGGREGATOR_BATCH_BYTES));
                if chunks_tx.send(full).await.is_err() {
                    // The thread stopped (a malformed stream): its error is the step's.
                    return Ok(());
                }
            }
        }
        if !batch.is_empty() {
            let _ = chunks_tx.send(batch).await;
        }
        Ok::<_, RollupError>(())
    }
    .await;
    drop(chunks_tx);
    streamed?;

    let answer = |done: tokio::sync::oneshot::Receiver<Result<_, RollupError>>| async move {
        done.await.unwrap_or_else(|_| {
            Err(RollupError::Format(
                "the aggregation thread ended without an answer".into(),
            ))
        })
    };
    let mut rows_written = 0;
    // The rollup rows' COPY opens with the first rows (a range without readings has none).
    let (readings, inexact) = match text_rx.recv().await {
        Some(first) => {
            let mut copy = conn.copy_in_raw(COPY_ROLLUP_SQL).await?;
            let mut next = Some(first);
            while let Some(text) = next {
                if let Err(err) = copy.send(text).await {
                    let _ = copy.abort("send failed").await;
                    return Err(err.into());
                }
                next = text_rx.recv().await;
            }
            match answer(done_rx).await {
                Ok(aggregated) => {
                    rows_written = i64::try_from(copy.finish().await?).unwrap_or(i64::MAX);
                    aggregated
                }
                Err(err) => {
                    let _ = copy.abort("aggregation failed").await;
                    return Err(err);
                }
            }
        }
        None => answer(done_rx).await?,
    };
    let mut out = NewMinutes {
        readings,
        rows_written,
        device_minutes_to_sql: inexact.tenants.len(),
        device_minutes_rejected: 0,
    };
    if !inexact.tenants.is_empty() {
        let (written, rejected): (i64, i32) = sqlx::query_as(
            "SELECT rows_written, rejected FROM fleet_rollup_1m_write_device_minutes($1, $2, $3)",
        )
        .bind(&inexact.tenants)
        .bind(&inexact.devices)
        .bind(&inexact.buckets)
        .fetch_one(&mut *conn)
        .await?;
        out.rows_written += written;
        out.device_minutes_rejected = rejected;
    }
    Ok(out)
}

/// Batches queued between the step's connection and its aggregation thread, each way.
const AGGREGATOR_QUEUE: usize = 8;
/// Bytes of the readings' COPY stream handed to the aggregation thread at a time.
const AGGREGATOR_BATCH_BYTES: usize = 256 * 1024;

/// The aggregation thread: parses the readings' COPY stream into an aggregator, then sends
/// the rollup rows back as COPY text in key order. Returns the readings read and the device
/// minutes left to SQL.
fn aggregate_on_thread(
    mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    text: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<(u64, DeviceMinutes), RollupError> {
    let mut aggregator = RangeAggregator::default();
    let mut parser = CopyRows::default();
    while let Some(chunk) = chunks.blocking_recv() {
        parser.feed(&chunk, &mut aggregator)?;
    }
    if !parser.trailer_seen {
        return Err(RollupError::Format(
            "COPY stream ended before its trailer".into(),
        ));
    }
    let (rows, inexact) = aggregator.finish();
    for slice in rows.chunks(COPY_SLICE_ROWS) {
        let mut encoded = String::with_capacity(slice.len() * 128);
        encode_rows(slice, &mut encoded);
        if text.blocking_send(encoded.into_bytes()).is_err() {
            // The step gave up (its error is reported there).
            break;
        }
    }
    Ok((aggregator.readings(), inexact))
}

/// Lowers the calling thread's scheduling priority to niceness `nice` (Linux: niceness is
/// per thread). Best effort: a failure is logged as a warning, the work goes on at normal
/// priority.
pub fn lower_thread_priority(nice: i8) {
    use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
    // thread-priority maps its portable 0-99 scale onto niceness 19..-20 (reversed); the
    // value that lands on `nice` is found by the same formula (checked by a test through
    // /proc).
    let target = (0u8..=99).find(|p| {
        let ratio = 1f32 - f32::from(*p) / 99f32;
        ((39f32 * ratio) as i8).saturating_sub(20) == nice
    });
    let result = target
        .and_then(|p| ThreadPriorityValue::try_from(p).ok())
        .ok_or_else(|| format!("niceness {nice} out of range"))
        .and_then(|value| {
            set_current_thread_priority(ThreadPriority::Crossplatform(value))
                .map_err(|e| format!("{e:?}"))
        });
    if let Err(err) = result {
        tracing::warn!(nice, error = %err, "SINK_ROLLUP_NICE: could not lower the aggregation thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_parse_add_and_print_as_postgresql_does() {
        let d = |s: &str| Decimal::parse(s).unwrap();
        assert_eq!(d("29.1").to_string(), "29.1");
        assert_eq!(d("-0.005").to_string(), "-0.005");
        assert_eq!(d("20.0").to_string(), "20.0");
        assert_eq!(d("41").to_string(), "41");
        let sum = d("29.1").checked_add(d("20.27")).unwrap();
        assert_eq!(sum.to_string(), "49.37");
        let sum = d("1.50").checked_add(d("-2")).unwrap();
        assert_eq!(sum.to_string(), "-0.50");
        assert_eq!(d("0.1").checked_add(d("-0.1")).unwrap().to_string(), "0.0");
        for bad in ["", "-", "1.", ".5", "1e5", "NaN", "1.2.3", "+1", "0x10"] {
            assert_eq!(Decimal::parse(bad), None, "{bad}");
        }
        // 38 significant digits fit; 39 do not (nor does 1.5e308 printed in full).
        assert!(Decimal::parse(&"9".repeat(38)).is_some());
        assert!(Decimal::parse(&format!("0.{}", "0".repeat(30))).is_some());
        assert_eq!(Decimal::parse(&"9".repeat(39)), None);
        assert_eq!(Decimal::parse(&format!("15{}", "0".repeat(307))), None);
        let big = d(&"9".repeat(38));
        assert_eq!(big.checked_add(big), None);
    }

    #[test]
    fn values_count_as_the_sql_counts_them() {
        assert_eq!(
            rollup_value("true"),
            Some(Some((Decimal::from_int(1), 1.0)))
        );
        assert_eq!(
            rollup_value("false"),
            Some(Some((Decimal::from_int(0), 0.0)))
        );
        assert_eq!(rollup_value("\"21.5\""), None);
        assert_eq!(rollup_value("null"), None);
        assert_eq!(rollup_value("{\"a\": 1}"), None);
        assert_eq!(rollup_value("[1]"), None);
        assert_eq!(
            rollup_value("-3.25"),
            Some(Some((Decimal::parse("-3.25").unwrap(), -3.25)))
        );
        assert_eq!(rollup_value(&format!("15{}", "0".repeat(307))), Some(None));
        // One significant digit, but below the smallest double: PostgreSQL refuses it.
        assert_eq!(rollup_value(&format!("0.{}1", "0".repeat(400))), Some(None));
        assert_eq!(
            rollup_value("0.000"),
            Some(Some((Decimal::parse("0.000").unwrap(), 0.0)))
        );
    }

    #[test]
    fn a_device_minute_aggregates_per_metric_and_falls_back_whole() {
        let mut agg = RangeAggregator::default();
        let t0 = 60 * MINUTE_MICROS;
        agg.add("t", "d", t0 + 2, r#"{"a": 2.5, "b": true, "s": "x"}"#);
        agg.add("t", "d", t0 + 1, r#"{"a": -1, "b": false}"#);
        agg.add("t", "d", t0 + MINUTE_MICROS, r#"{"a": 7}"#);
        agg.add("t", "e\\x", t0, r#"{"a\"q": 1}"#);
        agg.add(
            "t",
            "f",
            t0,
            &format!(r#"{{"a": 1, "z": 15{}}}"#, "0".repeat(307)),
        );
        agg.add("t", "f", t0 + 1, r#"{"a": 1}"#);
        agg.add("t", "g", t0, "[1, 2]");
        let (rows, inexact) = agg.finish();
        let mut text = String::new();
        encode_rows(&rows, &mut text);
        let expected = [
            "t\td\ta\t2000-01-01 01:00:00.000000+00\t2\t1.5\t-1\t2.5\t2000-01-01 01:00:00.000002+00\t2.5",
            "t\td\ta\t2000-01-01 01:01:00.000000+00\t1\t7\t7\t7\t2000-01-01 01:01:00.000000+00\t7",
            "t\td\tb\t2000-01-01 01:00:00.000000+00\t2\t1\t0\t1\t2000-01-01 01:00:00.000002+00\t1",
            "t\te\\\\x\ta\"q\t2000-01-01 01:00:00.000000+00\t1\t1\t1\t1\t2000-01-01 01:00:00.000000+00\t1",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        assert_eq!(rows.len(), 4);
        assert_eq!(inexact.tenants, ["t"]);
        assert_eq!(inexact.devices, ["f"]);
        assert_eq!(agg.readings(), 7);
    }

    /// The calling thread's niceness, from /proc (field 19 of its stat line).
    #[cfg(target_os = "linux")]
    fn thread_nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("readable stat");
        let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
        let nice = rest.split_whitespace().nth(16).expect("a nice field");
        nice.parse().expect("a number")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_aggregation_thread_runs_at_the_niceness_asked_for() {
        for nice in [1, 10, 19] {
            let seen = std::thread::spawn(move || {
                let before = thread_nice();
                lower_thread_priority(nice);
                (before, thread_nice())
            })
            .join()
            .expect("the thread ends");
            assert_eq!(seen, (0, i64::from(nice)), "niceness {nice}");
        }
        // The caller's thread is untouched.
        assert_eq!(thread_nice(), 0);
    }

    #[test]
    fn copy_rows_are_parsed_across_chunk_boundaries() {
        let mut stream = Vec::new();
        stream.extend_from_slice(SIGNATURE);
        stream.extend_from_slice(&0i32.to_be_bytes());
        stream.extend_from_slice(&0i32.to_be_bytes());
        for (device, metrics) in [("d1", r#"{"a": 1}"#), ("d2", r#"{"a": 2}"#)] {
            stream.extend_from_slice(&4i16.to_be_bytes());
            stream.extend_from_slice(&8i32.to_be_bytes());
            stream.extend_from_slice(&(5 * MINUTE_MICROS).to_be_bytes());
            for text in ["t", device] {
                stream.extend_from_slice(&(text.len() as i32).to_be_bytes());
                stream.extend_from_slice(text.as_bytes());
            }
            stream.extend_from_slice(&(metrics.len() as i32 + 1).to_be_bytes());
            stream.push(1);
            stream.extend_from_slice(metrics.as_bytes());
        }
        stream.extend_from_slice(&(-1i16).to_be_bytes());
        for chunk_size in [1, 3, 7, stream.len()] {
            let mut agg = RangeAggregator::default();
            let mut parser = CopyRows::default();
            for chunk in stream.chunks(chunk_size) {
                parser.feed(chunk, &mut agg).unwrap();
            }
            assert!(parser.trailer_seen);
            assert_eq!(agg.readings(), 2, "chunks of {chunk_size}");
            assert_eq!(agg.finish().0.len(), 2);
        }
    }
}
