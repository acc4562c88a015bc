//! Per-writer pipeline: a batcher task decodes messages and closes batches on size or age
//! (an aged batch keeps growing, up to the size limit, while the committer is still busy with
//! the previous one; while catching up on a backlog the limits are larger, see
//! [`BatchLimits::catchup_after`]), and a committer task writes them. The one-batch channel between them lets decoding of the
//! next batch overlap the COPY of the current one, and bounds memory: when the database is
//! slow or down, the batcher waits, its input channel fills, and the consumer pauses fetching.
//!
//! A partition belongs to one writer (partition modulo writer count), so its batches commit
//! in offset order and each batch's fence expectation is the previous batch's end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use plumbing::registry::{Decoded, TelemetryReader};
use plumbing::Shutdown;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, RawMessage};
use crate::writer::BatchWriter;

/// What the consumer sends a writer.
#[derive(Debug)]
pub enum Input {
    /// Messages of assigned partitions, in offset order per partition. Sent in chunks so the
    /// batcher is woken once per chunk, not once per message.
    Messages(Vec<RawMessage>),
    /// The partition is now ours; `position` is its stored `next_offset` (None: none stored).
    /// `replay_from`: its `latest_next_offset` when `device_latest` is behind; the consumer
    /// then reads from there, and the messages below `position` go to `device_latest` only.
    Assigned {
        partition: i32,
        position: Option<i64>,
        replay_from: Option<i64>,
    },
    /// The partition is no longer ours: drop its unflushed rows, acknowledge once every
    /// batch already handed to the committer is done.
    Revoked {
        partition: i32,
        ack: oneshot::Sender<()>,
    },
    /// Close the open batch now; acknowledge when it is written.
    Flush { ack: oneshot::Sender<()> },
}

enum ToCommitter {
    Batch(Batch),
    Barrier(oneshot::Sender<()>),
}

/// Limits of one writer's batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_age: Duration,
    /// Row limit while catching up (see [`BatchLimits::catchup_after`]); at or below
    /// `max_rows` catch-up batching is off.
    pub catchup_rows: usize,
    /// The writer is catching up when the readings it takes were received by ingest longer
    /// ago than this and keep coming in full chunks (the consumer has more fetched): their
    /// latency is already lost, so batches grow to `catchup_rows` (or [`CATCHUP_MAX_AGE`]). Large batches hold several readings per device, and each
    /// device's `device_latest` row is upserted once per batch, not once per reading.
    pub catchup_after: Duration,
}

/// Age at which a batch closes while catching up (a backlog that ends mid-batch).
pub const CATCHUP_MAX_AGE: Duration = Duration::from_secs(5);

impl BatchLimits {
    /// Rows and age at which a batch closes.
    fn close_at(&self, catching_up: bool) -> (usize, Duration) {
        // At least one row per batch, or the batcher would have no branch to wait on.
        let max_rows = self.max_rows.max(1);
        if catching_up && self.catchup_rows > max_rows {
            (self.catchup_rows, self.max_age.max(CATCHUP_MAX_AGE))
        } else {
            (max_rows, self.max_age)
        }
    }

    /// Whether a reading received by ingest at `received_at` is part of a backlog.
    fn behind(&self, received_at: chrono::DateTime<chrono::Utc>) -> bool {
        let age = chrono::Utc::now() - received_at;
        age.to_std().is_ok_and(|age| age > self.catchup_after)
    }
}

/// What the batcher decodes with, and when it stops waiting for the schema registry.
#[derive(Debug, Clone)]
pub struct Decoding {
    /// Both framings; Confluent ids resolved through the registry when one is configured.
    pub reader: Arc<TelemetryReader>,
    /// The service's shutdown signal: a lookup waiting for a registry that is away gives up,
    /// and that message and every later one are left unread (re-read after a restart).
    pub shutdown: Shutdown,
}

/// Starts one writer (batcher + committer); returns its input and the tasks to await.
pub fn spawn_writer(
    writer: BatchWriter,
    limits: BatchLimits,
    input_capacity: usize,
    give_up: CancellationToken,
    decoding: Decoding,
) -> (mpsc::Sender<Input>, Vec<tokio::task::JoinHandle<()>>) {
    let (input_tx, input_rx) = mpsc::channel(input_capacity);
    let (batch_tx, batch_rx) = mpsc::channel(1);
    let batcher = tokio::spawn(batcher(input_rx, batch_tx, limits, decoding));
    let committer = tokio::spawn(committer(batch_rx, writer, give_up));
    (input_tx, vec![batcher, committer])
}

