//! Shared by the evaluator's integration tests: scenario data, rules, running the service,
//! reading results back.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Parser;
use plumbing::testing::{TestDb, TestTopics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use schemas::{telemetry_codec, MetricValue, Telemetry};
use sqlx::PgPool;

pub fn reading(
    tenant: &str,
    device: &str,
    time: DateTime<Utc>,
    metrics: &[(&str, f64)],
) -> Telemetry {
    Telemetry {
        tenant_id: tenant.to_owned(),
        device_id: device.to_owned(),
        site_id: None,
        msg_type: "telemetry".to_owned(),
        seq: 0,
        time,
        received_at: Utc::now(),
        metrics: metrics
            .iter()
            .map(|(k, v)| ((*k).to_owned(), MetricValue::Double(*v)))
            .collect(),
    }
}

/// Tenants and devices (the alerts table's foreign keys need rules, rules need tenants).
pub async fn provision(pool: &PgPool, tenants: &[&str], devices: &[(&str, &str)]) -> Result<()> {
    for t in tenants {
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
            .bind(t)
            .execute(pool)
            .await?;
    }
    for (t, d) in devices {
        sqlx::query("INSERT INTO devices (tenant_id, device_id) VALUES ($1, $2)")
            .bind(t)
            .bind(d)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Inserts a rule from `column = value` SQL fragments; returns its id.
pub async fn rule(pool: &PgPool, tenant: &str, name: &str, fields: &str) -> Result<i64> {
    let (columns, values): (Vec<&str>, Vec<&str>) = fields
        .split(';')
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let (c, v) = f.split_once('=').unwrap();
            (c.trim(), v.trim())
        })
        .unzip();
    let sql = format!(
        "INSERT INTO alert_rules (tenant_id, name, {}) VALUES ($1, $2, {}) RETURNING rule_id",
        columns.join(", "),
        values.join(", ")
    );
    Ok(sqlx::query_scalar(&sql)
        .bind(tenant)
        .bind(name)
        .fetch_one(pool)
        .await?)
}

pub fn producer(topics: &TestTopics) -> Result<FutureProducer> {
    Ok(plumbing::kafka::producer_config(&topics.args, "evaluator-test-producer").create()?)
}

/// Produces readings in order (key `tenant/device`), waiting for every acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, readings: &[Telemetry]) -> Result<()> {
    let codec = telemetry_codec()?;
    let mut pending = Vec::new();
    for r in readings {
        let payload = codec.encode(r)?;
        let key = r.key();
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() >= 20_000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// What the sink would have stored: the readings, so warm starts find their history.
pub async fn store_telemetry(pool: &PgPool, readings: &[Telemetry]) -> Result<()> {
    for chunk in readings.chunks(5_000) {
        let tenants: Vec<&str> = chunk.iter().map(|r| r.tenant_id.as_str()).collect();
        let devices: Vec<&str> = chunk.iter().map(|r| r.device_id.as_str()).collect();
        let times: Vec<DateTime<Utc>> = chunk.iter().map(|r| r.time).collect();
        let metrics: Vec<serde_json::Value> = chunk.iter().map(Telemetry::metrics_json).collect();
        sqlx::query(
            "INSERT INTO telemetry (time, tenant_id, device_id, msg_type, seq, metrics) \
             SELECT t, te, d, 'telemetry', 0, m FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::jsonb[]) AS u(te, d, t, m)",
        )
        .bind(&tenants)
        .bind(&devices)
        .bind(&times)
        .bind(&metrics)
        .execute(pool)
        .await?;
    }
    Ok(())
}

pub fn config(
    db: &TestDb,
    topics: &TestTopics,
    group: &str,
    extra: &[&str],
) -> Result<evaluator_stream::Config> {
    let telemetry = topics.args.telemetry_topic.clone();
    let alerts = topics.args.alerts_topic.clone();
    let defaults: [(&str, &str); 10] = [
        ("--database-url", &db.url),
        ("--kafka-bootstrap-servers", &topics.args.bootstrap_servers),
        ("--telemetry-topic", &telemetry),
        ("--alerts-topic", &alerts),
        ("--admin-listen", "127.0.0.1:0"),
        ("--group-id", group),
        ("--start-from", "earliest"),
        // Replays must be deterministic: no wall-clock moves unless a test asks for them.
        ("--idle-timeout", "1h"),
        ("--commit-interval", "200ms"),
        ("--system-metrics-interval", "1s"),
    ];
    let mut args = vec!["evaluator-stream".to_owned()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.push(flag.to_owned());
            args.push(value.to_owned());
        }
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Ok(evaluator_stream::Config::try_parse_from(args)?)
}

/// Sum of `group`'s stored next offsets.
pub async fn stored_total(pool: &PgPool, group: &str) -> Result<i64, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await?
    .unwrap_or(0))
}

