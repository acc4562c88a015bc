//! `ingest-producer import FILE --tenant T`: history from an InfluxDB export into fleetstream.
//!
//! The file is read in chunks of whole lines ([`crate::export`]) on a thread of its own; each
//! chunk is mapped and merged exactly as a write to `/api/v2/write` is
//! ([`crate::lineproto::assemble`], the devices and the tenant checked against the database's
//! devices as for a gateway token of the tenant, the same time window), encoded with the same
//! Avro schema and framing (the Confluent wire format when `SCHEMA_REGISTRY_URL` is set,
//! `telemetry.v1` registered as ingest does) and produced with the same idempotent `acks=all` producer, at most two chunks
//! in flight. The HTTP rate limits do not apply: the import is an operator's tool.
//!
//! Exactly once: a reading is identified by (tenant, device, time) and a line always maps to
//! the same reading (`seq` 0, the file's values and timestamp: a line without one is
//! refused), so the sink stores each point once however
//! often it is produced: a re-run of a file after a crash (or of the same file twice) adds no
//! row and changes no value. The run ends with an error when Kafka did not acknowledge a
//! reading; running the same command again completes the import.
//!
//! On a terminal, a progress line (points/s, percentage of the file, ETA) is redrawn every
//! second on stderr; at the end a summary goes to stdout: lines read, stored, rejected, and
//! each rejected line's number and reason.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use plumbing::config::{parse_duration, DatabaseArgs, KafkaArgs, ObservabilityArgs};
use plumbing::Shutdown;
use tokio::task::JoinHandle;
use tracing::{info, info_span, Instrument};

use crate::credentials::{Credentials, Principal};
use crate::error::{Error, Rejection};
use crate::export::ExportReader;
use crate::lineproto::{self, Context, Mapping, Precision};
use crate::message::TimeLimits;
use crate::producer::{Outgoing, Producer};

/// Bytes of the file parsed and produced per step.
const CHUNK_BYTES: usize = 4 << 20;
/// Chunks produced but not yet acknowledged: bounds memory while the next one is parsed.
const CHUNKS_IN_FLIGHT: usize = 2;

/// `ingest-producer import`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ingest-producer import",
    about = "Import an InfluxDB line-protocol export (plain or .gz) through Kafka, exactly once"
)]
pub struct ImportArgs {
    /// The export: `influx export`/`influxd inspect export-lp` output, plain or gzip.
    pub file: PathBuf,
    /// Tenant the devices belong to (every device must be registered in it).
    #[arg(long)]
    pub tenant: String,
    /// Unit of the file's timestamps: `ns` (exports' default), `us`, `ms`, `s`, `m`, `h`.
    #[arg(long, default_value = "ns", value_parser = parse_precision)]
    pub precision: Precision,
    /// Tags naming the device, the first a line has wins.
    #[arg(
        long,
        env = "INFLUX_DEVICE_TAGS",
        value_delimiter = ',',
        default_value = "device_id,device,host"
    )]
    pub device_tags: Vec<String>,
    /// Readings older than this are refused (they would fall to retention at once).
    #[arg(long, env = "TELEMETRY_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub telemetry_retention: Duration,
    /// How far ahead of the clock a timestamp may be.
    #[arg(long, env = "MAX_CLOCK_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
    /// Longest wait for Kafka to acknowledge a reading.
    #[arg(long, env = "KAFKA_DELIVERY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub kafka_delivery_timeout: Duration,
    /// Progress line on stderr: `auto` (on a terminal), `always`, `never`.
    #[arg(long, default_value = "auto")]
    pub progress: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// With `SCHEMA_REGISTRY_URL`, readings are written in the Confluent wire format with the
    /// id of `telemetry.v1` under `<TELEMETRY_TOPIC>-value`, as ingest writes them.
    #[command(flatten)]
    pub registry: plumbing::registry::RegistryArgs,
}

/// `--precision` of `import` and `compare`: the 1.x names and `us`.
pub fn parse_precision(value: &str) -> Result<Precision, String> {
    match value {
        "us" => Ok(Precision::Microseconds),
        other => Precision::from_v1(Some(other)),
    }
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Lines of line protocol read (comments and blank lines not counted).
    pub lines: usize,
    /// Lines stored (their readings acknowledged by Kafka).
    pub stored: usize,
    /// Readings produced (lines of one device and time are one reading).
    pub readings: usize,
    /// Refused lines: number and reason.
    pub rejected: Vec<(usize, String)>,
    /// Readings Kafka did not acknowledge (the import must be run again).
    pub unacknowledged: usize,
    pub elapsed: Duration,
}

