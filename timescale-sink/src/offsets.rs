//! Offsets stored in PostgreSQL, in the transaction that writes the rows they cover.
//!
//! `consumer_offsets.next_offset` is the source of truth for where the group resumes. The
//! update is **fenced**: a partition's row only moves from the offset the batch started at
//! (or is created when the batch expects none), so a batch from an instance that lost the
//! partition — whose new owner has already moved the offset — updates nothing and the whole
//! transaction rolls back.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::batch::PartitionRange;

/// What is stored for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Where the partition resumes: every message below is stored.
    pub next: i64,
    /// Every reading below this has been applied to `device_latest` (`None`: all below
    /// `next`). Set while the sink writes `device_latest` behind (migration 0017).
    pub latest_next: Option<i64>,
}

impl Stored {
    /// Where reading resumes: `device_latest`'s offset when it is behind.
    pub fn read_from(&self) -> i64 {
        self.latest_next.map_or(self.next, |l| l.min(self.next))
    }
}

/// What is stored per partition of `topic` for `group` (missing partitions: none stored).
pub async fn load(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Stored>, sqlx::Error> {
    let rows: Vec<(i32, i64, Option<i64>)> = sqlx::query_as(
        "SELECT partition, next_offset, latest_next_offset FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(p, next, latest_next)| (p, Stored { next, latest_next }))
        .collect())
}

/// Moves each partition's stored offset from `expected` to `next`, and its `stored_through`
/// (the newest ingest time stored, never backwards) on. `latest_written`: this transaction
/// also applies the batch to `device_latest`; otherwise `latest_next_offset` keeps (or
/// becomes) the batch's start, so a restart applies the batch's readings to `device_latest`.
/// Returns how many partitions matched their expectation; fewer than `ranges.len()` means the
/// batch is fenced.
pub async fn store_fenced(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    ranges: &BTreeMap<i32, PartitionRange>,
    latest_written: bool,
) -> Result<usize, sqlx::Error> {
    let partitions: Vec<i32> = ranges.keys().copied().collect();
    let expected: Vec<Option<i64>> = ranges.values().map(|r| r.expected).collect();
    let next: Vec<i64> = ranges.values().map(|r| r.next).collect();
    let stored_through: Vec<Option<DateTime<Utc>>> =
        ranges.values().map(|r| r.stored_through).collect();
    let first: Vec<i64> = ranges.values().map(|r| r.first).collect();
    let matched: i64 = sqlx::query_scalar(
        "WITH input AS ( \
             SELECT * FROM unnest($3::int[], $4::int8[], $5::int8[], $6::timestamptz[], \
                                  $7::int8[]) \
                 AS u(partition, expected, next_offset, stored_through, first) \
         ), moved AS ( \
             UPDATE consumer_offsets c SET next_offset = i.next_offset, updated_at = now(), \
                 stored_through = greatest(c.stored_through, i.stored_through), \
                 latest_next_offset = CASE WHEN $8 THEN c.latest_next_offset \
                     ELSE coalesce(c.latest_next_offset, i.expected) END \
             FROM input i \
             WHERE c.consumer_group = $1 AND c.topic = $2 AND c.partition = i.partition \
               AND i.expected IS NOT NULL AND c.next_offset = i.expected \
             RETURNING c.partition \
         ), created AS ( \
             INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, \
                 stored_through, latest_next_offset) \
             SELECT $1, $2, i.partition, i.next_offset, i.stored_through, \
                 CASE WHEN $8 THEN NULL ELSE i.first END \
             FROM input i WHERE i.expected IS NULL \
             ON CONFLICT DO NOTHING \
             RETURNING partition \
         ) \
         SELECT (SELECT count(*) FROM moved) + (SELECT count(*) FROM created)",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&expected)
    .bind(&next)
    .bind(&stored_through)
    .bind(&first)
    .bind(latest_written)
    .fetch_one(conn)
    .await?;
    Ok(usize::try_from(matched).unwrap_or(0))
}

/// After `device_latest` took every reading below `covered[p]` of each partition: clears
/// `latest_next_offset` where `next_offset` is still `covered[p]`; where it moved on (a newer
/// owner stored more), moves it up to `covered[p]` at most, as the readings above are not all
/// applied yet. Returns the rows changed.
pub async fn mark_latest_written(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    covered: &BTreeMap<i32, i64>,
) -> Result<u64, sqlx::Error> {
    let partitions: Vec<i32> = covered.keys().copied().collect();
    let next: Vec<i64> = covered.values().copied().collect();
    Ok(sqlx::query(
        "UPDATE consumer_offsets c SET latest_next_offset = CASE \
             WHEN c.next_offset = u.next_offset THEN NULL \
             ELSE greatest(c.latest_next_offset, u.next_offset) END \
         FROM unnest($3::int[], $4::int8[]) AS u(partition, next_offset) \
         WHERE c.consumer_group = $1 AND c.topic = $2 AND c.partition = u.partition \
           AND c.next_offset >= u.next_offset AND c.latest_next_offset IS NOT NULL",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&next)
    .execute(conn)
    .await?
    .rows_affected())
}