/// Outbox rows not yet published.
pub async fn unsent(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM alert_outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await
}

/// One alert row, as compared between runs (ids left out: sequences differ).
pub type AlertRow = (
    i64,
    String,
    String,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// Every alert: (rule, device, status, started, fired, resolved), sorted.
pub async fn alerts(pool: &PgPool) -> Result<Vec<AlertRow>> {
    Ok(sqlx::query_as(
        "SELECT rule_id, device_id, status, started_at, fired_at, resolved_at FROM alerts \
         ORDER BY rule_id, device_id, started_at",
    )
    .fetch_all(pool)
    .await?)
}

/// Event ids on the alerts topic (from its beginning) until `quiet` passes without a new
/// message: (messages, distinct ids).
pub fn event_ids_on(
    args: &plumbing::config::KafkaArgs,
    quiet: Duration,
) -> Result<(usize, BTreeSet<String>)> {
    let events = alert_events_on(args, None, quiet)?;
    let total = events.len();
    Ok((total, events.into_iter().map(|e| e.event_id).collect()))
}

/// The alert events on the alerts topic (from its beginning, partition by partition) until
/// `quiet` passes without a new message, each checked for its key and `event_id` header.
/// Both framings: single-object, and the Confluent wire format with the writer schema fetched
/// from `registry` by the message's id. Call from a blocking thread inside a runtime.
pub fn alert_events_on(
    args: &plumbing::config::KafkaArgs,
    registry: Option<&plumbing::registry::Registry>,
    quiet: Duration,
) -> Result<Vec<schemas::AlertEvent>> {
    let mut config = plumbing::kafka::consumer_config(
        args,
        "evaluator-test-reader",
        &plumbing::testing::unique_name("reader"),
    );
    config.set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[&args.alerts_topic])?;
    let codec = schemas::alert_codec()?;
    let mut writers = std::collections::HashMap::new();
    let mut events = Vec::new();
    let mut last = std::time::Instant::now();
    while last.elapsed() < quiet {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            let payload = message.payload().unwrap_or_default();
            let event = match schemas::Codec::<schemas::AlertEvent>::framing(payload)? {
                schemas::Framing::Confluent { schema_id } => {
                    let registry = registry.ok_or_else(|| {
                        anyhow::anyhow!(
                            "Confluent-framed alert (id {schema_id}) without a registry"
                        )
                    })?;
                    let writer = match writers.entry(schema_id) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let json = tokio::runtime::Handle::current()
                                .block_on(registry.schema_by_id(schema_id))?;
                            e.insert(
                                codec.writer_schema(&format!("registry id {schema_id}"), &json)?,
                            )
                        }
                    };
                    codec.decode_body(writer, &payload[5..])?
                }
                schemas::Framing::SingleObject { .. } => codec.decode(payload)?,
            };
            let header = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "event_id"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned());
            assert_eq!(header.as_deref(), Some(event.event_id.as_str()));
            assert_eq!(
                message.key(),
                Some(format!("{}/{}", event.tenant_id, event.device_id).as_bytes())
            );
            events.push(event);
            last = std::time::Instant::now();
        }
    }
    Ok(events)
}

/// An alert row in seconds after the scenario start.
pub type Seen = (i64, String, String, Option<i64>, Option<i64>, Option<i64>);

/// Seconds after `t0` of each timestamp, for readable assertions.
pub fn at(t0: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| (t - t0).num_seconds())
}

pub fn metrics_map(values: &[(&str, f64)]) -> BTreeMap<String, f64> {
    values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}
