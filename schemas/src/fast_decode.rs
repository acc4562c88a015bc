//! Decoding `telemetry.v1` messages on the hot paths of the sink and the evaluator.
//!
//! The generic decoder ([`crate::Codec::decode`]) builds an `apache_avro` `Value` tree (a
//! `Vec` of named fields, a `HashMap` of boxed unions) and converts it into a [`Telemetry`]:
//! about half of the sink's own CPU per message in the throughput benchmark. Almost every
//! message is written with the current schema in single-object framing, for which the body
//! layout is fixed, so [`TelemetryDecoder`] reads such bodies straight into a `Telemetry`.
//!
//! **Equivalence.** The fast path only ever *accepts* what the generic decoder accepts, with
//! the same result: it is stricter where it matters (lengths and counts bounded by the bytes
//! left, booleans only `0`/`1`, varints of at most 10 bytes without overflow, strings at most
//! [`MAX_FAST_STRING`] bytes, no trailing bytes) and hands everything else — other framings,
//! other schema versions, anything unusual or malformed — to the generic decoder, whose
//! answer (value or typed error) is then the answer. Tests check this against the generic
//! decoder on random readings and on random corruptions of them.

use std::collections::BTreeMap;

use crate::{Codec, DecodeError, MetricValue, Telemetry};
use chrono::{DateTime, Utc};

// The schema whose body layout the fast path knows: the one the encoder writes.
use crate::fast_encode::FAST_SCHEMA;

/// Single-object framing: `C3 01`, then the 8-byte little-endian schema fingerprint.
const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const SINGLE_OBJECT_HEADER: usize = 10;

/// Longer strings go through the generic decoder (which caps allocations at 16 MiB); readings
/// never come near this.
pub const MAX_FAST_STRING: usize = 1 << 20;

/// Decodes telemetry messages: the fast path for current-schema single-object messages,
/// the generic codec for everything else.
#[derive(Clone, Copy)]
pub struct TelemetryDecoder {
    codec: &'static Codec<Telemetry>,
    /// Fingerprints of `telemetry.v1` (the specification's, and the legacy one written before
    /// 2026-11-30) when it is the codec's current (reader) schema; `None` once a newer version
    /// is current, because then v1 bodies need schema resolution.
    fast_fingerprint: Option<[[u8; 8]; 2]>,
}

impl std::fmt::Debug for TelemetryDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryDecoder")
            .field("fast_path", &self.fast_fingerprint.is_some())
            .finish()
    }
}

impl TelemetryDecoder {
    /// A decoder over `codec`; the fast path is on only while `telemetry.v1` is current.
    pub fn new(codec: &'static Codec<Telemetry>) -> Self {
        let fast_fingerprint = (codec.current_name() == FAST_SCHEMA).then(|| {
            [
                codec.current_fingerprint().to_le_bytes(),
                codec.current_legacy_fingerprint().to_le_bytes(),
            ]
        });
        Self {
            codec,
            fast_fingerprint,
        }
    }

    /// True when current-schema single-object messages take the fast path.
    pub fn has_fast_path(&self) -> bool {
        self.fast_fingerprint.is_some()
    }

    /// Decodes one message exactly as [`Codec::decode`] would.
    pub fn decode(&self, bytes: &[u8]) -> Result<Telemetry, DecodeError> {
        if let Some(row) = self.fast(bytes) {
            return Ok(row);
        }
        self.codec.decode(bytes)
    }

    /// Decodes a registry-framed body (after the 5-byte header) written with `writer`: the
    /// fast path when `writer` is the current `telemetry.v1`, else [`Codec::decode_body`].
    pub fn decode_body(
        &self,
        writer: &crate::WriterSchema,
        body: &[u8],
    ) -> Result<Telemetry, DecodeError> {
        if self.fast_fingerprint.is_some()
            && writer.shipped_fingerprint() == Some(self.codec.current_fingerprint())
        {
            if let Some(row) = decode_v1_body(body) {
                return Ok(row);
            }
        }
        self.codec.decode_body(writer, body)
    }

    /// The codec this decoder falls back to.
    pub fn codec(&self) -> &'static Codec<Telemetry> {
        self.codec
    }

    /// The fast path alone: `None` when the message is not a plain current-schema
    /// single-object message the fast path fully understands.
    pub fn fast(&self, bytes: &[u8]) -> Option<Telemetry> {
        let [spec, legacy] = self.fast_fingerprint?;
        let header = bytes.get(..SINGLE_OBJECT_HEADER)?;
        if header[..2] != SINGLE_OBJECT_MAGIC || (header[2..] != spec && header[2..] != legacy) {
            return None;
        }
        decode_v1_body(&bytes[SINGLE_OBJECT_HEADER..])
    }
}