impl Summary {
    /// Prints the summary and every rejected line.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            out,
            "lines read: {}, stored: {}, rejected: {}; readings produced: {}; {:.1} s, {:.0} lines/s",
            self.lines,
            self.stored,
            self.rejected.len(),
            self.readings,
            secs,
            self.lines as f64 / secs
        )?;
        for (number, reason) in &self.rejected {
            writeln!(out, "line {number}: {reason}")?;
        }
        if self.unacknowledged > 0 {
            writeln!(
                out,
                "{} readings were not acknowledged by Kafka: run the same import again \
                 (points already stored are not duplicated)",
                self.unacknowledged
            )?;
        }
        Ok(())
    }
}

/// The outcome of one chunk's produce.
struct Sent {
    results: Vec<Result<(), Rejection>>,
    lines: Vec<Vec<usize>>,
}

/// With a registry: registers `telemetry.v1` under `<telemetry topic>-value` as ingest does
/// (waiting while the registry is away, refused on an incompatible schema) and returns its id.
async fn register_schema(
    args: &ImportArgs,
    codec: &schemas::Codec<schemas::Telemetry>,
    shutdown: &Shutdown,
) -> Result<Option<u32>, Error> {
    let Some(registry) = plumbing::registry::Registry::from_args(&args.registry)? else {
        return Ok(None);
    };
    let topic = &args.kafka.telemetry_topic;
    let id = registry
        .register(
            topic,
            codec.current_name(),
            codec.current_json(),
            shutdown,
            |err| tracing::warn!(error = %err, url = registry.url(), "schema registry not reachable yet; retrying"),
        )
        .await?;
    info!(schema_id = id, subject = %format!("{topic}-value"), url = registry.url(), "registered telemetry.v1; writing the Confluent wire format");
    Ok(Some(id))
}

/// Imports the file; stops early (with what was done so far) when `shutdown` is cancelled.
pub async fn run(args: ImportArgs, shutdown: Shutdown) -> Result<Summary, Error> {
    let started = Instant::now();
    let pool = plumbing::db::pool(&args.database, "ingest-producer-import")?;
    let credentials = Credentials::default();
    let devices = credentials.reload(&pool).await?;
    pool.close().await;
    info!(devices, tenant = %args.tenant, file = %args.file.display(), "importing");
    let producer = Arc::new(Producer::new(
        &args.kafka,
        &format!("import-{}", std::process::id()),
        args.kafka_delivery_timeout,
    )?);
    let codec = schemas::telemetry_codec()?;
    let schema_id = register_schema(&args, codec, &shutdown).await?;
    let principal = Principal::Gateway {
        tenant_id: args.tenant.clone(),
    };
    let mapping = Mapping {
        device_tags: args.device_tags.clone(),
        ..Mapping::default()
    };
    let limits = TimeLimits {
        max_future: args.max_clock_skew,
        retention: args.telemetry_retention,
    };

    let mut reader =
        ExportReader::open(&args.file, args.precision).map_err(|err| Error::Config {
            name: "FILE",
            reason: format!("{}: {err}", args.file.display()),
        })?;
    let file_len = reader.file_len();
    let progress = reader.progress();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let parser = std::thread::spawn(move || loop {
        let chunk = reader.next_chunk(CHUNK_BYTES).transpose();
        let last = !matches!(chunk, Some(Ok(_)));
        if let Some(chunk) = chunk {
            if tx.blocking_send(chunk).is_err() {
                return;
            }
        }
        if last {
            return;
        }
    });

    let stored_lines = Arc::new(AtomicU64::new(0));
    let show_progress = match args.progress.as_str() {
        "always" => true,
        "never" => false,
        _ => std::io::stderr().is_terminal(),
    };
    let ticker = show_progress.then(|| {
        spawn_progress(
            progress.clone(),
            file_len,
            stored_lines.clone(),
            shutdown.clone(),
        )
    });

    let traceparent = format!(
        "00-{:032x}-{:016x}-01",
        rand::random::<u128>() | 1,
        rand::random::<u64>() | 1
    );
    let mut summary = Summary::default();
    let mut in_flight: VecDeque<JoinHandle<Sent>> = VecDeque::new();
    let mut failure = None;
    loop {
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => break,
            chunk = rx.recv() => chunk,
        };
        let Some(chunk) = chunk else { break };
        let lines = match chunk {
            Ok(lines) => lines,
            Err(err) => {
                failure = Some(Error::Config {
                    name: "FILE",
                    reason: format!("{}: {err}", args.file.display()),
                });
                break;
            }
        };
        // A line without a timestamp would get the clock's time, another on every run.
        let lines = lines
            .into_iter()
            .map(|mut line| {
                if matches!(&line.point, Ok(point) if point.time_ns.is_none()) {
                    line.point = Err(
                        "no timestamp (an import would store it at a new time each run)".to_owned(),
                    );
                }
                line
            })
            .collect();
        let batch = lineproto::assemble(
            lines,
            &Context {
                credentials: &credentials,
                principal: &principal,
                mapping: &mapping,
                limits,
                now: Utc::now(),
            },
        );
        summary.lines += batch.lines;
        summary
            .rejected
            .extend(batch.refused.into_iter().map(|(n, r)| (n, describe(&r))));
        let mut outgoing = Vec::with_capacity(batch.readings.len());
        let mut lines = Vec::with_capacity(batch.readings.len());
        for (telemetry, numbers) in batch.readings {
            let encoded = match schema_id {
                Some(id) => codec.encode_confluent(&telemetry, id),
                None => codec.encode(&telemetry),
            };
            match encoded {
                Ok(payload) => {
                    outgoing.push(Outgoing {
                        key: telemetry.key(),
                        payload,
                    });
                    lines.push(numbers);
                }
                Err(err) => summary.rejected.extend(
                    numbers
                        .into_iter()
                        .map(|n| (n, format!("cannot encode: {err}"))),
                ),
            }
        }
        summary.readings += outgoing.len();
        let producer = producer.clone();
        let traceparent = traceparent.clone();
        let span = info_span!("import_chunk", readings = outgoing.len());
        in_flight.push_back(tokio::spawn(
            async move {
                let results = producer.send_all(&outgoing, &traceparent).await;
                Sent { results, lines }
            }
            .instrument(span),
        ));
        while in_flight.len() >= CHUNKS_IN_FLIGHT {
            if let Some(sent) = in_flight.pop_front() {
                tally(sent.await, &mut summary, &stored_lines);
            }
        }
    }
    drop(rx);
    for sent in in_flight {
        tally(sent.await, &mut summary, &stored_lines);
    }
    let _ = tokio::task::spawn_blocking(move || parser.join()).await;
    producer.flush(Duration::from_secs(10));
    if let Some(ticker) = ticker {
        ticker.abort();
        eprintln!();
    }
    summary.rejected.sort_by_key(|(n, _)| *n);
    summary.rejected.dedup_by_key(|(n, _)| *n);
    summary.elapsed = started.elapsed();
    crate::metrics::line_protocol_lines("import", summary.stored, summary.rejected.len());
    match failure {
        Some(err) => Err(err),
        None => Ok(summary),
    }
}

