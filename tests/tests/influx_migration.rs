//! Moving off InfluxDB, end to end into PostgreSQL: ingest and the sink run in-process
//! against real Kafka and PostgreSQL.
//!
//! * A real Telegraf (built by `deploy/local/deps.sh up`, `FLEETSTREAM_TELEGRAF`) writes for a
//!   few intervals through both its outputs, `influxdb_v2` and `influxdb` (1.x), gzip on;
//!   the rows are exactly the lines its exec inputs printed (they log each line they hand
//!   to Telegraf), and as many `mem` points as Telegraf reports it wrote.
//! * `ingest-producer import` of a generated 1,000,000-line export, SIGKILLed halfway and run
//!   again, stores every point exactly once; `compare` then finds no difference, and after a
//!   row is deleted by hand reports exactly that row's difference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use fleetstream_tests::{free_addr, wait_for_status};
use ingest_producer::credentials::token_hash;
use plumbing::testing::{eventually, ServiceProcess, TestDb, TestTopics};
use plumbing::Shutdown;
use schemas::LayoutChoice;
use serde_json::Value;
use tokio::task::JoinHandle;

/// Ingest and the sink, in-process, on a database of their own.
struct Pipeline {
    db: TestDb,
    topics: TestTopics,
    ingest: std::net::SocketAddr,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl Pipeline {
    async fn start(devices: &[&str]) -> Result<Self> {
        let db = TestDb::new(LayoutChoice::Postgres).await?;
        sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
            .execute(&db.pool)
            .await?;
        for device in devices {
            sqlx::query(
                "INSERT INTO devices (tenant_id, device_id, token_hash, status) \
                 VALUES ('acme', $1, $2, 'active')",
            )
            .bind(device)
            .bind(token_hash(&format!("tok-{device}")))
            .execute(&db.pool)
            .await?;
        }
        sqlx::query(
            "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ('acme', 'gw', $1)",
        )
        .bind(token_hash("gw-acme"))
        .execute(&db.pool)
        .await?;
        let topics = TestTopics::new(3).await?;
        let shutdown = Shutdown::new();
        let common = |admin: std::net::SocketAddr| {
            vec![
                "service".to_owned(),
                "--database-url".to_owned(),
                db.url.clone(),
                "--kafka-bootstrap-servers".to_owned(),
                topics.args.bootstrap_servers.clone(),
                "--telemetry-topic".to_owned(),
                topics.args.telemetry_topic.clone(),
                "--admin-listen".to_owned(),
                admin.to_string(),
            ]
        };
        let sink_admin = free_addr()?;
        let sink = timescale_sink::Config::try_parse_from(common(sink_admin))?;
        let token = shutdown.clone();
        let mut tasks = vec![tokio::spawn(async move {
            Ok(timescale_sink::run(sink, token).await?)
        })];
        let ingest_admin = free_addr()?;
        let ingest = free_addr()?;
        let mut args = common(ingest_admin);
        args.extend(["--http-listen".to_owned(), ingest.to_string()]);
        // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
        args.extend(["--mqtt-listen".to_owned(), "off".to_owned()]);
        let config = ingest_producer::Config::try_parse_from(args)?;
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            Ok(ingest_producer::run(config, token).await?)
        }));
        for admin in [sink_admin, ingest_admin] {
            wait_for_status(admin, "/readyz", 200, Duration::from_secs(60)).await?;
        }
        Ok(Pipeline {
            db,
            topics,
            ingest,
            shutdown,
            tasks,
        })
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task).await???;
        }
        Ok(())
    }

    /// `(time, metric) → value` of every row of `device`.
    async fn metrics(&self, device: &str) -> Result<BTreeMap<(DateTime<Utc>, String), Value>> {
        let rows: Vec<(DateTime<Utc>, Value)> = sqlx::query_as(
            "SELECT time, metrics FROM telemetry WHERE tenant_id = 'acme' AND device_id = $1",
        )
        .bind(device)
        .fetch_all(&self.db.pool)
        .await?;
        let mut out = BTreeMap::new();
        for (time, metrics) in rows {
            for (name, value) in metrics.as_object().context("metrics object")? {
                out.insert((time, name.clone()), value.clone());
            }
        }
        Ok(out)
    }

    async fn rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM telemetry")
            .fetch_one(&self.db.pool)
            .await?)
    }
}

fn telegraf() -> Result<PathBuf> {
    let path = std::env::var_os("FLEETSTREAM_TELEGRAF")
        .map(PathBuf::from)
        .context("FLEETSTREAM_TELEGRAF is not set: run `eval \"$(deploy/local/deps.sh env)\"`")?;
    if !path.is_file() {
        bail!(
            "{} is missing: `deploy/local/deps.sh up` builds it",
            path.display()
        );
    }
    Ok(path)
}