async fn committer(
    mut rx: mpsc::Receiver<ToCommitter>,
    writer: BatchWriter,
    give_up: CancellationToken,
) {
    // `device_latest` written behind: flushed when due, on its own connection while the
    // batches go on (a flush of every device takes a while; batches waiting for it would add
    // that to their latency). One flush at a time per writer.
    let mut flushes = tokio::task::JoinSet::new();
    // Cancelled when the running flush must finish at once (its slices unpaced).
    let mut pace = CancellationToken::new();
    let spawn_flush = |flushes: &mut tokio::task::JoinSet<()>, pace: &mut CancellationToken| {
        *pace = CancellationToken::new();
        let (writer, give_up, pace) = (writer.clone(), give_up.clone(), pace.clone());
        flushes.spawn(async move { writer.flush_latest(&give_up, Some(&pace)).await });
    };
    loop {
        let due = flushes.is_empty().then(|| writer.latest_due()).flatten();
        let item = tokio::select! {
            biased;
            item = rx.recv() => item,
            _ = flushes.join_next(), if !flushes.is_empty() => continue,
            _ = tokio::time::sleep_until(due.unwrap_or_else(far_future).into()), if due.is_some() => {
                spawn_flush(&mut flushes, &mut pace);
                continue;
            }
        };
        let Some(item) = item else { break };
        match item {
            ToCommitter::Batch(batch) => {
                writer.write(batch, &give_up).await;
                if flushes.is_empty()
                    && writer
                        .latest_due()
                        .is_some_and(|due| due <= std::time::Instant::now())
                {
                    spawn_flush(&mut flushes, &mut pace);
                }
            }
            ToCommitter::Barrier(ack) => {
                // A revoke or an explicit flush: what is buffered goes to `device_latest`
                // first, so the partition's next owner has nothing to replay.
                pace.cancel();
                while flushes.join_next().await.is_some() {}
                writer.flush_latest(&give_up, None).await;
                let _ = ack.send(());
            }
        }
    }
    pace.cancel();
    while flushes.join_next().await.is_some() {}
    writer.flush_latest(&give_up, None).await;
}

fn far_future() -> std::time::Instant {
    std::time::Instant::now() + Duration::from_secs(3600)
}

