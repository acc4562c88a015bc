//! Evaluator speed, measured in one run on this machine:
//!
//! 1. **engine**: 1,000 rules (100 tenants × 10: thresholds, `for` thresholds, windows,
//!    no-data) over 100,000 devices; decode + evaluate of N pre-encoded readings in memory,
//!    against a decode-only baseline of the same bytes (the generic decoder and the fast path
//!    the service uses, `schemas::TelemetryDecoder`);
//! 2. **service**: the real evaluator from offset 0 of a pre-produced topic until every
//!    offset is stored (Kafka fetch, decode, evaluate, commits);
//! 3. **live latency**: readings produced at a steady rate (default 20,000 msg/s) while the
//!    evaluator runs, some crossing thresholds; p50/p99 from the reading's `received_at` to
//!    the commit of the transition it caused (`alert_outbox.created_at` is stamped with
//!    `clock_timestamp()` inside that transaction).
//!
//! `cargo bench -p evaluator-stream --bench evaluator_throughput` with `DATABASE_URL` and
//! `KAFKA_BOOTSTRAP_SERVERS` set. Environment: `BENCH_MESSAGES` (default 1,000,000),
//! `BENCH_LIVE_RATE` (20,000), `BENCH_LIVE_SECONDS` (20), `BENCH_HOT_EVERY` (500: one reading
//! in 500 of each device is hot). Prints figures; asserts nothing.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Parser;
use evaluator_stream::engine::{Engine, EngineConfig};
use evaluator_stream::rules::{Agg, Condition, Op, Rule, RuleSet};
use plumbing::testing::{eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::{telemetry_codec, LayoutChoice, MetricValue, Telemetry};

/// The service binary's allocator (see `src/main.rs`), so the in-process service measures
/// what runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TENANTS: usize = 100;
static HOT_EVERY: std::sync::LazyLock<i64> =
    std::sync::LazyLock::new(|| env_or("BENCH_HOT_EVERY", 500).max(1));
const DEVICES_PER_TENANT: usize = 1_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tenant(t: usize) -> String {
    format!("tenant-{t:03}")
}

/// Ten rules per tenant.
fn rules_sql() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in 0..TENANTS {
        for k in 0..10 {
            let fields = match k % 5 {
                0 => format!("kind='threshold'; metric='temperature'; op='>'; threshold={}", 40 + k),
                1 => format!("kind='threshold'; metric='temperature'; op='>'; threshold={}; for_s=30; resolve_threshold=35", 38 + k),
                2 => "kind='window'; metric='temperature'; agg='avg'; window_s=60; op='>'; threshold=37".to_owned(),
                3 => "kind='window'; metric='battery'; agg='min'; window_s=300; op='<'; threshold=10".to_owned(),
                _ => "kind='no_data'; no_data_s=120".to_owned(),
            };
            out.push((tenant(t), fields));
        }
    }
    out
}

fn rules_in_memory() -> RuleSet {
    let mut rules = Vec::new();
    let mut id = 0;
    for t in 0..TENANTS {
        for k in 0..10 {
            id += 1;
            let condition = match k % 5 {
                0 | 1 => Condition::Threshold {
                    metric: "temperature".into(),
                    op: Op::Gt,
                    threshold: 40.0 + k as f64,
                },
                2 => Condition::Window {
                    metric: "temperature".into(),
                    agg: Agg::Avg,
                    window_us: 60_000_000,
                    op: Op::Gt,
                    threshold: 37.0,
                },
                3 => Condition::Window {
                    metric: "battery".into(),
                    agg: Agg::Min,
                    window_us: 300_000_000,
                    op: Op::Lt,
                    threshold: 10.0,
                },
                _ => Condition::NoData {
                    metric: None,
                    silence_us: 120_000_000,
                },
            };
            rules.push(Rule {
                rule_id: id,
                tenant_id: tenant(t),
                name: format!("rule {id}"),
                site_id: None,
                device_id: None,
                condition,
                for_us: if k % 5 == 1 { 30_000_000 } else { 0 },
                resolve_threshold: None,
                severity: "warning".into(),
                enabled: true,
            });
        }
    }
    RuleSet::new(rules)
}

/// Reading `seq` of device `d`: temperature mostly 20–30; one reading in `HOT_EVERY` of each
/// device is hot (55 °C), so thresholds fire and resolve at a realistic rate.
fn reading(d: usize, seq: i64, time: DateTime<Utc>) -> Telemetry {
    let hot = (seq * 7 + d as i64) % *HOT_EVERY == 0;
    let temperature = if hot {
        55.0
    } else {
        20.0 + ((seq * 7 + d as i64) % 100) as f64 / 10.0
    };
    Telemetry {
        tenant_id: tenant(d / DEVICES_PER_TENANT),
        device_id: format!("dev-{d:06}"),
        site_id: None,
        msg_type: "telemetry".to_owned(),
        seq,
        time,
        received_at: Utc::now(),
        metrics: [
            ("temperature".to_owned(), MetricValue::Double(temperature)),
            ("battery".to_owned(), MetricValue::Long(100 - seq % 90)),
        ]
        .into_iter()
        .collect(),
    }
}

