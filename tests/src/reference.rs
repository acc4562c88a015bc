//! An independent reference evaluation of alert rules, to check the alerts evaluator-stream
//! wrote against what a deliberately simple implementation derives from the same readings.
//!
//! It shares no code with evaluator-stream: it is written from the documented semantics
//! (ARCHITECTURE.md "evaluator-stream: replay-safe alerts on the stream", README.md's
//! `EVALUATOR_*` rows, the `alert_rules` / `alerts` tables of `schemas/migrations`), with
//! `evaluator-stream/src/engine.rs` read only to settle boundaries. Everything is a plain loop
//! over plain maps; it is meant to be obviously right, not fast.
//!
//! # Semantics modelled
//!
//! * **Rules**: `threshold` and `window` rules (`avg`, `min`, `max`, `count`) that are
//!   `enabled`, scoped to their tenant and, when set, to one `device_id` and/or one `site_id`
//!   (the reading's `site_id`). `for_s` and `resolve_threshold` apply to both kinds. Rules are
//!   taken as they are when loaded: a rule changed during the run is not modelled.
//!   **`no_data` rules are not modelled** (they depend on the wall clock through
//!   `EVALUATOR_IDLE_TIMEOUT`); compare without their alerts, see [`excluded_rule_ids`].
//! * **Values**: a metric's value is a long, a finite double, or a boolean as 0/1; anything
//!   else (missing, null, string, NaN, ±∞) is no value. A threshold rule is evaluated on each
//!   reading carrying a value of its metric; a window rule likewise, its value being the
//!   aggregate of the device's values of the metric with time in `(t − window, t]`.
//! * **Comparisons**: `value op threshold` with `>`, `>=`, `<`, `<=`, `==`, `!=`.
//! * **Lifecycle** per (rule, device): when the condition holds and nothing is open, an
//!   episode starts at the reading's time `t` (`started_at = t`); with `for_s = 0` it fires at
//!   once (`fired_at = t`), otherwise it is pending until `t + for_s`. A pending episode whose
//!   condition no longer holds resolves without firing. A firing one resolves when
//!   `!(value op resolve_threshold)` (hysteresis; `threshold` when unset). `resolved_at` is
//!   the time of the reading that resolved it.
//! * **Clock** per Kafka partition: the highest reading time seen. When a reading moves it
//!   forward, every pending episode of that partition whose deadline (`started + for_s`) is at
//!   or before the new clock fires first, with `fired_at` = its deadline, and only then is the
//!   reading evaluated (so a reading exactly at the deadline that breaks the condition sees a
//!   firing episode and needs the resolve threshold to end it).
//! * **Lateness**: a reading older than `clock − allowed_lateness` is dropped (it does not
//!   count anywhere). One older than its device's newest reading but within the lateness joins
//!   the device's windows and is not evaluated: the state already reflects a newer reading. A
//!   reading at the same time as its device's newest counts as in order.
//!
//! # Not modelled (so a comparison should avoid them)
//!
//! * Device clocks ahead of ingest's: the evaluator moves a partition's clock by at most
//!   `min(time, received_at)` and runs a fast device's deadlines on that clock (issue 14,
//!   ARCHITECTURE.md). The reference moves it by `time`, which is the same for every reading
//!   with `time <= received_at` — every reading the simulator sends.
//! * The wall-clock move of an idle partition (`EVALUATOR_IDLE_TIMEOUT`): an evaluator run
//!   with a short idle timeout may fire pending episodes at the end that the reference still
//!   holds pending. Run it with a long one, or call [`Reference::advance_clock`] with the clock
//!   the evaluator reached.
//! * The evaluator's window warm start from `telemetry` the first time it sees a device (and
//!   after a rule change): the reference starts with empty windows, which matches when the
//!   evaluator reads the topic from its beginning and the database held no earlier readings
//!   of the device than its first one on the topic.
//! * Rule changes, restarts and rebalances (the evaluator is built to make them invisible).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use schemas::{MetricValue, Telemetry};

/// Microseconds since the Unix epoch (event time), as PostgreSQL's `timestamptz` holds it.
pub type Micros = i64;

/// One row of `alert_rules` (schemas/migrations/0001_core.sql), as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RuleRow {
    pub rule_id: i64,
    pub tenant_id: String,
    pub name: String,
    /// Scope: only readings of this site (when set).
    pub site_id: Option<String>,
    /// Scope: only this device (when set).
    pub device_id: Option<String>,
    pub metric: Option<String>,
    /// `threshold`, `window` or `no_data`.
    pub kind: String,
    /// `avg`, `min`, `max` or `count` (window rules).
    pub agg: Option<String>,
    /// `>`, `>=`, `<`, `<=`, `==` or `!=`.
    pub op: Option<String>,
    pub threshold: Option<f64>,
    pub window_s: Option<i32>,
    pub for_s: i32,
    pub no_data_s: Option<i32>,
    pub resolve_threshold: Option<f64>,
    pub enabled: bool,
}

