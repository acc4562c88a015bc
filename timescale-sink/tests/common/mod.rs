//! Shared by the sink's integration tests: producing telemetry, running the sink, polling.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Parser;
use plumbing::testing::{TestDb, TestTopics};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::{telemetry_codec, MetricValue, Telemetry};
use serde_json::{json, Value};

pub fn reading(tenant: &str, device: usize, seq: i64, time: DateTime<Utc>) -> Telemetry {
    let mut metrics = BTreeMap::new();
    metrics.insert(
        "temperature".to_owned(),
        MetricValue::Double(20.0 + (seq % 50) as f64 / 10.0),
    );
    metrics.insert("battery".to_owned(), MetricValue::Long(100 - seq % 100));
    metrics.insert("door_open".to_owned(), MetricValue::Bool(seq % 7 == 0));
    Telemetry {
        tenant_id: tenant.to_owned(),
        device_id: format!("dev-{device:06}"),
        site_id: device
            .is_multiple_of(3)
            .then(|| format!("site-{}", device % 10)),
        msg_type: "telemetry".to_owned(),
        seq,
        time,
        received_at: Utc::now(),
        metrics,
    }
}

/// A batch writer of group `g`, topic `t`, on `db`, with fast retries and its own stats.
pub fn batch_writer(
    db: &TestDb,
    topics: &TestTopics,
) -> Result<(
    timescale_sink::writer::BatchWriter,
    std::sync::Arc<timescale_sink::stats::Stats>,
)> {
    let stats = std::sync::Arc::new(timescale_sink::stats::Stats::default());
    let producer = plumbing::kafka::producer_config(&topics.args, "writer-test").create()?;
    Ok((
        timescale_sink::writer::BatchWriter {
            pool: db.pool.clone(),
            group: "g".to_owned(),
            topic: "t".to_owned(),
            dlq: timescale_sink::dlq::DeadLetterQueue::new(
                producer,
                topics.args.dlq_topic.clone(),
                "t".to_owned(),
            ),
            on_committed: std::sync::Arc::new(|_| {}),
            stats: stats.clone(),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            recent: Default::default(),
            latest: Default::default(),
        },
        stats,
    ))
}

pub fn producer(topics: &TestTopics) -> Result<FutureProducer> {
    let mut config = plumbing::kafka::producer_config(&topics.args, "sink-test-producer");
    config.set("queue.buffering.max.messages", "2000000");
    config.set("queue.buffering.max.kbytes", "2097151");
    Ok(config.create()?)
}

