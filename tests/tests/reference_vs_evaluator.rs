//! The reference evaluation (`fleetstream_tests::reference`) agrees with evaluator-stream run
//! in-process: a few hundred scripted readings over two partitions — threshold and window
//! rules, `for_s`, hysteresis, site scope, a disabled rule, late and too-late readings — give
//! exactly the same alert episodes in the `alerts` table as the reference derives by
//! replaying the topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Parser;
use fleetstream_tests::reference::{self, Reference};
use plumbing::testing::{eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::{telemetry_codec, LayoutChoice, MetricValue, Telemetry};
use sqlx::PgPool;

const T: &str = "tenant-r";
const OTHER: &str = "tenant-s";
const LATENESS_S: u64 = 5;

/// A small deterministic generator (64-bit LCG), so the scenario is the same every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// Uniform in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn reading(
    tenant: &str,
    device: &str,
    site: Option<&str>,
    time: DateTime<Utc>,
    metrics: Vec<(&str, MetricValue)>,
) -> Telemetry {
    Telemetry {
        tenant_id: tenant.to_owned(),
        device_id: device.to_owned(),
        site_id: site.map(str::to_owned),
        msg_type: "telemetry".to_owned(),
        seq: 0,
        time,
        received_at: Utc::now(),
        metrics: metrics
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Seven devices for 150 s, one reading each per second with a device-specific, jittered
/// sub-second offset; temperatures and humidity wander so that rules cross often; every so often a
/// reading comes 1–3 s late (accepted) or 9–12 s late (dropped).
fn scenario(t0: DateTime<Utc>) -> Vec<Telemetry> {
    let devices: [(&str, &str, Option<&str>); 7] = [
        (T, "d1", Some("north")),
        (T, "d2", Some("north")),
        (T, "d3", Some("south")),
        (T, "d4", None),
        (T, "d5", Some("south")),
        (T, "d6", Some("north")),
        (OTHER, "d1", Some("north")),
    ];
    let mut rng = Lcg(42);
    let mut temp: Vec<f64> = vec![28.0; devices.len()];
    let mut humidity: Vec<f64> = vec![70.0; devices.len()];
    let mut out = Vec::new();
    for second in 0..150i64 {
        for (i, (tenant, device, site)) in devices.iter().enumerate() {
            // Jitter, so that deadlines seldom coincide with a reading.
            let offset_us = (i as i64) * 137_000 + rng.below(120_000) as i64;
            let time = t0 + chrono::Duration::microseconds(second * 1_000_000 + offset_us);
            temp[i] = (temp[i] + (rng.below(9) as f64 - 4.0)).clamp(10.0, 50.0);
            humidity[i] = (humidity[i] + (rng.below(7) as f64 - 3.0) * 2.5).clamp(40.0, 95.0);
            let mut metrics = vec![("temp", MetricValue::Double(temp[i]))];
            if rng.below(4) != 0 {
                metrics.push(("humidity", MetricValue::Long(humidity[i] as i64)));
            }
            if rng.below(3) == 0 {
                metrics.push(("door", MetricValue::Bool(rng.below(2) == 0)));
            }
            if rng.below(10) == 0 {
                // Not a number: no value for any rule.
                metrics = vec![("temp", MetricValue::String("n/a".into()))];
            }
            out.push(reading(tenant, device, *site, time, metrics));
            match rng.below(20) {
                0 => {
                    let back = 1 + rng.below(3) as i64;
                    out.push(reading(
                        tenant,
                        device,
                        *site,
                        time - chrono::Duration::seconds(back),
                        vec![
                            ("temp", MetricValue::Double(45.0)),
                            ("humidity", MetricValue::Long(95)),
                        ],
                    ));
                }
                1 => {
                    let back = 9 + rng.below(4) as i64;
                    out.push(reading(
                        tenant,
                        device,
                        *site,
                        time - chrono::Duration::seconds(back),
                        vec![("temp", MetricValue::Double(49.0))],
                    ));
                }
                _ => {}
            }
        }
    }
    out
}

async fn rule(pool: &PgPool, tenant: &str, name: &str, fields: &[(&str, &str)]) -> Result<i64> {
    let columns: Vec<&str> = fields.iter().map(|(c, _)| *c).collect();
    let values: Vec<&str> = fields.iter().map(|(_, v)| *v).collect();
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

async fn produce(topics: &TestTopics, readings: &[Telemetry]) -> Result<()> {
    let producer: FutureProducer =
        plumbing::kafka::producer_config(&topics.args, "reference-test-producer").create()?;
    let codec = telemetry_codec()?;
    let mut pending = Vec::new();
    for r in readings {
        let payload = codec.encode(r)?;
        let key = r.key();
        let record = FutureRecord::to(&topics.args.telemetry_topic)
            .key(&key)
            .payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    // One message the evaluator and the reference both skip.
    let record = FutureRecord::to(&topics.args.telemetry_topic)
        .key("tenant-r/d1")
        .payload(&b"not avro"[..]);
    pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_derives_exactly_the_alerts_the_evaluator_wrote() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(2).await?;
    for tenant in [T, OTHER] {
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ($1, $1)")
            .bind(tenant)
            .execute(&db.pool)
            .await?;
    }
    let pool = &db.pool;
    rule(
        pool,
        T,
        "hot, hysteresis",
        &[
            ("kind", "'threshold'"),
            ("metric", "'temp'"),
            ("op", "'>'"),
            ("threshold", "32"),
            ("resolve_threshold", "27"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "very hot for 4 s",
        &[
            ("kind", "'threshold'"),
            ("metric", "'temp'"),
            ("op", "'>='"),
            ("threshold", "36"),
            ("for_s", "4"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "cold at the south site",
        &[
            ("kind", "'threshold'"),
            ("metric", "'temp'"),
            ("op", "'<'"),
            ("threshold", "22"),
            ("site_id", "'south'"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "warm on average",
        &[
            ("kind", "'window'"),
            ("metric", "'temp'"),
            ("agg", "'avg'"),
            ("window_s", "10"),
            ("op", "'>'"),
            ("threshold", "31"),
            ("resolve_threshold", "29"),
            ("for_s", "2"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "humid peak",
        &[
            ("kind", "'window'"),
            ("metric", "'humidity'"),
            ("agg", "'max'"),
            ("window_s", "6"),
            ("op", "'>='"),
            ("threshold", "85"),
            ("for_s", "3"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "dry trough",
        &[
            ("kind", "'window'"),
            ("metric", "'humidity'"),
            ("agg", "'min'"),
            ("window_s", "5"),
            ("op", "'<='"),
            ("threshold", "55"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "door busy",
        &[
            ("kind", "'window'"),
            ("metric", "'door'"),
            ("agg", "'count'"),
            ("window_s", "8"),
            ("op", "'>='"),
            ("threshold", "4"),
            ("device_id", "'d4'"),
        ],
    )
    .await?;
    rule(
        pool,
        T,
        "disabled",
        &[
            ("kind", "'threshold'"),
            ("metric", "'temp'"),
            ("op", "'>'"),
            ("threshold", "0"),
            ("enabled", "false"),
        ],
    )
    .await?;
    let no_data = rule(
        pool,
        T,
        "silent",
        &[("kind", "'no_data'"), ("no_data_s", "20")],
    )
    .await?;
    rule(
        pool,
        OTHER,
        "other tenant hot",
        &[
            ("kind", "'threshold'"),
            ("metric", "'temp'"),
            ("op", "'>'"),
            ("threshold", "30"),
            ("for_s", "1"),
        ],
    )
    .await?;

    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let t0 = DateTime::<Utc>::from_timestamp(t0.timestamp(), 0).unwrap();
    let readings = scenario(t0);
    produce(&topics, &readings).await?;
    let total = readings.len() as i64 + 1;

    let group = format!("reference-{}", db.name);
    let lateness = format!("{LATENESS_S}s");
    let config = evaluator_stream::Config::try_parse_from([
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
        &group,
        "--start-from",
        "earliest",
        "--allowed-lateness",
        &lateness,
        // Nothing wall-clock driven: the reference does not model idle partitions.
        "--idle-timeout",
        "1h",
        "--commit-interval",
        "200ms",
    ])?;
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { evaluator_stream::run(config, stop).await });
    eventually(
        "every reading evaluated and committed",
        Duration::from_secs(90),
        || async {
            let stored: Option<i64> = sqlx::query_scalar(
                "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE consumer_group = $1",
            )
            .bind(&group)
            .fetch_one(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
            match stored {
                Some(n) if n == total => Ok(()),
                other => Err(format!("stored {other:?} of {total}")),
            }
        },
    )
    .await?;
    shutdown.cancel();
    task.await??;

    let rules = reference::load_rules(&db.pool).await?;
    let mut expected = Reference::new(rules, Duration::from_secs(LATENESS_S));
    assert_eq!(expected.excluded_rule_ids(), &[no_data]);
    let args = topics.args.clone();
    let topic = topics.args.telemetry_topic.clone();
    let (read, expected) = tokio::task::spawn_blocking(move || {
        let read = reference::replay_topic(&args, &topic, &mut expected);
        read.map(|n| (n, expected))
    })
    .await??;
    assert_eq!(read, total as u64);
    let counters = expected.counters();
    assert_eq!(counters.undecodable, 1);
    assert!(counters.late_dropped > 0, "{counters:?}");
    assert!(counters.late_accepted > 0, "{counters:?}");

    let expected = expected.episodes();
    let actual = reference::load_alert_episodes(&db.pool, &[no_data]).await?;
    // The scenario must exercise what it claims to: firing, pending-only and open episodes.
    assert!(expected.len() >= 20, "only {} episodes", expected.len());
    assert!(expected
        .iter()
        .any(|e| e.fired_at.is_none() && e.resolved_at.is_some()));
    assert!(expected
        .iter()
        .any(|e| e.fired_at.is_some_and(|f| f > e.started_at)));
    let comparison = reference::compare(&expected, &actual);
    assert!(
        comparison.is_exact(),
        "missing {:#?}\nunexpected {:#?}",
        comparison.missing,
        comparison.unexpected
    );
    Ok(())
}
