//! The Kafka side: one consumer in the evaluator's group, polled on its own thread, feeding
//! the evaluation task through a bounded channel.
//!
//! As in the sink (see its `consumer` module for why the eager protocol): on assignment each
//! partition starts at the offset stored in `consumer_offsets` with the transitions it covers;
//! on revocation the evaluation task commits what it has and forgets the partitions before
//! the callback returns, so the next owner starts from a stored offset that matches the
//! stored alerts. A commit racing a revocation anyway is rolled back by the offset fence.
//!
//! Backpressure: while the channel is full, messages wait in a queue and the assigned
//! partitions are paused; the thread keeps polling, so the member stays in the group while
//! the database is slow or down.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use schemas::Telemetry;

use crate::engine::Micros;
use crate::store::StoredPartition;

pub use plumbing::kafka::StartFrom;

/// What the consumer thread hands the evaluation task, in order.
#[derive(Debug)]
pub enum Input {
    Message {
        partition: i32,
        offset: i64,
        /// Decoded on the consumer thread (in parallel with evaluation); `None`: undecodable.
        reading: Option<Box<Telemetry>>,
        /// W3C trace context of the ingest request, when the producer sent one.
        traceparent: Option<String>,
    },
    /// Partitions now owned, each with its stored offset and event-time clock.
    Assigned {
        partitions: Vec<(i32, Option<i64>, Option<Micros>)>,
        partition_count: i32,
    },
    /// The partition has been read to its end.
    Eof { partition: i32 },
    /// Partitions to commit and forget; `ack` once done.
    Revoked {
        partitions: Vec<i32>,
        ack: oneshot::Sender<()>,
    },
}

/// State shared by the poll loop and the rebalance callbacks (same thread).
pub struct EvalContext {
    pub input: mpsc::Sender<Vec<Input>>,
    pub pool: PgPool,
    pub runtime: Handle,
    pub group: String,
    pub topic: String,
    pub start_from: StartFrom,
    pub revoke_timeout: Duration,
    pub health: plumbing::admin::Health,
    pub shutdown: CancellationToken,
    /// Offsets stored in PostgreSQL (set by commits and on assignment): the lag report
    /// counts from them.
    pub stored: plumbing::kafka::StoredOffsets,
    /// Both framings: the fast path for current-schema messages, the generic codec for the
    /// rest, Confluent ids through the schema registry when one is configured.
    reader: std::sync::Arc<plumbing::registry::TelemetryReader>,
    pending: Mutex<VecDeque<Input>>,
}

impl std::fmt::Debug for EvalContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalContext")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .finish()
    }
}

impl EvalContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input: mpsc::Sender<Vec<Input>>,
        pool: PgPool,
        runtime: Handle,
        group: String,
        topic: String,
        start_from: StartFrom,
        revoke_timeout: Duration,
        health: plumbing::admin::Health,
        shutdown: CancellationToken,
        reader: std::sync::Arc<plumbing::registry::TelemetryReader>,
        stored: plumbing::kafka::StoredOffsets,
    ) -> Self {
        Self {
            reader,
            stored,
            input,
            pool,
            runtime,
            group,
            topic,
            start_from,
            revoke_timeout,
            health,
            shutdown,
            pending: Mutex::new(VecDeque::new()),
        }
    }

    fn load_offsets(&self, partitions: &[i32]) -> Option<HashMap<i32, StoredPartition>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = self.runtime.block_on(crate::store::load_offsets(
                &self.pool,
                &self.group,
                &self.topic,
                partitions,
            ));
            match result {
                Ok(offsets) => return Some(offsets),
                Err(err) => {
                    warn!(error = %err, "cannot read stored offsets; retrying");
                    metrics::counter!(crate::metrics::DB_RETRIES).increment(1);
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if self.shutdown.is_cancelled() {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

impl ClientContext for EvalContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // End-of-partition is an event here (asked for with `enable.partition.eof`), reported
        // through `poll`; librdkafka also raises it as a global error on every fetch that
        // reaches the end.
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::error!(error = %error, reason, "librdkafka error");
    }
}

impl ConsumerContext for EvalContext {
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
        // Another instance reports these partitions' lag from now on.
        for &partition in &partitions {
            self.stored.remove(partition);
            metrics::gauge!(crate::metrics::LAG, "partition" => partition.to_string()).set(0.0);
        }
        if let Ok(mut pending) = self.pending.lock() {
            pending.retain(
                |input| !matches!(input, Input::Message { partition, .. } if partitions.contains(partition)),
            );
        }
        let (ack, done) = oneshot::channel();
        if self
            .input
            .blocking_send(vec![Input::Revoked { partitions, ack }])
            .is_ok()
        {
            let timeout = self.revoke_timeout;
            let waited = self
                .runtime
                .block_on(async move { tokio::time::timeout(timeout, done).await });
            if waited.is_err() {
                warn!("revocation did not finish in time; relying on the offset fence");
            }
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
                    |p| stored.get(&p).map(|&(next, _)| next),
                    self.start_from,
                );
                let partition_count = consumer
                    .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == self.topic)
                            .map(|t| t.partitions().len() as i32)
                    })
                    .unwrap_or(0);
                let list = partitions
                    .iter()
                    .map(|&p| {
                        let (offset, clock) = stored
                            .get(&p)
                            .map_or((None, None), |&(next, clock)| (Some(next), clock));
                        match offset {
                            Some(next) => self.stored.set(p, next),
                            None => self.stored.remove(p),
                        }
                        (p, offset, clock)
                    })
                    .collect();
                let _ = self.input.blocking_send(vec![Input::Assigned {
                    partitions: list,
                    partition_count,
                }]);
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
}

