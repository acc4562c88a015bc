//! The evaluator in-process against real Kafka and PostgreSQL: a scripted scenario whose
//! every transition is known, lateness, rule validation and rule reloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use common::*;
use plumbing::testing::{eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;

const A: &str = "tenant-a";
const B: &str = "tenant-b";

/// Readings one second apart from `t0`, by script (see the test for the expected alerts).
fn scenario(t0: DateTime<Utc>) -> Vec<schemas::Telemetry> {
    let s = |i: i64| t0 + chrono::Duration::seconds(i);
    let mut out = Vec::new();
    for i in 0..=120 {
        out.push(reading(A, "clock", s(i), &[("temp", 20.0)]));
        let hot = if (10..25).contains(&i) { 35.0 } else { 20.0 };
        out.push(reading(A, "hot", s(i), &[("temp", hot)]));
        let blip = if (30..35).contains(&i) { 35.0 } else { 20.0 };
        out.push(reading(A, "blip", s(i), &[("temp", blip)]));
        let humid = if (40..50).contains(&i) { 80.0 } else { 60.0 };
        out.push(reading(A, "humid", s(i), &[("humidity", humid)]));
        if !(60..100).contains(&i) {
            out.push(reading(A, "silent", s(i), &[("temp", 20.0)]));
        }
        out.push(reading(
            B,
            "other",
            s(i),
            &[("temp", 99.0), ("humidity", 99.0)],
        ));
    }
    out
}

async fn start(config: evaluator_stream::Config) -> (Shutdown, tokio::task::JoinHandle<()>) {
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        evaluator_stream::run(config, stop).await.unwrap();
    });
    (shutdown, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_scenario_makes_exactly_the_expected_transitions() -> Result<()> {
    for layout in plumbing::testing::available_layouts().await? {
        run_scenario(layout).await?;
    }
    Ok(())
}

async fn run_scenario(layout: LayoutChoice) -> Result<()> {
    let db = TestDb::new(layout).await?;
    let topics = TestTopics::new(1).await?;
    let devices = [
        (A, "clock"),
        (A, "hot"),
        (A, "blip"),
        (A, "humid"),
        (A, "silent"),
        (B, "other"),
    ];
    provision(&db.pool, &[A, B], &devices).await?;
    let hot = rule(
        &db.pool,
        A,
        "hot now",
        "kind='threshold'; metric='temp'; op='>'; threshold=30",
    )
    .await?;
    let hot_for = rule(
        &db.pool,
        A,
        "hot for 10 s",
        "kind='threshold'; metric='temp'; op='>'; threshold=30; for_s=10; severity='critical'",
    )
    .await?;
    let humid = rule(
        &db.pool,
        A,
        "humid on average",
        "kind='window'; metric='humidity'; agg='avg'; window_s=10; op='>'; threshold=70",
    )
    .await?;
    let silent = rule(
        &db.pool,
        A,
        "silent",
        "kind='no_data'; no_data_s=30; device_id='silent'",
    )
    .await?;
    rule(
        &db.pool,
        A,
        "disabled",
        "kind='threshold'; metric='temp'; op='>'; threshold=0; enabled=false",
    )
    .await?;

    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let t0 = DateTime::<Utc>::from_timestamp(t0.timestamp(), 0).unwrap();
    let readings = scenario(t0);
    store_telemetry(&db.pool, &readings).await?;
    produce(&producer(&topics)?, &topics.args.telemetry_topic, &readings).await?;

    let group = format!("eval-{}", db.name);
    let (shutdown, task) = start(config(&db, &topics, &group, &[])?).await;
    let total = readings.len() as i64;
    eventually(
        "every reading evaluated and committed",
        Duration::from_secs(60),
        || async {
            let stored = stored_total(&db.pool, &group)
                .await
                .map_err(|e| e.to_string())?;
            let unsent = unsent(&db.pool).await.map_err(|e| e.to_string())?;
            if stored == total && unsent == 0 {
                Ok(())
            } else {
                Err(format!(
                    "stored {stored} of {total}, {unsent} events unsent"
                ))
            }
        },
    )
    .await?;

    let got: Vec<Seen> = alerts(&db.pool)
        .await?
        .into_iter()
        .map(|(r, d, s, st, f, re)| (r, d, s, at(t0, st), at(t0, f), at(t0, re)))
        .collect();
    let row = |r: i64, d: &str, st: i64, f: Option<i64>, re: i64| {
        (
            r,
            d.to_owned(),
            "resolved".to_owned(),
            Some(st),
            f,
            Some(re),
        )
    };
    assert_eq!(
        got,
        vec![
            row(hot, "blip", 30, Some(30), 35),
            row(hot, "hot", 10, Some(10), 25),
            // A blip shorter than for_s never fires.
            row(hot_for, "blip", 30, None, 35),
            row(hot_for, "hot", 10, Some(20), 25),
            // avg over 10 s passes 70 with the sixth reading of 80, falls back at 70.
            row(humid, "humid", 45, Some(45), 54),
            // Silent from 60 (last reading 59): fires at 59 + 30, resolves on the reading at 100.
            row(silent, "silent", 89, Some(89), 100),
        ],
        "layout {layout:?}"
    );

    // Every transition is on alerts.v1 once (13 steps: firing+resolved ×4, pending+firing+
    // resolved, pending+resolved), keyed by device, with the event id in a header.
    let args = topics.args.clone();
    let (total_events, ids) =
        tokio::task::spawn_blocking(move || event_ids_on(&args, Duration::from_secs(3))).await??;
    assert_eq!(total_events, 13);
    assert_eq!(ids.len(), 13);
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM alert_outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(outbox, 13);

    // Late readings: 2 s behind the partition clock is accepted, 60 s behind is dropped.
    let last = t0 + chrono::Duration::seconds(120);
    let late = vec![
        reading(
            A,
            "hot",
            last - chrono::Duration::seconds(2),
            &[("temp", 99.0)],
        ),
        reading(
            A,
            "hot",
            last - chrono::Duration::seconds(60),
            &[("temp", 99.0)],
        ),
    ];
    produce(&producer(&topics)?, &topics.args.telemetry_topic, &late).await?;
    eventually("late readings counted in system_metrics", Duration::from_secs(30), || async {
        let figures: Vec<(String, f64)> = sqlx::query_as(
            "SELECT DISTINCT ON (metric_name) metric_name, value FROM system_metrics \
             WHERE metric_name IN ('evaluator_late_accepted_total', 'evaluator_late_dropped_total') \
             ORDER BY metric_name, time DESC",
        )
        .fetch_all(&db.pool)
        .await
        .map_err(|e| e.to_string())?;
        let want = vec![
            ("evaluator_late_accepted_total".to_owned(), 1.0),
            ("evaluator_late_dropped_total".to_owned(), 1.0),
        ];
        if figures == want {
            Ok(())
        } else {
            Err(format!("{figures:?}"))
        }
    })
    .await?;
    // Neither late reading changed an alert.
    assert_eq!(alerts(&db.pool).await?.len(), 6);

    shutdown.cancel();
    task.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_added_while_running_applies_without_a_restart() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(2).await?;
    provision(&db.pool, &[A], &[(A, "d1")]).await?;
    let group = format!("eval-{}", db.name);
    let (shutdown, task) = start(config(&db, &topics, &group, &["--rules-refresh", "1h"])?).await;
    let producer = producer(&topics)?;
    let t0 = Utc::now();
    produce(
        &producer,
        &topics.args.telemetry_topic,
        &[reading(A, "d1", t0, &[("temp", 50.0)])],
    )
    .await?;
    eventually(
        "first reading committed",
        Duration::from_secs(30),
        || async {
            match stored_total(&db.pool, &group).await {
                Ok(1) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    assert!(alerts(&db.pool).await?.is_empty());

    // The NOTIFY from the insert reloads the rules (the periodic refresh is an hour away).
    let id = rule(
        &db.pool,
        A,
        "hot",
        "kind='threshold'; metric='temp'; op='>'; threshold=30",
    )
    .await?;
    let mut i = 1;
    eventually("the new rule fires", Duration::from_secs(30), || {
        i += 1;
        let producer = producer.clone();
        let topic = topics.args.telemetry_topic.clone();
        let pool = db.pool.clone();
        let t = t0 + chrono::Duration::seconds(i);
        async move {
            produce(&producer, &topic, &[reading(A, "d1", t, &[("temp", 50.0)])])
                .await
                .map_err(|e| e.to_string())?;
            let rows = alerts(&pool).await.map_err(|e| e.to_string())?;
            match rows.as_slice() {
                [(rule, device, status, ..)]
                    if *rule == id && device == "d1" && status == "firing" =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    shutdown.cancel();
    task.await?;
    Ok(())
}

#[tokio::test]
async fn invalid_rules_are_rejected_by_the_table() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    provision(&db.pool, &[A], &[]).await?;
    let bad = [
        (
            "threshold without metric",
            "kind='threshold'; op='>'; threshold=1",
        ),
        (
            "window without agg",
            "kind='window'; metric='m'; op='>'; threshold=1; window_s=60",
        ),
        (
            "unknown op",
            "kind='threshold'; metric='m'; op='=>'; threshold=1",
        ),
        (
            "negative for",
            "kind='threshold'; metric='m'; op='>'; threshold=1; for_s=-1",
        ),
        ("no_data without length", "kind='no_data'"),
        (
            "hysteresis on equality",
            "kind='threshold'; metric='m'; op='=='; threshold=1; resolve_threshold=2",
        ),
        (
            "agg on a threshold rule",
            "kind='threshold'; metric='m'; op='>'; threshold=1; agg='avg'; window_s=5",
        ),
        (
            "window longer than a day",
            "kind='window'; metric='m'; op='>'; threshold=1; agg='avg'; window_s=86401",
        ),
        (
            "bad severity",
            "kind='no_data'; no_data_s=5; severity='fatal'",
        ),
    ];
    for (what, fields) in bad {
        let err = rule(&db.pool, A, what, fields).await.expect_err(what);
        let code = err
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        // 23514 check_violation (22P02 would be a typo in the test itself).
        assert_eq!(code.as_deref(), Some("23514"), "{what}: {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_silent_in_real_time_fires_no_data_by_the_wall_clock() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    provision(&db.pool, &[A], &[(A, "lonely")]).await?;
    let id = rule(&db.pool, A, "silent 2 s", "kind='no_data'; no_data_s=2").await?;
    let group = format!("eval-{}", db.name);
    let config = config(
        &db,
        &topics,
        &group,
        &["--idle-timeout", "1s", "--allowed-lateness", "1s"],
    )?;
    let (shutdown, task) = start(config).await;
    let producer = producer(&topics)?;
    // Microseconds, as Avro carries them.
    let first = DateTime::<Utc>::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    produce(
        &producer,
        &topics.args.telemetry_topic,
        &[reading(A, "lonely", first, &[("temp", 1.0)])],
    )
    .await?;
    // Nothing else arrives on the partition: only the wall clock can tell it went silent.
    let fired = eventually(
        "no-data fires by the wall clock",
        Duration::from_secs(30),
        || async {
            let rows = alerts(&db.pool).await.map_err(|e| e.to_string())?;
            match rows.as_slice() {
                [(rule, device, status, Some(started), ..)]
                    if *rule == id && device == "lonely" && status == "firing" =>
                {
                    Ok(*started)
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    // The alert starts when the silence reached 2 s (event time), not when it was noticed.
    assert_eq!(fired, first + chrono::Duration::seconds(2));
    produce(
        &producer,
        &topics.args.telemetry_topic,
        &[reading(A, "lonely", Utc::now(), &[("temp", 1.0)])],
    )
    .await?;
    eventually("a reading resolves it", Duration::from_secs(30), || async {
        let rows = alerts(&db.pool).await.map_err(|e| e.to_string())?;
        match rows.as_slice() {
            [(_, _, status, ..)] if status == "resolved" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    shutdown.cancel();
    task.await?;
    Ok(())
}

/// `EVALUATOR_TRANSITION_COMMIT_DELAY`: a transition evaluated before the next reading is even
/// sent, with a delay of ten seconds, is written by one transaction with that reading's (the
/// same `xmin` on both alert rows and both outbox rows); without the delay the first would
/// have been committed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_within_the_commit_delay_share_one_transaction() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    provision(&db.pool, &[A], &[(A, "d0"), (A, "d1"), (A, "d2")]).await?;
    rule(
        &db.pool,
        A,
        "hot",
        "kind='threshold'; metric='temp'; op='>'; threshold=30",
    )
    .await?;
    let group = format!("eval-{}", db.name);
    let extra = [
        "--transition-commit-delay",
        "10s",
        "--commit-interval",
        "1h",
    ];
    let (shutdown, task) = start(config(&db, &topics, &group, &extra)?).await;
    let producer = producer(&topics)?;
    let topic = &topics.args.telemetry_topic;
    let firing = |devices: &'static [&'static str]| {
        let pool = db.pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                let rows = alerts(&pool).await.map_err(|e| e.to_string())?;
                let n = rows
                    .iter()
                    .filter(|r| r.2 == "firing" && devices.contains(&r.1.as_str()))
                    .count();
                if n == devices.len() {
                    Ok(())
                } else {
                    Err(format!("{rows:?}"))
                }
            }
        }
    };
    // Warm-up: the evaluator has joined its group, been assigned and committed once, so no
    // first-join rebalance (whose revocation commits at once) falls between the two below.
    let t0 = Utc::now();
    produce(&producer, topic, &[reading(A, "d0", t0, &[("temp", 50.0)])]).await?;
    eventually(
        "d0's alert firing",
        Duration::from_secs(30),
        firing(&["d0"]),
    )
    .await?;

    let t1 = t0 + chrono::Duration::seconds(1);
    produce(&producer, topic, &[reading(A, "d1", t1, &[("temp", 50.0)])]).await?;
    // d2's reading is sent only once d1's has been evaluated (its transition waiting for the
    // delay), so without the delay the two would be committed apart.
    eventually(
        "d1's reading evaluated (system_metrics)",
        Duration::from_secs(30),
        || async {
            let evaluated: Option<f64> = sqlx::query_scalar(
                "SELECT value FROM system_metrics WHERE metric_name = 'evaluator_messages_total' \
                 ORDER BY time DESC LIMIT 1",
            )
            .fetch_optional(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
            match evaluated {
                Some(n) if n >= 2.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    let t2 = t1 + chrono::Duration::milliseconds(500);
    produce(&producer, topic, &[reading(A, "d2", t2, &[("temp", 50.0)])]).await?;
    eventually(
        "d1's and d2's alerts firing",
        Duration::from_secs(30),
        firing(&["d1", "d2"]),
    )
    .await?;
    let transactions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT 'alerts', count(DISTINCT xmin::text) FROM alerts WHERE device_id <> 'd0' \
         UNION ALL SELECT 'outbox', count(DISTINCT xmin::text) FROM alert_outbox \
         WHERE device_id <> 'd0'",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        transactions,
        vec![("alerts".to_owned(), 1), ("outbox".to_owned(), 1)]
    );
    shutdown.cancel();
    task.await?;
    Ok(())
}

/// Kafka's committed offsets of the group follow the offsets stored in PostgreSQL, so
/// `kafka-consumer-groups.sh --describe` reports the lag the evaluator reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_committed_offsets_follow_the_offsets_stored_in_postgresql() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(2).await?;
    let devices: Vec<(&str, String)> = (0..8).map(|i| (A, format!("d{i}"))).collect();
    let device_refs: Vec<(&str, &str)> = devices.iter().map(|(t, d)| (*t, d.as_str())).collect();
    provision(&db.pool, &[A], &device_refs).await?;
    let t0 = Utc::now();
    let readings: Vec<_> = (0..40)
        .map(|i| {
            let (tenant, device) = device_refs[i % device_refs.len()];
            reading(
                tenant,
                device,
                t0 + chrono::Duration::milliseconds(i as i64),
                &[("temp", 20.0)],
            )
        })
        .collect();
    produce(&producer(&topics)?, &topics.args.telemetry_topic, &readings).await?;
    let group = format!("eval-{}", db.name);
    let (shutdown, task) = start(config(&db, &topics, &group, &[])?).await;
    eventually(
        "every reading committed",
        Duration::from_secs(30),
        || async {
            match stored_total(&db.pool, &group).await {
                Ok(40) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    let stored: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 \
         ORDER BY partition",
    )
    .bind(&group)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(stored.iter().map(|(_, n)| n).sum::<i64>(), 40);

    // What a lag tool reads: the group's committed offsets, without joining the group.
    let args = topics.args.clone();
    eventually(
        "Kafka's committed offsets = PostgreSQL's",
        Duration::from_secs(30),
        || {
            let seen = plumbing::testing::kafka_committed(&args, &group, 2);
            let stored = stored.clone();
            async move {
                let seen = seen.map_err(|e| e.to_string())?;
                if seen == stored {
                    Ok(())
                } else {
                    Err(format!("Kafka {seen:?}, PostgreSQL {stored:?}"))
                }
            }
        },
    )
    .await?;
    shutdown.cancel();
    task.await?;
    Ok(())
}

/// Issue 14: a device whose clock runs 120 s ahead (ingest accepts up to `MAX_CLOCK_SKEW`)
/// shares a partition with another tenant's device. Its readings must not make the other
/// device's readings "late": the other device's threshold fires within the normal latency,
/// and the fast device is evaluated too, in its own time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_fast_clock_does_not_silence_another_tenant_on_its_partition() -> Result<()>
{
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    provision(&db.pool, &[A, B], &[(A, "fast"), (B, "honest")]).await?;
    let hot = "kind='threshold'; metric='temp'; op='>'; threshold=30";
    let fast_rule = rule(&db.pool, A, "hot", hot).await?;
    let honest_rule = rule(&db.pool, B, "hot", hot).await?;
    let group = format!("eval-{}", db.name);
    let (shutdown, task) = start(config(&db, &topics, &group, &[])?).await;
    let producer = producer(&topics)?;
    let topic = &topics.args.telemetry_topic;
    // Microseconds, as Avro carries them.
    let now = || DateTime::<Utc>::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let ahead = chrono::Duration::seconds(120);
    let alert_of = |rule_id: i64| {
        let pool = db.pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                let rows = alerts(&pool).await.map_err(|e| e.to_string())?;
                match rows.iter().find(|r| r.0 == rule_id) {
                    Some(row) => Ok(row.clone()),
                    None => Err(format!("{rows:?}")),
                }
            }
        }
    };

    // Device A (tenant A), 120 s ahead, crosses its threshold: evaluated in its own time.
    let fast_hot = now() + ahead;
    produce(
        &producer,
        topic,
        &[reading(A, "fast", fast_hot, &[("temp", 50.0)])],
    )
    .await?;
    let (_, _, status, started, ..) = eventually(
        "the fast device's alert firing",
        Duration::from_secs(30),
        alert_of(fast_rule),
    )
    .await?;
    assert_eq!((status.as_str(), started), ("firing", Some(fast_hot)));

    // Device B (tenant B), on time, same partition: its readings are ~120 s behind A's.
    let honest = [
        reading(B, "honest", now(), &[("temp", 20.0)]),
        reading(B, "honest", now(), &[("temp", 45.0)]),
    ];
    produce(&producer, topic, &honest).await?;
    let (_, _, status, started, ..) = eventually(
        "the on-time device's alert firing",
        Duration::from_secs(30),
        alert_of(honest_rule),
    )
    .await?;
    assert_eq!((status.as_str(), started), ("firing", Some(honest[1].time)));
    // Within the normal latency: from ingest to the committed transition.
    let latency: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM created_at - source_received_at)::float8 FROM alert_outbox \
         WHERE device_id = 'honest'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(latency < 5.0, "alert latency {latency} s");

    // A is still evaluated: its next reading resolves its alert at its own time.
    let fast_cool = now() + ahead;
    produce(
        &producer,
        topic,
        &[reading(A, "fast", fast_cool, &[("temp", 20.0)])],
    )
    .await?;
    eventually(
        "the fast device's alert resolved",
        Duration::from_secs(30),
        || async {
            let row = alert_of(fast_rule)().await?;
            match row {
                (_, _, status, _, _, Some(resolved)) if status == "resolved" => Ok(resolved),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .map(|resolved| assert_eq!(resolved, fast_cool))?;
    // None of the four readings was dropped as late (figures of one flush share a time).
    let dropped = eventually(
        "system_metrics covering all four readings",
        Duration::from_secs(30),
        || async {
            let dropped: Option<f64> = sqlx::query_scalar(
                "SELECT d.value FROM system_metrics m JOIN system_metrics d \
                   ON d.time = m.time AND d.metric_name = 'evaluator_late_dropped_total' \
                 WHERE m.metric_name = 'evaluator_messages_total' AND m.value >= 4 \
                 ORDER BY m.time DESC LIMIT 1",
            )
            .fetch_optional(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
            dropped.ok_or_else(|| "not yet".to_owned())
        },
    )
    .await?;
    assert_eq!(dropped, 0.0);
    shutdown.cancel();
    task.await?;
    Ok(())
}

/// Issue 14 audit: a transition of a rule deleted after it was evaluated (before the rules
/// reload) would violate `alerts`' foreign key on every retry, and block every tenant's
/// alerts and offsets behind it. The commit leaves it out and stores the rest.
#[tokio::test]
async fn a_transition_of_a_rule_deleted_before_its_commit_does_not_block_the_others() -> Result<()>
{
    use evaluator_stream::engine::{CommitUnit, PartitionProgress, Status, Transition};
    use evaluator_stream::rules::{Condition, Op, Rule};
    use std::sync::Arc;

    let db = TestDb::new(LayoutChoice::Postgres).await?;
    provision(&db.pool, &[A, B], &[(A, "d1"), (B, "d2")]).await?;
    let hot = "kind='threshold'; metric='temp'; op='>'; threshold=30";
    let doomed = rule(&db.pool, A, "doomed", hot).await?;
    let kept = rule(&db.pool, B, "kept", hot).await?;
    sqlx::query("DELETE FROM alert_rules WHERE rule_id = $1")
        .bind(doomed)
        .execute(&db.pool)
        .await?;
    let t = Utc::now().timestamp_micros();
    let firing = |rule_id: i64, tenant: &str, device: &str| Transition {
        rule: Arc::new(Rule {
            rule_id,
            tenant_id: tenant.to_owned(),
            name: "hot".to_owned(),
            site_id: None,
            device_id: None,
            condition: Condition::Threshold {
                metric: "temp".to_owned(),
                op: Op::Gt,
                threshold: 30.0,
            },
            for_us: 0,
            resolve_threshold: None,
            severity: "warning".to_owned(),
            enabled: true,
        }),
        partition: 0,
        tenant_id: tenant.to_owned(),
        device_id: device.to_owned(),
        site_id: None,
        from: None,
        to: Status::Firing,
        started_at: t,
        time: t,
        value: Some(50.0),
        received_at: Some(t),
    };
    let mut unit = CommitUnit {
        transitions: vec![firing(doomed, A, "d1"), firing(kept, B, "d2")],
        progress: vec![PartitionProgress {
            partition: 0,
            expected: None,
            next: 2,
            clock: Some(t),
        }],
    };
    let done = evaluator_stream::store::commit(
        &db.pool,
        "g",
        "telemetry",
        evaluator_stream::store::AlertFraming::SingleObject,
        &mut unit,
    )
    .await?;
    assert_eq!((done.written, done.deleted_rules), (1, 1));
    assert_eq!(unit.transitions.len(), 1);
    let rows = alerts(&db.pool).await?;
    assert_eq!(
        rows.iter()
            .map(|r| (r.0, r.1.as_str(), r.2.as_str()))
            .collect::<Vec<_>>(),
        vec![(kept, "d2", "firing")]
    );
    assert_eq!(stored_total(&db.pool, "g").await?, 2);
    Ok(())
}

/// A restart's last-seen times of no-data rules: from `device_latest` while it keeps up with
/// the telemetry; where a sink writes it behind (`latest_next_offset` set, migration 0017),
/// the newer stored readings count too, also of a device not in `device_latest` yet.
#[tokio::test]
async fn last_seen_counts_readings_device_latest_does_not_hold_yet() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    provision(&db.pool, &[A], &[(A, "behind"), (A, "absent"), (A, "even")]).await?;
    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let s = |i: i64| t0 + chrono::Duration::seconds(i);
    store_telemetry(
        &db.pool,
        &[
            reading(A, "behind", s(1), &[("temp", 20.0)]),
            reading(A, "behind", s(2), &[("temp", 21.0)]),
            reading(A, "absent", s(3), &[("temp", 22.0)]),
            reading(A, "even", s(4), &[("temp", 23.0)]),
        ],
    )
    .await?;
    for (device, second) in [("behind", 1), ("even", 4)] {
        sqlx::query(
            "INSERT INTO device_latest (tenant_id, device_id, time, msg_type, seq, metrics) \
             VALUES ($1, $2, $3, 'telemetry', 0, '{\"temp\": 1}')",
        )
        .bind(A)
        .bind(device)
        .bind(s(second))
        .execute(&db.pool)
        .await?;
    }
    let seen = |tenants: Vec<String>| {
        let pool = db.pool.clone();
        async move {
            let mut out: Vec<(String, i64)> =
                evaluator_stream::store::load_last_seen(&pool, &tenants)
                    .await?
                    .into_iter()
                    .map(|(_, device, _, at)| (device, at))
                    .collect();
            out.sort();
            anyhow::Ok(out)
        }
    };
    let us = |i: i64| s(i).timestamp_micros();
    assert_eq!(
        seen(vec![A.to_owned()]).await?,
        [("behind".to_owned(), us(1)), ("even".to_owned(), us(4))],
        "device_latest as it is"
    );
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, \
                                       latest_next_offset) \
         VALUES ('sink', 'telemetry', 0, 4, 1)",
    )
    .execute(&db.pool)
    .await?;
    assert_eq!(
        seen(vec![A.to_owned()]).await?,
        [
            ("absent".to_owned(), us(3)),
            ("behind".to_owned(), us(2)),
            ("even".to_owned(), us(4))
        ],
        "device_latest behind: the telemetry's newer readings"
    );
    Ok(())
}

/// An alert as the answers of `apply_raw` name it: rule, device, start of its episode.
type AlertKey = (i64, String, DateTime<Utc>);

/// An `alerts` row's columns that the transitions write.
type AlertColumns = (
    i64,
    String,
    String,
    String,
    Option<f64>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// One transition as `fleet_apply_alert_transitions` takes it (its columns, not the engine's
/// `Transition`), for the function's own test below.
#[derive(Debug, Clone)]
struct RawTransition {
    tenant: &'static str,
    rule: i64,
    device: String,
    from: Option<&'static str>,
    to: &'static str,
    value: Option<f64>,
    started: DateTime<Utc>,
    time: DateTime<Utc>,
}

/// Calls `function` with `calls` one after another (a transaction each); returns what each call
/// returned with every alert id replaced by its alert's (rule, device, started_at), so two
/// databases' answers compare whatever identity values they assigned.
async fn apply_raw(
    pool: &sqlx::PgPool,
    function: &str,
    calls: &[Vec<RawTransition>],
) -> Result<Vec<Vec<Option<AlertKey>>>> {
    let sql = format!("SELECT {function}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
    let mut answers = Vec::new();
    for call in calls {
        let ids: Vec<Option<i64>> = sqlx::query_scalar(&sql)
            .bind(call.iter().map(|t| t.tenant).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.rule).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.device.as_str()).collect::<Vec<_>>())
            .bind(call.iter().map(|_| None::<String>).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.from).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.to).collect::<Vec<_>>())
            .bind(call.iter().map(|_| "warning").collect::<Vec<_>>())
            .bind(call.iter().map(|_| "temp").collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.value).collect::<Vec<_>>())
            .bind(call.iter().map(|_| Some(30.0)).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.started).collect::<Vec<_>>())
            .bind(call.iter().map(|t| t.time).collect::<Vec<_>>())
            .fetch_one(pool)
            .await?;
        assert_eq!(
            ids.len(),
            call.len(),
            "{function}: one answer per transition"
        );
        answers.push(ids);
    }
    let rows: Vec<(i64, i64, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT alert_id, rule_id, device_id, started_at FROM alerts")
            .fetch_all(pool)
            .await?;
    let by_id: std::collections::HashMap<i64, AlertKey> = rows
        .into_iter()
        .map(|(id, rule, device, started)| (id, (rule, device, started)))
        .collect();
    Ok(answers
        .into_iter()
        .map(|ids| {
            ids.into_iter()
                .map(|id| id.map(|id| by_id[&id].clone()))
                .collect()
        })
        .collect())
}

/// Issue 18: `fleet_apply_alert_transitions` (migration 0019, set-based in rounds) against
/// the one-by-one PL/pgSQL loop of migration 0008, on the same random calls: several
/// transitions of one alert within a call (and all their orders), transitions whose alert is
/// not in the expected state, whole calls sent again (a replay after a crash). Both must
/// answer the same for every transition and leave the same `alerts` rows.
#[tokio::test]
async fn set_based_alert_transitions_answer_as_the_one_by_one_loop() -> Result<()> {
    use rand::{Rng, SeedableRng};

    let reference = TestDb::new(LayoutChoice::Postgres).await?;
    let candidate = TestDb::new(LayoutChoice::Postgres).await?;
    let loop_0008 = include_str!("../../schemas/migrations/0008_alert_transitions.sql").replace(
        "fleet_apply_alert_transitions",
        "fleet_apply_alert_transitions_0008",
    );
    sqlx::raw_sql(&loop_0008).execute(&reference.pool).await?;
    let mut rules = Vec::new();
    for db in [&reference, &candidate] {
        provision(&db.pool, &[A, B], &[]).await?;
        let mut ids = Vec::new();
        for (tenant, name) in [(A, "a1"), (A, "a2"), (B, "b1"), (B, "b2")] {
            let hot = "kind='threshold'; metric='temp'; op='>'; threshold=30";
            ids.push((tenant, rule(&db.pool, tenant, name, hot).await?));
        }
        rules.push(ids);
    }
    assert_eq!(rules[0], rules[1], "both databases number the rules alike");
    let rules = rules.remove(0);

    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let t0 = Utc::now() - chrono::Duration::hours(1);
    // Each alert key's state as the engine would see it: None (no open alert), pending, firing.
    let keys: Vec<(&'static str, i64, String)> = rules
        .iter()
        .flat_map(|&(tenant, rule)| (0..3).map(move |d| (tenant, rule, format!("d{d}"))))
        .collect();
    let mut state: Vec<(Option<&'static str>, DateTime<Utc>)> = vec![(None, t0); keys.len()];
    let mut stream = Vec::new();
    for step in 0..600 {
        let k = rng.random_range(0..keys.len());
        let (tenant, rule, device) = keys[k].clone();
        let time = t0 + chrono::Duration::seconds(step);
        let (from, to) = match state[k].0 {
            None if rng.random_bool(0.5) => (None, "pending"),
            None => (None, "firing"),
            Some("pending") if rng.random_bool(0.5) => (Some("pending"), "firing"),
            Some(from) => (Some(from), "resolved"),
        };
        if from.is_none() {
            state[k].1 = time;
        }
        let started = state[k].1;
        state[k].0 = (to != "resolved").then_some(to);
        stream.push(RawTransition {
            tenant,
            rule,
            device,
            from,
            to,
            value: rng.random_bool(0.8).then(|| rng.random_range(0.0..100.0)),
            started,
            time,
        });
        // Now and then one the table does not expect: a firing of an alert that is not
        // pending, or a resolution of one that is not open.
        if rng.random_bool(0.1) {
            let (tenant, rule, device) = keys[rng.random_range(0..keys.len())].clone();
            let (from, to) = if rng.random_bool(0.5) {
                (Some("pending"), "firing")
            } else {
                (Some("firing"), "resolved")
            };
            stream.push(RawTransition {
                tenant,
                rule,
                device,
                from,
                to,
                value: None,
                started: time,
                time,
            });
        }
    }
    let mut calls = Vec::new();
    let mut rest = stream.as_slice();
    while !rest.is_empty() {
        let size = rng.random_range(1..=60).min(rest.len());
        let (call, tail) = rest.split_at(size);
        calls.push(call.to_vec());
        if rng.random_bool(0.2) {
            calls.push(call.to_vec());
        }
        rest = tail;
    }
    let repeated_keys = calls
        .iter()
        .filter(|call| {
            let mut seen = std::collections::HashSet::new();
            !call.iter().all(|t| seen.insert((t.rule, t.device.clone())))
        })
        .count();
    assert!(
        repeated_keys > 10,
        "calls with an alert twice: {repeated_keys}"
    );

    let expected = apply_raw(
        &reference.pool,
        "fleet_apply_alert_transitions_0008",
        &calls,
    )
    .await?;
    let actual = apply_raw(&candidate.pool, "fleet_apply_alert_transitions", &calls).await?;
    let (touched, untouched) =
        expected.iter().flatten().fold(
            (0, 0),
            |(t, u), id| if id.is_some() { (t + 1, u) } else { (t, u + 1) },
        );
    assert!(
        touched > 300 && untouched > 100,
        "touched {touched}, untouched {untouched}"
    );
    for (i, (e, a)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(e, a, "call {i}: {:?}", calls[i]);
    }
    let table = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, AlertColumns>(
            "SELECT rule_id, tenant_id, device_id, status, value, started_at, fired_at, \
             resolved_at FROM alerts \
             ORDER BY rule_id, device_id, started_at, status, value, fired_at, resolved_at",
        )
        .fetch_all(&pool)
        .await
    };
    let expected_rows = table(reference.pool.clone()).await?;
    assert!(expected_rows.len() > 100, "alerts: {}", expected_rows.len());
    let actual_rows = table(candidate.pool.clone()).await?;
    let first_difference = expected_rows
        .iter()
        .zip(&actual_rows)
        .position(|(e, a)| e != a);
    assert!(
        first_difference.is_none() && expected_rows.len() == actual_rows.len(),
        "alerts differ from row {first_difference:?} (rows: {} expected, {} actual): {:?} against {:?}",
        expected_rows.len(),
        actual_rows.len(),
        first_difference.map(|i| &expected_rows[i]),
        first_difference.map(|i| &actual_rows[i]),
    );
    Ok(())
}
