//! Alert rules: the `alert_rules` rows, checked and indexed by tenant for evaluation.
//!
//! Rules are loaded at start and reloaded when PostgreSQL notifies `alert_rules_changed`
//! (a trigger on the table) and on a periodic refresh, in case a notification was missed
//! while the listening connection was down.

use std::sync::Arc;

/// Hash maps of the evaluator's state: foldhash (seeded per process) instead of SipHash.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`HashMap`].
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use sqlx::PgPool;

/// A comparison between a value and a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            "<=" => Op::Le,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            _ => return None,
        })
    }

    /// `value op threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
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

/// Aggregate of a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Avg,
    Min,
    Max,
    Count,
}

impl Agg {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "avg" => Agg::Avg,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "count" => Agg::Count,
            _ => return None,
        })
    }

    /// The aggregate of `values` (`None` when empty, except `count`, which is 0).
    pub fn apply(self, values: impl Iterator<Item = f64>) -> Option<f64> {
        let (mut n, mut sum, mut min, mut max) = (0u64, 0.0, f64::INFINITY, f64::NEG_INFINITY);
        for v in values {
            n += 1;
            sum += v;
            min = min.min(v);
            max = max.max(v);
        }
        match self {
            Agg::Count => Some(n as f64),
            _ if n == 0 => None,
            Agg::Avg => Some(sum / n as f64),
            Agg::Min => Some(min),
            Agg::Max => Some(max),
        }
    }
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The metric's latest value compared with `threshold`.
    Threshold {
        metric: String,
        op: Op,
        threshold: f64,
    },
    /// An aggregate of the metric over the last `window_us` of event time.
    Window {
        metric: String,
        agg: Agg,
        window_us: i64,
        op: Op,
        threshold: f64,
    },
    /// No reading (with `metric`, when set) for `silence_us` of event time.
    NoData {
        metric: Option<String>,
        silence_us: i64,
    },
}

/// One rule, ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub rule_id: i64,
    pub tenant_id: String,
    pub name: String,
    pub site_id: Option<String>,
    pub device_id: Option<String>,
    pub condition: Condition,
    /// How long the condition must hold before a pending alert fires.
    pub for_us: i64,
    /// Resolve when `!(value op resolve_threshold)` instead of `!(value op threshold)`.
    pub resolve_threshold: Option<f64>,
    pub severity: String,
    pub enabled: bool,
}

impl Rule {
    /// Whether the rule covers a device of its tenant at `site`.
    pub fn applies_to(&self, device_id: &str, site_id: Option<&str>) -> bool {
        self.device_id.as_deref().is_none_or(|d| d == device_id)
            && self
                .site_id
                .as_deref()
                .is_none_or(|s| site_id.is_some_and(|site| site == s))
    }

    /// The metric the rule reads, if any.
    pub fn metric(&self) -> Option<&str> {
        match &self.condition {
            Condition::Threshold { metric, .. } | Condition::Window { metric, .. } => Some(metric),
            Condition::NoData { metric, .. } => metric.as_deref(),
        }
    }

    /// The threshold reported with the rule's alerts.
    pub fn threshold(&self) -> Option<f64> {
        match &self.condition {
            Condition::Threshold { threshold, .. } | Condition::Window { threshold, .. } => {
                Some(*threshold)
            }
            Condition::NoData { silence_us, .. } => Some(*silence_us as f64 / 1e6),
        }
    }
}

/// A row of `alert_rules` that cannot be evaluated (the table's CHECK constraints make this
/// rare: it needs a row written before a constraint existed).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("alert rule {rule_id}: {reason}")]
pub struct InvalidRule {
    pub rule_id: i64,
    pub reason: String,
}

#[derive(sqlx::FromRow)]
struct RuleRow {
    rule_id: i64,
    tenant_id: String,
    name: String,
    site_id: Option<String>,
    device_id: Option<String>,
    metric: Option<String>,
    kind: String,
    agg: Option<String>,
    op: Option<String>,
    threshold: Option<f64>,
    window_s: Option<i32>,
    for_s: i32,
    no_data_s: Option<i32>,
    resolve_threshold: Option<f64>,
    severity: String,
    enabled: bool,
}