fn engine_figures(messages: usize) -> Result<()> {
    let codec = telemetry_codec()?;
    let devices = TENANTS * DEVICES_PER_TENANT;
    let t0 = Utc::now() - chrono::Duration::hours(1);
    let encoded: Vec<(i32, Vec<u8>)> = (0..messages)
        .map(|i| {
            let d = i % devices;
            let seq = (i / devices) as i64;
            let r = reading(d, seq, t0 + chrono::Duration::seconds(seq * 5));
            (0, codec.encode(&r).expect("a generated reading encodes"))
        })
        .collect();

    let started = Instant::now();
    let mut decoded = 0usize;
    for (_, bytes) in &encoded {
        decoded += codec.decode(bytes).map(|t| t.metrics.len()).unwrap_or(0);
    }
    let generic_rate = messages as f64 / started.elapsed().as_secs_f64();
    // What the service decodes with: the fast path for current-schema single-object bodies.
    let fast = schemas::TelemetryDecoder::new(codec);
    let started = Instant::now();
    let mut fast_decoded = 0usize;
    for (_, bytes) in &encoded {
        fast_decoded += fast.decode(bytes).map(|t| t.metrics.len()).unwrap_or(0);
    }
    let decode_rate = messages as f64 / started.elapsed().as_secs_f64();
    assert_eq!(fast_decoded, decoded, "both decoders read the same metrics");

    let mut engine = Engine::new(
        EngineConfig {
            allowed_lateness: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
        },
        Arc::new(rules_in_memory()),
    );
    engine.assign(0, None, None);
    let started = Instant::now();
    let mut transitions = 0;
    for (offset, (partition, bytes)) in encoded.iter().enumerate() {
        let message = fast.decode(bytes)?;
        if let Some(cold) = engine.cold(*partition, &message) {
            engine.warm(&cold, None, &[]);
        }
        engine.process(*partition, offset as i64, &message);
        if offset % 10_000 == 0 {
            transitions += engine.take_commit().transitions.len();
        }
    }
    transitions += engine.take_commit().transitions.len();
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    let c = engine.counters();
    println!("engine: {messages} messages, 1000 rules, {devices} devices (checksum {decoded})");
    println!(
        "  decode only, generic  {generic_rate:>12.0} msg/s  ({:.2} µs/msg)",
        1e6 / generic_rate
    );
    println!(
        "  decode only, fast     {decode_rate:>12.0} msg/s  ({:.2} µs/msg; {:.2} × generic)",
        1e6 / decode_rate,
        decode_rate / generic_rate
    );
    println!(
        "  decode + evaluate     {rate:>12.0} msg/s  ({:.2} × decode-only; {} rule evaluations, {transitions} transitions)",
        rate / decode_rate,
        c.evaluations
    );
    Ok(())
}

async fn provision(db: &TestDb) -> Result<()> {
    for t in 0..TENANTS {
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
            .bind(tenant(t))
            .execute(&db.pool)
            .await?;
    }
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id) \
         SELECT format('tenant-%s', lpad((d / 1000)::text, 3, '0')), format('dev-%s', lpad(d::text, 6, '0')) \
         FROM generate_series(0, $1 - 1) AS d",
    )
    .bind((TENANTS * DEVICES_PER_TENANT) as i64)
    .execute(&db.pool)
    .await?;
    for (t, fields) in rules_sql() {
        let (columns, values): (Vec<&str>, Vec<&str>) = fields
            .split(';')
            .filter_map(|f| f.split_once('='))
            .map(|(c, v)| (c.trim(), v.trim()))
            .unzip();
        sqlx::query(&format!(
            "INSERT INTO alert_rules (tenant_id, name, {}) VALUES ($1, 'bench', {})",
            columns.join(", "),
            values.join(", ")
        ))
        .bind(t)
        .execute(&db.pool)
        .await?;
    }
    Ok(())
}

fn config(db: &TestDb, topics: &TestTopics, start_from: &str) -> Result<evaluator_stream::Config> {
    Ok(evaluator_stream::Config::try_parse_from([
        "evaluator-stream",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--alerts-topic",
        &topics.args.alerts_topic,
        "--admin-listen",
        "127.0.0.1:0",
        "--group-id",
        &format!("bench-{}", db.name),
        "--start-from",
        start_from,
        "--log",
        "warn",
    ])?)
}

/// Longest wait for the evaluator to get through what was produced.
const DEADLINE: Duration = Duration::from_secs(600);

async fn until_stored(db: &TestDb, total: i64) -> Result<()> {
    eventually("every offset stored", DEADLINE, || async {
        match stored(db).await {
            Ok(n) if n >= total => Ok(()),
            other => Err(format!("{other:?} of {total}")),
        }
    })
    .await
}