/// Produces `(key, payload)` pairs to `topic` (partition by key, or the given one), waiting
/// for every acknowledgement.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>, Option<i32>)>,
) -> Result<usize> {
    let mut pending = Vec::new();
    let mut sent = 0;
    for (key, payload, partition) in messages {
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() >= 50_000 {
            for delivery in pending.drain(..) {
                delivery.await?.map_err(|(e, _)| e)?;
                sent += 1;
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
        sent += 1;
    }
    Ok(sent)
}

/// `devices` devices × `per_device` readings each, one second apart, ending about now.
pub fn fleet(
    tenants: usize,
    devices: usize,
    per_device: i64,
) -> Vec<(String, Vec<u8>, Option<i32>)> {
    let codec = telemetry_codec().unwrap();
    let start = Utc::now() - chrono::Duration::seconds(per_device + 60);
    let mut out = Vec::with_capacity(devices * per_device as usize);
    for seq in 0..per_device {
        for device in 0..devices {
            let tenant = format!("tenant-{}", device % tenants);
            let r = reading(&tenant, device, seq, start + chrono::Duration::seconds(seq));
            out.push((r.key(), codec.encode(&r).unwrap(), None));
        }
    }
    out
}

pub fn sink_config(
    db: &TestDb,
    topics: &TestTopics,
    extra: &[&str],
) -> Result<timescale_sink::Config> {
    let mut args = vec![
        "timescale-sink".to_owned(),
        "--database-url".to_owned(),
        db.url.clone(),
        "--kafka-bootstrap-servers".to_owned(),
        topics.args.bootstrap_servers.clone(),
        "--telemetry-topic".to_owned(),
        topics.args.telemetry_topic.clone(),
        "--dlq-topic".to_owned(),
        topics.args.dlq_topic.clone(),
        "--admin-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--group-id".to_owned(),
        format!("sink-{}", db.name),
        "--system-metrics-interval".to_owned(),
        "1s".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Ok(timescale_sink::Config::try_parse_from(args)?)
}

/// Sum of `group`'s stored next offsets (0 before the first commit).
pub async fn stored_total(pool: &sqlx::PgPool, group: &str) -> Result<i64, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await?
    .unwrap_or(0))
}

/// Polls until `group` has stored at least `at_least` offsets. Database errors count as "not
/// yet" (tests restart the server under it); returns the total reached.
pub async fn wait_for_stored(
    pool: &sqlx::PgPool,
    group: &str,
    at_least: i64,
    timeout: Duration,
) -> Result<i64> {
    plumbing::testing::eventually(
        &format!("{at_least} stored offsets of {group}"),
        timeout,
        || async move {
            match stored_total(pool, group).await {
                Ok(total) if total >= at_least => Ok(total),
                Ok(total) => Err(format!("{total} stored")),
                Err(err) => Err(err.to_string()),
            }
        },
    )
    .await
}

/// Sum of the topic's high watermarks.
pub fn end_offsets(topics: &TestTopics, partitions: i32) -> Result<BTreeMap<i32, i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        plumbing::kafka::base_config(&topics.args, "sink-test-watermarks").create()?;
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        let (_, high) =
            consumer.fetch_watermarks(&topics.args.telemetry_topic, p, Duration::from_secs(10))?;
        out.insert(p, high);
    }
    Ok(out)
}

pub async fn stored_offsets(pool: &sqlx::PgPool, group: &str) -> Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

pub async fn assert_no_duplicate_keys(pool: &sqlx::PgPool) -> Result<()> {
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM telemetry GROUP BY tenant_id, device_id, time HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(duplicates, 0);
    Ok(())
}

/// Split-sensor devices: each reports `temperature` and `humidity` in separate messages at the
/// same timestamps, one second apart and ending about now, as ThingsBoard- and Telegraf-style
/// agents do; every `resend_every`-th message is sent twice in a row (an exact re-send). At the
/// last timestamp only `temperature` is reported, so each metric's latest time differs.
#[derive(Debug)]
pub struct SplitSensors {
    pub messages: Vec<(String, Vec<u8>, Option<i32>)>,
    /// The readings, in the order of `messages`.
    pub readings: Vec<Telemetry>,
    pub devices: usize,
    pub times: i64,
    pub start: DateTime<Utc>,
    /// Messages sent a second time.
    pub resends: u64,
}

pub const SPLIT_TENANT: &str = "split";

pub fn split_temperature(device: usize, t: i64) -> f64 {
    device as f64 + t as f64 / 8.0
}

pub fn split_humidity(device: usize, t: i64) -> i64 {
    (device as i64 * 7 + t) % 100
}

impl SplitSensors {
    pub fn new(devices: usize, times: i64, resend_every: usize) -> Self {
        let codec = telemetry_codec().unwrap();
        // Whole seconds, so times compare exactly with what the database returns.
        let start = DateTime::from_timestamp(Utc::now().timestamp() - times - 60, 0).unwrap();
        let mut out = SplitSensors {
            messages: Vec::new(),
            readings: Vec::new(),
            devices,
            times,
            start,
            resends: 0,
        };
        let mut n = 0usize;
        for t in 0..times {
            for device in 0..devices {
                let mut metrics = vec![(
                    "temperature",
                    MetricValue::Double(split_temperature(device, t)),
                )];
                if t + 1 < times {
                    metrics.push(("humidity", MetricValue::Long(split_humidity(device, t))));
                }
                for (name, value) in metrics {
                    let r = Telemetry {
                        tenant_id: SPLIT_TENANT.to_owned(),
                        device_id: format!("dev-{device:05}"),
                        site_id: None,
                        msg_type: "telemetry".to_owned(),
                        seq: t,
                        time: start + chrono::Duration::seconds(t),
                        received_at: Utc::now(),
                        metrics: BTreeMap::from([(name.to_owned(), value)]),
                    };
                    let copies = if n % resend_every == resend_every - 1 {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        out.messages
                            .push((r.key(), codec.encode(&r).unwrap(), None));
                        out.readings.push(r.clone());
                    }
                    out.resends += copies - 1;
                    n += 1;
                }
            }
        }
        out
    }

