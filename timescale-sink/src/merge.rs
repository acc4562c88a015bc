//! One point per (tenant, device, time): grouping a batch's readings into points, merging their
//! metrics, accounting each reading, and each device's newest value per metric.
//!
//! The rule (InfluxDB's for fields of one series at one timestamp): readings that share
//! (tenant, device, time) are one point whose metrics are the union of theirs, the last write
//! in partition order winning per metric. A device's readings all travel on one partition
//! (the Kafka key is tenant/device), so partition order is the device's order, and a replay
//! after a crash applies the same readings in the same order: the merge is deterministic and
//! idempotent whatever the batch boundaries were.
//!
//! Each reading is accounted once: it starts a point (`new_points`), changes a point
//! (`merged`), or changes nothing because every metric it carries is already there with the
//! same value (`duplicates`: an exact re-send).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use schemas::{MetricValue, Telemetry};
use serde_json::Value;

use crate::batch::SourcedRow;

/// (tenant, device, time in microseconds since the Unix epoch).
pub type PointKey = (String, String, i64);

/// The key of a reading's point.
pub fn point_key(row: &Telemetry) -> PointKey {
    (
        row.tenant_id.clone(),
        row.device_id.clone(),
        row.time.timestamp_micros(),
    )
}

/// A 64-bit hash of a reading's point key (equal keys, equal hashes; rarely, different keys
/// too: users of the hash treat a match as "maybe").
pub fn point_hash(row: &Telemetry) -> u64 {
    foldhash::fast::FixedState::default().hash_one((
        row.tenant_id.as_str(),
        row.device_id.as_str(),
        row.time.timestamp_micros(),
    ))
}

/// Hashes of the points stored in the last `WINDOW` to `2 × WINDOW` (two generations, at most
/// `CAPACITY` each), so a batch can send readings that meet a point stored moments ago
/// straight to the merge path instead of failing its COPY on them. A hash match is only a
/// hint: a point that does not exist yet is inserted by the merge path as well, and a point
/// not remembered makes the COPY fail, after which the whole batch is merged.
///
/// Armed only while merges happen (for `ARMED_FOR` after the last one); only then are
/// batches grouped into points before their COPY. A fleet whose readings never share a point
/// pays nothing for either: a batch that does share points meets a unique violation in its
/// COPY, is merged, and arms this.
#[derive(Debug)]
pub struct RecentPoints {
    generations: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    current: HashSet<u64, foldhash::fast::FixedState>,
    previous: HashSet<u64, foldhash::fast::FixedState>,
    started: Instant,
    /// Until when batches are remembered (`None`: not armed).
    armed_until: Option<Instant>,
}

impl RecentPoints {
    const WINDOW: Duration = Duration::from_secs(30);
    const CAPACITY: usize = 2_000_000;
    const ARMED_FOR: Duration = Duration::from_secs(600);

    /// Readings met stored points: remember batches from now on (for `ARMED_FOR`).
    pub fn arm(&self) {
        if let Ok(mut generations) = self.generations.lock() {
            generations.armed_until = Some(Instant::now() + Self::ARMED_FOR);
        }
    }

    /// Whether merges happened lately: then batches are grouped into points up front and
    /// checked against the recent points.
    pub fn armed(&self) -> bool {
        self.generations
            .lock()
            .is_ok_and(|g| g.armed_until.is_some_and(|until| until > Instant::now()))
    }