/// Messages handed to the evaluation task at once while the broker keeps delivering.
pub const SEND_CHUNK: usize = 256;

/// Polls until `shutdown`, handing messages to the evaluation task with backpressure.
pub fn poll_loop(consumer: &BaseConsumer<EvalContext>) {
    let context = consumer.context();
    let mut paused = false;
    let mut last_lag = Instant::now();
    let mut last_kafka_commit = Instant::now();
    let mut kafka_committed = std::collections::BTreeMap::new();
    // Whether the last poll found nothing: then whatever is pending goes out now; while
    // messages keep coming they go out in chunks, one wake-up of the evaluation task each.
    let mut idle = true;
    while !context.shutdown.is_cancelled() {
        let (blocked, backlog) = match context.pending.lock() {
            Ok(mut pending) => {
                let mut blocked = false;
                while !pending.is_empty() && (idle || pending.len() >= SEND_CHUNK) {
                    let n = pending.len().min(SEND_CHUNK);
                    let chunk: Vec<Input> = pending.drain(..n).collect();
                    match context.input.try_send(chunk) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(chunk)) => {
                            for input in chunk.into_iter().rev() {
                                pending.push_front(input);
                            }
                            blocked = true;
                            break;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                (blocked, pending.len())
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
            Duration::from_millis(5)
        } else if backlog > 0 {
            // Something waits for a fuller chunk: only take what is already fetched.
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let polled = consumer.poll(timeout);
        idle = polled.is_none();
        match polled {
            Some(Ok(message)) => {
                let payload = message.payload().unwrap_or_default();
                let decoded = match context.reader.try_decode(payload) {
                    plumbing::registry::Decoded::Done(decoded) => decoded,
                    // A registry id not seen yet: this thread waits for the registry (the
                    // engine sees nothing out of order), giving up only on shutdown, when
                    // this message is left unhandled and read again after a restart.
                    plumbing::registry::Decoded::Lookup(_) => match context
                        .runtime
                        .block_on(context.reader.decode(payload, &context.shutdown))
                    {
                        Ok(decoded) => decoded,
                        Err(err) => {
                            tracing::warn!(error = %err, partition = message.partition(), offset = message.offset(), "consumer stops");
                            return;
                        }
                    },
                };
                let reading = match decoded {
                    Ok(reading) => Some(Box::new(reading)),
                    Err(err) => {
                        tracing::debug!(partition = message.partition(), offset = message.offset(), error = %err, "undecodable message skipped");
                        metrics::counter!(crate::metrics::UNDECODABLE).increment(1);
                        None
                    }
                };
                let input = Input::Message {
                    partition: message.partition(),
                    offset: message.offset(),
                    reading,
                    traceparent: plumbing::kafka::traceparent(&message),
                };
                if let Ok(mut pending) = context.pending.lock() {
                    pending.push_back(input);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if let Ok(mut pending) = context.pending.lock() {
                    pending.push_back(Input::Eof { partition });
                }
            }
            Some(Err(err)) => warn!(error = %err, "kafka consumer error"),
            None => {}
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
            report_lag(consumer);
        }
    }
}

/// Lag as an SRE must read it: end offset − the offset stored in PostgreSQL (what a restart
/// resumes from), not − the fetch position, which runs ahead by everything queued.
fn report_lag(consumer: &BaseConsumer<EvalContext>) {
    let mut total = 0u64;
    for (partition, lag) in plumbing::kafka::stored_lag(consumer, &consumer.context().stored) {
        total += lag;
        metrics::gauge!(crate::metrics::LAG, "partition" => partition.to_string()).set(lag as f64);
    }
    crate::LAG_TOTAL.store(total, std::sync::atomic::Ordering::Relaxed);
}

/// Leaves the group: the revoke callback makes the evaluation task commit and forget every
/// partition, and the other instances take them over at once.
pub fn leave(consumer: &BaseConsumer<EvalContext>) {
    if let Ok(mut pending) = consumer.context().pending.lock() {
        pending.clear();
    }
    plumbing::kafka::leave_group(consumer);
}
