//! The rule state machine: pure, deterministic, no I/O.
//!
//! State is kept per assigned partition: every device seen on it, each device's sliding
//! windows, its open alerts (pending or firing) and its no-data deadlines, plus the
//! partition's clock and a timer queue.
//!
//! Given the same messages in the same order (and the same warm-start data), the engine makes
//! the same transitions with the same event times, so a replay after a crash reproduces the
//! transitions the crashed run made, and their event ids (see [`Transition::event_id`]).
//! Timers fire from the partition clock as it advances with each message; only a partition
//! that has been silent for `idle_timeout` is advanced by the wall clock.
//!
//! # Two times per reading
//!
//! A reading carries `time` (the device's clock) and `received_at` (ingest's clock). Its
//! *event time* is `time`: the device's windows, thresholds, `for` durations and the alert
//! times are all measured in it, so a device is judged by its own readings whatever its
//! clock says. Its *contribution to the partition clock* is `min(time, received_at)`: the
//! partition clock (the highest contribution seen) can never run ahead of ingest's clock,
//! whatever one device's clock says. Ingest accepts readings up to `MAX_CLOCK_SKEW` in the
//! future; if such a reading moved the shared clock, every other device on the partition —
//! other tenants' included — would be "late" for that long and dropped. Bounded by
//! `received_at`, a fast device moves the clock no further than the moment ingest received
//! it, which every honest device's readings reach as well. Both times come from the message,
//! so a replay computes the same clock (the wall clock at processing time never enters it,
//! except through the idle-partition fallback above).
//!
//! Timers are kept in the partition clock's frame and stamped in the device's: a pending
//! alert of a reading with contribution `c` and event time `t` is due when the partition
//! clock reaches `c + for` and fires with event time `t + for` (the same for a no-data
//! deadline, from the device's last reading). For a device whose clock is right (`time ≤
//! received_at`) the two frames are one and nothing changes; a device whose clock runs
//! ahead gets its `for` and no-data deadlines on time rather than its skew late. A device's
//! own reading at or past a pending deadline (in its own time) fires it too, so a pending
//! alert restored after a restart (whose deadline is known only in event time) fires at the
//! same reading it did in the uninterrupted run when the device's skew is steady.
//!
//! Lateness: a reading whose contribution is older than `clock - allowed_lateness` is dropped
//! (counted). Since the clock is bounded by ingest time, a reading is dropped only for its
//! own delay or its own slow clock, never because of another device. One older than its
//! device's newest reading but within the lateness joins the device's windows (counted) and
//! does not move threshold state, which already reflects a newer reading.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use schemas::{MetricValue, Telemetry};

use crate::rules::{Condition, HashMap, Rule, RuleSet};

/// Microseconds since the Unix epoch (event time).
pub type Micros = i64;

/// Lifecycle status of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Status::Pending,
            "firing" => Status::Firing,
            "resolved" => Status::Resolved,
            _ => return None,
        })
    }
}

/// One lifecycle step of one (rule, device) alert.
#[derive(Debug, Clone)]
pub struct Transition {
    pub rule: Arc<Rule>,
    pub partition: i32,
    pub tenant_id: String,
    pub device_id: String,
    pub site_id: Option<String>,
    pub from: Option<Status>,
    pub to: Status,
    /// Event time the episode began (the first pending or firing).
    pub started_at: Micros,
    /// Event time of this step.
    pub time: Micros,
    pub value: Option<f64>,
    /// Ingest time of the message that caused the step (none for timer-driven steps).
    pub received_at: Option<Micros>,
}

impl Transition {
    /// Stable across replays: the rule, the device, the episode and the step. Consumers of
    /// `alerts.v1` deduplicate on it; the outbox's unique key does too.
    pub fn event_id(&self) -> String {
        format!(
            "{}:{}/{}:{}:{}",
            self.rule.rule_id,
            self.tenant_id,
            self.device_id,
            self.started_at,
            self.to.as_str()
        )
    }
}

/// Timing settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// How far behind a partition's clock a message may be and still count.
    pub allowed_lateness: Duration,
    /// A partition without messages for this long has its clock advanced by the wall clock.
    pub idle_timeout: Duration,
}

/// Counters since start, read by the service for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub evaluations: u64,
    pub late_accepted: u64,
    pub late_dropped: u64,
}

#[derive(Debug, Clone)]
struct OpenAlert {
    status: Status,
    started_at: Micros,
    /// When a pending alert fires if its condition still holds.
    due: Option<Deadline>,
    value: Option<f64>,
}

/// A timer's deadline in both frames (see the module doc): `at` on the partition clock (the
/// timer queue's key), `time` in the device's event time (the transition's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deadline {
    at: Micros,
    time: Micros,
}

impl Deadline {
    /// `span` after a reading with contribution `at` and event time `time`.
    fn after(at: Micros, time: Micros, span: Micros) -> Self {
        Self {
            at: at.saturating_add(span),
            time: time.saturating_add(span),
        }
    }

    /// A deadline known only in event time (warm start): both frames alike.
    fn at_event_time(time: Micros) -> Self {
        Self { at: time, time }
    }
}

/// A reading's contribution to its partition's clock: its device time, bounded by the time
/// ingest received it, so no device can move the shared clock past ingest's.
pub fn clock_contribution(message: &Telemetry) -> Micros {
    message
        .time
        .timestamp_micros()
        .min(message.received_at.timestamp_micros())
}

#[derive(Debug)]
struct DeviceState {
    tenant_id: String,
    device_id: String,
    site_id: Option<String>,
    /// Event time of the newest in-order reading.
    last_time: Option<Micros>,
    /// That reading's contribution to the partition clock.
    last_at: Option<Micros>,
    /// Whether the windows hold what the database had before this device's first message.
    windows_warm: bool,
    /// Per metric: (time, value), ascending by time.
    windows: HashMap<String, VecDeque<(Micros, f64)>>,
    open: HashMap<i64, OpenAlert>,
    /// No-data rules: when the silence reaches the rule's length.
    silence_due: HashMap<i64, Deadline>,
}

impl DeviceState {
    fn new(tenant_id: &str, device_id: &str, site_id: Option<&str>) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            device_id: device_id.to_owned(),
            site_id: site_id.map(str::to_owned),
            last_time: None,
            last_at: None,
            windows_warm: false,
            windows: HashMap::default(),
            open: HashMap::default(),
            silence_due: HashMap::default(),
        }
    }
}