    /// Indexes (ascending) of `points` that were stored recently.
    pub fn seen(&self, rows: &[SourcedRow], points: &[Point]) -> Vec<usize> {
        let Ok(generations) = self.generations.lock() else {
            return Vec::new();
        };
        if generations.current.is_empty() {
            return Vec::new();
        }
        points
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                let hash = point_hash(p.row(rows));
                generations.current.contains(&hash) || generations.previous.contains(&hash)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Records the points of a committed batch (only while armed).
    pub fn remember(&self, rows: &[SourcedRow]) {
        let Ok(mut generations) = self.generations.lock() else {
            return;
        };
        match generations.armed_until {
            Some(until) if until > Instant::now() => {}
            Some(_) => {
                // Disarmed: no merges for a while; free the memory.
                *generations = Generations::default();
                return;
            }
            None => return,
        }
        if generations.started.elapsed() >= Self::WINDOW
            || generations.current.len() + rows.len() > Self::CAPACITY
        {
            let full = std::mem::take(&mut generations.current);
            generations.previous = full;
            generations.started = Instant::now();
        }
        generations
            .current
            .extend(rows.iter().map(|r| point_hash(&r.row)));
    }
}

impl Default for RecentPoints {
    fn default() -> Self {
        Self {
            generations: Mutex::new(Generations::default()),
        }
    }
}

impl Default for Generations {
    fn default() -> Self {
        Self {
            current: HashSet::default(),
            previous: HashSet::default(),
            started: Instant::now(),
            armed_until: None,
        }
    }
}

/// The readings of one point in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Indexes into the batch's rows, in batch (partition) order; never empty.
    pub readings: Vec<usize>,
    /// The merged row when the point has more than one reading; `None`: the row of its only
    /// reading.
    merged: Option<Telemetry>,
}

impl Point {
    /// The row to store for this point.
    pub fn row<'a>(&'a self, rows: &'a [SourcedRow]) -> &'a Telemetry {
        self.merged.as_ref().unwrap_or(&rows[self.readings[0]].row)
    }

    /// Groups `rows` into points, in order of each point's first reading. Metrics are merged
    /// in row order, later rows winning per metric; `site_id` is the last one given, and
    /// `msg_type`, `seq` and `received_at` are the last reading's.
    pub fn group(rows: &[SourcedRow]) -> Vec<Point> {
        let mut index: HashMap<(&str, &str, i64), usize> = HashMap::with_capacity(rows.len());
        let mut points: Vec<Point> = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let key = (
                r.row.tenant_id.as_str(),
                r.row.device_id.as_str(),
                r.row.time.timestamp_micros(),
            );
            match index.get(&key) {
                None => {
                    index.insert(key, points.len());
                    points.push(Point {
                        readings: vec![i],
                        merged: None,
                    });
                }
                Some(&p) => {
                    let point = &mut points[p];
                    let merged = point
                        .merged
                        .get_or_insert_with(|| rows[point.readings[0]].row.clone());
                    merge_into(merged, &r.row);
                    point.readings.push(i);
                }
            }
        }
        points
    }
}

/// Merges `later` into `row` (same point): metrics unioned, `later`'s values winning.
fn merge_into(row: &mut Telemetry, later: &Telemetry) {
    for (name, value) in &later.metrics {
        row.metrics.insert(name.clone(), value.clone());
    }
    if later.site_id.is_some() {
        row.site_id.clone_from(&later.site_id);
    }
    row.msg_type.clone_from(&later.msg_type);
    row.seq = later.seq;
    row.received_at = later.received_at;
}

/// What a batch's readings did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Account {
    /// Points that did not exist before: rows inserted.
    pub new_points: u64,
    /// Readings that added or changed a metric of an existing point.
    pub merged: u64,
    /// Readings that changed nothing (every metric already there with the same value).
    pub duplicates: u64,
}

impl Account {
    /// Accounts `points` of `rows`, given the metrics already stored for those of their keys
    /// that existed (`stored`, absent keys did not exist).
    pub fn of(
        points: &[Point],
        rows: &[SourcedRow],
        stored: &HashMap<PointKey, serde_json::Map<String, Value>>,
    ) -> Account {
        let mut account = Account::default();
        for point in points {
            let first = &rows[point.readings[0]].row;
            let mut state: Option<serde_json::Map<String, Value>> = if stored.is_empty() {
                None
            } else {
                stored.get(&point_key(first)).cloned()
            };
            for &i in &point.readings {
                let metrics = &rows[i].row.metrics;
                match &mut state {
                    None => {
                        account.new_points += 1;
                        if point.readings.len() > 1 {
                            state = Some(
                                metrics
                                    .iter()
                                    .map(|(k, v)| (k.clone(), v.to_json()))
                                    .collect(),
                            );
                        }
                    }
                    Some(state) => {
                        let changes = metrics
                            .iter()
                            .any(|(k, v)| !state.get(k).is_some_and(|s| same_value(s, v)));
                        if changes {
                            account.merged += 1;
                            for (k, v) in metrics {
                                state.insert(k.clone(), v.to_json());
                            }
                        } else {
                            account.duplicates += 1;
                        }
                    }
                }
            }
        }
        account
    }
}