/// An exec input script: prints one line with an explicit timestamp (whole microseconds,
/// which Telegraf's `precision = "1us"` keeps) and appends it to `log`.
fn exec_script(dir: &Path, measurement: &str) -> Result<(PathBuf, PathBuf)> {
    let log = dir.join(format!("{measurement}.log"));
    let script = dir.join(format!("{measurement}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             ts=\"$(date +%s%6N)000\"\n\
             n=$(( $(date +%s%N) % 1000000 ))\n\
             line=\"{measurement},probe=p1 n=${{n}}i,ratio=0.5,label=\\\"ok\\\",up=true $ts\"\n\
             echo \"$line\" >> {log}\n\
             echo \"$line\"\n",
            log = log.display()
        ),
    )?;
    Command::new("chmod").arg("+x").arg(&script).status()?;
    Ok((script, log))
}

/// What the exec logs say was sent: `(time, metric) → value`.
fn logged(log: &Path, measurement: &str) -> Result<BTreeMap<(DateTime<Utc>, String), Value>> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(log)?.lines() {
        let (fields, ts) = line
            .rsplit_once(' ')
            .and_then(|(head, ts)| Some((head.split_once(' ')?.1, ts)))
            .context("log line")?;
        let ns: i64 = ts.parse()?;
        let time = DateTime::from_timestamp_micros(ns / 1000).context("time")?;
        let n: i64 = fields
            .split(',')
            .next()
            .and_then(|f| f.strip_prefix("n="))
            .and_then(|v| v.strip_suffix('i'))
            .context("n")?
            .parse()?;
        let metric = |field: &str| format!("{measurement}.{field}:probe:p1");
        out.insert((time, metric("n")), Value::from(n));
        out.insert((time, metric("ratio")), Value::from(0.5));
        out.insert((time, metric("label")), Value::from("ok"));
        out.insert((time, metric("up")), Value::from(true));
    }
    Ok(out)
}

