//! Sink throughput against its ceiling, measured in one run on this machine:
//!
//! 1. pre-produce N readings (default 2,000,000 from 100,000 devices) to a fresh topic;
//! 2. **ceiling**: a raw binary COPY of the same rows from memory into a fresh database of the
//!    same layout, with 1 and with `SINK_WRITERS` connections in parallel;
//! 3. **sink**: the real sink from offset 0 until every offset is stored;
//! 4. **live latency**: readings produced at a steady rate while the sink runs; p50/p99 of
//!    ingest (`received_at`) → batch committed, from the sink's own histogram;
//! 5. with `BENCH_SHARED_PERCENT=P` (e.g. 10): **shared points**, the same number of readings
//!    of which P % share their (tenant, device, time) with an earlier reading (a second
//!    message of the device at that time with another metric, half a fleet round later, so
//!    some meet their point in the same batch and some in the database), through a fresh
//!    sink from offset 0; rows/s and the ratio to step 3's all-distinct run.
//!
//! `cargo bench -p timescale-sink --bench sink_throughput` with `DATABASE_URL` and
//! `KAFKA_BOOTSTRAP_SERVERS` set (e.g. `eval "$(deploy/local/deps.sh env)"`). Environment:
//! `BENCH_MESSAGES`, `BENCH_DEVICES`, `BENCH_LIVE_RATE` (msg/s), `BENCH_LIVE_SECONDS`,
//! `BENCH_SHARED_PERCENT`, and the
//! sink's own `SINK_*` settings. Prints figures; asserts nothing.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::Utc;
use clap::Parser;
use plumbing::testing::{eventually, TestDb, TestTopics};
use plumbing::Shutdown;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::{telemetry_codec, LayoutChoice, MetricValue, Telemetry};
use timescale_sink::copy_writer::{CopyEncoder, COPY_TELEMETRY_SQL};

/// The service binary's allocator (see `src/main.rs`), so the in-process sink measures what
/// runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest wait for the sink to store what was produced.
const DEADLINE: Duration = Duration::from_secs(600);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn reading(device: usize, seq: i64, time: chrono::DateTime<Utc>) -> Telemetry {
    let mut metrics = BTreeMap::new();
    metrics.insert(
        "temperature".to_owned(),
        MetricValue::Double(18.0 + (device % 17) as f64 + (seq % 10) as f64 * 0.1),
    );
    metrics.insert(
        "humidity".to_owned(),
        MetricValue::Double(40.0 + (seq % 30) as f64),
    );
    metrics.insert("battery".to_owned(), MetricValue::Long(100 - (seq % 100)));
    metrics.insert(
        "rssi".to_owned(),
        MetricValue::Long(-60 - (device % 30) as i64),
    );
    metrics.insert("door_open".to_owned(), MetricValue::Bool(seq % 11 == 0));
    Telemetry {
        tenant_id: format!("tenant-{:03}", device % 100),
        device_id: format!("dev-{device:06}"),
        site_id: Some(format!("site-{}", device % 500)),
        msg_type: "telemetry".to_owned(),
        seq,
        time,
        received_at: Utc::now(),
        metrics,
    }
}

fn rows(n: usize, devices: usize) -> Vec<Telemetry> {
    let per_device = n.div_ceil(devices) as i64;
    let start = Utc::now() - chrono::Duration::seconds(per_device * 5 + 60);
    (0..n)
        .map(|i| {
            let seq = (i / devices) as i64;
            reading(i % devices, seq, start + chrono::Duration::seconds(seq * 5))
        })
        .collect()
}

/// `n` readings of which `percent` % share their point with an earlier one: each such reading
/// carries only `pressure`, at the time of a reading of its device `devices / 2` positions
/// earlier in the stream.
fn rows_sharing(n: usize, devices: usize, percent: usize) -> Vec<Telemetry> {
    let shared = n * percent / 100;
    let distinct = rows(n - shared, devices);
    let every = distinct.len() / shared.max(1);
    let mut out = Vec::with_capacity(n);
    let mut pending: std::collections::VecDeque<(usize, Telemetry)> = Default::default();
    for (i, r) in distinct.iter().enumerate() {
        while pending.front().is_some_and(|(at, _)| *at <= i) {
            out.extend(pending.pop_front().map(|(_, r)| r));
        }
        out.push(r.clone());
        if shared > 0 && i % every == 0 && pending.len() + out.len() < n {
            let mut second = r.clone();
            second.metrics = BTreeMap::from([(
                "pressure".to_owned(),
                MetricValue::Double(1000.0 + (i % 50) as f64),
            )]);
            pending.push_back((i + devices / 2, second));
        }
    }
    out.extend(pending.into_iter().map(|(_, r)| r));
    out
}

