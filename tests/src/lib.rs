//! Support for the end-to-end tests in `tests/tests/`, which start services through their
//! `run` functions against real Kafka and PostgreSQL (see `plumbing::testing`).

pub mod fleet;
pub mod reference;
pub mod report;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free loopback address for a service's admin listener.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.local_addr()
}

/// `GET path` over plain HTTP/1.1; returns (status, body). Enough for admin endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `GET path` until it answers `status`; returns the body.
pub async fn wait_for_status(
    addr: SocketAddr,
    path: &str,
    status: u16,
    timeout: Duration,
) -> anyhow::Result<String> {
    plumbing::testing::eventually(
        &format!("GET {path} to answer {status}"),
        timeout,
        || async move {
            match http_get(addr, path).await {
                Ok((code, body)) if code == status => Ok(body),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(err) => Err(err.to_string()),
            }
        },
    )
    .await
}

/// Polls `GET path` until its body contains `needle`; returns the body.
pub async fn wait_for_body(
    addr: SocketAddr,
    path: &str,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    plumbing::testing::eventually(
        &format!("GET {path} to contain {needle}"),
        timeout,
        || async move {
            match http_get(addr, path).await {
                Ok((_, body)) if body.contains(needle) => Ok(body),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(err) => Err(err.to_string()),
            }
        },
    )
    .await
}