impl RuleRow {
    fn into_rule(self) -> Result<Rule, InvalidRule> {
        let invalid = |reason: &str| InvalidRule {
            rule_id: self.rule_id,
            reason: reason.to_owned(),
        };
        let seconds = |s: i32| i64::from(s) * 1_000_000;
        let condition = match self.kind.as_str() {
            "threshold" | "window" => {
                let metric = self
                    .metric
                    .clone()
                    .ok_or_else(|| invalid("metric missing"))?;
                let op = self
                    .op
                    .as_deref()
                    .and_then(Op::parse)
                    .ok_or_else(|| invalid("op missing or unknown"))?;
                let threshold = self
                    .threshold
                    .filter(|t| t.is_finite())
                    .ok_or_else(|| invalid("threshold missing or not finite"))?;
                if self.kind == "threshold" {
                    Condition::Threshold {
                        metric,
                        op,
                        threshold,
                    }
                } else {
                    let agg = self
                        .agg
                        .as_deref()
                        .and_then(Agg::parse)
                        .ok_or_else(|| invalid("agg missing or unknown"))?;
                    let window_s = self
                        .window_s
                        .filter(|w| *w > 0)
                        .ok_or_else(|| invalid("window_s missing"))?;
                    Condition::Window {
                        metric,
                        agg,
                        window_us: seconds(window_s),
                        op,
                        threshold,
                    }
                }
            }
            "no_data" => Condition::NoData {
                metric: self.metric.clone(),
                silence_us: seconds(
                    self.no_data_s
                        .filter(|s| *s > 0)
                        .ok_or_else(|| invalid("no_data_s missing"))?,
                ),
            },
            _ => return Err(invalid("unknown kind")),
        };
        Ok(Rule {
            rule_id: self.rule_id,
            tenant_id: self.tenant_id,
            name: self.name,
            site_id: self.site_id,
            device_id: self.device_id,
            condition,
            for_us: seconds(self.for_s.max(0)),
            resolve_threshold: self.resolve_threshold.filter(|t| t.is_finite()),
            severity: self.severity,
            enabled: self.enabled,
        })
    }
}

/// Every rule, indexed for evaluation. Immutable; a reload builds a new one.
#[derive(Debug, Default, PartialEq)]
pub struct RuleSet {
    /// Every rule by id, enabled or not (a disabled rule resolves its open alerts).
    pub by_id: HashMap<i64, Arc<Rule>>,
    /// Enabled rules per tenant.
    by_tenant: HashMap<String, Vec<Arc<Rule>>>,
    /// Per tenant: the window rules' metrics and the longest window over each.
    windows: HashMap<String, HashMap<String, i64>>,
    /// Tenants with an enabled no-data rule.
    no_data_tenants: HashSet<String>,
}

impl RuleSet {
    /// Indexes `rules`.
    pub fn new(rules: Vec<Rule>) -> Self {
        let mut set = RuleSet::default();
        for rule in rules {
            let rule = Arc::new(rule);
            if rule.enabled {
                set.by_tenant
                    .entry(rule.tenant_id.clone())
                    .or_default()
                    .push(rule.clone());
                match &rule.condition {
                    Condition::Window {
                        metric, window_us, ..
                    } => {
                        let longest = set
                            .windows
                            .entry(rule.tenant_id.clone())
                            .or_default()
                            .entry(metric.clone())
                            .or_insert(0);
                        *longest = (*longest).max(*window_us);
                    }
                    Condition::NoData { .. } => {
                        set.no_data_tenants.insert(rule.tenant_id.clone());
                    }
                    Condition::Threshold { .. } => {}
                }
            }
            set.by_id.insert(rule.rule_id, rule);
        }
        for rules in set.by_tenant.values_mut() {
            rules.sort_by_key(|r| r.rule_id);
        }
        set
    }

    /// Enabled rules of `tenant`, in rule-id order.
    pub fn of_tenant(&self, tenant: &str) -> &[Arc<Rule>] {
        self.by_tenant.get(tenant).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Metrics `tenant`'s window rules read, with the longest window over each.
    pub fn windows_of(&self, tenant: &str) -> Option<&HashMap<String, i64>> {
        self.windows.get(tenant)
    }

    /// Tenants with an enabled rule.
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.by_tenant.keys().map(String::as_str)
    }

    /// Tenants with an enabled no-data rule.
    pub fn no_data_tenants(&self) -> impl Iterator<Item = &str> {
        self.no_data_tenants.iter().map(String::as_str)
    }