async fn produce(producer: &FutureProducer, topic: &str, rows: &[Telemetry]) -> Result<()> {
    let codec = telemetry_codec()?;
    let mut pending = Vec::new();
    for r in rows {
        let payload = codec.encode(r)?;
        let key = r.key();
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
        if pending.len() >= 100_000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn raw_copy(
    db: &TestDb,
    rows: &[Telemetry],
    connections: usize,
    batch: usize,
) -> Result<(f64, f64)> {
    sqlx::query("TRUNCATE telemetry").execute(&db.pool).await?;
    let chunks: Vec<Vec<u8>> = rows
        .chunks(batch)
        .map(|chunk| {
            let mut e = CopyEncoder::with_capacity(chunk.len() * 200);
            for r in chunk {
                e.push_telemetry(r).unwrap();
            }
            e.finish()
        })
        .collect();
    // Open the connections first, so their backends are counted from the start.
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(db.pool.acquire().await?);
    }
    let cpu_before = backend_cpu(db).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let mine: Vec<Vec<u8>> = chunks
            .iter()
            .skip(c)
            .step_by(connections)
            .cloned()
            .collect();
        tasks.push(tokio::spawn(async move {
            for bytes in mine {
                let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
                let mut copy = tx.copy_in_raw(COPY_TELEMETRY_SQL).await?;
                copy.send(bytes).await?;
                copy.finish().await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu_delta(&cpu_before, &backend_cpu(db).await?);
    Ok((rate, cpu))
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat` (0 if gone).
fn proc_cpu(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports clock ticks of 1/100 s (USER_HZ) on every architecture we run on.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of every PostgreSQL backend connected to `db`, by pid.
async fn backend_cpu(db: &TestDb) -> Result<HashMap<i32, f64>> {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(&db.name)
        .fetch_all(&db.pool)
        .await?;
    Ok(pids
        .into_iter()
        .map(|pid| (pid, proc_cpu(&pid.to_string())))
        .collect())
}

fn cpu_delta(before: &HashMap<i32, f64>, after: &HashMap<i32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

/// CPU seconds of the Kafka broker processes on this machine (shared: includes other users).
fn kafka_cpu() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(11).any(|w| w == b"kafka.Kafka"))
        })
        .map(|pid| proc_cpu(&pid))
        .sum()
}

async fn stored(db: &TestDb, group: &str) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(next_offset)::int8 FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(&db.pool)
    .await?
    .unwrap_or(0))
}

/// Cumulative bucket counts of the ingest→commit histogram, by upper bound.
fn latency_buckets() -> Result<Vec<(f64, f64)>> {
    let text = plumbing::observability::prometheus()?.render();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) =
            line.strip_prefix("fleetstream_sink_ingest_to_commit_seconds_bucket{le=\"")
        else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        out.push((le, count.trim().parse()?));
    }
    Ok(out)
}

/// `(sum, count)` of a histogram in the sink's Prometheus output.
fn sum_count(name: &str, labels: &str) -> Result<(f64, f64)> {
    let text = plumbing::observability::prometheus()?.render();
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{suffix}{labels} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((value("_sum"), value("_count")))
}

fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let before: HashMap<u64, f64> = before.iter().map(|(le, c)| (le.to_bits(), *c)).collect();
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| (*le, c - before.get(&le.to_bits()).copied().unwrap_or(0.0)))
        .collect();
    let total = diff.last().map(|(_, c)| *c).unwrap_or(0.0);
    diff.iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
        .unwrap_or(f64::NAN)
}

fn sink_config(db: &TestDb, topics: &TestTopics) -> Result<timescale_sink::Config> {
    Ok(timescale_sink::Config::try_parse_from([
        "timescale-sink",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--dlq-topic",
        &topics.args.dlq_topic,
        "--admin-listen",
        "127.0.0.1:0",
        "--log",
        "warn",
    ])?)
}

/// A fresh topic and database, `data` produced, a sink from offset 0 until every offset is
/// stored. Returns (rows/s overall, rows/s from the first commit, stored rows).
async fn sink_from_offset_zero(
    layout: LayoutChoice,
    producer: &FutureProducer,
    data: &[Telemetry],
) -> Result<(f64, f64, i64)> {
    let topics = TestTopics::new(12).await?;
    produce(producer, &topics.args.telemetry_topic, data).await?;
    let db = TestDb::new(layout).await?;
    let config = sink_config(&db, &topics)?;
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let started = Instant::now();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    let mut first: Option<(Instant, i64)> = None;
    let n = data.len() as i64;
    loop {
        let s = stored(&db, &group).await?;
        if first.is_none() && s > 0 {
            first = Some((Instant::now(), s));
        }
        if s >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < DEADLINE,
            "the sink stored {s} of {n} offsets in {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed().as_secs_f64();
    let (first_at, first_rows) = first.unwrap_or((Instant::now(), 0));
    shutdown.cancel();
    sink.await??;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await?;
    Ok((
        n as f64 / total,
        (n - first_rows) as f64 / first_at.elapsed().as_secs_f64().max(1e-9),
        rows,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = env_or("BENCH_MESSAGES", 2_000_000);
    let devices: usize = env_or("BENCH_DEVICES", 100_000);
    let live_rate: u64 = env_or("BENCH_LIVE_RATE", 20_000);
    let live_seconds: u64 = env_or("BENCH_LIVE_SECONDS", 20);
    let shared_percent: usize = env_or("BENCH_SHARED_PERCENT", 0);
    let layout = match std::env::var("BENCH_LAYOUT").as_deref() {
        Ok("timescaledb") => LayoutChoice::TimescaleDb,
        _ => LayoutChoice::Postgres,
    };
    let data = rows(n, devices);
    let topics = TestTopics::new(12).await?;
    let mut pc = plumbing::kafka::producer_config(&topics.args, "bench");
    pc.set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .set("linger.ms", "20");
    let producer: FutureProducer = pc.create()?;
    let t = Instant::now();
    produce(&producer, &topics.args.telemetry_topic, &data).await?;
    println!(
        "produced {n} messages ({devices} devices) in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let sink_db = TestDb::new(layout).await?;
    let config = sink_config(&sink_db, &topics)?;
    let (writers, max_rows, max_age) =
        (config.writers, config.batch_max_rows, config.batch_max_age);
    let (catchup_rows, catchup_after) = (config.batch_catchup_rows, config.catchup_after);

    let ceiling_db = TestDb::new(layout).await?;
    let (one, one_cpu) = raw_copy(&ceiling_db, &data, 1, max_rows).await?;
    let (parallel, parallel_cpu) = raw_copy(&ceiling_db, &data, writers, max_rows).await?;
    let ceiling = one.max(parallel);
    drop(ceiling_db);
    let group = config.group_id.clone();
    let shutdown = Shutdown::new();
    let self_pid = std::process::id().to_string();
    let (sink_cpu_before, kafka_cpu_before) = (proc_cpu(&self_pid), kafka_cpu());
    let started = Instant::now();
    let sink = tokio::spawn(timescale_sink::run(config, shutdown.clone()));
    let mut backends = HashMap::new();
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let s = stored(&sink_db, &group).await?;
        if first.is_none() && s > 0 {
            first = Some((Instant::now(), s));
        }
        // The pool's backends, sampled while they live (the last sample counts).
        backends.extend(backend_cpu(&sink_db).await?);
        if s >= n as i64 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < DEADLINE,
            "the sink stored {s} of {n} offsets in {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed().as_secs_f64();
    let sink_cpu = proc_cpu(&self_pid) - sink_cpu_before;
    let kafka_cpu = kafka_cpu() - kafka_cpu_before;
    backends.extend(backend_cpu(&sink_db).await?);
    let sink_pg_cpu: f64 = backends.values().sum();
    let stages: Vec<(&str, f64)> = ["decode", "offsets", "copy", "latest", "commit"]
        .into_iter()
        .map(|stage| {
            let (sum, _) = sum_count(
                "fleetstream_sink_stage_duration_seconds",
                &format!("{{stage=\"{stage}\"}}"),
            )
            .unwrap_or((0.0, 0.0));
            (stage, sum)
        })
        .collect();
    let (copy_sum, batches) = sum_count("fleetstream_sink_copy_duration_seconds", "")?;
    let (commit_sum, _) = sum_count("fleetstream_sink_batch_commit_duration_seconds", "")?;
    let (first_at, first_rows) = first.unwrap();
    let steady = (n as i64 - first_rows) as f64 / first_at.elapsed().as_secs_f64();

    // Live phase: a steady rate while the sink keeps up.
    let before = latency_buckets()?;
    let live_backends_before = backend_cpu(&sink_db).await?;
    let live_sink_cpu_before = proc_cpu(&self_pid);
    let live_batches_before = sum_count("fleetstream_sink_copy_duration_seconds", "")?.1;
    let codec = telemetry_codec()?;
    let live_total = live_rate * live_seconds;
    let tick = Duration::from_millis(10);
    let per_tick = (live_rate / 100).max(1);
    let live_start = Instant::now();
    let mut sent = 0u64;
    let mut pending = Vec::new();
    let base = Utc::now();
    while sent < live_total {
        for _ in 0..per_tick {
            let r = reading(
                (sent as usize) % devices,
                1_000_000 + sent as i64,
                base + chrono::Duration::milliseconds(sent as i64),
            );
            let payload = codec.encode(&r)?;
            let key = r.key();
            pending.push(
                producer
                    .send_result(
                        FutureRecord::to(&topics.args.telemetry_topic)
                            .key(&key)
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)?,
            );
            sent += 1;
        }
        let next = live_start + tick * (sent / per_tick) as u32;
        tokio::time::sleep_until(next.into()).await;
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    let want = (n as u64 + live_total) as i64;
    eventually("every live offset stored", DEADLINE, || async {
        match stored(&sink_db, &group).await {
            Ok(s) if s >= want => Ok(()),
            other => Err(format!("{other:?} of {want}")),
        }
    })
    .await?;
    let after = latency_buckets()?;
    // Backends that lived through the phase (a backend that ended is missed, as in step 3).
    let live_pg_cpu = cpu_delta(&live_backends_before, &backend_cpu(&sink_db).await?);
    let live_sink_cpu = proc_cpu(&self_pid) - live_sink_cpu_before;
    let live_batches =
        sum_count("fleetstream_sink_copy_duration_seconds", "")?.1 - live_batches_before;
    shutdown.cancel();
    sink.await??;

    println!(
        "layout: {}; writers: {writers}; batch: {max_rows} rows / {max_age:?}; \
         catching up (readings older than {catchup_after:?}): {catchup_rows} rows",
        sink_db.layout
    );
    println!("ceiling, raw binary COPY from memory: 1 connection {one:.0} rows/s; {writers} connections {parallel:.0} rows/s");
    println!("sink, offset 0 to caught up: {:.0} rows/s overall ({total:.1} s incl. group join), {steady:.0} rows/s from first commit", n as f64 / total);
    println!(
        "catch-up: {batches:.0} batches, mean {:.1} rows; per batch: COPY {:.1} ms, whole transaction {:.1} ms; \
         transaction time / wall time = {:.2} (of {writers} writers)",
        n as f64 / batches.max(1.0),
        copy_sum / batches.max(1.0) * 1e3,
        commit_sum / batches.max(1.0) * 1e3,
        commit_sum / total
    );
    println!(
        "per batch by stage (ms): {}",
        stages
            .iter()
            .map(|(stage, sum)| format!("{stage} {:.1}", sum / batches.max(1.0) * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let per_100k = |cpu: f64| cpu / n as f64 * 100_000.0;
    println!(
        "CPU s per 100k rows: raw COPY backends {:.2} (1 conn) / {:.2} ({writers} conns); \
         sink: PostgreSQL backends {:.2}, sink process {:.2}, Kafka broker {:.2} (shared broker)",
        per_100k(one_cpu),
        per_100k(parallel_cpu),
        per_100k(sink_pg_cpu),
        per_100k(sink_cpu),
        per_100k(kafka_cpu)
    );
    println!(
        "ratio sink/ceiling: {:.2} (steady) / {:.2} (overall)",
        steady / ceiling,
        n as f64 / total / ceiling
    );
    println!(
        "live {live_rate} msg/s for {live_seconds} s: ingest→commit p50 ≤ {:.3} s, p99 ≤ {:.3} s (histogram bucket bounds)",
        quantile(&before, &after, 0.5),
        quantile(&before, &after, 0.99)
    );
    println!(
        "live CPU µs per row: PostgreSQL backends {:.1}, sink process {:.1} (includes this \
         program's producer); {live_batches:.0} batches, mean {:.0} rows",
        live_pg_cpu / live_total as f64 * 1e6,
        live_sink_cpu / live_total as f64 * 1e6,
        live_total as f64 / live_batches.max(1.0)
    );
    if shared_percent > 0 {
        let shared = rows_sharing(n, devices, shared_percent);
        let (overall, from_first, stored_rows) =
            sink_from_offset_zero(layout, &producer, &shared).await?;
        println!(
            "shared points ({shared_percent} % of {n} readings share a point with an earlier one; \
             {stored_rows} rows stored): {overall:.0} rows/s overall, {from_first:.0} from first \
             commit; ratio to all-distinct: {:.2} (overall) / {:.2} (from first commit)",
            overall / (n as f64 / total),
            from_first / steady
        );
    }
    Ok(())
}