/// Whether a stored jsonb value equals a reading's value as jsonb compares them (numbers by
/// numeric value: `5` equals `5.0`).
fn same_value(stored: &Value, value: &MetricValue) -> bool {
    match (stored, value) {
        (Value::Null, MetricValue::Null) => true,
        (Value::Bool(a), MetricValue::Bool(b)) => a == b,
        (Value::String(a), MetricValue::String(b)) => a == b,
        (Value::Number(a), MetricValue::Long(b)) => match a.as_i64() {
            Some(a) => a == *b,
            None => a.as_f64() == Some(*b as f64) && (*b as f64).fract() == 0.0,
        },
        (Value::Number(a), MetricValue::Double(b)) => a.as_f64() == Some(*b),
        // A non-finite double is stored as null (it has no JSON form).
        (Value::Null, MetricValue::Double(b)) => !b.is_finite(),
        _ => false,
    }
}

/// A device's newest value per metric over a batch, for `device_latest` (see migration
/// 0011): `time` is the newest time of any metric, `metric_times` holds the metrics whose
/// newest value is older, in microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestState<'a> {
    /// The newest reading (largest time; at equal times the later): its site, type, seq and
    /// received_at describe the row.
    pub newest: &'a Telemetry,
    /// `None` in the usual case: the newest reading carries every metric the device's other
    /// readings in the batch carry, so its metrics, all at its time, are the state.
    pub merged: Option<MergedLatest<'a>>,
}

/// Metrics of a device's readings in a batch, when the newest does not carry them all.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedLatest<'a> {
    pub metrics: BTreeMap<&'a str, &'a MetricValue>,
    pub metric_times: BTreeMap<&'a str, i64>,
}

/// Each device's [`LatestState`] over `rows` (in partition order), sorted by (tenant, device):
/// a stable order keeps concurrent upserts from deadlocking on row locks. Allocates per
/// device only for devices whose newest reading lacks a metric of an earlier one.
pub fn latest_per_device<'a>(rows: &[&'a Telemetry]) -> Vec<LatestState<'a>> {
    // Pass 1: each device's newest reading, and whether all its readings carry the same
    // metric names (then the newest carries them all).
    let mut newest: HashMap<
        (&'a str, &'a str),
        (&'a Telemetry, bool),
        foldhash::fast::RandomState,
    > = HashMap::with_capacity_and_hasher(rows.len(), Default::default());
    for row in rows {
        newest
            .entry((row.tenant_id.as_str(), row.device_id.as_str()))
            .and_modify(|(best, uniform)| {
                *uniform = *uniform && row.metrics.keys().eq(best.metrics.keys());
                if row.time >= best.time {
                    *best = row;
                }
            })
            .or_insert((row, true));
    }
    // Pass 2: devices with a reading holding a metric their newest lacks; pass 3: fold those
    // devices' readings per metric.
    let mut merged: HashMap<(&'a str, &'a str), Folded<'a>> = HashMap::new();
    let all_uniform = newest.values().all(|(_, uniform)| *uniform);
    for row in rows.iter().filter(|_| !all_uniform) {
        let key = (row.tenant_id.as_str(), row.device_id.as_str());
        let (best, uniform) = newest[&key];
        if !uniform && !row.metrics.keys().all(|k| best.metrics.contains_key(k)) {
            merged.entry(key).or_default();
        }
    }
    if !merged.is_empty() {
        for row in rows {
            if let Some(acc) = merged.get_mut(&(row.tenant_id.as_str(), row.device_id.as_str())) {
                fold(acc, row);
            }
        }
    }
    let mut states: Vec<LatestState<'a>> = newest
        .into_iter()
        .map(|(key, (newest, _))| LatestState {
            newest,
            merged: merged.remove(&key).map(|acc| {
                let newest_us = newest.time.timestamp_micros();
                MergedLatest {
                    metric_times: acc
                        .iter()
                        .filter(|(_, (_, t))| *t < newest_us)
                        .map(|(k, (_, t))| (*k, *t))
                        .collect(),
                    metrics: acc.into_iter().map(|(k, (v, _))| (k, v)).collect(),
                }
            }),
        })
        .collect();
    states.sort_unstable_by(|a, b| {
        (&a.newest.tenant_id, &a.newest.device_id).cmp(&(&b.newest.tenant_id, &b.newest.device_id))
    });
    states
}

