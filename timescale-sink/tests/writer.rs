//! The batch transaction on its own: fencing and duplicate counting, exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::reading;
use plumbing::testing::{TestDb, TestTopics};
use schemas::LayoutChoice;
use timescale_sink::batch::{Batch, RawMessage};
use timescale_sink::stats::Stats;
use timescale_sink::writer::{BatchWriter, Outcome};
use tokio_util::sync::CancellationToken;

async fn writer(db: &TestDb, topics: &TestTopics) -> Result<(BatchWriter, Arc<Stats>)> {
    let stats = Arc::new(Stats::default());
    let producer = plumbing::kafka::producer_config(&topics.args, "writer-test").create()?;
    Ok((
        BatchWriter {
            pool: db.pool.clone(),
            group: "g".to_owned(),
            topic: "t".to_owned(),
            dlq: timescale_sink::dlq::DeadLetterQueue::new(
                producer,
                topics.args.dlq_topic.clone(),
                "t".to_owned(),
            ),
            on_committed: Arc::new(|_| {}),
            stats: stats.clone(),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        },
        stats,
    ))
}

/// Readings `seqs` of device 1 on partition 0 at offsets `first..`, expecting `expected`.
fn batch(first_offset: i64, seqs: std::ops::Range<i64>, expected: Option<i64>) -> Batch {
    let codec = schemas::telemetry_codec().unwrap();
    // A fixed base, so the same seq is the same reading (same key) in every batch.
    let base = chrono::Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let mut batch = Batch::with_capacity(16);
    for (i, seq) in seqs.enumerate() {
        let r = reading("acme", 1, seq, base + chrono::Duration::seconds(seq));
        let payload = codec.encode(&r).unwrap();
        let message = RawMessage {
            partition: 0,
            offset: first_offset + i as i64,
            payload,
            traceparent: None,
        };
        batch.push(message, expected, Ok(r));
    }
    batch
}

#[tokio::test]
async fn a_batch_whose_start_no_longer_matches_the_stored_offset_rolls_back_and_is_counted(
) -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let (writer, stats) = writer(&db, &topics).await?;
    let never = CancellationToken::new();
    assert!(matches!(
        writer.write(batch(0, 0..10, None), &never).await,
        Outcome::Committed { rows: 10, .. }
    ));
    // A zombie's batch that started where the offset was before the first commit.
    assert_eq!(
        writer.write(batch(0, 100..105, Some(0)), &never).await,
        Outcome::Fenced
    );
    // A batch expecting no stored row at all, while one exists.
    assert_eq!(
        writer.write(batch(0, 200..205, None), &never).await,
        Outcome::Fenced
    );
    assert_eq!(stats.fenced_batches(), 2);
    let (rows, next): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM telemetry), (SELECT next_offset FROM consumer_offsets WHERE consumer_group = 'g')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!((rows, next), (10, 10), "fenced batches wrote nothing");
    // The rightful next batch applies.
    assert!(matches!(
        writer.write(batch(10, 10..15, Some(10)), &never).await,
        Outcome::Committed { rows: 5, .. }
    ));
    Ok(())
}

#[tokio::test]
async fn re_sent_readings_are_skipped_and_counted_exactly() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    let (writer, stats) = writer(&db, &topics).await?;
    let never = CancellationToken::new();
    assert_eq!(
        writer.write(batch(0, 0..100, None), &never).await,
        Outcome::Committed {
            rows: 100,
            duplicates: 0,
            dead_letters: 0
        }
    );
    // The same 100 readings again (a whole batch re-sent) plus 3 new ones.
    assert_eq!(
        writer.write(batch(100, 0..103, Some(100)), &never).await,
        Outcome::Committed {
            rows: 3,
            duplicates: 100,
            dead_letters: 0
        }
    );
    assert_eq!(stats.duplicates(), 100);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 103);
    let latest: i64 = sqlx::query_scalar("SELECT seq FROM device_latest")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(latest, 102);
    Ok(())
}