/// A cursor over an Avro binary body.
struct Body<'a> {
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    /// A zigzag varint `long` of at most 10 bytes that fits in 64 bits.
    fn long(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        for (i, &byte) in self.bytes.iter().enumerate().take(10) {
            let bits = u64::from(byte & 0x7F);
            // The 10th byte may only carry the top bit of the 64.
            if i == 9 && bits > 1 {
                return None;
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        None
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Some(head)
    }

    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.long()?).ok()?;
        if len > MAX_FAST_STRING {
            return None;
        }
        let raw = self.take(len)?;
        std::str::from_utf8(raw).ok().map(str::to_owned)
    }

    fn timestamp_micros(&mut self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros(self.long()?)
    }

    fn metric(&mut self) -> Option<MetricValue> {
        Some(match self.long()? {
            0 => MetricValue::Null,
            1 => match self.take(1)? {
                [0] => MetricValue::Bool(false),
                [1] => MetricValue::Bool(true),
                _ => return None,
            },
            2 => MetricValue::Long(self.long()?),
            3 => {
                let raw: [u8; 8] = self.take(8)?.try_into().ok()?;
                MetricValue::Double(f64::from_le_bytes(raw))
            }
            4 => MetricValue::String(self.string()?),
            _ => return None,
        })
    }

    /// An Avro map: blocks of `count` entries (a negative count is followed by the block's
    /// byte size), ended by a zero count.
    fn metrics(&mut self) -> Option<BTreeMap<String, MetricValue>> {
        let mut map = BTreeMap::new();
        loop {
            let mut count = self.long()?;
            if count == 0 {
                return Some(map);
            }
            if count < 0 {
                count = count.checked_neg()?;
                if self.long()? < 0 {
                    return None;
                }
            }
            // Each entry takes at least 2 bytes (empty key, null): a larger count is corrupt.
            if count > (self.bytes.len() / 2) as i64 {
                return None;
            }
            for _ in 0..count {
                let key = self.string()?;
                let value = self.metric()?;
                map.insert(key, value);
            }
        }
    }
}

