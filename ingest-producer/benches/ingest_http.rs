//! HTTP ingest benchmark: prints accepted msg/s and request latency p50/p99.
//!
//! The service runs in this process against the real broker and PostgreSQL (a fresh
//! database and a 12-partition topic, as the tests make them); the load comes from
//! `ingest-producer simulate` in a second process, so client and server do not share a
//! runtime. Scenarios: batches of 100 and single readings over a concurrency sweep, then the
//! simulator producing straight to Kafka. Needs `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`
//! as the tests do. `INGEST_BENCH_SECONDS` sets each scenario's length (default 10).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ingest_producer::simulate::{self, SimulateArgs};
use plumbing::testing::{TestDb, TestTopics};
use schemas::LayoutChoice;

const PREFIX: &str = "bench";
const DEVICES: u32 = 100_000;

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> Result<()> {
    let seconds: u64 = std::env::var("INGEST_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(schemas::topics::DEFAULT_PARTITIONS).await?;
    let provisioning = SimulateArgs::try_parse_from([
        "simulate",
        "--prefix",
        PREFIX,
        "--devices",
        &DEVICES.to_string(),
    ])?;
    simulate::provision(&provisioning, &db.pool).await?;

    let config = ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // HTTP only (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        "127.0.0.1:0",
        "--tenant-rate-limit",
        "10000000",
        "--tenant-rate-burst",
        "10000000",
        "--log",
        "warn",
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = plumbing::Shutdown::new();
    let service = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));
    wait_for_credentials(&url).await?;

    println!("# ingest HTTP benchmark ({seconds} s per scenario, 12 partitions, acks=all)");
    let duration = format!("{seconds}s");
    // (devices sending once per second = offered msg/s, batch, concurrency)
    let http_scenarios: &[(u32, usize, usize)] = &[
        (100_000, 100, 4),
        (100_000, 100, 16),
        (100_000, 100, 32),
        (20_000, 1, 16),
        (20_000, 1, 64),
    ];
    for &(devices, batch, concurrency) in http_scenarios {
        let line = simulator(&[
            "--via",
            "http",
            "--url",
            &url,
            "--devices",
            &devices.to_string(),
            "--interval",
            "1s",
            "--duration",
            &duration,
            "--batch",
            &batch.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ])?;
        println!("{line}");
    }
    let line = simulator(&[
        "--via",
        "kafka",
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--devices",
        &DEVICES.to_string(),
        "--interval",
        "500ms",
        "--duration",
        &duration,
        "--batch",
        "1000",
        "--concurrency",
        "8",
    ])?;
    println!("{line}");

    shutdown.cancel();
    service.await??;
    Ok(())
}

/// Runs the simulator binary and returns its summary line.
fn simulator(extra: &[&str]) -> Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_ingest-producer"))
        .arg("simulate")
        .args([
            "--prefix",
            PREFIX,
            "--silence-probability",
            "0",
            "--log",
            "error",
        ])
        .args(extra)
        .output()
        .context("running the simulator")?;
    if !output.status.success() {
        bail!(
            "simulator failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Polls until the service accepts the simulator's gateway token.
async fn wait_for_credentials(url: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = format!("simulator-{PREFIX}-t0");
    let body = format!(r#"{{"device_id":"{PREFIX}-d000000","seq":0,"metrics":{{}}}}"#);
    loop {
        let status = client
            .post(format!("{url}/v1/telemetry"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 202 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("service not ready (last status {status})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