async fn batcher(
    mut rx: mpsc::Receiver<Input>,
    to_committer: mpsc::Sender<ToCommitter>,
    limits: BatchLimits,
    decoding: Decoding,
) {
    let Decoding { reader, shutdown } = decoding;
    // Set when shutdown came while a registry lookup was waiting: from then on no message is
    // taken (offsets only advance through batches, so the rest is read again on restart).
    let mut stalled = false;
    // Stored-offset expectation of the next batch, per assigned partition.
    let mut positions: HashMap<i32, Option<i64>> = HashMap::new();
    // Partitions read again for `device_latest`: from which offset, up to which.
    let mut replays: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut batch = Batch::with_capacity(limits.max_rows);
    // Whether the first reading of the last chunk was part of a backlog.
    let mut catching_up = false;
    loop {
        let (max_rows, max_age) = limits.close_at(catching_up);
        let deadline = batch.opened_at + max_age;
        let full = batch.messages() >= max_rows;
        let due = !batch.is_idle() && (full || std::time::Instant::now() >= deadline);
        // A due batch goes to the committer as soon as it has room. Until then (the previous
        // batch is still being written) the batch keeps taking messages up to `max_rows`:
        // under a backlog batches grow to the size limit instead of closing at the age limit,
        // which costs no latency — the committer could not have taken the batch earlier.
        let input = tokio::select! {
            biased;
            permit = to_committer.reserve(), if due => {
                let Ok(permit) = permit else {
                    return; // the committer is gone: the writer is shutting down
                };
                permit.send(ToCommitter::Batch(take(&mut batch, limits)));
                continue;
            }
            _ = tokio::time::sleep_until(deadline.into()), if !batch.is_idle() && !due => continue,
            input = rx.recv(), if !full => input,
        };
        match input {
            None => {
                let _ = flush(&mut batch, &to_committer, limits).await;
                return;
            }
            Some(Input::Messages(messages)) => {
                // A chunk may take the batch past `max_rows` by less than one chunk.
                // A partial chunk means the consumer's queue ran dry: the end of a backlog
                // (or a slow fetch), so the normal limits apply again.
                let mut check_backlog = messages.len() >= crate::consumer::SEND_CHUNK;
                if !check_backlog {
                    catching_up = false;
                }
                for message in messages {
                    if stalled {
                        break;
                    }
                    let Some(position) = positions.get(&message.partition).copied() else {
                        continue; // not (or no longer) ours
                    };
                    let replay = replays.get(&message.partition).copied();
                    if position.is_some_and(|p| message.offset < p) {
                        // Already stored; read again only for `device_latest`.
                        let Some((from, until)) = replay else {
                            continue;
                        };
                        if message.offset < from {
                            continue;
                        }
                        let decoded = match reader.try_decode(&message.payload) {
                            Decoded::Done(decoded) => decoded,
                            Decoded::Lookup(_) => {
                                match reader.decode(&message.payload, &shutdown).await {
                                    Ok(decoded) => decoded,
                                    Err(err) => {
                                        tracing::warn!(error = %err, partition = message.partition, offset = message.offset, "writer stops taking messages");
                                        stalled = true;
                                        break;
                                    }
                                }
                            }
                        };
                        if batch.is_idle() {
                            batch.opened_at = tokio::time::Instant::now().into_std();
                        }
                        batch.push_replayed(message.partition, decoded);
                        if message.offset + 1 >= until {
                            batch.replayed_through.insert(message.partition, until);
                            replays.remove(&message.partition);
                        }
                        continue;
                    }
                    if let Some((_, until)) = replay {
                        // Past the stored offset: everything below it was read again.
                        batch.replayed_through.insert(message.partition, until);
                        replays.remove(&message.partition);
                    }
                    let decode_started = std::time::Instant::now();
                    let decoded = match reader.try_decode(&message.payload) {
                        Decoded::Done(decoded) => decoded,
                        // An id not seen yet: ask the registry (waiting while it is away,
                        // so the consumer pauses behind this writer rather than dead-letter).
                        Decoded::Lookup(schema_id) => {
                            match reader.decode(&message.payload, &shutdown).await {
                                Ok(decoded) => decoded,
                                Err(err) => {
                                    tracing::warn!(schema_id, error = %err, partition = message.partition, offset = message.offset, "writer stops taking messages");
                                    stalled = true;
                                    break;
                                }
                            }
                        }
                    };
                    let expected = position;
                    positions.insert(message.partition, Some(message.offset + 1));
                    if batch.is_empty() {
                        batch.opened_at = tokio::time::Instant::now().into_std();
                    }
                    if check_backlog {
                        if let Ok(row) = &decoded {
                            catching_up = limits.behind(row.received_at);
                            check_backlog = false;
                        }
                    }
                    batch.push(message, expected, decoded);
                    batch.decode_time += decode_started.elapsed();
                }
            }
            Some(Input::Assigned {
                partition,
                position,
                replay_from,
            }) => {
                positions.insert(partition, position);
                match (replay_from, position) {
                    (Some(from), Some(until)) if from < until => {
                        replays.insert(partition, (from, until));
                    }
                    _ => {
                        replays.remove(&partition);
                    }
                }
            }
            Some(Input::Revoked { partition, ack }) => {
                positions.remove(&partition);
                replays.remove(&partition);
                batch.remove_partition(partition);
                if to_committer.send(ToCommitter::Barrier(ack)).await.is_err() {
                    return;
                }
            }
            Some(Input::Flush { ack }) => {
                if flush(&mut batch, &to_committer, limits).await.is_err()
                    || to_committer.send(ToCommitter::Barrier(ack)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn flush(
    batch: &mut Batch,
    to_committer: &mpsc::Sender<ToCommitter>,
    limits: BatchLimits,
) -> Result<(), ()> {
    if batch.is_idle() {
        batch.opened_at = std::time::Instant::now();
        return Ok(());
    }
    to_committer
        .send(ToCommitter::Batch(take(batch, limits)))
        .await
        .map_err(|_| ())
}

/// The closed batch, leaving an empty one in its place.
fn take(batch: &mut Batch, limits: BatchLimits) -> Batch {
    let full = std::mem::replace(batch, Batch::with_capacity(limits.max_rows));
    metrics::histogram!(crate::metrics::STAGE_DURATION, "stage" => "decode")
        .record(full.decode_time.as_secs_f64());
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(catchup_rows: usize) -> BatchLimits {
        BatchLimits {
            max_rows: 10_000,
            max_age: Duration::from_millis(200),
            catchup_rows,
            catchup_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn catching_up_raises_the_limits_only_when_enabled() {
        let on = limits(100_000);
        assert_eq!(on.close_at(false), (10_000, Duration::from_millis(200)));
        assert_eq!(on.close_at(true), (100_000, CATCHUP_MAX_AGE));
        let off = limits(0);
        assert_eq!(off.close_at(true), (10_000, Duration::from_millis(200)));
        let zero = BatchLimits {
            max_rows: 0,
            ..limits(0)
        };
        assert_eq!(zero.close_at(false).0, 1);
    }

    #[test]
    fn only_readings_received_before_the_threshold_are_a_backlog() {
        let l = limits(100_000);
        let now = chrono::Utc::now();
        assert!(!l.behind(now));
        assert!(!l.behind(now - chrono::Duration::seconds(2)));
        assert!(l.behind(now - chrono::Duration::seconds(60)));
        // A clock ahead of ours is not a backlog.
        assert!(!l.behind(now + chrono::Duration::seconds(60)));
    }
}