    /// Points: one per device and timestamp.
    pub fn points(&self) -> u64 {
        self.devices as u64 * self.times as u64
    }

    /// Readings merged into a point: every humidity message (sent after its temperature).
    pub fn merged(&self) -> u64 {
        self.devices as u64 * (self.times as u64 - 1)
    }

    /// Asserts the database holds exactly the merged points and per-metric latest values.
    pub async fn assert_stored(&self, pool: &sqlx::PgPool) -> Result<()> {
        let rows: Vec<(String, DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
            "SELECT device_id::text, time, metrics FROM telemetry WHERE tenant_id = $1 \
             ORDER BY device_id, time",
        )
        .bind(SPLIT_TENANT)
        .fetch_all(pool)
        .await?;
        assert_eq!(rows.len() as u64, self.points(), "one row per point");
        let mut i = 0;
        for device in 0..self.devices {
            for t in 0..self.times {
                let (device_id, time, metrics) = &rows[i];
                i += 1;
                assert_eq!(device_id, &format!("dev-{device:05}"));
                assert_eq!(*time, self.start + chrono::Duration::seconds(t));
                let expected = if t + 1 < self.times {
                    serde_json::json!({"temperature": split_temperature(device, t),
                                       "humidity": split_humidity(device, t)})
                } else {
                    serde_json::json!({"temperature": split_temperature(device, t)})
                };
                assert_eq!(metrics, &expected, "{device_id} at {time}");
            }
        }
        let latest: Vec<(String, DateTime<Utc>, serde_json::Value, serde_json::Value)> =
            sqlx::query_as(
                "SELECT device_id::text, time, metrics, metric_times FROM device_latest \
                 WHERE tenant_id = $1 ORDER BY device_id",
            )
            .bind(SPLIT_TENANT)
            .fetch_all(pool)
            .await?;
        assert_eq!(latest.len(), self.devices);
        let last = self.times - 1;
        for (device, (device_id, time, metrics, metric_times)) in latest.iter().enumerate() {
            assert_eq!(device_id, &format!("dev-{device:05}"));
            assert_eq!(*time, self.start + chrono::Duration::seconds(last));
            assert_eq!(
                metrics,
                &serde_json::json!({"temperature": split_temperature(device, last),
                                    "humidity": split_humidity(device, last - 1)})
            );
            let humidity_at = (self.start + chrono::Duration::seconds(last - 1)).timestamp_micros();
            assert_eq!(
                metric_times,
                &serde_json::json!({ "humidity": humidity_at })
            );
        }
        Ok(())
    }
}

pub const DEVICES: usize = 100;
pub const PER_DEVICE: usize = 5;

/// Reading `seq` of `device` for the independent Python producers: what they get (a record of `telemetry.v1` in Python's
/// types) and what the database must hold.
pub struct Sent {
    pub key: String,
    pub tenant: String,
    pub device: String,
    pub site: Option<String>,
    pub seq: i64,
    pub time: DateTime<Utc>,
    pub metrics: Value,
}

pub fn sent(device: usize, seq: usize, base: DateTime<Utc>) -> Sent {
    let tenant = format!("tenant-{}", device % 2);
    let device_id = format!("py-{device:04}");
    let seq = seq as i64;
    // Doubles with a fraction (JSON keeps them floats on both sides), integers of both signs
    // and beyond 32 bits, booleans, strings with non-ASCII text, nulls.
    let metrics = json!({
        "temperature": 20.25 + device as f64 + seq as f64 / 8.0,
        "counter": (device as i64) * 5_000_000_000 - seq,
        "door_open": seq % 2 == 0,
        "firmware": format!("v{seq}-ü"),
        "error_code": null,
    });
    Sent {
        key: format!("{tenant}/{device_id}"),
        site: device
            .is_multiple_of(3)
            .then(|| format!("site-{}", device % 5)),
        tenant,
        device: device_id,
        seq,
        time: base + chrono::Duration::milliseconds(device as i64 * 10 + seq * 1_000),
        metrics,
    }
}

pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

impl Sent {
    /// The record as the Python producers take it (`time` and `received_at` in microseconds).
    pub fn line(&self) -> Value {
        json!({
            "key": self.key,
            "record": {
                "tenant_id": self.tenant,
                "device_id": self.device,
                "site_id": self.site,
                "msg_type": "telemetry",
                "seq": self.seq,
                "time": micros(self.time),
                "received_at": micros(self.time) + 250_000,
                "metrics": self.metrics,
            },
        })
    }
}

/// Runs the venv's Python (`FLEETSTREAM_PYTHON`) on `script` (under `tests/interop`) with
/// `args`, feeding `lines` on stdin; returns its stdout, trimmed.
pub fn run_python(script: &str, args: &[&str], lines: &[Value]) -> Result<String> {
    use std::io::Write;
    let python = std::env::var("FLEETSTREAM_PYTHON").map_err(|_| {
        anyhow::anyhow!(
            "FLEETSTREAM_PYTHON is not set: run `eval \"$(deploy/local/deps.sh env)\"` after \
             `deploy/local/deps.sh up`, which installs fastavro and confluent-kafka"
        )
    })?;
    let path = format!("{}/tests/interop/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            writeln!(stdin, "{line}")?;
        }
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Asserts the `telemetry` table holds exactly `readings`, as sent.
pub async fn assert_stored_as_sent(pool: &sqlx::PgPool, readings: &[Sent]) -> Result<()> {
    type Row = (String, String, Option<String>, i64, DateTime<Utc>, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT tenant_id, device_id, site_id, seq, time, metrics::text FROM telemetry \
         ORDER BY tenant_id, device_id, time",
    )
    .fetch_all(pool)
    .await?;
    let mut want: Vec<&Sent> = readings.iter().collect();
    want.sort_by(|a, b| (&a.tenant, &a.device, a.time).cmp(&(&b.tenant, &b.device, b.time)));
    assert_eq!(rows.len(), want.len(), "one row per reading");
    for (row, r) in rows.iter().zip(want) {
        let stored: Value = serde_json::from_str(&row.5)?;
        assert_eq!(
            (&row.0, &row.1, &row.2, row.3, row.4, &stored),
            (&r.tenant, &r.device, &r.site, r.seq, r.time, &r.metrics),
            "stored as sent"
        );
    }
    Ok(())
}

/// The next `count` dead letters of `topics`' DLQ: (source offset, stage, error, payload).
pub async fn dead_letters(
    topics: &TestTopics,
    group: &str,
    count: usize,
) -> Result<Vec<(String, String, String, Vec<u8>)>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer =
        plumbing::kafka::consumer_config(&topics.args, "dlq-reader", group).create()?;
    consumer.subscribe(&[&topics.args.dlq_topic])?;
    let mut letters = Vec::new();
    while letters.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let header = |name: &str| {
            message
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        letters.push((
            header("source_offset"),
            header("error_stage"),
            header("error"),
            message.payload().unwrap_or_default().to_vec(),
        ));
    }
    Ok(letters)
}

/// The DLQ's end offsets summed over its partitions (how many dead letters were written).
pub fn dlq_total(topics: &TestTopics) -> Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        plumbing::kafka::base_config(&topics.args, "sink-test-dlq-watermarks").create()?;
    let metadata =
        consumer.fetch_metadata(Some(&topics.args.dlq_topic), Duration::from_secs(10))?;
    let mut total = 0;
    for topic in metadata.topics() {
        for p in topic.partitions() {
            let (_, high) = consumer.fetch_watermarks(
                &topics.args.dlq_topic,
                p.id(),
                Duration::from_secs(10),
            )?;
            total += high;
        }
    }
    Ok(total)
}