/// Which of `rows` (in partition order) can still change [`latest_per_device`]'s outcome:
/// of a device whose readings all carry the same metric names, only its newest (largest
/// time; at equal times the later); of any other device, all. Lets readings that wait for
/// `device_latest` be thinned out without changing what it gets.
pub fn needed_for_latest(rows: &[&Telemetry]) -> Vec<bool> {
    let mut newest: HashMap<(&str, &str), (usize, bool), foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(rows.len() / 2, Default::default());
    for (i, row) in rows.iter().enumerate() {
        newest
            .entry((row.tenant_id.as_str(), row.device_id.as_str()))
            .and_modify(|(best, uniform)| {
                let current = rows[*best];
                *uniform = *uniform && row.metrics.keys().eq(current.metrics.keys());
                if row.time >= current.time {
                    *best = i;
                }
            })
            .or_insert((i, true));
    }
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let (best, uniform) = newest[&(row.tenant_id.as_str(), row.device_id.as_str())];
            !uniform || best == i
        })
        .collect()
}

/// Per metric, its newest value and that value's time (µs).
type Folded<'a> = BTreeMap<&'a str, (&'a MetricValue, i64)>;

/// Per metric, the later time wins; at equal times the later reading.
fn fold<'a>(acc: &mut Folded<'a>, row: &'a Telemetry) {
    let time = row.time.timestamp_micros();
    for (name, value) in &row.metrics {
        let slot = acc.entry(name.as_str()).or_insert((value, time));
        if time >= slot.1 {
            *slot = (value, time);
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    fn reading(device: &str, second: u32, seq: i64, metrics: &[(&str, MetricValue)]) -> SourcedRow {
        SourcedRow {
            row: Telemetry {
                tenant_id: "t".into(),
                device_id: device.into(),
                site_id: None,
                msg_type: "telemetry".into(),
                seq,
                time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second).unwrap(),
                received_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second).unwrap(),
                metrics: metrics
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            },
            partition: 0,
            offset: seq,
            payload: Vec::new(),
        }
    }

    fn d(v: f64) -> MetricValue {
        MetricValue::Double(v)
    }

    #[test]
    fn readings_of_one_point_merge_later_winning() {
        let rows = vec![
            reading("a", 1, 1, &[("temperature", d(20.0))]),
            reading("b", 1, 2, &[("temperature", d(5.0))]),
            reading("a", 1, 3, &[("humidity", d(40.0))]),
            reading("a", 1, 4, &[("temperature", d(21.0))]),
            reading("a", 2, 5, &[("temperature", d(22.0))]),
        ];
        let points = Point::group(&rows);
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].readings, vec![0, 2, 3]);
        let merged = points[0].row(&rows);
        assert_eq!(merged.metrics.len(), 2);
        assert_eq!(merged.metrics["temperature"], d(21.0));
        assert_eq!(merged.metrics["humidity"], d(40.0));
        assert_eq!(merged.seq, 4);
        assert_eq!(points[1].row(&rows), &rows[1].row);
        assert_eq!(points[2].readings, vec![4]);
    }

    #[test]
    fn each_reading_is_new_merged_or_duplicate() {
        let rows = vec![
            reading("a", 1, 1, &[("temperature", d(20.0))]),
            reading("a", 1, 2, &[("temperature", d(20.0))]), // exact re-send
            reading("a", 1, 3, &[("humidity", d(40.0))]),    // merges
            reading("a", 1, 4, &[("temperature", d(21.0))]), // changes a value
            reading("b", 1, 5, &[("temperature", MetricValue::Long(5))]),
        ];
        let points = Point::group(&rows);
        let none = HashMap::new();
        assert_eq!(
            Account::of(&points, &rows, &none),
            Account {
                new_points: 2,
                merged: 2,
                duplicates: 1
            }
        );
        // b's point existed with 5.0 (numerically equal), a's with humidity only.
        let mut stored = HashMap::new();
        stored.insert(
            point_key(&rows[4].row),
            serde_json::from_str(r#"{"temperature": 5.0}"#).unwrap(),
        );
        stored.insert(
            point_key(&rows[0].row),
            serde_json::from_str(r#"{"humidity": 40}"#).unwrap(),
        );
        assert_eq!(
            Account::of(&points, &rows, &stored),
            Account {
                new_points: 0,
                merged: 2,
                duplicates: 3
            }
        );
    }

    #[test]
    fn a_newest_reading_with_every_metric_is_the_state() {
        let rows = [
            reading("a", 3, 1, &[("temperature", d(20.0))]),
            reading(
                "a",
                5,
                2,
                &[("temperature", d(21.0)), ("humidity", d(40.0))],
            ),
            reading("b", 4, 3, &[("temperature", d(1.0))]),
        ];
        let refs: Vec<&Telemetry> = rows.iter().map(|r| &r.row).collect();
        let states = latest_per_device(&refs);
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].newest.seq, 2);
        assert_eq!(states[0].merged, None);
        assert_eq!(states[1].newest.seq, 3);
        assert_eq!(states[1].merged, None);
    }

    #[test]
    fn thinning_keeps_what_device_latest_needs() {
        let rows = [
            reading("a", 5, 1, &[("temperature", d(20.0))]),
            reading("b", 3, 2, &[("temperature", d(1.0))]),
            reading("a", 5, 3, &[("temperature", d(21.0))]),
            reading("a", 4, 4, &[("temperature", d(22.0))]),
            reading("c", 1, 5, &[("temperature", d(1.0)), ("humidity", d(2.0))]),
            reading("c", 2, 6, &[("temperature", d(3.0))]),
            reading("b", 6, 7, &[("temperature", d(2.0))]),
        ];
        let refs: Vec<&Telemetry> = rows.iter().map(|r| &r.row).collect();
        let keep = needed_for_latest(&refs);
        // a: the later of the two at second 5; b: the newest; c: both (not the same metrics).
        assert_eq!(keep, [false, false, true, false, true, true, true]);
        let kept: Vec<&Telemetry> = refs
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| *r)
            .collect();
        assert_eq!(latest_per_device(&kept), latest_per_device(&refs));
    }

    #[test]
    fn latest_keeps_each_metrics_newest_value_and_time() {
        let rows = [
            reading(
                "a",
                3,
                1,
                &[("temperature", d(20.0)), ("humidity", d(40.0))],
            ),
            reading("a", 5, 2, &[("temperature", d(21.0))]),
            reading("a", 4, 3, &[("temperature", d(99.0)), ("pressure", d(1.0))]),
            reading("a", 5, 4, &[("temperature", d(22.0))]),
        ];
        let refs: Vec<&Telemetry> = rows.iter().map(|r| &r.row).collect();
        let states = latest_per_device(&refs);
        assert_eq!(states.len(), 1);
        assert_eq!(
            states[0].newest.seq, 4,
            "equal times: the later reading is the newest"
        );
        let s = states[0]
            .merged
            .as_ref()
            .expect("the newest lacks humidity and pressure");
        assert_eq!(s.metrics["temperature"], &d(22.0));
        assert_eq!(s.metrics["humidity"], &d(40.0));
        assert_eq!(s.metrics["pressure"], &d(1.0));
        let second = |s: u32| {
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, s)
                .unwrap()
                .timestamp_micros()
        };
        assert_eq!(
            s.metric_times,
            BTreeMap::from([("humidity", second(3)), ("pressure", second(4))])
        );
    }
}