/// Reads a `telemetry.v1` body (fields in schema order); `None` on anything unexpected.
fn decode_v1_body(bytes: &[u8]) -> Option<Telemetry> {
    let mut body = Body { bytes };
    let tenant_id = body.string()?;
    let device_id = body.string()?;
    let site_id = match body.long()? {
        0 => None,
        1 => Some(body.string()?),
        _ => return None,
    };
    let msg_type = body.string()?;
    let seq = body.long()?;
    let time = body.timestamp_micros()?;
    let received_at = body.timestamp_micros()?;
    let metrics = body.metrics()?;
    if !body.bytes.is_empty() {
        return None;
    }
    Some(Telemetry {
        tenant_id,
        device_id,
        site_id,
        msg_type,
        seq,
        time,
        received_at,
        metrics,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn decoder() -> TelemetryDecoder {
        TelemetryDecoder::new(crate::telemetry_codec().expect("shipped schema"))
    }

    fn random_string(rng: &mut impl Rng, max: usize) -> String {
        let len = rng.random_range(0..=max);
        (0..len)
            .map(|_| match rng.random_range(0..10) {
                0 => 'é',
                1 => '🛰',
                _ => rng.random_range(b'a'..=b'z') as char,
            })
            .collect()
    }

    fn random_long(rng: &mut impl Rng) -> i64 {
        match rng.random_range(0..8) {
            0 => *[i64::MIN, i64::MAX, 0, -1, 63, -64, 64, -65]
                .get(rng.random_range(0..8))
                .expect("in range"),
            1 => rng.random_range(-1000..1000),
            _ => rng.random(),
        }
    }

    fn random_double(rng: &mut impl Rng) -> f64 {
        match rng.random_range(0..8) {
            0 => *[
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                -0.0,
                f64::MIN_POSITIVE,
                f64::MAX,
                f64::MIN,
                5e-324,
            ]
            .get(rng.random_range(0..8))
            .expect("in range"),
            _ => rng.random_range(-1e12..1e12),
        }
    }

    fn random_time(rng: &mut impl Rng) -> DateTime<Utc> {
        if rng.random_range(0..50) == 0 {
            // chrono's extremes, at the microsecond Avro's timestamp-micros carries.
            let edge = if rng.random() {
                DateTime::<Utc>::MIN_UTC
            } else {
                DateTime::<Utc>::MAX_UTC
            };
            return DateTime::from_timestamp_micros(edge.timestamp_micros())
                .expect("chrono's own range");
        }
        DateTime::from_timestamp_micros(rng.random_range(-62_000_000_000_000_000..i64::MAX / 2))
            .expect("in chrono's range by construction")
    }

    /// A random reading: every metric kind, edge values (NaN and infinite doubles, extreme
    /// longs and timestamps), empty and non-ASCII strings. Shared with `fast_encode`'s tests.
    pub(crate) fn random_reading(rng: &mut impl Rng) -> Telemetry {
        let metrics = (0..rng.random_range(0..12))
            .map(|_| {
                let value = match rng.random_range(0..5) {
                    0 => MetricValue::Null,
                    1 => MetricValue::Bool(rng.random()),
                    2 => MetricValue::Long(random_long(rng)),
                    3 => MetricValue::Double(random_double(rng)),
                    _ => MetricValue::String(random_string(rng, 20)),
                };
                (random_string(rng, 12), value)
            })
            .collect();
        Telemetry {
            tenant_id: random_string(rng, 16),
            device_id: random_string(rng, 16),
            site_id: rng.random_bool(0.7).then(|| random_string(rng, 8)),
            msg_type: random_string(rng, 10),
            seq: random_long(rng),
            time: random_time(rng),
            received_at: random_time(rng),
            metrics,
        }
    }

    /// Doubles compared by bits, so the check is exact.
    pub(crate) fn same(a: &Telemetry, b: &Telemetry) -> bool {
        let bits = |t: &Telemetry| -> Vec<(String, String)> {
            t.metrics
                .iter()
                .map(|(k, v)| match v {
                    MetricValue::Double(d) => (k.clone(), format!("double {:x}", d.to_bits())),
                    other => (k.clone(), format!("{other:?}")),
                })
                .collect()
        };
        let strip = |t: &Telemetry| Telemetry {
            metrics: BTreeMap::new(),
            ..t.clone()
        };
        strip(a) == strip(b) && bits(a) == bits(b)
    }

    #[test]
    fn fast_path_is_on_for_the_current_schema() {
        assert!(decoder().has_fast_path());
    }

    #[test]
    fn fast_path_decodes_what_the_generic_decoder_decodes() {
        let decoder = decoder();
        let codec = crate::telemetry_codec().expect("shipped schema");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            let reading = random_reading(&mut rng);
            let bytes = codec.encode(&reading).expect("encodable");
            let fast = decoder
                .fast(&bytes)
                .expect("a plain v1 message takes the fast path");
            let generic = codec.decode(&bytes).expect("decodable");
            assert!(same(&fast, &generic), "{fast:?} != {generic:?}");
            assert!(same(&fast, &reading));
        }
    }

    /// The specification of the fast path: on any input, when it answers, the generic
    /// decoder gives the same value.
    #[test]
    fn fast_path_never_accepts_what_the_generic_decoder_decodes_differently() {
        let decoder = decoder();
        let codec = crate::telemetry_codec().expect("shipped schema");
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..60_000 {
            let reading = random_reading(&mut rng);
            let mut bytes = codec.encode(&reading).expect("encodable");
            for _ in 0..rng.random_range(1..4) {
                let body = SINGLE_OBJECT_HEADER..bytes.len();
                match rng.random_range(0..5) {
                    0 => {
                        let i = rng.random_range(body);
                        bytes[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 => {
                        let i = rng.random_range(body);
                        bytes[i] = rng.random();
                    }
                    2 => bytes.truncate(rng.random_range(SINGLE_OBJECT_HEADER..bytes.len())),
                    3 => {
                        let i = rng.random_range(SINGLE_OBJECT_HEADER..=bytes.len());
                        bytes.insert(i, rng.random());
                    }
                    _ => {
                        let i = rng.random_range(body);
                        bytes.remove(i);
                    }
                }
                if bytes.len() <= SINGLE_OBJECT_HEADER {
                    break;
                }
            }
            match decoder.fast(&bytes) {
                Some(fast) => {
                    accepted += 1;
                    let generic = codec
                        .decode(&bytes)
                        .unwrap_or_else(|err| panic!("fast path accepted {bytes:?}: {err}"));
                    assert!(same(&fast, &generic), "{fast:?} != {generic:?}");
                }
                None => refused += 1,
            }
        }
        // Both branches must have been exercised for the check to mean anything.
        assert!(
            accepted > 1_000 && refused > 1_000,
            "{accepted} / {refused}"
        );
    }

    /// Messages written before 2026-11-30 carry the legacy fingerprint: same body, same row.
    #[test]
    fn legacy_fingerprint_messages_take_the_fast_path_too() {
        let decoder = decoder();
        let codec = crate::telemetry_codec().expect("shipped schema");
        let reading = random_reading(&mut rand::rngs::StdRng::seed_from_u64(5));
        let mut legacy = codec.encode(&reading).expect("encodable");
        legacy[2..SINGLE_OBJECT_HEADER]
            .copy_from_slice(&codec.current_legacy_fingerprint().to_le_bytes());
        let fast = decoder.fast(&legacy).expect("the fast path takes it");
        assert!(same(
            &fast,
            &codec.decode(&legacy).expect("the codec reads it")
        ));
    }

    #[test]
    fn other_framings_and_garbage_get_the_generic_answer() {
        let decoder = decoder();
        let codec = crate::telemetry_codec().expect("shipped schema");
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let reading = random_reading(&mut rng);
        let mut wrong_fingerprint = codec.encode(&reading).expect("encodable");
        wrong_fingerprint[5] ^= 0xFF;
        for bytes in [vec![], vec![0xC3], b"not avro".to_vec(), wrong_fingerprint] {
            assert!(decoder.fast(&bytes).is_none());
            assert_eq!(
                decoder.decode(&bytes).map_err(|e| e.to_string()),
                codec.decode(&bytes).map_err(|e| e.to_string())
            );
        }
    }
}
