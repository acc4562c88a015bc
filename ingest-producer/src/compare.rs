//! `ingest-producer compare FILE --tenant T`: the dual-write check before InfluxDB is switched
//! off. It reads a line-protocol export, maps every line as `import` and the write endpoints
//! do, and compares with what the database holds for the same tenant, devices and time range:
//!
//! * points per (device, measurement, hour): distinct times of the device having a metric of
//!   the measurement (the measurement of a metric is its name up to the first `.`, on both
//!   sides);
//! * per (device, metric, hour): the number of values, and min, max and sum of the numeric
//!   ones (sums compared to a relative 1e-9: the database adds exact decimals, the file side
//!   doubles; min and max exactly).
//!
//! Every difference is printed, including groups found on one side only; the exit code is
//! non-zero when there is any. Lines the mapping refuses (or without a timestamp, or whose
//! device tag is missing) cannot be compared and are counted apart; `import` lists them.
//! The hours compared are those of the file's first and last timestamp and all between.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use plumbing::config::{DatabaseArgs, ObservabilityArgs};
use schemas::MetricValue;
use sqlx::Row;

use crate::error::Error;
use crate::export::ExportReader;
use crate::import::parse_precision;
use crate::lineproto::{Mapping, Precision};

const HOUR_US: i64 = 3_600_000_000;

/// `ingest-producer compare`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ingest-producer compare",
    about = "Compare a line-protocol export with the database: points per device, measurement \
             and hour; count, min, max, sum per field"
)]
pub struct CompareArgs {
    /// The export (plain or gzip).
    pub file: PathBuf,
    /// Tenant the devices belong to.
    #[arg(long)]
    pub tenant: String,
    /// Unit of the file's timestamps.
    #[arg(long, default_value = "ns", value_parser = parse_precision)]
    pub precision: Precision,
    /// Tags naming the device, as for `import`.
    #[arg(
        long,
        env = "INFLUX_DEVICE_TAGS",
        value_delimiter = ',',
        default_value = "device_id,device,host"
    )]
    pub device_tags: Vec<String>,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

/// Count, min, max and sum of one metric's values in one hour.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub count: i64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub sum: Option<f64>,
}

impl Stats {
    fn add(&mut self, value: &MetricValue) {
        self.count += 1;
        let number = match value {
            MetricValue::Long(v) => *v as f64,
            MetricValue::Double(v) => *v,
            _ => return,
        };
        self.min = Some(self.min.map_or(number, |m| m.min(number)));
        self.max = Some(self.max.map_or(number, |m| m.max(number)));
        self.sum = Some(self.sum.unwrap_or(0.0) + number);
    }

    fn same(&self, other: &Stats) -> bool {
        let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()),
            (a, b) => a == b,
        };
        self.count == other.count
            && self.min == other.min
            && self.max == other.max
            && close(self.sum, other.sum)
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "count {}", self.count)?;
        if let (Some(min), Some(max), Some(sum)) = (self.min, self.max, self.sum) {
            write!(f, " min {min} max {max} sum {sum}")?;
        }
        Ok(())
    }
}

/// (device, measurement, hour start in µs) → points.
type PointCounts = BTreeMap<(String, String, i64), i64>;
/// (device, metric, hour start in µs) → stats.
type MetricStats = BTreeMap<(String, String, i64), Stats>;

/// The outcome of a comparison.
#[derive(Debug, Default)]
pub struct Report {
    /// Lines read.
    pub lines: usize,
    /// Lines that cannot be compared (refused by the mapping, no device, no timestamp).
    pub skipped: usize,
    /// Groups compared (both kinds, either side).
    pub groups: usize,
    /// One line per difference.
    pub differences: Vec<String>,
}

impl Report {
    /// Prints the report.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        for difference in &self.differences {
            writeln!(out, "{difference}")?;
        }
        writeln!(
            out,
            "lines read: {}, not comparable: {}; groups compared: {}; differences: {}",
            self.lines,
            self.skipped,
            self.groups,
            self.differences.len()
        )
    }
}