/// Timer queue entry: (due on the partition clock, rule, device key). Ordered, so timers fire
/// deterministically.
type Timer = (Micros, i64, String);

#[derive(Debug)]
struct PartitionState {
    /// The highest clock contribution seen (see the module doc), or the idle fallback's move.
    clock: Option<Micros>,
    devices: HashMap<String, DeviceState>,
    timers: BTreeSet<Timer>,
    last_message: Instant,
    /// Read to the end of the partition, nothing newer yet.
    at_end: bool,
    /// Offset after the last processed message.
    next_offset: Option<i64>,
    /// What `consumer_offsets` holds (the fence's expectation).
    stored_offset: Option<i64>,
}

/// A partition's progress to store with the transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionProgress {
    pub partition: i32,
    /// Stored offset the update is fenced on (`None`: no row yet).
    pub expected: Option<i64>,
    pub next: i64,
    pub clock: Option<Micros>,
}

/// Everything one commit stores.
#[derive(Debug, Default)]
pub struct CommitUnit {
    pub transitions: Vec<Transition>,
    pub progress: Vec<PartitionProgress>,
}

impl CommitUnit {
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && self.progress.is_empty()
    }

    /// Drops what belongs to `partitions` (fenced: another instance owns them now).
    pub fn without(&mut self, partitions: &[i32]) {
        self.transitions
            .retain(|t| !partitions.contains(&t.partition));
        self.progress.retain(|p| !partitions.contains(&p.partition));
    }
}

/// Numeric reading of a metric: numbers, and booleans as 0/1; anything else is no reading.
pub fn numeric(value: Option<&MetricValue>) -> Option<f64> {
    match value? {
        MetricValue::Long(v) => Some(*v as f64),
        MetricValue::Double(v) if v.is_finite() => Some(*v),
        MetricValue::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// A device the engine needs window history for before it can evaluate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColdDevice {
    pub partition: i32,
    pub tenant_id: String,
    pub device_id: String,
    /// Time of the device's first message now being processed: history is what came before.
    pub before: Micros,
    /// Metric → longest window over it.
    pub metrics: Vec<(String, Micros)>,
}

/// The evaluator's state.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    rules: Arc<RuleSet>,
    partitions: HashMap<i32, PartitionState>,
    pending: Vec<Transition>,
    counters: Counters,
}

fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Engine {
    pub fn new(config: EngineConfig, rules: Arc<RuleSet>) -> Self {
        Self {
            config,
            rules,
            partitions: HashMap::default(),
            pending: Vec::new(),
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// Assigned partitions.
    pub fn partitions(&self) -> Vec<i32> {
        let mut p: Vec<i32> = self.partitions.keys().copied().collect();
        p.sort_unstable();
        p
    }

    /// A partition's event-time clock.
    pub fn clock(&self, partition: i32) -> Option<Micros> {
        self.partitions.get(&partition).and_then(|p| p.clock)
    }

    pub fn is_assigned(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Starts (or restarts) a partition from its stored offset and clock.
    pub fn assign(&mut self, partition: i32, stored_offset: Option<i64>, clock: Option<Micros>) {
        self.pending.retain(|t| t.partition != partition);
        self.partitions.insert(
            partition,
            PartitionState {
                clock,
                devices: HashMap::default(),
                timers: BTreeSet::new(),
                last_message: Instant::now(),
                at_end: false,
                next_offset: None,
                stored_offset,
            },
        );
    }

    /// Forgets a partition (after its last commit, or because another instance owns it).
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.pending.retain(|t| t.partition != partition);
    }

    /// Warm start: an alert that was open when the partition was assigned.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_open_alert(
        &mut self,
        partition: i32,
        tenant_id: &str,
        device_id: &str,
        site_id: Option<&str>,
        rule_id: i64,
        status: Status,
        started_at: Micros,
        value: Option<f64>,
    ) {
        let rules = self.rules.clone();
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let key = schemas::message_key(tenant_id, device_id);
        let dev = ps
            .devices
            .entry(key.clone())
            .or_insert_with(|| DeviceState::new(tenant_id, device_id, site_id));
        let mut open = OpenAlert {
            status,
            started_at,
            due: None,
            value,
        };
        match rules.by_id.get(&rule_id) {
            Some(rule) if rule.enabled => {
                if status == Status::Pending {
                    // Known in event time only: `received_at` of the reading that opened it
                    // is not stored. The device's own readings fire it on time (see
                    // `fire_own_pending`); the partition clock only once it reaches it.
                    let due = Deadline::at_event_time(started_at.saturating_add(rule.for_us));
                    open.due = Some(due);
                    ps.timers.insert((due.at, rule_id, key));
                }
                dev.open.insert(rule_id, open);
            }
            Some(rule) => {
                // Disabled while open: resolve it at the partition's clock.
                let time = ps.clock.unwrap_or(started_at).max(started_at);
                self.pending.push(transition(
                    rule,
                    partition,
                    dev,
                    Some(status),
                    Status::Resolved,
                    started_at,
                    time,
                    value,
                    None,
                ));
            }
            None => {}
        }
    }

    /// Warm start for no-data rules: a device's last reading time, capped at the partition's
    /// clock (readings after it will be read again from Kafka).
    pub fn restore_last_seen(
        &mut self,
        partition: i32,
        tenant_id: &str,
        device_id: &str,
        site_id: Option<&str>,
        last_seen: Micros,
    ) {
        let rules = self.rules.clone();
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        let last_seen = ps.clock.map_or(last_seen, |c| c.min(last_seen));
        let key = schemas::message_key(tenant_id, device_id);
        let dev = ps
            .devices
            .entry(key.clone())
            .or_insert_with(|| DeviceState::new(tenant_id, device_id, site_id));
        // Only the no-data deadline: `last_time` orders this device's readings and is set by
        // the readings themselves (the stored latest one may lie ahead of the stream).
        let last_seen = dev.last_time.map_or(last_seen, |t| t.max(last_seen));
        for rule in rules.of_tenant(tenant_id) {
            if let Condition::NoData { silence_us, .. } = rule.condition {
                if rule.applies_to(device_id, site_id) && !dev.open.contains_key(&rule.rule_id) {
                    let due = Deadline::at_event_time(last_seen.saturating_add(silence_us));
                    dev.silence_due.insert(rule.rule_id, due);
                    ps.timers.insert((due.at, rule.rule_id, key.clone()));
                }
            }
        }
    }

    /// Whether `message`'s device needs window history first (see [`Engine::warm`]).
    pub fn cold(&self, partition: i32, message: &Telemetry) -> Option<ColdDevice> {
        let ps = self.partitions.get(&partition)?;
        let windows = self.rules.windows_of(&message.tenant_id)?;
        let key = schemas::message_key(&message.tenant_id, &message.device_id);
        if ps.devices.get(&key).is_some_and(|d| d.windows_warm) {
            return None;
        }
        let mut metrics: Vec<(String, Micros)> =
            windows.iter().map(|(m, w)| (m.clone(), *w)).collect();
        metrics.sort();
        Some(ColdDevice {
            partition,
            tenant_id: message.tenant_id.clone(),
            device_id: message.device_id.clone(),
            before: message.time.timestamp_micros(),
            metrics,
        })
    }

    /// Fills a cold device's windows with readings from the database (time, metric → value),
    /// ascending by time.
    pub fn warm(
        &mut self,
        cold: &ColdDevice,
        site_id: Option<&str>,
        history: &[(Micros, BTreeMap<String, f64>)],
    ) {
        let Some(ps) = self.partitions.get_mut(&cold.partition) else {
            return;
        };
        let key = schemas::message_key(&cold.tenant_id, &cold.device_id);
        let dev = ps
            .devices
            .entry(key)
            .or_insert_with(|| DeviceState::new(&cold.tenant_id, &cold.device_id, site_id));
        dev.windows.clear();
        for (metric, longest) in &cold.metrics {
            let from = cold.before.saturating_sub(*longest);
            let samples: VecDeque<(Micros, f64)> = history
                .iter()
                .filter(|(t, _)| *t > from && *t < cold.before)
                .filter_map(|(t, values)| values.get(metric).map(|v| (*t, *v)))
                .collect();
            dev.windows.insert(metric.clone(), samples);
        }
        dev.windows_warm = true;
    }

    /// Moves past a message that could not be decoded.
    pub fn skip(&mut self, partition: i32, offset: i64) {
        if let Some(ps) = self.partitions.get_mut(&partition) {
            ps.last_message = Instant::now();
            ps.at_end = false;
            ps.next_offset = Some(offset + 1);
            self.counters.messages += 1;
        }
    }

    /// Evaluates one message of `partition` at `offset`.
    pub fn process(&mut self, partition: i32, offset: i64, message: &Telemetry) {
        let rules = self.rules.clone();
        let lateness = micros(self.config.allowed_lateness);
        let Some(ps) = self.partitions.get_mut(&partition) else {
            return;
        };
        ps.last_message = Instant::now();
        ps.at_end = false;
        ps.next_offset = Some(offset + 1);
        self.counters.messages += 1;
        let t = message.time.timestamp_micros();
        // What this reading may do to the shared clock: never more than ingest's time.
        let at = clock_contribution(message);
        if ps
            .clock
            .is_some_and(|clock| at < clock.saturating_sub(lateness))
        {
            self.counters.late_dropped += 1;
            return;
        }
        if ps.clock.is_none_or(|clock| at > clock) {
            ps.clock = Some(at);
            fire_timers(&rules, partition, ps, at, &mut self.pending);
        }
        let tenant_rules = rules.of_tenant(&message.tenant_id);
        if tenant_rules.is_empty() {
            return;
        }
        let key = schemas::message_key(&message.tenant_id, &message.device_id);
        let dev = ps.devices.entry(key.clone()).or_insert_with(|| {
            DeviceState::new(
                &message.tenant_id,
                &message.device_id,
                message.site_id.as_deref(),
            )
        });
        // Lateness per device, in its own time: as behind the partition clock, a reading
        // further behind its device's newest one is dropped. For a device whose clock is right
        // this never adds a drop (its newest reading is at or before the partition clock); for
        // one whose clock runs ahead it keeps the rule the shared clock used to enforce.
        if dev
            .last_time
            .is_some_and(|last| t < last.saturating_sub(lateness))
        {
            self.counters.late_dropped += 1;
            return;
        }
        if dev.site_id != message.site_id {
            dev.site_id.clone_from(&message.site_id);
        }
        let in_order = dev.last_time.is_none_or(|last| t >= last);
        if !in_order {
            self.counters.late_accepted += 1;
        }
        if let Some(windows) = rules.windows_of(&message.tenant_id) {
            for (metric, longest) in windows {
                if !dev.windows.contains_key(metric) {
                    dev.windows.insert(metric.clone(), VecDeque::new());
                }
                let Some(samples) = dev.windows.get_mut(metric) else {
                    continue;
                };
                if let Some(v) = numeric(message.metrics.get(metric)) {
                    let at = samples.partition_point(|(st, _)| *st <= t);
                    samples.insert(at, (t, v));
                }
                let newest = samples.back().map_or(t, |(st, _)| *st).max(t);
                while samples
                    .front()
                    .is_some_and(|(st, _)| *st <= newest.saturating_sub(*longest))
                {
                    samples.pop_front();
                }
            }
        }
        if !in_order {
            return;
        }
        if !dev.open.is_empty() {
            fire_own_pending(
                &rules,
                partition,
                &key,
                dev,
                &mut ps.timers,
                t,
                &mut self.pending,
            );
        }
        dev.last_time = Some(t);
        dev.last_at = Some(at);
        let received = Some(message.received_at.timestamp_micros());
        for rule in tenant_rules {
            if !rule.applies_to(&message.device_id, message.site_id.as_deref()) {
                continue;
            }
            self.counters.evaluations += 1;
            match &rule.condition {
                Condition::Threshold {
                    metric,
                    op,
                    threshold,
                } => {
                    if let Some(v) = numeric(message.metrics.get(metric)) {
                        let holds = op.holds(v, *threshold);
                        let clears = !op.holds(v, rule.resolve_threshold.unwrap_or(*threshold));
                        step(
                            rule,
                            partition,
                            &key,
                            dev,
                            &mut ps.timers,
                            (at, t),
                            holds,
                            clears,
                            v,
                            received,
                            &mut self.pending,
                        );
                    }
                }
                Condition::Window {
                    metric,
                    agg,
                    window_us,
                    op,
                    threshold,
                } => {
                    if numeric(message.metrics.get(metric)).is_none() {
                        continue;
                    }
                    let from = t.saturating_sub(*window_us);
                    let value = dev.windows.get(metric).and_then(|samples| {
                        agg.apply(
                            samples
                                .iter()
                                .filter(|(st, _)| *st > from && *st <= t)
                                .map(|(_, v)| *v),
                        )
                    });
                    if let Some(v) = value {
                        let holds = op.holds(v, *threshold);
                        let clears = !op.holds(v, rule.resolve_threshold.unwrap_or(*threshold));
                        step(
                            rule,
                            partition,
                            &key,
                            dev,
                            &mut ps.timers,
                            (at, t),
                            holds,
                            clears,
                            v,
                            received,
                            &mut self.pending,
                        );
                    }
                }
                Condition::NoData { metric, silence_us } => {
                    if metric
                        .as_deref()
                        .is_some_and(|m| !message.metrics.contains_key(m))
                    {
                        continue;
                    }
                    if let Some(open) = dev.open.remove(&rule.rule_id) {
                        self.pending.push(transition(
                            rule,
                            partition,
                            dev,
                            Some(open.status),
                            Status::Resolved,
                            open.started_at,
                            t,
                            None,
                            received,
                        ));
                    }
                    let due = Deadline::after(at, t, *silence_us);
                    // Move the deadline rather than leave the old one to expire: a busy device
                    // would otherwise pile up stale timers.
                    if let Some(old) = dev.silence_due.insert(rule.rule_id, due) {
                        if old.at != due.at {
                            ps.timers.remove(&(old.at, rule.rule_id, key.clone()));
                        }
                    }
                    ps.timers.insert((due.at, rule.rule_id, key.clone()));
                }
            }
        }
    }

    /// Records that `partition` has been read to its end (the broker's end-of-partition event;
    /// the next message clears it).
    pub fn caught_up(&mut self, partition: i32) {
        if let Some(ps) = self.partitions.get_mut(&partition) {
            ps.at_end = true;
        }
    }

    /// Advances the clock of partitions read to their end and silent for `idle_timeout` to
    /// `now - allowed_lateness` (wall clock), firing their due timers. Returns how many
    /// partitions moved.
    pub fn tick(&mut self, now: Micros) -> usize {
        let rules = self.rules.clone();
        let to = now.saturating_sub(micros(self.config.allowed_lateness));
        let mut moved = 0;
        for (&partition, ps) in &mut self.partitions {
            // Only a partition read to its end is silent; one still catching up on a backlog
            // is merely waiting for its next fetch.
            if !ps.at_end
                || ps.last_message.elapsed() < self.config.idle_timeout
                || ps.clock.is_some_and(|clock| clock >= to)
            {
                continue;
            }
            ps.clock = Some(to);
            fire_timers(&rules, partition, ps, to, &mut self.pending);
            moved += 1;
        }
        moved
    }

    /// Replaces the rules. Open alerts of a rule that was disabled resolve; those of a deleted
    /// rule are forgotten (the database deleted them with the rule); no-data deadlines start
    /// for new no-data rules; devices whose tenant's windows changed are warmed again.
    pub fn set_rules(&mut self, rules: Arc<RuleSet>) {
        if *rules == *self.rules {
            // A periodic reload that found nothing new: no walk over every device.
            return;
        }
        let old = std::mem::replace(&mut self.rules, rules.clone());
        // Transitions of deleted rules: the database deleted their alerts with the rule (and
        // would refuse a new one), so they have nothing left to change.
        self.pending
            .retain(|t| rules.by_id.contains_key(&t.rule.rule_id));
        let rewarm: std::collections::HashSet<&str> = old
            .tenants()
            .chain(rules.tenants())
            .filter(|t| old.windows_of(t) != rules.windows_of(t))
            .collect();
        for (&partition, ps) in &mut self.partitions {
            let time_now = ps.clock;
            for (key, dev) in &mut ps.devices {
                // Deleted rules: the database deleted their alerts with them.
                dev.open
                    .retain(|rule_id, _| rules.by_id.contains_key(rule_id));
                let disabled: Vec<(Arc<Rule>, OpenAlert)> = dev
                    .open
                    .iter()
                    .filter_map(|(rule_id, open)| {
                        let rule = rules.by_id.get(rule_id)?;
                        (!rule.enabled).then(|| (rule.clone(), open.clone()))
                    })
                    .collect();
                for (rule, open) in disabled {
                    dev.open.remove(&rule.rule_id);
                    let time = time_now.unwrap_or(open.started_at).max(open.started_at);
                    self.pending.push(transition(
                        &rule,
                        partition,
                        dev,
                        Some(open.status),
                        Status::Resolved,
                        open.started_at,
                        time,
                        open.value,
                        None,
                    ));
                }
                dev.silence_due
                    .retain(|rule_id, _| rules.by_id.get(rule_id).is_some_and(|r| r.enabled));
                if rewarm.contains(dev.tenant_id.as_str()) {
                    dev.windows_warm = false;
                }
                let (Some(last), Some(last_at)) = (dev.last_time, dev.last_at) else {
                    continue;
                };
                for rule in rules.of_tenant(&dev.tenant_id) {
                    if let Condition::NoData { silence_us, .. } = rule.condition {
                        if rule.applies_to(&dev.device_id, dev.site_id.as_deref())
                            && !dev.open.contains_key(&rule.rule_id)
                            && !dev.silence_due.contains_key(&rule.rule_id)
                        {
                            let due = Deadline::after(last_at, last, silence_us);
                            dev.silence_due.insert(rule.rule_id, due);
                            ps.timers.insert((due.at, rule.rule_id, key.clone()));
                        }
                    }
                }
            }
        }
    }

    /// Whether transitions wait to be committed.
    pub fn has_transitions(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Number of transitions waiting to be committed.
    pub fn pending_transitions(&self) -> usize {
        self.pending.len()
    }

    /// Takes the transitions and the progress of every partition since its last commit.
    pub fn take_commit(&mut self) -> CommitUnit {
        let mut progress: Vec<PartitionProgress> = self
            .partitions
            .iter()
            .filter_map(|(&partition, ps)| {
                let next = ps.next_offset?;
                (ps.stored_offset != Some(next)).then_some(PartitionProgress {
                    partition,
                    expected: ps.stored_offset,
                    next,
                    clock: ps.clock,
                })
            })
            .collect();
        progress.sort_by_key(|p| p.partition);
        CommitUnit {
            transitions: std::mem::take(&mut self.pending),
            progress,
        }
    }

    /// Records that `unit` was committed: its offsets are now the fence's expectations.
    pub fn committed(&mut self, unit: &CommitUnit) {
        for p in &unit.progress {
            if let Some(ps) = self.partitions.get_mut(&p.partition) {
                ps.stored_offset = Some(p.next);
            }
        }
    }

    /// Number of devices held in state.
    pub fn devices(&self) -> usize {
        self.partitions.values().map(|p| p.devices.len()).sum()
    }

    /// Number of armed timers (pending deadlines and no-data deadlines).
    pub fn timers(&self) -> usize {
        self.partitions.values().map(|p| p.timers.len()).sum()
    }

    /// Number of open (pending or firing) alerts held in state.
    pub fn open_alerts(&self) -> usize {
        self.partitions
            .values()
            .flat_map(|p| p.devices.values())
            .map(|d| d.open.len())
            .sum()
    }
}

#[allow(clippy::too_many_arguments)]
fn transition(
    rule: &Arc<Rule>,
    partition: i32,
    dev: &DeviceState,
    from: Option<Status>,
    to: Status,
    started_at: Micros,
    time: Micros,
    value: Option<f64>,
    received_at: Option<Micros>,
) -> Transition {
    Transition {
        rule: rule.clone(),
        partition,
        tenant_id: dev.tenant_id.clone(),
        device_id: dev.device_id.clone(),
        site_id: dev.site_id.clone(),
        from,
        to,
        started_at,
        time,
        value,
        received_at,
    }
}

/// One evaluation of a threshold or window rule: `holds` opens (or keeps) the alert,
/// `clears` resolves a firing one (hysteresis), `!holds` cancels a pending one.
#[allow(clippy::too_many_arguments)]
fn step(
    rule: &Arc<Rule>,
    partition: i32,
    key: &str,
    dev: &mut DeviceState,
    timers: &mut BTreeSet<Timer>,
    (at, t): (Micros, Micros),
    holds: bool,
    clears: bool,
    value: f64,
    received: Option<Micros>,
    out: &mut Vec<Transition>,
) {
    match dev.open.get_mut(&rule.rule_id) {
        None if holds => {
            let (status, due) = if rule.for_us == 0 {
                (Status::Firing, None)
            } else {
                let due = Deadline::after(at, t, rule.for_us);
                timers.insert((due.at, rule.rule_id, key.to_owned()));
                (Status::Pending, Some(due))
            };
            dev.open.insert(
                rule.rule_id,
                OpenAlert {
                    status,
                    started_at: t,
                    due,
                    value: Some(value),
                },
            );
            out.push(transition(
                rule,
                partition,
                dev,
                None,
                status,
                t,
                t,
                Some(value),
                received,
            ));
        }
        None => {}
        Some(open) => {
            let close = match open.status {
                Status::Pending => !holds,
                _ => clears,
            };
            if close {
                let (status, started_at) = (open.status, open.started_at);
                dev.open.remove(&rule.rule_id);
                out.push(transition(
                    rule,
                    partition,
                    dev,
                    Some(status),
                    Status::Resolved,
                    started_at,
                    t,
                    Some(value),
                    received,
                ));
            } else {
                open.value = Some(value);
            }
        }
    }
}

/// Fires `dev`'s pending alerts whose deadline (in the device's event time) is at or before
/// `t`, the time of its in-order reading about to be evaluated, in rule order. For a device
/// whose clock is right the partition clock has fired them already (the frames coincide);
/// this matters for a deadline restored in event time only (warm start) of a device whose
/// clock runs ahead, which would otherwise wait for the partition clock to catch up.
fn fire_own_pending(
    rules: &RuleSet,
    partition: i32,
    key: &str,
    dev: &mut DeviceState,
    timers: &mut BTreeSet<Timer>,
    t: Micros,
    out: &mut Vec<Transition>,
) {
    let mut due: Vec<(i64, Deadline)> = dev
        .open
        .iter()
        .filter(|(_, open)| open.status == Status::Pending)
        .filter_map(|(&rule_id, open)| open.due.filter(|d| d.time <= t).map(|d| (rule_id, d)))
        .collect();
    if due.is_empty() {
        return;
    }
    due.sort_unstable_by_key(|&(rule_id, _)| rule_id);
    for (rule_id, deadline) in due {
        timers.remove(&(deadline.at, rule_id, key.to_owned()));
        let Some(rule) = rules.by_id.get(&rule_id).filter(|r| r.enabled) else {
            continue;
        };
        fire_pending(rule, partition, dev, deadline.time, out);
    }
}

/// Moves `dev`'s pending alert of `rule` to firing at event time `time` (its deadline).
fn fire_pending(
    rule: &Arc<Rule>,
    partition: i32,
    dev: &mut DeviceState,
    time: Micros,
    out: &mut Vec<Transition>,
) {
    let Some(open) = dev.open.get_mut(&rule.rule_id) else {
        return;
    };
    open.status = Status::Firing;
    open.due = None;
    let (started_at, value) = (open.started_at, open.value);
    out.push(transition(
        rule,
        partition,
        dev,
        Some(Status::Pending),
        Status::Firing,
        started_at,
        time,
        value,
        None,
    ));
}

/// Fires every timer of `ps` due at or before `upto` on the partition clock, in (due, rule,
/// device) order.
fn fire_timers(
    rules: &RuleSet,
    partition: i32,
    ps: &mut PartitionState,
    upto: Micros,
    out: &mut Vec<Transition>,
) {
    while ps.timers.first().is_some_and(|(at, _, _)| *at <= upto) {
        let Some((at, rule_id, key)) = ps.timers.pop_first() else {
            break;
        };
        let Some(rule) = rules.by_id.get(&rule_id).filter(|r| r.enabled) else {
            continue;
        };
        let Some(dev) = ps.devices.get_mut(&key) else {
            continue;
        };
        if let Some(open) = dev.open.get_mut(&rule_id) {
            // A pending alert whose condition held until its deadline fires.
            let due = open.due.filter(|d| d.at == at);
            if let (Status::Pending, Some(due)) = (open.status, due) {
                fire_pending(rule, partition, dev, due.time, out);
            }
            continue;
        }
        // A no-data deadline reached without a reading.
        let Some(due) = dev
            .silence_due
            .get(&rule_id)
            .copied()
            .filter(|d| d.at == at)
        else {
            continue;
        };
        dev.silence_due.remove(&rule_id);
        let (status, next) = if rule.for_us == 0 {
            (Status::Firing, None)
        } else {
            (
                Status::Pending,
                Some(Deadline::after(due.at, due.time, rule.for_us)),
            )
        };
        if let Some(next) = next {
            ps.timers.insert((next.at, rule_id, key.clone()));
        }
        dev.open.insert(
            rule_id,
            OpenAlert {
                status,
                started_at: due.time,
                due: next,
                value: None,
            },
        );
        out.push(transition(
            rule, partition, dev, None, status, due.time, due.time, None, None,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Agg, Op};
    use chrono::{DateTime, Utc};

    const S: Micros = 1_000_000;
    const T0: Micros = 1_767_225_600 * S; // 2026-01-01T00:00:00Z

    fn rule(rule_id: i64, condition: Condition, for_s: i64) -> Rule {
        Rule {
            rule_id,
            tenant_id: "t1".into(),
            name: format!("rule {rule_id}"),
            site_id: None,
            device_id: None,
            condition,
            for_us: for_s * S,
            resolve_threshold: None,
            severity: "warning".into(),
            enabled: true,
        }
    }

    fn temp_above(rule_id: i64, threshold: f64, for_s: i64) -> Rule {
        rule(
            rule_id,
            Condition::Threshold {
                metric: "temp".into(),
                op: Op::Gt,
                threshold,
            },
            for_s,
        )
    }

    fn engine(rules: Vec<Rule>) -> Engine {
        let mut e = Engine::new(
            EngineConfig {
                allowed_lateness: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(3600),
            },
            Arc::new(RuleSet::new(rules)),
        );
        e.assign(0, None, None);
        e
    }

    fn reading(tenant: &str, device: &str, at: Micros, metrics: &[(&str, f64)]) -> Telemetry {
        Telemetry {
            tenant_id: tenant.into(),
            device_id: device.into(),
            site_id: None,
            msg_type: "telemetry".into(),
            seq: 0,
            time: DateTime::<Utc>::from_timestamp_micros(at).unwrap(),
            received_at: DateTime::<Utc>::from_timestamp_micros(at).unwrap(),
            metrics: metrics
                .iter()
                .map(|(k, v)| ((*k).to_owned(), MetricValue::Double(*v)))
                .collect(),
        }
    }

    /// A reading whose device clock says `at`, received by ingest at `received`.
    fn reading_received(
        tenant: &str,
        device: &str,
        at: Micros,
        received: Micros,
        metrics: &[(&str, f64)],
    ) -> Telemetry {
        let mut r = reading(tenant, device, at, metrics);
        r.received_at = DateTime::<Utc>::from_timestamp_micros(received).unwrap();
        r
    }

    /// (device, from, to, seconds after T0) of each step.
    fn steps_by_device(e: &mut Engine) -> Vec<(String, Option<Status>, Status, Micros)> {
        e.take_commit()
            .transitions
            .iter()
            .map(|t| (t.device_id.clone(), t.from, t.to, (t.time - T0) / S))
            .collect()
    }

    /// Feeds `temp` readings of device d1, one per second from T0; returns the steps.
    fn feed(e: &mut Engine, values: &[f64]) -> Vec<(Option<Status>, Status, Micros)> {
        for (i, v) in (0i64..).zip(values) {
            e.process(0, i, &reading("t1", "d1", T0 + i * S, &[("temp", *v)]));
        }
        e.take_commit()
            .transitions
            .iter()
            .map(|t| (t.from, t.to, (t.time - T0) / S))
            .collect()
    }

    #[test]
    fn a_threshold_fires_once_and_resolves_once() {
        let mut e = engine(vec![temp_above(1, 30.0, 0)]);
        let steps = feed(&mut e, &[20.0, 31.0, 35.0, 33.0, 25.0, 20.0]);
        assert_eq!(
            steps,
            vec![
                (None, Status::Firing, 1),
                (Some(Status::Firing), Status::Resolved, 4)
            ]
        );
    }

    #[test]
    fn for_delays_firing_and_a_shorter_blip_never_fires() {
        let mut e = engine(vec![temp_above(1, 30.0, 3)]);
        // Blip of 2 s (t=1..2), then a run of 5 s from t=5.
        let steps = feed(
            &mut e,
            &[
                20.0, 31.0, 32.0, 20.0, 20.0, 31.0, 31.0, 31.0, 31.0, 31.0, 20.0,
            ],
        );
        assert_eq!(
            steps,
            vec![
                (None, Status::Pending, 1),
                (Some(Status::Pending), Status::Resolved, 3),
                (None, Status::Pending, 5),
                (Some(Status::Pending), Status::Firing, 8),
                (Some(Status::Firing), Status::Resolved, 10),
            ]
        );
    }

    #[test]
    fn hysteresis_holds_a_firing_alert_until_the_resolve_threshold() {
        let mut r = temp_above(1, 30.0, 0);
        r.resolve_threshold = Some(25.0);
        let mut e = engine(vec![r]);
        let steps = feed(&mut e, &[31.0, 28.0, 26.0, 25.0]);
        assert_eq!(
            steps,
            vec![
                (None, Status::Firing, 0),
                (Some(Status::Firing), Status::Resolved, 3)
            ]
        );
    }

    #[test]
    fn a_window_average_crosses_and_recovers() {
        let mut e = engine(vec![rule(
            1,
            Condition::Window {
                metric: "temp".into(),
                agg: Agg::Avg,
                window_us: 3 * S,
                op: Op::Gt,
                threshold: 30.0,
            },
            0,
        )]);
        e.warm(
            &e.cold(0, &reading("t1", "d1", T0, &[])).unwrap(),
            None,
            &[],
        );
        // Windows of 3 s: avg(20)=20, avg(20,40)=30, avg(20,40,40)=33.3 fires,
        // avg(40,40,20)=33.3, avg(40,20,20)=26.7 resolves.
        let steps = feed(&mut e, &[20.0, 40.0, 40.0, 20.0, 20.0]);
        assert_eq!(
            steps,
            vec![
                (None, Status::Firing, 2),
                (Some(Status::Firing), Status::Resolved, 4)
            ]
        );
    }

    #[test]
    fn warm_history_counts_in_the_window() {
        let mut e = engine(vec![rule(
            1,
            Condition::Window {
                metric: "temp".into(),
                agg: Agg::Max,
                window_us: 10 * S,
                op: Op::Gt,
                threshold: 50.0,
            },
            0,
        )]);
        let cold = e.cold(0, &reading("t1", "d1", T0, &[])).unwrap();
        assert_eq!(cold.metrics, vec![("temp".to_owned(), 10 * S)]);
        let history = vec![
            (T0 - 20 * S, BTreeMap::from([("temp".to_owned(), 99.0)])), // outside the window
            (T0 - 5 * S, BTreeMap::from([("temp".to_owned(), 60.0)])),
        ];
        e.warm(&cold, None, &history);
        assert!(e.cold(0, &reading("t1", "d1", T0, &[])).is_none());
        let steps = feed(&mut e, &[10.0]);
        assert_eq!(steps, vec![(None, Status::Firing, 0)]);
    }

    #[test]
    fn no_data_fires_on_silence_and_resolves_on_a_reading() {
        let mut e = engine(vec![rule(
            1,
            Condition::NoData {
                metric: None,
                silence_us: 10 * S,
            },
            0,
        )]);
        e.process(0, 0, &reading("t1", "quiet", T0, &[("temp", 1.0)]));
        // Another device on the partition moves the clock past the deadline.
        for i in 1..=12 {
            e.process(0, i, &reading("t1", "busy", T0 + i * S, &[("temp", 1.0)]));
        }
        e.process(
            0,
            13,
            &reading("t1", "quiet", T0 + 13 * S, &[("temp", 1.0)]),
        );
        let steps: Vec<_> = e
            .take_commit()
            .transitions
            .iter()
            .map(|t| (t.device_id.clone(), t.from, t.to, (t.time - T0) / S))
            .collect();
        assert_eq!(
            steps,
            vec![
                ("quiet".to_owned(), None, Status::Firing, 10),
                (
                    "quiet".to_owned(),
                    Some(Status::Firing),
                    Status::Resolved,
                    13
                ),
            ]
        );
    }

    #[test]
    fn the_wall_clock_moves_only_a_silent_partition_read_to_its_end() {
        let mut e = Engine::new(
            EngineConfig {
                allowed_lateness: Duration::from_secs(5),
                idle_timeout: Duration::ZERO,
            },
            Arc::new(RuleSet::new(vec![rule(
                1,
                Condition::NoData {
                    metric: None,
                    silence_us: 10 * S,
                },
                0,
            )])),
        );
        e.assign(0, None, None);
        e.process(0, 0, &reading("t1", "d1", T0, &[("temp", 1.0)]));
        // Still catching up: no end-of-partition yet, so the wall clock does not count.
        assert_eq!(e.tick(T0 + 3600 * S), 0);
        assert!(!e.has_transitions());
        e.caught_up(0);
        assert_eq!(e.tick(T0 + 3600 * S), 1);
        let unit = e.take_commit();
        assert_eq!(unit.transitions.len(), 1);
        assert_eq!(unit.transitions[0].time, T0 + 10 * S);
    }

    #[test]
    fn a_busy_device_keeps_one_no_data_timer() {
        let mut e = engine(vec![rule(
            1,
            Condition::NoData {
                metric: None,
                silence_us: 60 * S,
            },
            0,
        )]);
        for i in 0..100 {
            e.process(0, i, &reading("t1", "d1", T0 + i * S, &[("temp", 1.0)]));
        }
        assert_eq!(e.timers(), 1);
    }

    #[test]
    fn a_rule_of_one_tenant_never_fires_on_another() {
        let mut e = engine(vec![temp_above(1, 30.0, 0)]);
        e.process(0, 0, &reading("t2", "d1", T0, &[("temp", 99.0)]));
        assert!(e.take_commit().transitions.is_empty());
    }

    #[test]
    fn late_readings_are_counted_and_too_late_ones_dropped() {
        let mut e = engine(vec![temp_above(1, 30.0, 0)]);
        e.process(0, 0, &reading("t1", "d1", T0 + 10 * S, &[("temp", 20.0)]));
        e.process(0, 1, &reading("t1", "d1", T0 + 7 * S, &[("temp", 99.0)])); // within 5 s
        e.process(0, 2, &reading("t1", "d1", T0 + 2 * S, &[("temp", 99.0)])); // beyond
        let c = e.counters();
        assert_eq!((c.messages, c.late_accepted, c.late_dropped), (3, 1, 1));
        // Neither late reading moved the threshold state.
        assert!(e.take_commit().transitions.is_empty());
    }

    #[test]
    fn a_disabled_rule_resolves_its_open_alert() {
        let mut e = engine(vec![temp_above(1, 30.0, 0)]);
        feed(&mut e, &[31.0]);
        let mut r = temp_above(1, 30.0, 0);
        r.enabled = false;
        e.set_rules(Arc::new(RuleSet::new(vec![r])));
        let unit = e.take_commit();
        assert_eq!(unit.transitions.len(), 1);
        assert_eq!(unit.transitions[0].to, Status::Resolved);
        assert_eq!(e.open_alerts(), 0);
    }

    #[test]
    fn a_restored_pending_alert_fires_at_its_original_deadline() {
        let mut e = engine(vec![temp_above(1, 30.0, 5)]);
        e.restore_open_alert(0, "t1", "d1", None, 1, Status::Pending, T0, Some(31.0));
        e.process(0, 0, &reading("t1", "d1", T0 + 6 * S, &[("temp", 32.0)]));
        let unit = e.take_commit();
        let steps: Vec<_> = unit
            .transitions
            .iter()
            .map(|t| (t.from, t.to, (t.time - T0) / S, t.event_id()))
            .collect();
        assert_eq!(
            steps,
            vec![(
                Some(Status::Pending),
                Status::Firing,
                5,
                format!("1:t1/d1:{T0}:firing")
            )]
        );
    }

    #[test]
    fn a_fast_clock_moves_the_partition_clock_no_further_than_ingest_time() {
        let mut e = engine(vec![]);
        e.process(0, 0, &reading_received("t1", "fast", T0 + 120 * S, T0, &[]));
        assert_eq!(e.clock(0), Some(T0));
        // A device whose clock is right: its own time (at or before ingest's) counts.
        e.process(0, 1, &reading_received("t2", "b", T0 + S, T0 + 2 * S, &[]));
        assert_eq!(e.clock(0), Some(T0 + S));
        // The stored clock is the bounded one, so a restart resumes with it.
        assert_eq!(e.take_commit().progress[0].clock, Some(T0 + S));
    }

    #[test]
    fn a_device_with_a_fast_clock_does_not_make_another_tenants_readings_late() {
        let mut b_rule = temp_above(2, 30.0, 0);
        b_rule.tenant_id = "t2".into();
        let mut e = engine(vec![temp_above(1, 30.0, 0), b_rule]);
        // Device "fast" of t1 is 120 s ahead; "b" of t2 on the same partition is on time.
        e.process(
            0,
            0,
            &reading_received("t1", "fast", T0 + 120 * S, T0, &[("temp", 99.0)]),
        );
        e.process(
            0,
            1,
            &reading_received("t2", "b", T0 + S, T0 + S, &[("temp", 20.0)]),
        );
        e.process(
            0,
            2,
            &reading_received("t2", "b", T0 + 2 * S, T0 + 2 * S, &[("temp", 50.0)]),
        );
        e.process(
            0,
            3,
            &reading_received("t1", "fast", T0 + 123 * S, T0 + 3 * S, &[("temp", 10.0)]),
        );
        assert_eq!(e.counters().late_dropped, 0);
        assert_eq!(
            steps_by_device(&mut e),
            vec![
                // The fast device is evaluated too, in its own time.
                ("fast".to_owned(), None, Status::Firing, 120),
                ("b".to_owned(), None, Status::Firing, 2),
                (
                    "fast".to_owned(),
                    Some(Status::Firing),
                    Status::Resolved,
                    123
                ),
            ]
        );
    }

    #[test]
    fn a_fast_devices_deadlines_run_on_ingest_time_and_carry_its_own_time() {
        let mut e = engine(vec![
            temp_above(1, 30.0, 5),
            rule(
                2,
                Condition::NoData {
                    metric: None,
                    silence_us: 10 * S,
                },
                0,
            ),
        ]);
        // 120 s ahead, hot for 3 s of ingest time, then silent; another device keeps the
        // partition clock going.
        for i in 0..3 {
            let at = T0 + i * S;
            e.process(
                0,
                i,
                &reading_received("t1", "fast", at + 120 * S, at, &[("temp", 50.0)]),
            );
        }
        for i in 3..=12 {
            let at = T0 + i * S;
            e.process(0, i, &reading_received("t1", "b", at, at, &[("temp", 1.0)]));
        }
        assert_eq!(e.counters().late_dropped, 0);
        assert_eq!(
            steps_by_device(&mut e),
            vec![
                ("fast".to_owned(), None, Status::Pending, 120),
                // Due 5 s of ingest time after it opened, stamped 5 s after in its own time.
                (
                    "fast".to_owned(),
                    Some(Status::Pending),
                    Status::Firing,
                    125
                ),
                // Silent for 10 s since its last reading (ingest T0 + 2 s, its own T0 + 122 s).
                ("fast".to_owned(), None, Status::Firing, 132),
            ]
        );
    }

    #[test]
    fn a_reading_further_behind_its_own_devices_newest_than_the_lateness_is_dropped() {
        let mut e = engine(vec![temp_above(1, 30.0, 0)]);
        e.process(
            0,
            0,
            &reading_received("t1", "fast", T0 + 120 * S, T0, &[("temp", 20.0)]),
        );
        // The device's clock was corrected: 118 s behind its newest reading, though not behind
        // the partition clock.
        e.process(
            0,
            1,
            &reading_received("t1", "fast", T0 + 2 * S, T0 + 2 * S, &[("temp", 99.0)]),
        );
        // 3 s behind its newest: within the lateness, windows only.
        e.process(
            0,
            2,
            &reading_received("t1", "fast", T0 + 117 * S, T0 + 3 * S, &[("temp", 99.0)]),
        );
        let c = e.counters();
        assert_eq!((c.late_dropped, c.late_accepted), (1, 1));
        assert!(e.take_commit().transitions.is_empty());
    }

    #[test]
    fn a_restored_pending_alert_of_a_fast_device_fires_at_its_own_reading_past_the_deadline() {
        let mut e = engine(vec![temp_above(1, 30.0, 5)]);
        e.assign(0, Some(10), Some(T0));
        // Opened at its own T0 + 120 s; the reading that opened it is not replayed.
        e.restore_open_alert(
            0,
            "t1",
            "fast",
            None,
            1,
            Status::Pending,
            T0 + 120 * S,
            Some(50.0),
        );
        e.process(
            0,
            10,
            &reading_received("t1", "fast", T0 + 124 * S, T0 + 4 * S, &[("temp", 50.0)]),
        );
        assert!(!e.has_transitions());
        // Its own clock passes the deadline (the partition clock is 115 s short of it).
        e.process(
            0,
            11,
            &reading_received("t1", "fast", T0 + 126 * S, T0 + 6 * S, &[("temp", 20.0)]),
        );
        assert_eq!(
            steps_by_device(&mut e),
            vec![
                (
                    "fast".to_owned(),
                    Some(Status::Pending),
                    Status::Firing,
                    125
                ),
                (
                    "fast".to_owned(),
                    Some(Status::Firing),
                    Status::Resolved,
                    126
                ),
            ]
        );
        assert_eq!(e.timers(), 0);
    }

    #[test]
    fn progress_is_fenced_on_the_stored_offset() {
        let mut e = engine(vec![]);
        e.assign(3, Some(100), None);
        e.process(3, 100, &reading("t1", "d1", T0, &[]));
        e.process(3, 101, &reading("t1", "d1", T0 + S, &[]));
        let unit = e.take_commit();
        assert_eq!(
            unit.progress,
            vec![PartitionProgress {
                partition: 3,
                expected: Some(100),
                next: 102,
                clock: Some(T0 + S)
            }]
        );
        e.committed(&unit);
        assert!(e.take_commit().is_empty());
    }
}
