//! The Kafka side: one consumer in the group, polled on its own thread.
//!
//! Rebalance callbacks run on that thread, inside `poll`, so assignment changes are ordered
//! with the messages routed to writers:
//!
//! * **assign** (eager protocol): read each partition's `next_offset` from `consumer_offsets`
//!   and re-assign with those offsets, so fetching starts exactly after what the database
//!   holds (configurable earliest/latest where nothing is stored); tell the owning writer.
//! * **revoke**: tell each owning writer to drop the partition's unflushed rows and wait until
//!   batches already handed to its committer are done, so none commits for a partition the
//!   new owner has started on (and if one does anyway, the fence rolls it back).
//!
//! Why eager and not cooperative-sticky: rust-rdkafka's safe API performs the incremental
//! assignment itself with the broker-committed offsets and offers no way to set the start
//! offsets of newly added partitions inside the callback; re-assigning the full list with
//! explicit offsets is only well defined for the eager protocol.
//!
//! Backpressure: when a writer's input channel is full, the messages wait in a per-writer
//! queue and every assigned partition is paused until the queues drain; the thread keeps
//! polling, so the consumer stays in the group while the database is slow or down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Message, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::batch::RawMessage;
use crate::pipeline::Input;

pub use plumbing::kafka::StartFrom;

/// State shared by the poll loop and the rebalance callbacks (same thread).
pub struct SinkContext {
    /// Input of each writer (partition modulo count); held here so a writer ends when the
    /// consumer is dropped.
    pub writers: Vec<mpsc::Sender<Input>>,
    pub pool: PgPool,
    pub runtime: Handle,
    pub group: String,
    pub topic: String,
    pub start_from: StartFrom,
    /// How long a revocation waits for in-flight batches before relying on the fence.
    pub revoke_timeout: Duration,
    pub health: plumbing::admin::Health,
    pub shutdown: CancellationToken,
    /// Offsets stored in PostgreSQL with the rows (set by the writers and on assignment):
    /// the lag report counts from them.
    pub stored: plumbing::kafka::StoredOffsets,
    /// Messages polled but not yet handed to their writer, per writer.
    pending: Mutex<Vec<VecDeque<RawMessage>>>,
}

impl std::fmt::Debug for SinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkContext")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .field("writers", &self.writers.len())
            .finish()
    }
}

