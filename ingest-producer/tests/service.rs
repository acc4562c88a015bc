//! The whole service in-process through `run_on`: readiness, credentials following the
//! database through LISTEN/NOTIFY (the periodic reload is set to an hour, so only a
//! notification can explain a change), metrics, key figures in `system_metrics`, and a clean
//! shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use ingest_producer::credentials::token_hash;
use plumbing::testing::{TestDb, TestTopics};
use schemas::LayoutChoice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A minimal HTTP/1.1 exchange (`Connection: close`): status and body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` until it is true or `within` passed (`plumbing::testing::eventually`).
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    plumbing::testing::eventually(what, within, || {
        let check = check();
        async move {
            match check.await {
                Ok(true) => Ok(()),
                Ok(false) => Err("not yet".to_owned()),
                Err(err) => Err(err.to_string()),
            }
        }
    })
    .await
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test]
async fn the_service_follows_credential_changes_and_stops_cleanly() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(2).await?;
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await?;
    sqlx::query("INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ('acme', 'd1', $1)")
        .bind(token_hash("tok-d1"))
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO gateway_tokens (tenant_id, name, token_hash) VALUES ('acme', 'gw', $1)",
    )
    .bind(token_hash("gw-acme"))
    .execute(&db.pool)
    .await?;

    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        &admin_addr.to_string(),
        "--credentials-refresh-interval",
        "1h",
        "--system-metrics-interval",
        "200ms",
        "--instance-id",
        "ingest-test",
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = plumbing::Shutdown::new();
    let service = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));

    eventually(Duration::from_secs(30), "readiness", || async {
        Ok(http(admin_addr, "GET", "/readyz", None, "")
            .await
            .map(|(s, _)| s)
            .unwrap_or(0)
            == 200)
    })
    .await?;

    let reading = r#"{"device_id":"d1","seq":1,"metrics":{"t":1}}"#;
    assert_eq!(
        http(addr, "POST", "/v1/telemetry", Some("gw-acme"), reading)
            .await?
            .0,
        202
    );
    assert_eq!(
        http(addr, "POST", "/v1/telemetry", Some("tok-d2"), reading)
            .await?
            .0,
        401
    );

    // Revoking the gateway token and adding a device take effect without a restart.
    sqlx::query("UPDATE gateway_tokens SET revoked_at = now()")
        .execute(&db.pool)
        .await?;
    sqlx::query("INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ('acme', 'd2', $1)")
        .bind(token_hash("tok-d2"))
        .execute(&db.pool)
        .await?;
    eventually(Duration::from_secs(10), "revocation", || async {
        Ok(
            http(addr, "POST", "/v1/telemetry", Some("gw-acme"), reading)
                .await?
                .0
                == 401,
        )
    })
    .await?;
    let own = r#"{"seq":1,"metrics":{"t":1}}"#;
    eventually(Duration::from_secs(10), "new device", || async {
        Ok(http(addr, "POST", "/v1/telemetry", Some("tok-d2"), own)
            .await?
            .0
            == 202)
    })
    .await?;

    let (status, metrics) = http(admin_addr, "GET", "/metrics", None, "").await?;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("fleetstream_ingest_messages_total"),
        "{metrics}"
    );
    assert!(metrics.contains("fleetstream_ingest_request_duration_seconds"));

    // Key figures reach system_metrics for the dashboard.
    eventually(Duration::from_secs(10), "system_metrics", || async {
        let accepted: Option<f64> = sqlx::query_scalar(
            "SELECT max(value) FROM system_metrics \
             WHERE instance = 'ingest-test' AND metric_name = 'ingest_accepted_total'",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok(accepted.is_some_and(|v| v >= 2.0))
    })
    .await?;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), service).await???;
    Ok(())
}

/// A TCP forwarder on `port` to `target` (the real schema registry), started when the test
/// wants the registry to come back: until then nothing listens there.
async fn forward(port: u16, target: String) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}

/// `FLEETSTREAM_SCHEMA_REGISTRY_URL` (deps.sh starts the registry) as host:port and path.
fn registry() -> Result<(String, String, String)> {
    let url = std::env::var("FLEETSTREAM_SCHEMA_REGISTRY_URL").map_err(|_| {
        anyhow::anyhow!(
            "FLEETSTREAM_SCHEMA_REGISTRY_URL is not set: eval \"$(deploy/local/deps.sh env)\""
        )
    })?;
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((url.clone(), host.to_owned(), format!("/{path}")))
}

fn registry_config(
    db: &TestDb,
    topics: &TestTopics,
    admin: std::net::SocketAddr,
    registry_url: &str,
) -> Result<ingest_producer::Config> {
    Ok(ingest_producer::Config::try_parse_from([
        "ingest-producer",
        // No MQTT listener: tests run in parallel (MQTT_LISTEN defaults to a fixed port).
        "--mqtt-listen",
        "off",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--admin-listen",
        &admin.to_string(),
        "--schema-registry-url",
        registry_url,
    ])?)
}

#[tokio::test]
async fn with_a_registry_ingest_waits_for_it_then_writes_what_avro_deserializer_reads() -> Result<()>
{
    let (_, registry_host, registry_path) = registry()?;
    let python = std::env::var("FLEETSTREAM_PYTHON")?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await?;
    sqlx::query("INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ('acme', 'd1', $1)")
        .bind(token_hash("tok-d1"))
        .execute(&db.pool)
        .await?;
    // The registry is away at start-up: nothing listens on this port yet.
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}{registry_path}");
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = registry_config(&db, &topics, admin_addr, &url)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = plumbing::Shutdown::new();
    let service = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));

    // Not ready, and readings are refused as unavailable, while the registry is away (the
    // database and the broker are up: readiness names only the registry).
    eventually(
        Duration::from_secs(30),
        "readiness waiting only for the registry",
        || async {
            let (status, body) = http(admin_addr, "GET", "/readyz", None, "")
                .await
                .unwrap_or_default();
            Ok(status == 503
                && body.contains(r#""schema_registry":false"#)
                && body.contains(r#""kafka":true"#)
                && body.contains(r#""credentials":true"#)
                && body.contains(r#""database":true"#))
        },
    )
    .await?;
    let reading = r#"{"device_id":"d1","seq":7,"time":"2026-11-30T12:00:00.5Z","metrics":{"t":21.5,"n":3,"ok":true,"s":"x"}}"#;
    assert_eq!(
        http(addr, "POST", "/v1/telemetry", Some("tok-d1"), reading)
            .await?
            .0,
        503
    );
    assert!(!service.is_finished(), "ingest waits for the registry");

    let forwarder = forward(port, registry_host).await?;
    eventually(
        Duration::from_secs(30),
        "readiness once the registry answers",
        || async {
            Ok(http(admin_addr, "GET", "/readyz", None, "")
                .await
                .map(|(s, _)| s)
                .unwrap_or(0)
                == 200)
        },
    )
    .await?;
    assert_eq!(
        http(addr, "POST", "/v1/telemetry", Some("tok-d1"), reading)
            .await?
            .0,
        202
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), service).await???;
    forwarder.abort();

    // Confluent's own deserializer reads it, fetching the writer schema by the message's id.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/registry_consume.py"
    );
    let (registry_url, _, _) = registry()?;
    let out = std::process::Command::new(&python)
        .args([
            script,
            &topics.args.bootstrap_servers,
            &topics.args.telemetry_topic,
            &registry_url,
            "1",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut record = line["record"].clone();
    let received_at = record["received_at"].take();
    assert!(received_at
        .as_i64()
        .is_some_and(|t| t > 1_700_000_000_000_000));
    assert!(line["schema_id"].as_i64().is_some_and(|id| id > 0));
    assert_eq!(
        record,
        serde_json::json!({
            "tenant_id": "acme", "device_id": "d1", "site_id": null, "msg_type": "telemetry",
            "seq": 7, "time": 1_796_040_000_500_000_i64, "received_at": null,
            "metrics": {"t": 21.5, "n": 3, "ok": true, "s": "x"},
        })
    );
    Ok(())
}

#[tokio::test]
async fn an_incompatible_schema_change_is_refused_at_start_up() -> Result<()> {
    let (url, _, _) = registry()?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    // The subject's latest version lacks `seq`, which telemetry.v1 needs (no default): v1
    // cannot read what that version wrote, so it is not a BACKWARD-compatible successor.
    let mut older: serde_json::Value =
        serde_json::from_str(schemas::telemetry_codec()?.current_json())?;
    older["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "seq");
    let args = plumbing::registry::RegistryArgs {
        schema_registry_url: Some(url.clone()),
        schema_registry_username: None,
        schema_registry_password: None,
        schema_registry_cache_capacity: 10,
        schema_registry_timeout: Duration::from_secs(5),
    };
    let client = plumbing::registry::Registry::from_args(&args)?.unwrap();
    let older_id = client
        .register(
            &topics.args.telemetry_topic,
            "older",
            &older.to_string(),
            &plumbing::Shutdown::new(),
            |_| {},
        )
        .await?;

    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = registry_config(&db, &topics, admin_addr, &url)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        ingest_producer::run_on(listener, config, plumbing::Shutdown::new()),
    )
    .await?
    .unwrap_err()
    .to_string();
    let prefix = format!(
        "schema telemetry.v1 is not backward compatible with subject {}-value in the schema \
         registry: it cannot read data written with version 1 (id {older_id}): ",
        topics.args.telemetry_topic
    );
    assert!(err.starts_with(&prefix), "{err}");
    assert!(err.contains("seq"), "the reason names the field: {err}");
    Ok(())
}

#[tokio::test]
async fn with_a_registry_import_writes_what_avro_deserializer_reads() -> Result<()> {
    let (registry_url, _, _) = registry()?;
    let python = std::env::var("FLEETSTREAM_PYTHON")?;
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    let topics = TestTopics::new(1).await?;
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await?;
    sqlx::query("INSERT INTO devices (tenant_id, device_id) VALUES ('acme', 'd1')")
        .execute(&db.pool)
        .await?;
    let dir = std::env::temp_dir().join(plumbing::testing::unique_name("import"));
    std::fs::create_dir_all(&dir)?;
    let export = dir.join("export.lp");
    let time_s = chrono::Utc::now().timestamp() - 3600;
    std::fs::write(
        &export,
        format!("env,device_id=d1 temp=21.5,count=3i {time_s}250000000\n"),
    )?;
    let args = ingest_producer::import::ImportArgs::try_parse_from([
        "import",
        export.to_str().unwrap(),
        "--tenant",
        "acme",
        "--database-url",
        &db.url,
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--progress",
        "never",
        "--schema-registry-url",
        &registry_url,
    ])?;
    let summary = ingest_producer::import::run(args, plumbing::Shutdown::new()).await?;
    std::fs::remove_dir_all(&dir)?;
    assert_eq!((summary.lines, summary.stored), (1, 1), "{summary:?}");

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/registry_consume.py"
    );
    let out = std::process::Command::new(&python)
        .args([
            script,
            &topics.args.bootstrap_servers,
            &topics.args.telemetry_topic,
            &registry_url,
            "1",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let codec = schemas::telemetry_codec()?;
    let args = plumbing::registry::RegistryArgs {
        schema_registry_url: Some(registry_url.clone()),
        schema_registry_username: None,
        schema_registry_password: None,
        schema_registry_cache_capacity: 10,
        schema_registry_timeout: Duration::from_secs(5),
    };
    // Registering the same text again answers the id the import registered.
    let id = plumbing::registry::Registry::from_args(&args)?
        .unwrap()
        .register(
            &topics.args.telemetry_topic,
            codec.current_name(),
            codec.current_json(),
            &plumbing::Shutdown::new(),
            |_| {},
        )
        .await?;
    assert_eq!(line["schema_id"], serde_json::json!(id));
    let mut record = line["record"].clone();
    assert!(record["received_at"]
        .take()
        .as_i64()
        .is_some_and(|t| t > 1_700_000_000_000_000));
    assert_eq!(
        record,
        serde_json::json!({
            "tenant_id": "acme", "device_id": "d1", "site_id": null, "msg_type": "telemetry",
            "seq": 0, "time": time_s * 1_000_000 + 250_000, "received_at": null,
            "metrics": {"env.temp": 21.5, "env.count": 3},
        })
    );
    Ok(())
}

#[tokio::test]
async fn with_a_registry_simulate_via_kafka_writes_what_avro_deserializer_reads() -> Result<()> {
    let (registry_url, _, _) = registry()?;
    let python = std::env::var("FLEETSTREAM_PYTHON")?;
    let topics = TestTopics::new(1).await?;
    let args = ingest_producer::simulate::SimulateArgs::try_parse_from([
        "simulate",
        "--via",
        "kafka",
        "--devices",
        "2",
        "--tenants",
        "1",
        "--interval",
        "100ms",
        "--duration",
        "500ms",
        "--kafka-bootstrap-servers",
        &topics.args.bootstrap_servers,
        "--telemetry-topic",
        &topics.args.telemetry_topic,
        "--schema-registry-url",
        &registry_url,
    ])?;
    let summary = ingest_producer::simulate::run(args, plumbing::Shutdown::new()).await?;
    assert!(summary.accepted >= 2, "{summary:?}");
    assert_eq!(summary.failed, 0);

    let codec = schemas::telemetry_codec()?;
    let args = plumbing::registry::RegistryArgs {
        schema_registry_url: Some(registry_url.clone()),
        schema_registry_username: None,
        schema_registry_password: None,
        schema_registry_cache_capacity: 10,
        schema_registry_timeout: Duration::from_secs(5),
    };
    let id = plumbing::registry::Registry::from_args(&args)?
        .unwrap()
        .register(
            &topics.args.telemetry_topic,
            codec.current_name(),
            codec.current_json(),
            &plumbing::Shutdown::new(),
            |_| {},
        )
        .await?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/registry_consume.py"
    );
    let count = summary.accepted.to_string();
    let out = std::process::Command::new(&python)
        .args([
            script,
            &topics.args.bootstrap_servers,
            &topics.args.telemetry_topic,
            &registry_url,
            &count,
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len() as u64, summary.accepted);
    for line in &lines {
        assert_eq!(line["schema_id"], serde_json::json!(id));
        assert_eq!(line["record"]["msg_type"], "telemetry");
    }
    Ok(())
}
