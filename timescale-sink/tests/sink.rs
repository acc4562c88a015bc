//! The sink against real Kafka and PostgreSQL: exactly once, fencing, re-sent readings,
//! dead letters. Every storage layout the server offers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use plumbing::testing::{available_layouts, eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use schemas::LayoutChoice;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_messages_from_ten_thousand_devices_are_stored_exactly_once(
) -> Result<()> {
    const PARTITIONS: i32 = 12;
    let messages = fleet(5, 10_000, 20);
    for layout in available_layouts().await? {
        let db = TestDb::new(layout).await?;
        let topics = TestTopics::new(PARTITIONS).await?;
        let producer = producer(&topics)?;
        let sent = produce(&producer, &topics.args.telemetry_topic, messages.clone()).await?;
        assert_eq!(sent, 200_000);

        let config = sink_config(&db, &topics, &[])?;
        let group = config.group_id.clone();
        let shutdown = Shutdown::new();
        let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
        let ends = end_offsets(&topics, PARTITIONS)?;
        let total_end: i64 = ends.values().sum();
        assert_eq!(total_end, 200_000);
        wait_for_stored(&db.pool, &group, total_end, Duration::from_secs(180)).await?;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), sink).await???;

        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
            .fetch_one(&db.pool)
            .await?;
        assert_eq!(rows, 200_000, "layout {}", db.layout);
        assert_no_duplicate_keys(&db.pool).await?;
        assert_eq!(stored_offsets(&db.pool, &group).await?, ends);
        let (devices, newest): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE seq = 19 AND metrics ? 'temperature') FROM device_latest",
        )
        .fetch_one(&db.pool)
        .await?;
        assert_eq!(
            (devices, newest),
            (10_000, 10_000),
            "device_latest holds each device's newest reading"
        );
        let reported: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM system_metrics WHERE metric_name = 'sink_rows_per_second'",
        )
        .fetch_one(&db.pool)
        .await?;
        assert!(reported >= 1, "key figures are written to system_metrics");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_message_and_a_row_the_database_rejects_go_to_the_dlq_and_the_partition_moves_on(
) -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let producer = producer(&topics)?;
    let codec = schemas::telemetry_codec()?;
    let now = chrono::Utc::now();
    let mut messages = Vec::new();
    let mut garbage_payload = Vec::new();
    let mut rejected_payload = Vec::new();
    for i in 0..1002i64 {
        let (key, payload) = match i {
            300 => {
                garbage_payload = b"\xc3\x01not avro at all".to_vec();
                ("acme/garbage".to_owned(), garbage_payload.clone())
            }
            600 => {
                // Year 5001 BC: valid Avro, but before timestamptz's range, so PostgreSQL
                // rejects the row (22008) during the COPY.
                let mut r = reading("acme", 1, i, now);
                r.time = chrono::NaiveDate::from_ymd_opt(-5000, 1, 1)
                    .unwrap()
                    .and_hms_opt(0, 0, 0)
                    .unwrap()
                    .and_utc();
                rejected_payload = codec.encode(&r)?;
                (r.key(), rejected_payload.clone())
            }
            _ => {
                let r = reading(
                    "acme",
                    (i % 50) as usize,
                    i,
                    now - chrono::Duration::seconds(2000 - i),
                );
                (r.key(), codec.encode(&r)?)
            }
        };
        messages.push((key, payload, Some(0)));
    }
    produce(&producer, &topics.args.telemetry_topic, messages).await?;

    let config = sink_config(&db, &topics, &[])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(&db.pool, &group, 1002, Duration::from_secs(60)).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1000, "every other row is written");

    let consumer: StreamConsumer =
        plumbing::kafka::consumer_config(&topics.args, "dlq-reader", &format!("dlq-{}", db.name))
            .create()?;
    consumer.subscribe(&[&topics.args.dlq_topic])?;
    let mut letters = Vec::new();
    while letters.len() < 2 {
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
            header("source_partition"),
            header("source_topic"),
            !header("error").is_empty(),
            message.payload().unwrap_or_default().to_vec(),
        ));
    }
    letters.sort();
    let topic = topics.args.telemetry_topic.clone();
    assert_eq!(
        letters,
        vec![
            (
                "300".to_owned(),
                "decode".to_owned(),
                "0".to_owned(),
                topic.clone(),
                true,
                garbage_payload
            ),
            (
                "600".to_owned(),
                "database".to_owned(),
                "0".to_owned(),
                topic,
                true,
                rejected_payload
            ),
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_sent_twice_is_stored_once() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(4).await?;
    let producer = producer(&topics)?;
    let once = fleet(2, 500, 4);
    // Each reading twice, and then the whole first half re-sent as a block.
    let mut twice: Vec<_> = once.iter().flat_map(|m| [m.clone(), m.clone()]).collect();
    twice.extend(once[..1000].iter().cloned());
    let total = twice.len() as i64;
    produce(&producer, &topics.args.telemetry_topic, twice).await?;
    let config = sink_config(&db, &topics, &[])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(&db.pool, &group, total, Duration::from_secs(60)).await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 2000);
    assert_no_duplicate_keys(&db.pool).await?;
    let reported: Option<f64> = sqlx::query_scalar(
        "SELECT max(value) FROM system_metrics WHERE metric_name = 'sink_duplicate_rows_total'",
    )
    .fetch_one(&db.pool)
    .await?;
    // The last report may predate the last batch; the exact count is checked at writer level.
    assert!(reported.unwrap_or(0.0) <= (total - 2000) as f64);
    Ok(())
}

