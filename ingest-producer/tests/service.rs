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
