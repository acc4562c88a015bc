//! A gzip bomb against the production body limit (1 MiB) costs bounded memory: the request
//! gets `413` after at most the limit was inflated, and the process's peak resident memory
//! (`VmHWM`, reset through `/proc/self/clear_refs` before each request) grows by a few MiB,
//! not by the bomb's decompressed size. Nothing reaches the topic.
//!
//! One test in its own binary, so no other test allocates while the peak is measured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use flate2::write::GzEncoder;
use flate2::Compression;
use ingest_producer::credentials::{token_hash, Credentials};
use ingest_producer::http::{router, App, IngestSettings};
use ingest_producer::message::TimeLimits;
use ingest_producer::producer::Producer;
use ingest_producer::rate_limit::{Limit, RateLimits};
use plumbing::testing::{TestDb, TestTopics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use schemas::LayoutChoice;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The production default of `MAX_BODY_BYTES`.
const LIMIT: usize = 1 << 20;
/// Peak memory a refused bomb may add: the body as sent, the inflated limit and the vectors'
/// slack are about 4 MiB; the bombs inflate to 100 MiB and 1 GiB.
const MAX_PEAK_GROWTH_KIB: u64 = 32 << 10;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A `kB` line of `/proc/self/status`.
fn status_kib(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

/// Posts `body` as gzip and returns the status, the JSON body and how much the peak resident
/// memory grew over the resident memory before the request.
async fn post(router: &Router, body: Body, length: Option<usize>) -> (StatusCode, Value, u64) {
    let mut request = Request::post("/v1/telemetry")
        .header("authorization", "Bearer tok-d1")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip");
    if let Some(length) = length {
        request = request.header("content-length", length);
    }
    let request = request.body(body).unwrap();
    let before = status_kib("VmRSS");
    // "5" resets the peak to the current resident size (Linux ≥ 4.0).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let peak = status_kib("VmHWM");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        peak.saturating_sub(before),
    )
}

#[tokio::test]
async fn gzip_bombs_get_413_with_bounded_memory_at_the_production_limit() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    sqlx::query("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id, token_hash, status) \
         VALUES ('acme', 'd1', $1, 'active')",
    )
    .bind(token_hash("tok-d1"))
    .execute(&db.pool)
    .await?;
    let topics = TestTopics::new(1).await?;
    let credentials = Credentials::default();
    credentials.reload(&db.pool).await?;
    let limit = Limit::per_second(
        NonZeroU32::new(1000).unwrap(),
        NonZeroU32::new(1000).unwrap(),
    );
    let app = App::new(
        credentials,
        Producer::new(&topics.args, "ingest-test", Duration::from_secs(10))?,
        RateLimits::new(limit, limit),
        IngestSettings {
            max_body_bytes: LIMIT,
            time_limits: TimeLimits {
                max_future: Duration::from_secs(300),
                retention: Duration::from_secs(90 * 86_400),
            },
        },
    );
    let router = router(app);
    let decompressed_too_large = json!({
        "error": "decompressed body exceeds 1048576 bytes", "field": null, "index": null
    });

    // 100 MiB of zeros in one gzip member (about 100 KiB).
    let bomb = gzip(&vec![0; 100 << 20]);
    assert!(bomb.len() < LIMIT, "{}", bomb.len());
    let length = bomb.len();
    let (status, body, growth) = post(&router, Body::from(bomb), Some(length)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, decompressed_too_large);
    assert!(growth < MAX_PEAK_GROWTH_KIB, "peak grew by {growth} KiB");

    // 1 GiB of zeros: 64 members of 16 MiB, just under 1 MiB as sent.
    let member = gzip(&vec![0; 16 << 20]);
    let bomb = member.repeat(64);
    assert!(bomb.len() < LIMIT, "{}", bomb.len());
    let length = bomb.len();
    let (status, body, growth) = post(&router, Body::from(bomb), Some(length)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, decompressed_too_large);
    assert!(growth < MAX_PEAK_GROWTH_KIB, "peak grew by {growth} KiB");

    // A 10 MB bomb (10 GiB of zeros) is over the limit as sent: refused unread when its
    // length is declared, and once the limit is passed when it is streamed.
    let bomb = member.repeat(10_000_000 / member.len() + 1);
    let too_large = json!({"error": "body exceeds 1048576 bytes", "field": null, "index": null});
    let length = bomb.len();
    let (status, body, growth) = post(&router, Body::from(bomb.clone()), Some(length)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, too_large);
    assert!(growth < MAX_PEAK_GROWTH_KIB, "peak grew by {growth} KiB");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bomb.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    drop(bomb);
    let (status, body, growth) = post(
        &router,
        Body::from_stream(futures::stream::iter(chunks)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, too_large);
    assert!(growth < MAX_PEAK_GROWTH_KIB, "peak grew by {growth} KiB");

    // Nothing was produced (a refused request returns before producing anything).
    let args = topics.args.clone();
    let (low, high) = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "ingest-test-count")
            .create()
            .unwrap();
        consumer.fetch_watermarks(&args.telemetry_topic, 0, Duration::from_secs(10))
    })
    .await??;
    assert_eq!(high - low, 0);
    Ok(())
}