/// Sum of `Wrote batch of N metrics` that Telegraf logged for an output.
fn written(log: &str, output: &str) -> usize {
    let tag = format!("[outputs.{output}] Wrote batch of ");
    log.lines()
        .filter_map(|line| line.split_once(&tag))
        .filter_map(|(_, rest)| rest.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

fn with_prefix(
    all: &BTreeMap<(DateTime<Utc>, String), Value>,
    prefix: &str,
) -> BTreeMap<(DateTime<Utc>, String), Value> {
    all.iter()
        .filter(|((_, name), _)| name.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegraf_through_both_outputs_stores_exactly_what_it_sent() -> Result<()> {
    let telegraf = telegraf()?;
    let pipeline = Pipeline::start(&["tg1"]).await?;
    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("telegraf"));
    std::fs::create_dir_all(&dir)?;
    let (v2_script, v2_log) = exec_script(&dir, "exec_v2")?;
    let (v1_script, v1_log) = exec_script(&dir, "exec_v1")?;
    let url = format!("http://{}", pipeline.ingest);
    let config = dir.join("telegraf.conf");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
  interval = "1s"
  flush_interval = "1s"
  round_interval = false
  precision = "1us"
  hostname = "tg1"
  debug = true

[[inputs.exec]]
  commands = ["{v2}"]
  data_format = "influx"
[[inputs.exec]]
  commands = ["{v1}"]
  data_format = "influx"
[[inputs.mem]]

[[outputs.influxdb_v2]]
  urls = ["{url}"]
  token = "gw-acme"
  organization = "o"
  bucket = "b"
  content_encoding = "gzip"
  namepass = ["exec_v2", "mem"]

[[outputs.influxdb]]
  urls = ["{url}"]
  database = "telegraf"
  username = "telegraf"
  password = "gw-acme"
  content_encoding = "gzip"
  namepass = ["exec_v1"]
"#,
            v2 = v2_script.display(),
            v1 = v1_script.display(),
        ),
    )?;
    let mut command = Command::new(&telegraf);
    command.arg("--config").arg(&config);
    let mut process = ServiceProcess::spawn(command, "telegraf")?;

    // A few intervals: at least three lines of each exec input stored (polled; a Telegraf
    // that exits ends the wait at once).
    let deadline = Instant::now() + Duration::from_secs(90);
    let result = loop {
        let all = pipeline.metrics("tg1").await?;
        let count = |prefix: &str| {
            with_prefix(&all, prefix)
                .keys()
                .map(|(t, _)| *t)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        if count("exec_v1.") >= 3 && count("exec_v2.") >= 3 {
            break Ok(());
        }
        if let Some(status) = process.try_wait()? {
            break Err(anyhow::anyhow!("telegraf exited early: {status:?}"));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "three intervals not stored in 90 s: {} metrics",
                all.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Command::new("kill")
        .arg("-TERM")
        .arg(process.id().to_string())
        .status()?;
    let status = process.exit_status(Duration::from_secs(30)).await?;
    let log = process.stderr();
    result.with_context(|| log.clone())?;
    assert!(status.success(), "telegraf exited with {status:?}\n{log}");
    assert!(!log.contains(" E! "), "telegraf logged errors:\n{log}");

    // Every line the exec inputs handed to Telegraf, exactly, once.
    let v2_sent = logged(&v2_log, "exec_v2")?;
    let v1_sent = logged(&v1_log, "exec_v1")?;
    let v1_lines = std::fs::read_to_string(&v1_log)?.lines().count();
    let v2_lines = std::fs::read_to_string(&v2_log)?.lines().count();
    assert_eq!(written(&log, "influxdb"), v1_lines, "{log}");
    let mem_written = written(&log, "influxdb_v2") - v2_lines;
    assert!(mem_written >= 3, "{log}");
    let all = eventually(
        "every written metric stored",
        Duration::from_secs(60),
        || async {
            let all = pipeline.metrics("tg1").await.map_err(|e| e.to_string())?;
            let mem_points = with_prefix(&all, "mem.")
                .keys()
                .map(|(t, _)| *t)
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            let done = with_prefix(&all, "exec_v1.").len() >= v1_sent.len()
                && with_prefix(&all, "exec_v2.").len() >= v2_sent.len()
                && mem_points >= mem_written;
            if done {
                Ok(all)
            } else {
                Err(format!("{} metrics, {mem_points} mem points", all.len()))
            }
        },
    )
    .await?;
    assert_eq!(with_prefix(&all, "exec_v1."), v1_sent);
    assert_eq!(with_prefix(&all, "exec_v2."), v2_sent);
    // mem: one point per metric Telegraf wrote, with its integer and float fields typed.
    let mem = with_prefix(&all, "mem.");
    let mem_times: std::collections::BTreeSet<_> = mem.keys().map(|(t, _)| *t).collect();
    assert_eq!(mem_times.len(), mem_written);
    for time in &mem_times {
        let total = &mem[&(*time, "mem.total".to_owned())];
        assert!(total.is_i64() && total.as_i64() > Some(0), "{total}");
        assert!(mem[&(*time, "mem.used_percent".to_owned())].is_f64());
    }
    // Nothing else was stored.
    assert_eq!(
        all.len(),
        v1_sent.len() + v2_sent.len() + mem.len(),
        "{:?}",
        all.keys()
            .map(|(_, n)| n)
            .collect::<std::collections::BTreeSet<_>>()
    );
    pipeline.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

const DEVICES: usize = 100;
const LINES: usize = 1_000_000;

/// The generated export: `env,device_id=devD,room=rR temp=…,count=…i,ok=… T` for 100
/// devices, one line per device and second (10,000 s of history ending 10 minutes ago).
fn write_export(path: &Path, end_s: i64) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut out =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    writeln!(out, "# exported from InfluxDB")?;
    for i in 0..LINES {
        let (device, step) = (i % DEVICES, (i / DEVICES) as i64);
        let t = (end_s - 10_000 + step) * 1_000_000_000 + 250_000_000;
        writeln!(
            out,
            "env,device_id=dev{device},room=r{} temp={}.{},count={}i,ok={} {t}",
            device % 4,
            step % 40,
            device % 10,
            step,
            step % 2 == 0
        )?;
    }
    out.finish()?.flush()?;
    Ok(())
}

fn ingest_bin() -> PathBuf {
    // target/debug/deps/influx_migration-<hash> → target/debug/ingest-producer
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("ingest-producer")
}

fn subcommand(pipeline: &Pipeline, verb: &str, file: &Path) -> Command {
    let mut command = Command::new(ingest_bin());
    command
        .arg(verb)
        .arg(file)
        .args(["--tenant", "acme", "--database-url", &pipeline.db.url])
        .env("RUST_LOG", "warn");
    if verb == "import" {
        command.args([
            "--kafka-bootstrap-servers",
            &pipeline.topics.args.bootstrap_servers,
            "--telemetry-topic",
            &pipeline.topics.args.telemetry_topic,
            "--progress",
            "never",
        ]);
    }
    command
}

async fn topic_messages(pipeline: &Pipeline) -> Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let args = pipeline.topics.args.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            plumbing::kafka::base_config(&args, "influx-migration-count").create()?;
        let mut total = 0;
        for p in 0..3 {
            let (low, high) =
                consumer.fetch_watermarks(&args.telemetry_topic, p, Duration::from_secs(10))?;
            total += high - low;
        }
        Ok(total)
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_killed_halfway_and_run_again_stores_each_point_once_and_compare_agrees(
) -> Result<()> {
    let ingest = ingest_bin();
    if !ingest.is_file() {
        bail!(
            "{} missing: build the workspace binaries (cargo test --workspace does)",
            ingest.display()
        );
    }
    let devices: Vec<String> = (0..DEVICES).map(|d| format!("dev{d}")).collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    let pipeline = Pipeline::start(&names).await?;
    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("import"));
    std::fs::create_dir_all(&dir)?;
    let export = dir.join("export.lp.gz");
    let end_s = Utc::now().timestamp() - 600;
    write_export(&export, end_s)?;

    // First run, SIGKILLed once about half the readings are on the topic.
    let mut first = ServiceProcess::spawn(subcommand(&pipeline, "import", &export), "import")?;
    let started = Instant::now();
    loop {
        let on_topic = topic_messages(&pipeline).await?;
        if on_topic >= (LINES / 2) as i64 {
            break;
        }
        if let Some(status) = first.try_wait()? {
            bail!(
                "import ended before it was killed: {status:?}\n{}",
                first.stderr()
            );
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("import too slow: {on_topic} messages after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Command::new("kill")
        .arg("-KILL")
        .arg(first.id().to_string())
        .status()?;
    first.exit_status(Duration::from_secs(10)).await?;
    let killed_at = topic_messages(&pipeline).await?;
    assert!(killed_at < LINES as i64, "{killed_at}");

    // The same command again, to the end.
    let output = subcommand(&pipeline, "import", &export).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with(&format!(
            "lines read: {LINES}, stored: {LINES}, rejected: 0; readings produced: {LINES};"
        )),
        "{stdout}"
    );
    let rows = eventually("every point stored", Duration::from_secs(600), || async {
        match pipeline.rows().await {
            Ok(rows) if rows >= LINES as i64 => Ok(rows),
            Ok(rows) => Err(format!("{rows} rows")),
            Err(err) => Err(err.to_string()),
        }
    })
    .await?;
    assert_eq!(rows, LINES as i64);
    // And stays so: the sink has consumed both runs' messages.
    let on_topic = topic_messages(&pipeline).await?;
    assert_eq!(on_topic, killed_at + LINES as i64);

    // compare: no difference.
    let output = subcommand(&pipeline, "compare", &export).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.ends_with("differences: 0\n")
            && stdout.starts_with("lines read: 1000000, not comparable: 0;"),
        "{stdout}"
    );

    // A row deleted by hand: dev7's point of step 123 (room r3).
    let step = 123_i64;
    let t = DateTime::from_timestamp(end_s - 10_000 + step, 250_000_000).unwrap();
    let deleted = sqlx::query(
        "DELETE FROM telemetry WHERE tenant_id = 'acme' AND device_id = 'dev7' AND time = $1",
    )
    .bind(t)
    .execute(&pipeline.db.pool)
    .await?
    .rows_affected();
    assert_eq!(deleted, 1);
    let output = subcommand(&pipeline, "compare", &export).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let hour_start = (t.timestamp() / 3600) * 3600;
    let hour = DateTime::from_timestamp(hour_start, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:00Z");
    // dev7's steps in that hour, and their stats with and without step 123.
    let steps: Vec<i64> = (0..10_000)
        .filter(|s| (end_s - 10_000 + s).div_euclid(3600) * 3600 == hour_start)
        .collect();
    let n = steps.len() as i64;
    // The file side adds doubles in file order; the database adds exact decimals (here
    // tenths) and rounds once.
    let stats = |steps: &[i64], tenths: &dyn Fn(i64) -> i64, exact: bool| {
        let values: Vec<f64> = steps.iter().map(|s| tenths(*s) as f64 / 10.0).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = if exact {
            steps.iter().map(|s| tenths(*s)).sum::<i64>() as f64 / 10.0
        } else {
            values.iter().sum()
        };
        format!("count {} min {min} max {max} sum {sum}", values.len())
    };
    let without: Vec<i64> = steps.iter().copied().filter(|s| *s != step).collect();
    let temp = |s: i64| (s % 40) * 10 + 7;
    let count = |s: i64| s * 10;
    let expected = [
        format!(
            "device dev7, measurement env, hour {hour}: points in file {n}, in database {}",
            n - 1
        ),
        format!(
            "device dev7, metric env.count:room:r3, hour {hour}: file {}, database {}",
            stats(&steps, &count, false),
            stats(&without, &count, true)
        ),
        format!(
            "device dev7, metric env.ok:room:r3, hour {hour}: file count {n}, database count {}",
            n - 1
        ),
        format!(
            "device dev7, metric env.temp:room:r3, hour {hour}: file {}, database {}",
            stats(&steps, &temp, false),
            stats(&without, &temp, true)
        ),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..lines.len() - 1],
        expected.each_ref().map(String::as_str),
        "{stdout}"
    );
    assert!(
        lines[lines.len() - 1].ends_with("differences: 4"),
        "{stdout}"
    );
    pipeline.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