fn tally(
    sent: Result<Sent, tokio::task::JoinError>,
    summary: &mut Summary,
    stored_lines: &AtomicU64,
) {
    let Ok(sent) = sent else {
        summary.unacknowledged += 1;
        return;
    };
    for (result, numbers) in sent.results.into_iter().zip(sent.lines) {
        match result {
            Ok(()) => {
                summary.stored += numbers.len();
                stored_lines.fetch_add(numbers.len() as u64, Ordering::Relaxed);
            }
            Err(rejection) => {
                summary.unacknowledged += 1;
                summary
                    .rejected
                    .extend(numbers.into_iter().map(|n| (n, describe(&rejection))));
            }
        }
    }
}

/// A refused line's reason, naming the field when one is to blame.
fn describe(rejection: &Rejection) -> String {
    match rejection.field.as_deref() {
        Some(field) if !field.is_empty() => format!("{field}: {}", rejection.error),
        _ => rejection.error.clone(),
    }
}

/// Redraws `points/s, % of the file, ETA` on stderr every second.
fn spawn_progress(
    progress: crate::export::Progress,
    file_len: u64,
    stored: Arc<AtomicU64>,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let elapsed = started.elapsed().as_secs_f64().max(1e-3);
            let done = progress.bytes() as f64 / (file_len.max(1) as f64);
            let eta = if done > 0.0 {
                elapsed * (1.0 - done) / done
            } else {
                0.0
            };
            let points = stored.load(Ordering::Relaxed);
            eprint!(
                "\r{points} points stored, {:.0} points/s, {:.1} % of the file, ETA {:.0} s   ",
                points as f64 / elapsed,
                (done * 100.0).min(100.0),
                eta
            );
            let _ = std::io::stderr().flush();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses() {
        let args = ImportArgs::try_parse_from([
            "import",
            "dump.lp.gz",
            "--tenant",
            "acme",
            "--precision",
            "s",
            "--database-url",
            "postgres://u:p@db/fleet",
        ])
        .unwrap();
        assert_eq!(args.file, PathBuf::from("dump.lp.gz"));
        assert_eq!(args.precision, Precision::Seconds);
        assert_eq!(args.device_tags, vec!["device_id", "device", "host"]);
        assert!(
            ImportArgs::try_parse_from(["import", "f", "--tenant", "a", "--precision", "d"])
                .is_err()
        );
    }
}