/// Reads the file, queries the database, compares.
pub async fn run(args: CompareArgs) -> Result<Report, Error> {
    let mapping = Mapping {
        device_tags: args.device_tags.clone(),
        ..Mapping::default()
    };
    let path = args.file.clone();
    let precision = args.precision;
    let (mut report, points, metrics) =
        tokio::task::spawn_blocking(move || read_file(&path, precision, &mapping))
            .await
            .map_err(|err| Error::Config {
                name: "FILE",
                reason: err.to_string(),
            })??;
    let pool = plumbing::db::pool(&args.database, "ingest-producer-compare")?;
    let (db_points, db_metrics) = if points.is_empty() {
        (PointCounts::new(), MetricStats::new())
    } else {
        query_database(&pool, &args.tenant, &points).await?
    };
    pool.close().await;
    report.differences.extend(diff(
        &points,
        &db_points,
        |(device, measurement, hour), file, db| {
            format!(
                "device {device}, measurement {measurement}, hour {}: points in file {}, in database {}",
                hour_text(*hour),
                show(file),
                show(db)
            )
        },
    ));
    report.differences.extend(diff_stats(&metrics, &db_metrics));
    report.groups = union_len(&points, &db_points) + union_len(&metrics, &db_metrics);
    Ok(report)
}

fn show(value: Option<&i64>) -> String {
    value.map_or_else(|| "none".to_owned(), i64::to_string)
}

fn union_len<K: Ord, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
    a.keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn hour_text(hour_us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(hour_us)
        .map(|t| t.format("%Y-%m-%dT%H:00Z").to_string())
        .unwrap_or_else(|| hour_us.to_string())
}

fn diff(
    file: &PointCounts,
    db: &PointCounts,
    describe: impl Fn(&(String, String, i64), Option<&i64>, Option<&i64>) -> String,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<_> = file.keys().chain(db.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (a, b) = (file.get(key), db.get(key));
            (a != b).then(|| describe(key, a, b))
        })
        .collect()
}

fn diff_stats(file: &MetricStats, db: &MetricStats) -> Vec<String> {
    let keys: std::collections::BTreeSet<_> = file.keys().chain(db.keys()).collect();
    keys.into_iter()
        .filter_map(|key @ (device, metric, hour)| {
            let (a, b) = (file.get(key), db.get(key));
            let same = match (a, b) {
                (Some(a), Some(b)) => a.same(b),
                _ => false,
            };
            (!same).then(|| {
                let text =
                    |s: Option<&Stats>| s.map_or_else(|| "none".to_owned(), Stats::to_string);
                format!(
                    "device {device}, metric {metric}, hour {}: file {}, database {}",
                    hour_text(*hour),
                    text(a),
                    text(b)
                )
            })
        })
        .collect()
}

/// The measurement of a metric name: up to the first `.`.
fn measurement(metric: &str) -> &str {
    metric.split('.').next().unwrap_or(metric)
}

fn read_file(
    path: &std::path::Path,
    precision: Precision,
    mapping: &Mapping,
) -> Result<(Report, PointCounts, MetricStats), Error> {
    let io_error = |err: std::io::Error| Error::Config {
        name: "FILE",
        reason: format!("{}: {err}", path.display()),
    };
    let mut reader = ExportReader::open(path, precision).map_err(io_error)?;
    let mut report = Report::default();
    let mut times: BTreeMap<(String, String, i64), HashSet<i64>> = BTreeMap::new();
    let mut metrics = MetricStats::new();
    while let Some(lines) = reader.next_chunk(4 << 20).map_err(io_error)? {
        report.lines += lines.len();
        for line in lines {
            let mapped = line.point.ok().and_then(|point| mapping.map(&point).ok());
            let Some(mapped) = mapped else {
                report.skipped += 1;
                continue;
            };
            let (Some(device), Some(ns)) = (mapped.device_id.clone(), mapped.time_ns) else {
                report.skipped += 1;
                continue;
            };
            let time_us = ns.div_euclid(1_000);
            let hour = time_us.div_euclid(HOUR_US) * HOUR_US;
            for (name, value) in &mapped.metrics {
                times
                    .entry((device.clone(), measurement(name).to_owned(), hour))
                    .or_default()
                    .insert(time_us);
                metrics
                    .entry((device.clone(), name.clone(), hour))
                    .or_default()
                    .add(value);
            }
        }
    }
    let points = times
        .into_iter()
        .map(|(key, set)| (key, set.len() as i64))
        .collect();
    Ok((report, points, metrics))
}

