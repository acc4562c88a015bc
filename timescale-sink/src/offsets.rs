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

/// Stored `next_offset` per partition of `topic` for `group` (missing partitions: none stored).
pub async fn load(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Moves each partition's stored offset from `expected` to `next`, and its `stored_through`
/// (the newest ingest time stored, never backwards) on. Returns how many
/// partitions matched their expectation; fewer than `ranges.len()` means the batch is fenced.
pub async fn store_fenced(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    ranges: &BTreeMap<i32, PartitionRange>,
) -> Result<usize, sqlx::Error> {
    let partitions: Vec<i32> = ranges.keys().copied().collect();
    let expected: Vec<Option<i64>> = ranges.values().map(|r| r.expected).collect();
    let next: Vec<i64> = ranges.values().map(|r| r.next).collect();
    let stored_through: Vec<Option<DateTime<Utc>>> =
        ranges.values().map(|r| r.stored_through).collect();
    let matched: i64 = sqlx::query_scalar(
        "WITH input AS ( \
             SELECT * FROM unnest($3::int[], $4::int8[], $5::int8[], $6::timestamptz[]) \
                 AS u(partition, expected, next_offset, stored_through) \
         ), moved AS ( \
             UPDATE consumer_offsets c SET next_offset = i.next_offset, updated_at = now(), \
                 stored_through = greatest(c.stored_through, i.stored_through) \
             FROM input i \
             WHERE c.consumer_group = $1 AND c.topic = $2 AND c.partition = i.partition \
               AND i.expected IS NOT NULL AND c.next_offset = i.expected \
             RETURNING c.partition \
         ), created AS ( \
             INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, \
                 stored_through) \
             SELECT $1, $2, i.partition, i.next_offset, i.stored_through \
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
    .fetch_one(conn)
    .await?;
    Ok(usize::try_from(matched).unwrap_or(0))
}