/// `plumbing::kafka::stored_lag` (the sink's and the evaluator's lag report, one batched
/// `ListOffsets` for every partition's end): end − stored where an offset is stored, and from
/// the low watermark for a partition with nothing stored and no fetch position yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_lag_is_end_minus_stored_per_partition_or_end_minus_start() -> Result<()> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let topics = TestTopics::new(3).await?;
    let topic = topics.args.telemetry_topic.clone();
    let producer = producer(&topics)?;
    let messages = |partition: i32, n: usize| {
        (0..n).map(move |i| (format!("k{i}"), vec![1u8], Some(partition)))
    };
    produce(&producer, &topic, messages(0, 5).chain(messages(1, 3))).await?;
    let consumer: BaseConsumer = plumbing::kafka::consumer_config(
        &topics.args,
        "lag-test",
        &plumbing::testing::unique_name("lag"),
    )
    .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..3 {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let stored = plumbing::kafka::StoredOffsets::default();
    stored.set(0, 2);
    let lag = tokio::task::spawn_blocking(move || {
        let mut lag = plumbing::kafka::stored_lag(&consumer, &stored);
        lag.sort_unstable();
        lag
    })
    .await?;
    // Partition 0: 5 − 2; partition 1: 3 − 0 (nothing stored, not fetched); partition 2: empty.
    assert_eq!(lag, vec![(0, 3), (1, 3), (2, 0)]);
    Ok(())
}

/// The lag an SRE reads is end offset − the offset stored in PostgreSQL (what a restart
/// resumes from), not − the consumer's fetch position: with the offsets table locked, the
/// sink fetches a backlog it cannot commit, and its lag still counts every message of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_from_the_offsets_stored_in_postgresql() -> Result<()> {
    const PARTITIONS: i32 = 3;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let producer = producer(&topics)?;
    let messages = fleet(1, 100, 50);
    let (first, backlog) = messages.split_at(2_000);
    produce(&producer, &topics.args.telemetry_topic, first.to_vec()).await?;

    let config = sink_config(&db, &topics, &[])?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    wait_for_stored(&db.pool, &group, 2_000, Duration::from_secs(60)).await?;

    let latest_lag = || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT value FROM system_metrics WHERE metric_name = 'sink_consumer_lag_messages' \
             ORDER BY time DESC LIMIT 1",
        )
        .fetch_optional(&db.pool)
        .await
    };
    // Offsets cannot be stored while this transaction holds the table.
    let mut lock = db.pool.begin().await?;
    sqlx::query("LOCK TABLE consumer_offsets IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;
    produce(&producer, &topics.args.telemetry_topic, backlog.to_vec()).await?;
    let ends: i64 = end_offsets(&topics, PARTITIONS)?.values().sum();
    assert_eq!(ends, 5_000);
    // The report runs every 10 s; the consumer has long fetched the backlog by then.
    eventually(
        "lag = end − stored = 3,000",
        Duration::from_secs(60),
        || async {
            match latest_lag().await {
                Ok(Some(3_000.0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    assert_eq!(stored_total(&db.pool, &group).await?, 2_000);
    // Kafka's committed offsets (what kafka-consumer-groups.sh reads) follow the stored ones
    // and never lead them: 2,000 while the backlog cannot be stored.
    let kafka_committed_total = || -> Result<i64> {
        Ok(
            plumbing::testing::kafka_committed(&topics.args, &group, PARTITIONS)?
                .iter()
                .map(|(_, offset)| (*offset).max(0))
                .sum(),
        )
    };
    eventually(
        "Kafka committed = stored = 2,000",
        Duration::from_secs(30),
        || async {
            match kafka_committed_total() {
                Ok(2_000) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;

    lock.rollback().await?;
    wait_for_stored(&db.pool, &group, 5_000, Duration::from_secs(60)).await?;
    eventually(
        "Kafka committed = stored = 5,000",
        Duration::from_secs(30),
        || async {
            match kafka_committed_total() {
                Ok(5_000) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    eventually("lag back to 0", Duration::from_secs(60), || async {
        match latest_lag().await {
            Ok(Some(0.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), sink).await???;
    Ok(())
}