/// Every `alert_rules` row, by id. `pool` must see every tenant's rows (the owner or a
/// superuser: the table has row-level security).
pub async fn load_rules(pool: &sqlx::PgPool) -> anyhow::Result<Vec<RuleRow>> {
    sqlx::query_as(
        "SELECT rule_id, tenant_id::text AS tenant_id, name, site_id::text AS site_id, \
                device_id::text AS device_id, metric, kind, agg, op, threshold, window_s, for_s, \
                no_data_s, resolve_threshold, enabled \
         FROM alert_rules ORDER BY rule_id",
    )
    .fetch_all(pool)
    .await
    .context("reading alert_rules")
}

/// Rules whose alerts the reference does not derive: `no_data` rules (wall-clock driven) and
/// rows it cannot evaluate (missing fields; the table's CHECK constraints make these rare).
/// Disabled rules are *not* excluded: they must have no alerts, and that is checked.
pub fn excluded_rule_ids(rules: &[RuleRow]) -> Vec<i64> {
    rules
        .iter()
        .filter(|row| Rule::from_row(row).is_none())
        .map(|row| row.rule_id)
        .collect()
}

/// One alert episode of a (rule, device): a row of `alerts` (schemas/migrations/0001_core.sql),
/// with times in µs. `fired_at` is `None` for an episode that never fired; `resolved_at` is
/// `None` while it is open. Ordered by rule, tenant, device, start.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Episode {
    pub rule_id: i64,
    pub tenant_id: String,
    pub device_id: String,
    pub started_at: Micros,
    pub fired_at: Option<Micros>,
    pub resolved_at: Option<Micros>,
}

impl Episode {
    /// The `alerts.status` this episode has: `resolved`, `firing` or `pending`.
    pub fn status(&self) -> &'static str {
        match (self.fired_at, self.resolved_at) {
            (_, Some(_)) => "resolved",
            (Some(_), None) => "firing",
            (None, None) => "pending",
        }
    }
}

/// Every row of `alerts` except those of `exclude_rule_ids`, sorted. `pool` must see every
/// tenant's rows (the owner or a superuser).
pub async fn load_alert_episodes(
    pool: &sqlx::PgPool,
    exclude_rule_ids: &[i64],
) -> anyhow::Result<Vec<Episode>> {
    type Row = (
        i64,
        String,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT rule_id, tenant_id::text, device_id, started_at, fired_at, resolved_at \
         FROM alerts WHERE NOT (rule_id = ANY($1))",
    )
    .bind(exclude_rule_ids)
    .fetch_all(pool)
    .await
    .context("reading alerts")?;
    let mut episodes: Vec<Episode> = rows
        .into_iter()
        .map(
            |(rule_id, tenant_id, device_id, started, fired, resolved)| Episode {
                rule_id,
                tenant_id,
                device_id,
                started_at: started.timestamp_micros(),
                fired_at: fired.map(|t| t.timestamp_micros()),
                resolved_at: resolved.map(|t| t.timestamp_micros()),
            },
        )
        .collect();
    episodes.sort();
    Ok(episodes)
}

/// Expected against actual episodes, as multisets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertComparison {
    /// Number of expected episodes.
    pub expected: usize,
    /// Number of actual episodes.
    pub actual: usize,
    /// Expected but not found (sorted).
    pub missing: Vec<Episode>,
    /// Found but not expected (sorted).
    pub unexpected: Vec<Episode>,
}