async fn stored(db: &TestDb) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE consumer_group LIKE 'bench-%'",
    )
    .fetch_one(&db.pool)
    .await?
    .unwrap_or(0))
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    readings: impl Iterator<Item = Telemetry>,
) -> Result<usize> {
    let codec = telemetry_codec()?;
    let mut pending = Vec::new();
    let mut n = 0;
    for r in readings {
        let payload = codec.encode(&r)?;
        let key = r.key();
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
        if pending.len() >= 50_000 {
            for p in pending.drain(..) {
                p.await?.map_err(|(e, _)| e)?;
                n += 1;
            }
        }
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
        n += 1;
    }
    Ok(n)
}

async fn service_figures(messages: usize, live_rate: usize, live_seconds: u64) -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    provision(&db).await?;
    let topics = TestTopics::new(12).await?;
    let mut producer_config = plumbing::kafka::producer_config(&topics.args, "evaluator-bench");
    producer_config.set("queue.buffering.max.messages", "2000000");
    let producer: FutureProducer = producer_config.create()?;
    let devices = TENANTS * DEVICES_PER_TENANT;
    // The backlog ends about now, so the live phase continues its event time.
    let rounds = messages.div_ceil(devices) as i64;
    let t0 = Utc::now() - chrono::Duration::seconds(rounds * 5 + 10);
    let produced = produce(
        &producer,
        &topics.args.telemetry_topic,
        (0..messages).map(|i| {
            let seq = (i / devices) as i64;
            reading(i % devices, seq, t0 + chrono::Duration::seconds(seq * 5))
        }),
    )
    .await?;

    let shutdown = Shutdown::new();
    let started = Instant::now();
    let task = tokio::spawn(evaluator_stream::run(
        config(&db, &topics, "earliest")?,
        shutdown.clone(),
    ));
    // The first stored offset marks the end of the group join.
    let (joined, at_join) = eventually("the first commit", DEADLINE, || async {
        match stored(&db).await {
            Ok(n) if n > 0 => Ok((Instant::now(), n)),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    until_stored(&db, produced as i64).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let after_join = (produced as i64 - at_join) as f64 / joined.elapsed().as_secs_f64();
    let transitions: i64 = sqlx::query_scalar("SELECT count(*) FROM alert_outbox")
        .fetch_one(&db.pool)
        .await?;
    println!("service: {produced} messages from offset 0 (group join included)");
    println!(
        "  evaluated + committed {:>12.0} msg/s  ({elapsed:.1} s with the group join, {transitions} transitions)",
        produced as f64 / elapsed
    );
    println!("  after the first commit {after_join:>11.0} msg/s");

    // Live: a steady rate with readings stamped now.
    let before: i64 = sqlx::query_scalar("SELECT coalesce(max(outbox_id), 0) FROM alert_outbox")
        .fetch_one(&db.pool)
        .await?;
    let tick = Duration::from_millis(10);
    let per_tick = (live_rate / 100).max(1);
    let until = Instant::now() + Duration::from_secs(live_seconds);
    let mut next = Instant::now();
    let mut sent = 0usize;
    let codec = telemetry_codec()?;
    let mut seq = (messages / devices) as i64 + 1;
    let mut pending = Vec::new();
    while Instant::now() < until {
        for _ in 0..per_tick {
            let d = sent % devices;
            if d == 0 {
                seq += 1;
            }
            let r = reading(d, seq, Utc::now());
            let payload = codec.encode(&r)?;
            let key = r.key();
            pending.push(
                producer
                    .send_result(
                        FutureRecord::to(&topics.args.telemetry_topic)
                            .key(&key)
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)?,
            );
            sent += 1;
        }
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    let achieved = sent as f64 / live_seconds as f64;
    until_stored(&db, (produced + sent) as i64).await?;
    let (n, p50, p99, max): (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM created_at - source_received_at)::float8), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM created_at - source_received_at)::float8), \
                max(extract(epoch FROM created_at - source_received_at))::float8 \
         FROM alert_outbox WHERE outbox_id > $1 AND source_received_at IS NOT NULL",
    )
    .bind(before)
    .fetch_one(&db.pool)
    .await?;
    println!("live: {achieved:.0} msg/s for {live_seconds} s");
    println!(
        "  received_at → transition committed: {n} transitions, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50.unwrap_or(0.0) * 1e3,
        p99.unwrap_or(0.0) * 1e3,
        max.unwrap_or(0.0) * 1e3
    );
    shutdown.cancel();
    task.await??;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let messages = env_or("BENCH_MESSAGES", 1_000_000usize);
    let live_rate = env_or("BENCH_LIVE_RATE", 20_000usize);
    let live_seconds = env_or("BENCH_LIVE_SECONDS", 20u64);
    engine_figures(messages)?;
    service_figures(messages, live_rate, live_seconds).await?;
    Ok(())
}