    /// Number of enabled rules.
    pub fn enabled(&self) -> usize {
        self.by_tenant.values().map(Vec::len).sum()
    }
}

/// Reads every rule. Rows that cannot be evaluated are skipped and returned as errors to log.
pub async fn load(pool: &PgPool) -> Result<(RuleSet, Vec<InvalidRule>), sqlx::Error> {
    let rows: Vec<RuleRow> = sqlx::query_as(
        "SELECT rule_id, tenant_id::text AS tenant_id, name, site_id::text AS site_id, \
                device_id::text AS device_id, metric, kind, agg, op, threshold, window_s, for_s, \
                no_data_s, resolve_threshold, severity, enabled \
         FROM alert_rules ORDER BY rule_id",
    )
    .fetch_all(pool)
    .await?;
    let mut rules = Vec::with_capacity(rows.len());
    let mut invalid = Vec::new();
    for row in rows {
        match row.into_rule() {
            Ok(rule) => rules.push(rule),
            Err(err) => invalid.push(err),
        }
    }
    Ok((RuleSet::new(rules), invalid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str) -> RuleRow {
        RuleRow {
            rule_id: 7,
            tenant_id: "t1".into(),
            name: "hot".into(),
            site_id: None,
            device_id: None,
            metric: Some("temp".into()),
            kind: kind.into(),
            agg: None,
            op: Some(">".into()),
            threshold: Some(30.0),
            window_s: None,
            for_s: 10,
            no_data_s: None,
            resolve_threshold: None,
            severity: "warning".into(),
            enabled: true,
        }
    }

    #[test]
    fn a_threshold_row_becomes_a_rule_with_microsecond_durations() {
        let rule = row("threshold").into_rule().unwrap();
        assert_eq!(
            rule.condition,
            Condition::Threshold {
                metric: "temp".into(),
                op: Op::Gt,
                threshold: 30.0
            }
        );
        assert_eq!(rule.for_us, 10_000_000);
    }

    #[test]
    fn a_window_row_without_agg_is_reported_not_evaluated() {
        let mut r = row("window");
        r.window_s = Some(60);
        assert_eq!(
            r.into_rule().unwrap_err(),
            InvalidRule {
                rule_id: 7,
                reason: "agg missing or unknown".into()
            }
        );
    }

    #[test]
    fn aggregates_follow_their_definitions() {
        let v = [1.0, 5.0, 3.0];
        assert_eq!(Agg::Avg.apply(v.into_iter()), Some(3.0));
        assert_eq!(Agg::Min.apply(v.into_iter()), Some(1.0));
        assert_eq!(Agg::Max.apply(v.into_iter()), Some(5.0));
        assert_eq!(Agg::Count.apply(v.into_iter()), Some(3.0));
        assert_eq!(Agg::Avg.apply(std::iter::empty()), None);
        assert_eq!(Agg::Count.apply(std::iter::empty()), Some(0.0));
    }

    #[test]
    fn scope_matches_site_and_device() {
        let mut rule = row("threshold").into_rule().unwrap();
        assert!(rule.applies_to("d1", None));
        rule.site_id = Some("s1".into());
        assert!(rule.applies_to("d1", Some("s1")));
        assert!(!rule.applies_to("d1", Some("s2")));
        assert!(!rule.applies_to("d1", None));
        rule.device_id = Some("d2".into());
        assert!(!rule.applies_to("d1", Some("s1")));
    }

    #[test]
    fn the_set_indexes_enabled_rules_and_longest_windows() {
        let mut a = row("window");
        a.agg = Some("avg".into());
        a.window_s = Some(60);
        let mut b = row("window");
        b.rule_id = 8;
        b.agg = Some("max".into());
        b.window_s = Some(300);
        let mut c = row("threshold");
        c.rule_id = 9;
        c.enabled = false;
        let set = RuleSet::new(vec![
            a.into_rule().unwrap(),
            b.into_rule().unwrap(),
            c.into_rule().unwrap(),
        ]);
        assert_eq!(set.of_tenant("t1").len(), 2);
        assert_eq!(set.by_id.len(), 3);
        assert_eq!(set.windows_of("t1").unwrap()["temp"], 300_000_000);
        assert!(set.of_tenant("t2").is_empty());
    }
}