impl AlertComparison {
    /// Whether both sides hold exactly the same episodes.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

/// Compares `expected` with `actual`, each episode counted as often as it occurs.
pub fn compare(expected: &[Episode], actual: &[Episode]) -> AlertComparison {
    let mut balance: BTreeMap<&Episode, i64> = BTreeMap::new();
    for e in expected {
        *balance.entry(e).or_default() += 1;
    }
    for a in actual {
        *balance.entry(a).or_default() -= 1;
    }
    let mut missing = Vec::new();
    let mut unexpected = Vec::new();
    for (episode, n) in balance {
        for _ in 0..n.max(0) {
            missing.push(episode.clone());
        }
        for _ in 0..(-n).max(0) {
            unexpected.push(episode.clone());
        }
    }
    AlertComparison {
        expected: expected.len(),
        actual: actual.len(),
        missing,
        unexpected,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agg {
    Avg,
    Min,
    Max,
    Count,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Threshold,
    Window { agg: Agg, window_us: Micros },
}

/// A rule the reference evaluates (enabled or not).
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    rule_id: i64,
    tenant_id: String,
    site_id: Option<String>,
    device_id: Option<String>,
    metric: String,
    kind: Kind,
    op: Op,
    threshold: f64,
    resolve_threshold: f64,
    for_us: Micros,
    enabled: bool,
}

const SECOND: Micros = 1_000_000;

impl Rule {
    /// `None` for `no_data` rules and rows missing what their kind needs.
    fn from_row(row: &RuleRow) -> Option<Rule> {
        let op = match row.op.as_deref()? {
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            "<=" => Op::Le,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            _ => return None,
        };
        let kind = match row.kind.as_str() {
            "threshold" => Kind::Threshold,
            "window" => {
                let agg = match row.agg.as_deref()? {
                    "avg" => Agg::Avg,
                    "min" => Agg::Min,
                    "max" => Agg::Max,
                    "count" => Agg::Count,
                    _ => return None,
                };
                let window_s = row.window_s.filter(|w| *w > 0)?;
                Kind::Window {
                    agg,
                    window_us: i64::from(window_s) * SECOND,
                }
            }
            _ => return None,
        };
        let threshold = row.threshold.filter(|t| t.is_finite())?;
        Some(Rule {
            rule_id: row.rule_id,
            tenant_id: row.tenant_id.clone(),
            site_id: row.site_id.clone(),
            device_id: row.device_id.clone(),
            metric: row.metric.clone()?,
            kind,
            op,
            threshold,
            resolve_threshold: row
                .resolve_threshold
                .filter(|t| t.is_finite())
                .unwrap_or(threshold),
            for_us: i64::from(row.for_s.max(0)) * SECOND,
            enabled: row.enabled,
        })
    }

    fn covers(&self, reading: &Telemetry) -> bool {
        self.enabled
            && self.tenant_id == reading.tenant_id
            && self
                .device_id
                .as_ref()
                .is_none_or(|d| *d == reading.device_id)
            && self
                .site_id
                .as_ref()
                .is_none_or(|s| reading.site_id.as_ref() == Some(s))
    }
}

/// A metric's numeric value: a long, a finite double, a boolean as 0/1.
fn value_of(reading: &Telemetry, metric: &str) -> Option<f64> {
    match reading.metrics.get(metric)? {
        MetricValue::Long(v) => Some(*v as f64),
        MetricValue::Double(v) if v.is_finite() => Some(*v),
        MetricValue::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// An open episode of one (rule, device).
#[derive(Debug, Clone)]
struct Open {
    started_at: Micros,
    fired_at: Option<Micros>,
}

#[derive(Debug, Default)]
struct Device {
    tenant_id: String,
    device_id: String,
    /// Time of the newest reading evaluated (in order).
    newest: Option<Micros>,
    /// Per metric read by a window rule: (time, value) in time order, readings of equal time
    /// in arrival order. Trimmed to the longest window over the metric.
    samples: HashMap<String, VecDeque<(Micros, f64)>>,
    /// Open episodes by rule index.
    open: BTreeMap<usize, Open>,
}

#[derive(Debug, Default)]
struct Partition {
    clock: Option<Micros>,
    devices: HashMap<(String, String), Device>,
    /// At or before the earliest deadline of a pending episode of this partition (it may be
    /// earlier than any: a resolved pending episode leaves it behind). Only saves scans.
    earliest_due: Option<Micros>,
}

/// What [`Reference::push`] did with readings, for the comparison's report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Readings pushed.
    pub readings: u64,
    /// Dropped as older than their partition's clock − allowed lateness.
    pub late_dropped: u64,
    /// Older than their device's newest reading but within the lateness: windows only.
    pub late_accepted: u64,
    /// Messages [`replay_topic`] could not decode (not pushed).
    pub undecodable: u64,
}

/// The reference evaluation: feed it readings with [`Reference::push`], then read
/// [`Reference::episodes`].
#[derive(Debug)]
pub struct Reference {
    rules: Vec<Rule>,
    /// See [`excluded_rule_ids`].
    excluded: Vec<i64>,
    /// Indices into `rules` of each tenant's enabled rules, in rule-id order.
    by_tenant: HashMap<String, Vec<usize>>,
    /// Per tenant: metric → longest window over it (the samples kept).
    windows: HashMap<String, HashMap<String, Micros>>,
    allowed_lateness: Micros,
    partitions: BTreeMap<i32, Partition>,
    closed: Vec<Episode>,
    counters: Counters,
}

impl Reference {
    /// A reference over `rules` (every row of `alert_rules`; `no_data` rules and rows that
    /// cannot be evaluated are ignored) with the evaluator's `EVALUATOR_ALLOWED_LATENESS`.
    pub fn new(rules: Vec<RuleRow>, allowed_lateness: Duration) -> Self {
        let excluded = excluded_rule_ids(&rules);
        let mut rules: Vec<Rule> = rules.iter().filter_map(Rule::from_row).collect();
        rules.sort_by_key(|r| r.rule_id);
        let mut by_tenant: HashMap<String, Vec<usize>> = HashMap::new();
        let mut windows: HashMap<String, HashMap<String, Micros>> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            if !rule.enabled {
                continue;
            }
            by_tenant.entry(rule.tenant_id.clone()).or_default().push(i);
            if let Kind::Window { window_us, .. } = rule.kind {
                let longest = windows
                    .entry(rule.tenant_id.clone())
                    .or_default()
                    .entry(rule.metric.clone())
                    .or_default();
                *longest = (*longest).max(window_us);
            }
        }
        Self {
            rules,
            excluded,
            by_tenant,
            windows,
            allowed_lateness: i64::try_from(allowed_lateness.as_micros()).unwrap_or(i64::MAX),
            partitions: BTreeMap::new(),
            closed: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// What happened to the readings so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// A partition's clock (highest reading time seen), if it has seen a reading.
    pub fn clock(&self, partition: i32) -> Option<Micros> {
        self.partitions.get(&partition).and_then(|p| p.clock)
    }

    /// Evaluates one reading of Kafka `partition`. Readings must be pushed in Kafka order
    /// within each partition; partitions may be pushed one after another or interleaved.
    pub fn push(&mut self, partition: i32, reading: &Telemetry) {
        self.counters.readings += 1;
        let t = reading.time.timestamp_micros();
        let lateness = self.allowed_lateness;
        let p = self.partitions.entry(partition).or_default();
        if p.clock
            .is_some_and(|clock| t < clock.saturating_sub(lateness))
        {
            self.counters.late_dropped += 1;
            return;
        }
        if p.clock.is_none_or(|clock| t > clock) {
            p.clock = Some(t);
            fire_due(&self.rules, p, t);
        }
        let Some(tenant_rules) = self.by_tenant.get(&reading.tenant_id) else {
            return;
        };
        let device = p
            .devices
            .entry((reading.tenant_id.clone(), reading.device_id.clone()))
            .or_insert_with(|| Device {
                tenant_id: reading.tenant_id.clone(),
                device_id: reading.device_id.clone(),
                ..Device::default()
            });

        // Every reading within the lateness joins the windows, in time order.
        if let Some(metrics) = self.windows.get(&reading.tenant_id) {
            for (metric, longest) in metrics {
                let samples = device.samples.entry(metric.clone()).or_default();
                if let Some(v) = value_of(reading, metric) {
                    let at = samples.partition_point(|(st, _)| *st <= t);
                    samples.insert(at, (t, v));
                }
                // Nothing at or before newest − longest can be in a window again: every later
                // evaluation is at a time at or after the newest sample.
                let newest = samples.back().map_or(t, |(st, _)| *st).max(t);
                while samples
                    .front()
                    .is_some_and(|(st, _)| *st <= newest.saturating_sub(*longest))
                {
                    samples.pop_front();
                }
            }
        }

        if device.newest.is_some_and(|newest| t < newest) {
            self.counters.late_accepted += 1;
            return;
        }
        device.newest = Some(t);

        for &i in tenant_rules {
            let rule = &self.rules[i];
            if !rule.covers(reading) {
                continue;
            }
            let Some(latest) = value_of(reading, &rule.metric) else {
                continue;
            };
            let value = match rule.kind {
                Kind::Threshold => Some(latest),
                Kind::Window { agg, window_us } => aggregate(
                    agg,
                    device
                        .samples
                        .get(&rule.metric)
                        .into_iter()
                        .flatten()
                        .filter(|(st, _)| *st > t.saturating_sub(window_us) && *st <= t)
                        .map(|(_, v)| *v),
                ),
            };
            let Some(value) = value else { continue };
            let holds = rule.op.holds(value, rule.threshold);
            let clears = !rule.op.holds(value, rule.resolve_threshold);
            match device.open.get(&i) {
                None if holds => {
                    let fired_at = (rule.for_us == 0).then_some(t);
                    device.open.insert(
                        i,
                        Open {
                            started_at: t,
                            fired_at,
                        },
                    );
                    if fired_at.is_none() {
                        let due = t.saturating_add(rule.for_us);
                        p.earliest_due = Some(p.earliest_due.map_or(due, |d| d.min(due)));
                    }
                }
                None => {}
                Some(open) => {
                    let ends = match open.fired_at {
                        None => !holds,
                        Some(_) => clears,
                    };
                    if ends {
                        self.closed.push(Episode {
                            rule_id: rule.rule_id,
                            tenant_id: device.tenant_id.clone(),
                            device_id: device.device_id.clone(),
                            started_at: open.started_at,
                            fired_at: open.fired_at,
                            resolved_at: Some(t),
                        });
                        device.open.remove(&i);
                    }
                }
            }
        }
    }

    /// Moves `partition`'s clock forward to `to` (never back), firing the pending episodes
    /// due by then, as the evaluator does when a partition has been idle for
    /// `EVALUATOR_IDLE_TIMEOUT` (its clock then goes to now − allowed lateness).
    pub fn advance_clock(&mut self, partition: i32, to: Micros) {
        let p = self.partitions.entry(partition).or_default();
        if p.clock.is_none_or(|clock| to > clock) {
            p.clock = Some(to);
            fire_due(&self.rules, p, to);
        }
    }

    /// Every episode so far, closed and open, sorted.
    pub fn episodes(&self) -> Vec<Episode> {
        let mut out = self.closed.clone();
        for p in self.partitions.values() {
            for device in p.devices.values() {
                for (&i, open) in &device.open {
                    out.push(Episode {
                        rule_id: self.rules[i].rule_id,
                        tenant_id: device.tenant_id.clone(),
                        device_id: device.device_id.clone(),
                        started_at: open.started_at,
                        fired_at: open.fired_at,
                        resolved_at: None,
                    });
                }
            }
        }
        out.sort();
        out
    }

    /// Rules whose alerts [`Reference::episodes`] does not derive (see
    /// [`excluded_rule_ids`]): pass them to [`load_alert_episodes`].
    pub fn excluded_rule_ids(&self) -> &[i64] {
        &self.excluded
    }
}

/// Fires every pending episode of `p` due at or before `clock`, at its deadline.
fn fire_due(rules: &[Rule], p: &mut Partition, clock: Micros) {
    if p.earliest_due.is_none_or(|due| due > clock) {
        return;
    }
    let mut earliest = None::<Micros>;
    for device in p.devices.values_mut() {
        for (&i, open) in device.open.iter_mut() {
            if open.fired_at.is_some() {
                continue;
            }
            let due = open.started_at.saturating_add(rules[i].for_us);
            if due <= clock {
                open.fired_at = Some(due);
            } else {
                earliest = Some(earliest.map_or(due, |e| e.min(due)));
            }
        }
    }
    p.earliest_due = earliest;
}

/// The aggregate of `values`: `None` when there are none, except `count`, which is then 0.
fn aggregate(agg: Agg, values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut n = 0u64;
    let mut sum = 0.0;
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    for v in values {
        n += 1;
        sum += v;
        min = min.min(v);
        max = max.max(v);
    }
    match agg {
        Agg::Count => Some(n as f64),
        _ if n == 0 => None,
        Agg::Avg => Some(sum / n as f64),
        Agg::Min => Some(min),
        Agg::Max => Some(max),
    }
}

/// How long [`replay_topic`] waits without a message before it gives up on a partition that
/// has not reached its end offset.
const REPLAY_STALL: Duration = Duration::from_secs(60);

/// Reads `topic` from its beginning to the end offsets it has when called, every partition,
/// and pushes each decodable reading into `reference` (Kafka order within a partition).
/// Undecodable messages are skipped and counted in [`Counters::undecodable`]. Returns the
/// number of messages read. Blocking: call it from `spawn_blocking` in async code.
///
/// A plain assigned consumer (no group membership, nothing committed); it holds one message
/// at a time, so topics of any size fit.
pub fn replay_topic(
    kafka: &plumbing::config::KafkaArgs,
    topic: &str,
    reference: &mut Reference,
) -> anyhow::Result<u64> {
    let mut config = plumbing::kafka::consumer_config(
        kafka,
        "fleetstream-reference",
        "fleetstream-reference-replay",
    );
    config.set("enable.partition.eof", "false");
    let consumer: BaseConsumer = config.create().context("creating the replay consumer")?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("fetching metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");

    // Per partition: the offset after the last message to read.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .with_context(|| format!("fetching the offsets of {topic}/{partition}"))?;
        if high > low {
            ends.insert(partition, high);
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .context("building the assignment")?;
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer
        .assign(&assignment)
        .context("assigning the partitions")?;

    let codec = schemas::telemetry_codec().context("loading the telemetry codec")?;
    let mut read = 0u64;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        let Some(result) = consumer.poll(Duration::from_millis(500)) else {
            // The last offsets before an end may hold no message (transaction markers): the
            // consumer's position then reaches the end without a message at end − 1.
            if let Ok(positions) = consumer.position() {
                for element in positions.elements_for_topic(topic) {
                    if let Offset::Offset(position) = element.offset() {
                        if ends
                            .get(&element.partition())
                            .is_some_and(|end| position >= *end)
                        {
                            ends.remove(&element.partition());
                        }
                    }
                }
                if ends.is_empty() {
                    break;
                }
            }
            anyhow::ensure!(
                last_progress.elapsed() < REPLAY_STALL,
                "replay of {topic} stalled with partitions {:?} unfinished",
                ends.keys().collect::<Vec<_>>()
            );
            continue;
        };
        let message = match result {
            Ok(message) => message,
            Err(err) => {
                anyhow::ensure!(
                    last_progress.elapsed() < REPLAY_STALL,
                    "replay of {topic} failing: {err}"
                );
                continue;
            }
        };
        last_progress = Instant::now();
        let partition = message.partition();
        let Some(&end) = ends.get(&partition) else {
            continue;
        };
        if message.offset() >= end {
            ends.remove(&partition);
            continue;
        }
        read += 1;
        match codec.decode(message.payload().unwrap_or_default()) {
            Ok(reading) => reference.push(partition, &reading),
            Err(_) => reference.counters.undecodable += 1,
        }
        if message.offset() + 1 >= end {
            ends.remove(&partition);
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const S: Micros = SECOND;
    const T0: Micros = 1_767_225_600 * S; // 2026-01-01T00:00:00Z

    fn rule(rule_id: i64, kind: &str, fields: &[(&str, &str)]) -> RuleRow {
        let mut row = RuleRow {
            rule_id,
            tenant_id: "t1".into(),
            name: format!("rule {rule_id}"),
            site_id: None,
            device_id: None,
            metric: Some("temp".into()),
            kind: kind.into(),
            agg: None,
            op: Some(">".into()),
            threshold: Some(30.0),
            window_s: None,
            for_s: 0,
            no_data_s: None,
            resolve_threshold: None,
            enabled: true,
        };
        for (field, value) in fields {
            match *field {
                "op" => row.op = Some((*value).into()),
                "threshold" => row.threshold = Some(value.parse().unwrap()),
                "resolve_threshold" => row.resolve_threshold = Some(value.parse().unwrap()),
                "for_s" => row.for_s = value.parse().unwrap(),
                "agg" => row.agg = Some((*value).into()),
                "window_s" => row.window_s = Some(value.parse().unwrap()),
                "no_data_s" => row.no_data_s = Some(value.parse().unwrap()),
                "metric" => row.metric = Some((*value).into()),
                "site_id" => row.site_id = Some((*value).into()),
                "device_id" => row.device_id = Some((*value).into()),
                "enabled" => row.enabled = value.parse().unwrap(),
                other => panic!("unknown field {other}"),
            }
        }
        row
    }

    fn reading(device: &str, at: Micros, temp: f64) -> Telemetry {
        let time = DateTime::<Utc>::from_timestamp_micros(at).unwrap();
        Telemetry {
            tenant_id: "t1".into(),
            device_id: device.into(),
            site_id: None,
            msg_type: "telemetry".into(),
            seq: 0,
            time,
            received_at: time,
            metrics: BTreeMap::from([("temp".to_owned(), MetricValue::Double(temp))]),
        }
    }

    fn reference(rules: Vec<RuleRow>) -> Reference {
        Reference::new(rules, Duration::from_secs(5))
    }

    /// Pushes `temp` readings of device d1, one per second from T0, on partition 0.
    fn feed(r: &mut Reference, values: &[f64]) {
        for (i, v) in (0i64..).zip(values) {
            r.push(0, &reading("d1", T0 + i * S, *v));
        }
    }

    /// An episode of device d1 with times in seconds after T0.
    fn ep(rule_id: i64, started: i64, fired: Option<i64>, resolved: Option<i64>) -> Episode {
        Episode {
            rule_id,
            tenant_id: "t1".into(),
            device_id: "d1".into(),
            started_at: T0 + started * S,
            fired_at: fired.map(|f| T0 + f * S),
            resolved_at: resolved.map(|r| T0 + r * S),
        }
    }

    #[test]
    fn a_threshold_fires_at_once_and_resolves_below_the_resolve_threshold() {
        let mut r = reference(vec![rule(1, "threshold", &[("resolve_threshold", "25")])]);
        // 31 fires; 28 and 26 are not above 30 but still above 25: firing holds; 25 resolves.
        // Then 31 starts a second episode that stays open.
        feed(&mut r, &[20.0, 31.0, 28.0, 26.0, 25.0, 20.0, 31.0]);
        assert_eq!(
            r.episodes(),
            vec![ep(1, 1, Some(1), Some(4)), ep(1, 6, Some(6), None)]
        );
    }

    #[test]
    fn without_a_resolve_threshold_the_threshold_resolves() {
        let mut r = reference(vec![rule(1, "threshold", &[("op", ">=")])]);
        feed(&mut r, &[30.0, 35.0, 29.9]);
        assert_eq!(r.episodes(), vec![ep(1, 0, Some(0), Some(2))]);
    }

    #[test]
    fn a_pending_episode_fires_at_its_deadline_when_the_clock_passes_it() {
        let mut r = reference(vec![rule(1, "threshold", &[("for_s", "3")])]);
        // Pending from 1 (deadline 4); the reading at 5 moves the clock past it: fired at 4.
        r.push(0, &reading("d1", T0, 20.0));
        r.push(0, &reading("d1", T0 + S, 31.0));
        r.push(0, &reading("d1", T0 + 2 * S, 31.0));
        assert_eq!(r.episodes(), vec![ep(1, 1, None, None)]);
        r.push(0, &reading("d1", T0 + 5 * S, 20.0));
        // The timer fires before the reading is evaluated, so 20 resolves a firing episode.
        assert_eq!(r.episodes(), vec![ep(1, 1, Some(4), Some(5))]);
    }

    #[test]
    fn another_device_on_the_partition_moves_the_clock_that_fires_a_pending_episode() {
        let mut r = reference(vec![rule(
            1,
            "threshold",
            &[("for_s", "3"), ("device_id", "d1")],
        )]);
        r.push(0, &reading("d1", T0, 31.0));
        r.push(0, &reading("d2", T0 + 10 * S, 99.0)); // out of the rule's scope
        assert_eq!(r.episodes(), vec![ep(1, 0, Some(3), None)]);
        // A reading on another partition does not move partition 0's clock.
        let mut r = reference(vec![rule(1, "threshold", &[("for_s", "3")])]);
        r.push(0, &reading("d1", T0, 31.0));
        r.push(1, &reading("d2", T0 + 10 * S, 20.0));
        assert_eq!(r.episodes(), vec![ep(1, 0, None, None)]);
    }

    #[test]
    fn a_pending_episode_whose_condition_breaks_resolves_without_firing() {
        let mut r = reference(vec![rule(1, "threshold", &[("for_s", "3")])]);
        // Blip at 1..2 (resolves at 3 unfired), then a run from 5 that fires at 8, ends at 10.
        feed(
            &mut r,
            &[
                20.0, 31.0, 32.0, 20.0, 20.0, 31.0, 31.0, 31.0, 31.0, 31.0, 20.0,
            ],
        );
        assert_eq!(
            r.episodes(),
            vec![ep(1, 1, None, Some(3)), ep(1, 5, Some(8), Some(10))]
        );
    }

    #[test]
    fn a_reading_exactly_at_the_deadline_fires_first() {
        let mut r = reference(vec![rule(1, "threshold", &[("for_s", "2")])]);
        feed(&mut r, &[31.0, 31.0, 20.0]);
        assert_eq!(r.episodes(), vec![ep(1, 0, Some(2), Some(2))]);
    }

    #[test]
    fn a_window_average_slides_over_the_last_window_s_seconds() {
        let mut r = reference(vec![rule(
            1,
            "window",
            &[("agg", "avg"), ("window_s", "3")],
        )]);
        // Window (t−3, t]: avg(20)=20, avg(20,40)=30 (not > 30), avg(20,40,40)=33.3 fires,
        // avg(40,40,20)=33.3, avg(40,20,20)=26.7 resolves.
        feed(&mut r, &[20.0, 40.0, 40.0, 20.0, 20.0]);
        assert_eq!(r.episodes(), vec![ep(1, 2, Some(2), Some(4))]);
    }

    #[test]
    fn window_min_max_and_count_follow_their_definitions() {
        let rules = vec![
            rule(
                1,
                "window",
                &[("agg", "max"), ("window_s", "2"), ("threshold", "50")],
            ),
            rule(
                2,
                "window",
                &[
                    ("agg", "min"),
                    ("window_s", "2"),
                    ("op", "<"),
                    ("threshold", "10"),
                ],
            ),
            rule(
                3,
                "window",
                &[
                    ("agg", "count"),
                    ("window_s", "10"),
                    ("op", ">="),
                    ("threshold", "3"),
                ],
            ),
        ];
        let mut r = reference(rules);
        // max over (t−2, t]: 60 at 1 stays in until t=3 → firing 1..3; min: 5 at 2, in until 4.
        // count over 10 s reaches 3 at t=2 and never falls.
        feed(&mut r, &[20.0, 60.0, 5.0, 20.0, 20.0]);
        assert_eq!(
            r.episodes(),
            vec![
                ep(1, 1, Some(1), Some(3)),
                ep(2, 2, Some(2), Some(4)),
                ep(3, 2, Some(2), None),
            ]
        );
    }

    #[test]
    fn a_reading_further_behind_than_the_lateness_is_dropped() {
        let mut r = reference(vec![rule(
            1,
            "window",
            &[("agg", "max"), ("window_s", "60")],
        )]);
        r.push(0, &reading("d1", T0 + 10 * S, 20.0));
        r.push(0, &reading("d1", T0 + 4 * S, 99.0)); // 6 s behind, lateness 5 s: dropped
        r.push(0, &reading("d1", T0 + 11 * S, 20.0));
        assert!(r.episodes().is_empty());
        assert_eq!(r.counters().late_dropped, 1);
        // Exactly at clock − lateness is still accepted, and joins the window.
        r.push(0, &reading("d1", T0 + 6 * S, 99.0));
        r.push(0, &reading("d1", T0 + 12 * S, 20.0));
        assert_eq!(r.episodes(), vec![ep(1, 12, Some(12), None)]);
        assert_eq!(r.counters().late_accepted, 1);
    }

    #[test]
    fn a_late_reading_within_the_lateness_does_not_move_threshold_state() {
        let mut r = reference(vec![rule(1, "threshold", &[])]);
        r.push(0, &reading("d1", T0 + 10 * S, 20.0));
        r.push(0, &reading("d1", T0 + 7 * S, 99.0)); // within 5 s, older than d1's newest
        assert!(r.episodes().is_empty());
        // A reading of another device, older than the clock but newer than that device's own
        // newest, is in order for its device and is evaluated.
        r.push(0, &reading("d2", T0 + 8 * S, 99.0));
        assert_eq!(
            r.episodes(),
            vec![Episode {
                device_id: "d2".into(),
                ..ep(1, 8, Some(8), None)
            }]
        );
        assert_eq!(r.counters().late_accepted, 1);
    }

    #[test]
    fn a_disabled_rule_makes_no_episodes_and_no_data_rules_are_excluded() {
        let rules = vec![
            rule(1, "threshold", &[("enabled", "false")]),
            rule(2, "no_data", &[("no_data_s", "10")]),
            rule(3, "threshold", &[("threshold", "90")]),
        ];
        assert_eq!(excluded_rule_ids(&rules), vec![2]);
        let mut r = reference(rules);
        feed(&mut r, &[99.0, 20.0]);
        r.push(0, &reading("d1", T0 + 100 * S, 20.0));
        assert_eq!(r.episodes(), vec![ep(3, 0, Some(0), Some(1))]);
    }

    #[test]
    fn site_and_tenant_scope_select_the_readings_a_rule_sees() {
        let mut r = reference(vec![rule(1, "threshold", &[("site_id", "s1")])]);
        let mut at_s1 = reading("d1", T0, 99.0);
        at_s1.site_id = Some("s1".into());
        let mut at_s2 = reading("d2", T0, 99.0);
        at_s2.site_id = Some("s2".into());
        let mut other_tenant = reading("d1", T0, 99.0);
        other_tenant.tenant_id = "t2".into();
        r.push(0, &at_s1);
        r.push(0, &at_s2);
        r.push(0, &reading("d3", T0, 99.0)); // no site
        r.push(0, &other_tenant);
        assert_eq!(r.episodes(), vec![ep(1, 0, Some(0), None)]);
    }

    #[test]
    fn advancing_an_idle_partition_fires_what_is_due() {
        let mut r = reference(vec![rule(1, "threshold", &[("for_s", "30")])]);
        r.push(0, &reading("d1", T0, 31.0));
        r.advance_clock(0, T0 + 29 * S);
        assert_eq!(r.episodes(), vec![ep(1, 0, None, None)]);
        r.advance_clock(0, T0 + 60 * S);
        assert_eq!(r.episodes(), vec![ep(1, 0, Some(30), None)]);
    }

    #[test]
    fn comparison_counts_duplicates_and_reports_both_sides() {
        let a = ep(1, 0, Some(0), Some(1));
        let b = ep(1, 5, None, Some(6));
        let c = ep(2, 0, Some(0), None);
        let exact = compare(&[a.clone(), b.clone()], &[b.clone(), a.clone()]);
        assert!(exact.is_exact());
        let off = compare(&[a.clone(), b.clone()], &[a.clone(), a.clone(), c.clone()]);
        assert!(!off.is_exact());
        assert_eq!((off.expected, off.actual), (2, 3));
        assert_eq!(off.missing, vec![b]);
        assert_eq!(off.unexpected, vec![a, c]);
    }
}