impl SinkContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        writers: Vec<mpsc::Sender<Input>>,
        pool: PgPool,
        runtime: Handle,
        group: String,
        topic: String,
        start_from: StartFrom,
        health: plumbing::admin::Health,
        shutdown: CancellationToken,
        stored: plumbing::kafka::StoredOffsets,
    ) -> Self {
        let pending = Mutex::new(writers.iter().map(|_| VecDeque::new()).collect());
        Self {
            writers,
            pool,
            runtime,
            group,
            topic,
            start_from,
            revoke_timeout: Duration::from_secs(30),
            health,
            shutdown,
            stored,
            pending,
        }
    }

    fn writer_of(&self, partition: i32) -> usize {
        partition.unsigned_abs() as usize % self.writers.len()
    }

    /// Sends directly (bypassing the pending queues), waiting for room.
    fn send_blocking(&self, writer: usize, input: Input) -> bool {
        self.writers[writer].blocking_send(input).is_ok()
    }

    fn load_offsets(&self, partitions: &[i32]) -> Option<HashMap<i32, crate::offsets::Stored>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = self.runtime.block_on(async {
                let mut conn = self.pool.acquire().await?;
                crate::offsets::load(&mut conn, &self.group, &self.topic, partitions).await
            });
            match result {
                Ok(offsets) => return Some(offsets),
                Err(err) => {
                    warn!(error = %err, "cannot read stored offsets; retrying");
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.shutdown.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

impl ClientContext for SinkContext {}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        if !plumbing::kafka::on_consumer_thread() {
            warn!("revocation outside the consumer thread; relying on the offset fence");
            return;
        }
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        info!(?partitions, "partitions revoked");
        if let Ok(mut pending) = self.pending.lock() {
            for queue in pending.iter_mut() {
                queue.retain(|m| !partitions.contains(&m.partition));
            }
        }
        let mut acks = Vec::new();
        for &partition in &partitions {
            let (ack, done) = oneshot::channel();
            if self.send_blocking(self.writer_of(partition), Input::Revoked { partition, ack }) {
                acks.push(done);
            }
        }
        let deadline = Instant::now() + self.revoke_timeout;
        for done in acks {
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = self
                .runtime
                .block_on(async move { tokio::time::timeout(left, done).await });
            if waited.is_err() {
                warn!("revocation did not finish in time; relying on the offset fence");
                break;
            }
        }
        // After the writers acknowledged: a batch committed meanwhile must not put its
        // partition back. Another instance reports these partitions' lag from now on.
        for &partition in &partitions {
            self.stored.remove(partition);
            metrics::gauge!(crate::metrics::LAG, "partition" => partition.to_string()).set(0.0);
        }
        metrics::gauge!(crate::metrics::ASSIGNED_PARTITIONS).set(0.0);
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if !plumbing::kafka::on_consumer_thread() {
                    return;
                }
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let Some(stored) = self.load_offsets(&partitions) else {
                    return;
                };
                plumbing::kafka::assign_at_stored(
                    consumer,
                    &self.topic,
                    &partitions,
                    // Where `device_latest` is behind, from its offset (see migration 0017).
                    |p| stored.get(&p).map(crate::offsets::Stored::read_from),
                    self.start_from,
                );
                for &partition in &partitions {
                    let position = stored.get(&partition).map(|s| s.next);
                    let replay_from = stored.get(&partition).and_then(|s| s.latest_next);
                    match position {
                        Some(next) => self.stored.set(partition, next),
                        None => self.stored.remove(partition),
                    }
                    self.send_blocking(
                        self.writer_of(partition),
                        Input::Assigned {
                            partition,
                            position,
                            replay_from,
                        },
                    );
                }
                info!(
                    ?partitions,
                    stored = stored.len(),
                    "partitions assigned at stored offsets"
                );
                metrics::gauge!(crate::metrics::ASSIGNED_PARTITIONS).set(partitions.len() as f64);
                self.health.set("assigned", true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => warn!(error = %err, "rebalance error"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(err) = result {
            tracing::debug!(error = %err, "kafka-side offset commit failed (lag tools only)");
        }
    }
}

/// Messages per writer handed over at once while the broker keeps delivering: one wake-up
/// of the batcher per chunk instead of per message (a batch may exceed its row limit by less
/// than this).
pub(crate) const SEND_CHUNK: usize = 256;

/// Polls until `shutdown`, routing messages to writers with backpressure. Returns when the
/// shutdown token is cancelled; the caller then flushes and closes.
pub fn poll_loop(consumer: &BaseConsumer<SinkContext>, stats: &crate::stats::Stats) {
    let context = consumer.context();
    let mut paused = false;
    let mut last_lag = Instant::now();
    let mut last_kafka_commit = Instant::now();
    let mut kafka_committed = BTreeMap::new();
    // Whether the last poll found librdkafka's queue empty: then whatever is pending goes out
    // now; while messages keep coming they go out in chunks of `SEND_CHUNK`.
    let mut idle = true;
    while !context.shutdown.is_cancelled() {
        // Hand pending messages to the writers, as far as they have room.
        let blocked = match context.pending.lock() {
            Ok(mut pending) => {
                let mut blocked = false;
                for (writer, queue) in pending.iter_mut().enumerate() {
                    while !queue.is_empty() && (idle || queue.len() >= SEND_CHUNK) {
                        let n = queue.len().min(SEND_CHUNK);
                        let chunk: Vec<RawMessage> = queue.drain(..n).collect();
                        match context.writers[writer].try_send(Input::Messages(chunk)) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(Input::Messages(chunk))) => {
                                for message in chunk.into_iter().rev() {
                                    queue.push_front(message);
                                }
                                blocked = true;
                                break;
                            }
                            Err(_) => return,
                        }
                    }
                }
                blocked
            }
            Err(_) => return,
        };
        if blocked && !paused {
            if let Ok(assignment) = consumer.assignment() {
                paused = consumer.pause(&assignment).is_ok();
            }
        } else if !blocked && paused {
            if let Ok(assignment) = consumer.assignment() {
                paused = consumer.resume(&assignment).is_err();
            }
        }
        let timeout = if blocked {
            Duration::from_millis(20)
        } else if idle {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        };
        match consumer.poll(timeout) {
            Some(Ok(message)) => {
                idle = false;
                let raw = RawMessage {
                    partition: message.partition(),
                    offset: message.offset(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    traceparent: plumbing::kafka::traceparent(&message),
                };
                let writer = context.writer_of(raw.partition);
                if let Ok(mut pending) = context.pending.lock() {
                    pending[writer].push_back(raw);
                }
            }
            Some(Err(err)) => warn!(error = %err, "kafka consumer error"),
            None => idle = true,
        }
        if last_kafka_commit.elapsed() > plumbing::kafka::KAFKA_COMMIT_INTERVAL {
            last_kafka_commit = Instant::now();
            plumbing::kafka::commit_stored(
                consumer,
                &context.topic,
                &context.stored,
                &mut kafka_committed,
            );
        }
        if last_lag.elapsed() > Duration::from_secs(10) {
            last_lag = Instant::now();
            report_lag(consumer, stats);
        }
    }
}

/// Lag as an SRE must read it: end offset − the offset stored in PostgreSQL (what a restart
/// resumes from), not − the fetch position, which runs ahead by everything buffered.
fn report_lag(consumer: &BaseConsumer<SinkContext>, stats: &crate::stats::Stats) {
    let mut total = 0u64;
    for (partition, lag) in plumbing::kafka::stored_lag(consumer, &consumer.context().stored) {
        total += lag;
        metrics::gauge!(crate::metrics::LAG, "partition" => partition.to_string()).set(lag as f64);
    }
    stats.set_lag(total);
}

/// Flushes every writer (waiting up to `deadline`), then leaves the group.
pub fn drain_and_close(consumer: &BaseConsumer<SinkContext>, deadline: Instant) {
    let context = consumer.context();
    // Messages still queued for writers are dropped: their offsets are not stored, so they
    // are read again by whoever owns the partition next.
    if let Ok(mut pending) = context.pending.lock() {
        pending.iter_mut().for_each(VecDeque::clear);
    }
    let mut acks = Vec::new();
    for writer in &context.writers {
        let (ack, done) = oneshot::channel();
        if writer.blocking_send(Input::Flush { ack }).is_ok() {
            acks.push(done);
        }
    }
    for done in acks {
        let left = deadline.saturating_duration_since(Instant::now());
        if context
            .runtime
            .block_on(async move { tokio::time::timeout(left, done).await })
            .is_err()
        {
            warn!("flush did not finish before the shutdown deadline");
            break;
        }
    }
    // What the last batches stored, for lag tools, before the partitions go.
    plumbing::kafka::commit_stored(
        consumer,
        &context.topic,
        &context.stored,
        &mut BTreeMap::new(),
    );
    // Leaving the group runs the revoke callback (nothing left to drop) and lets the other
    // instances take the partitions over at once instead of after the session timeout.
    plumbing::kafka::leave_group(consumer);
}