async fn query_database(
    pool: &sqlx::PgPool,
    tenant: &str,
    points: &PointCounts,
) -> Result<(PointCounts, MetricStats), Error> {
    let devices: Vec<String> = points
        .keys()
        .map(|(device, _, _)| device.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let first = points.keys().map(|k| k.2).min().unwrap_or(0);
    let last = points.keys().map(|k| k.2).max().unwrap_or(0) + HOUR_US;
    let (from, to) = (
        chrono::DateTime::from_timestamp_micros(first).unwrap_or_default(),
        chrono::DateTime::from_timestamp_micros(last).unwrap_or_default(),
    );
    // Constant SQL only is joined with `format!` below; every input is a bind.
    let hour = "(extract(epoch FROM date_bin('1 hour', t.time, TIMESTAMPTZ '1970-01-01 00:00:00+00')) * 1000000)::bigint";
    let rows = sqlx::query(&format!(
        "SELECT t.device_id, {hour} AS hour, split_part(k.key, '.', 1) AS measurement, \
                count(DISTINCT t.time) AS points \
         FROM telemetry t CROSS JOIN LATERAL jsonb_object_keys(t.metrics) AS k(key) \
         WHERE t.tenant_id = $1 AND t.device_id = ANY($2) AND t.time >= $3 AND t.time < $4 \
         GROUP BY 1, 2, 3"
    ))
    .bind(tenant)
    .bind(&devices)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut db_points = PointCounts::new();
    for row in rows {
        db_points.insert(
            (row.try_get(0)?, row.try_get(2)?, row.try_get(1)?),
            row.try_get(3)?,
        );
    }
    let rows = sqlx::query(&format!(
        "SELECT t.device_id, {hour} AS hour, m.key, count(*), \
                min(n.num)::float8, max(n.num)::float8, sum(n.num)::float8 \
         FROM telemetry t CROSS JOIN LATERAL jsonb_each(t.metrics) AS m(key, value) \
         CROSS JOIN LATERAL (SELECT CASE WHEN jsonb_typeof(m.value) = 'number' \
                                         THEN (m.value #>> '{{}}')::numeric END AS num) n \
         WHERE t.tenant_id = $1 AND t.device_id = ANY($2) AND t.time >= $3 AND t.time < $4 \
         GROUP BY 1, 2, 3"
    ))
    .bind(tenant)
    .bind(&devices)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut db_metrics = MetricStats::new();
    for row in rows {
        db_metrics.insert(
            (row.try_get(0)?, row.try_get(2)?, row.try_get(1)?),
            Stats {
                count: row.try_get(3)?,
                min: row.try_get(4)?,
                max: row.try_get(5)?,
                sum: row.try_get(6)?,
            },
        );
    }
    Ok((db_points, db_metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_compare_sums_to_a_relative_1e9_and_the_rest_exactly() {
        let mut a = Stats::default();
        for v in [0.1, 0.2, 0.3] {
            a.add(&MetricValue::Double(v));
        }
        let b = Stats {
            count: 3,
            min: Some(0.1),
            max: Some(0.3),
            sum: Some(0.6),
        };
        assert!(a.same(&b), "{a:?}");
        assert!(!a.same(&Stats { count: 2, ..b }));
        assert!(!a.same(&Stats {
            max: Some(0.30000000000000004),
            ..b
        }));
        let mut s = Stats::default();
        s.add(&MetricValue::String("x".into()));
        assert_eq!(s.to_string(), "count 1");
        assert_eq!(measurement("cpu.usage:cpu:cpu0"), "cpu");
    }
}
