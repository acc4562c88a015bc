//! The real schema registry of the tests (Apicurio, started by `deploy/local/deps.sh up`), and
//! two things put in front of it: a [`Forwarder`] a test switches off and on (the registry
//! being away), and a [`BasicAuthProxy`] that refuses requests without the right credentials.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The registry's URL (`FLEETSTREAM_SCHEMA_REGISTRY_URL`, from deps.sh), e.g.
/// `http://127.0.0.1:8089/apis/ccompat/v7`.
pub fn registry_url() -> anyhow::Result<String> {
    std::env::var("FLEETSTREAM_SCHEMA_REGISTRY_URL").map_err(|_| {
        anyhow::anyhow!(
            "FLEETSTREAM_SCHEMA_REGISTRY_URL is not set: run `eval \"$(deploy/local/deps.sh env)\"` \
             after `deploy/local/deps.sh up`, which starts the schema registry"
        )
    })
}

/// The registry's `host:port` and its API path (`/apis/ccompat/v7`).
pub fn registry_host_and_path() -> anyhow::Result<(String, String)> {
    let url = registry_url()?;
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url} is not an http:// URL"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((host.to_owned(), format!("/{path}")))
}

/// A TCP forwarder to the real schema registry that a test switches off and on: while off,
/// every connection (new, and those already open, e.g. pooled keep-alive ones) is closed at
/// once, which a client sees as the registry being away. Counts the connections refused.
#[derive(Debug)]
pub struct Forwarder {
    pub port: u16,
    up: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    cut: Arc<Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Listening on a free port, forwarding to `target` (`host:port`), switched on.
    pub async fn start(target: String) -> anyhow::Result<Self> {
        let forwarder = Self::start_down(target).await?;
        forwarder.set_up(true);
        Ok(forwarder)
    }

    /// Listening on a free port, forwarding to `target`, switched off until [`Self::set_up`].
    pub async fn start_down(target: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (up2, refused2, cut2) = (up.clone(), refused.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    refused2.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: closed at once
                }
                let token = cut2.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            () = token.cancelled() => {}
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            up,
            refused,
            cut,
            task,
        })
    }

    /// Switches forwarding on or off (off also cuts the connections already open).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
            cut.cancel();
            *cut = CancellationToken::new();
        }
    }

    /// Connections closed at once because forwarding was off.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// **Test double for the basic-auth check only**: Apicurio as deps.sh runs it has no
/// authentication, so this HTTP/1.1 reverse proxy in front of it stands in for a registry that
/// requires basic auth. Each request is checked for `Authorization: Basic base64(user:pass)`:
/// without it (or with other credentials) the answer is `401 Unauthorized` with a
/// Confluent-style JSON error; with it, the request goes to the real registry and its answer
/// back. Requests are forwarded with `Connection: close`, so every request of a client comes
/// on a new connection and is checked (none rides on a connection checked earlier).
#[derive(Debug)]
pub struct BasicAuthProxy {
    pub port: u16,
    authorized: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Largest request head the proxy reads: registry requests are far smaller.
const MAX_HEAD: usize = 64 * 1024;

impl BasicAuthProxy {
    /// Listening on a free port, in front of `target` (`host:port`), requiring `user`/`password`.
    pub async fn start(target: String, user: &str, password: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let authorized = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (ok2, refused2) = (authorized.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (target, expected) = (target.clone(), expected.clone());
                let (ok, refused) = (ok2.clone(), refused2.clone());
                tokio::spawn(async move {
                    match proxy_one(inbound, &target, &expected).await {
                        Ok(true) => ok.fetch_add(1, Ordering::SeqCst),
                        Ok(false) => refused.fetch_add(1, Ordering::SeqCst),
                        Err(_) => 0,
                    };
                });
            }
        });
        Ok(Self {
            port,
            authorized,
            refused,
            task,
        })
    }

    /// Requests with the right credentials, forwarded to the registry.
    pub fn authorized(&self) -> usize {
        self.authorized.load(Ordering::SeqCst)
    }

    /// Requests answered 401.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for BasicAuthProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Handles the one request of a connection: `Ok(true)` forwarded, `Ok(false)` refused.
async fn proxy_one(mut inbound: TcpStream, target: &str, expected: &str) -> anyhow::Result<bool> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        anyhow::ensure!(buf.len() < MAX_HEAD, "request head too large");
        let mut chunk = [0u8; 4096];
        let n = inbound.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before a full request head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let (request_line, headers, authorization) = parse_head(&buf[..head_end])?;
    if authorization.as_deref() != Some(expected) {
        let body = r#"{"error_code":401,"message":"Unauthorized (fleetstream test proxy: basic auth required)"}"#;
        let answer = format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
             WWW-Authenticate: Basic realm=\"registry\"\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        inbound.write_all(answer.as_bytes()).await?;
        inbound.shutdown().await?;
        return Ok(false);
    }
    let length = content_length(&headers)?;
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = inbound.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the request body ended");
        body.extend_from_slice(&chunk[..n]);
    }
    let mut outbound = TcpStream::connect(target).await?;
    outbound
        .write_all(with_connection_close(&request_line, &headers).as_bytes())
        .await?;
    outbound.write_all(&body).await?;
    // The answer: its head with `Connection: close`, then the body until the registry closes.
    let mut answer = Vec::with_capacity(4096);
    let answer_head_end = loop {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = outbound.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "registry closed before a full answer head");
        answer.extend_from_slice(&chunk[..n]);
    };
    let (status_line, answer_headers, _) = parse_head(&answer[..answer_head_end])?;
    inbound
        .write_all(with_connection_close(&status_line, &answer_headers).as_bytes())
        .await?;
    inbound.write_all(&answer[answer_head_end..]).await?;
    tokio::io::copy(&mut outbound, &mut inbound).await?;
    inbound.shutdown().await?;
    Ok(true)
}

/// The first line, the other header lines (without `Connection`/`Keep-Alive`), and the
/// `Authorization` value of an HTTP/1.1 head.
fn parse_head(head: &[u8]) -> anyhow::Result<(String, Vec<String>, Option<String>)> {
    let head = std::str::from_utf8(head).context("HTTP head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    let mut authorization = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "authorization" => authorization = Some(value.trim().to_owned()),
            "connection" | "keep-alive" => continue,
            _ => {}
        }
        headers.push(line.to_owned());
    }
    Ok((first, headers, authorization))
}

fn content_length(headers: &[String]) -> anyhow::Result<usize> {
    for line in headers {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let name = name.trim().to_ascii_lowercase();
        anyhow::ensure!(
            name != "transfer-encoding",
            "chunked request bodies are not supported by the test proxy"
        );
        if name == "content-length" {
            return Ok(value.trim().parse()?);
        }
    }
    Ok(0)
}

fn with_connection_close(first: &str, headers: &[String]) -> String {
    let mut out = String::with_capacity(512);
    out.push_str(first);
    out.push_str("\r\n");
    for header in headers {
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}
