//! What the HTTP tests of ingest share: a migrated database with two tenants, their devices
//! and tokens; topics; the router as production builds it; reading the topic back.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::Router;
use flate2::write::GzEncoder;
use flate2::Compression;
use ingest_producer::credentials::{token_hash, Credentials};
use ingest_producer::http::{router, App, IngestSettings};
use ingest_producer::message::TimeLimits;
use ingest_producer::producer::Producer;
use ingest_producer::rate_limit::{Limit, RateLimits};
use plumbing::config::KafkaArgs;
use plumbing::testing::{TestDb, TestTopics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use schemas::{LayoutChoice, Telemetry};

pub mod mqtt;

pub const MAX_BODY: usize = 8192;

/// A migrated database with two tenants, their devices and tokens; topics; a router.
pub struct Fixture {
    pub _db: TestDb,
    pub topics: TestTopics,
    pub router: Router,
    /// What the router serves (the MQTT tests start a listener on it).
    pub app: App,
    pub partitions: i32,
}

/// Tenants `acme` (site `plant-1`; devices `d1` at the site, `d2`, `off` disabled; gateway
/// tokens `gw-acme` and `gw-revoked`, revoked) and `globex` (device `g1`, gateway `gw-globex`).
/// A device's token is `tok-<device>`.
pub async fn seed(db: &TestDb) -> Result<()> {
    let statements = [
        "INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme'), ('globex', 'Globex')",
        "INSERT INTO sites (tenant_id, site_id, name) VALUES ('acme', 'plant-1', 'Plant 1')",
    ];
    for sql in statements {
        sqlx::query(sql).execute(&db.pool).await?;
    }
    for (tenant, device, site, token, status) in [
        ("acme", "d1", Some("plant-1"), "tok-d1", "active"),
        ("acme", "d2", None, "tok-d2", "active"),
        ("acme", "off", None, "tok-off", "disabled"),
        ("globex", "g1", None, "tok-g1", "active"),
    ] {
        sqlx::query(
            "INSERT INTO devices (tenant_id, device_id, site_id, token_hash, status) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(tenant)
        .bind(device)
        .bind(site)
        .bind(token_hash(token))
        .bind(status)
        .execute(&db.pool)
        .await?;
    }
    for (tenant, token, revoked) in [
        ("acme", "gw-acme", false),
        ("acme", "gw-revoked", true),
        ("globex", "gw-globex", false),
    ] {
        sqlx::query(
            "INSERT INTO gateway_tokens (tenant_id, name, token_hash, revoked_at) \
             VALUES ($1, 'gw', $2, CASE WHEN $3 THEN now() END)",
        )
        .bind(tenant)
        .bind(token_hash(token))
        .bind(revoked)
        .execute(&db.pool)
        .await?;
    }
    Ok(())
}

pub fn limit(per_second: u32, burst: u32) -> Limit {
    Limit::per_second(
        NonZeroU32::new(per_second).unwrap(),
        NonZeroU32::new(burst).unwrap(),
    )
}

/// A bucket that does not refill within a test, however slow the machine.
pub fn slow_limit(burst: u32) -> Limit {
    Limit {
        period: Duration::from_secs(3600),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

pub fn settings() -> IngestSettings {
    IngestSettings {
        max_body_bytes: MAX_BODY,
        time_limits: TimeLimits {
            max_future: Duration::from_secs(300),
            retention: Duration::from_secs(90 * 86_400),
        },
    }
}

impl Fixture {
    /// Generous limits, `partitions` telemetry partitions.
    pub async fn new(partitions: i32) -> Result<Self> {
        Self::with_limits(partitions, limit(1000, 1000), limit(100_000, 100_000)).await
    }

    pub async fn with_limits(partitions: i32, device: Limit, tenant: Limit) -> Result<Self> {
        let db = TestDb::new(LayoutChoice::Postgres).await?;
        seed(&db).await?;
        let topics = TestTopics::new(partitions).await?;
        // Ingest reads credentials as fleet_writer, as in production.
        let writer = db.role_pool("fleet_writer", 2).await?;
        let credentials = Credentials::default();
        credentials.reload(&writer).await?;
        let producer = Producer::new(&topics.args, "ingest-test", Duration::from_secs(10))?;
        let app = App::new(
            credentials,
            producer,
            RateLimits::new(device, tenant),
            settings(),
        );
        Ok(Fixture {
            _db: db,
            router: router(app.clone()),
            app,
            topics,
            partitions,
        })
    }

    /// Every message on the telemetry topic, decoded.
    pub async fn consume_all(&self) -> Vec<Consumed> {
        consume_all(&self.topics.args, self.partitions).await
    }

    /// Messages on the telemetry topic.
    pub async fn topic_count(&self) -> i64 {
        topic_count(&self.topics.args, self.partitions).await
    }
}

/// The router over a seeded database whose producer's broker does not exist (nothing listens
/// on port 1), delivery timeout 1.5 s. Returns the database too: it must outlive the router.
pub async fn unreachable_broker_router() -> Result<(TestDb, Router)> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    seed(&db).await?;
    let credentials = Credentials::default();
    credentials.reload(&db.pool).await?;
    let mut args = plumbing::testing::kafka_args().await?;
    args.bootstrap_servers = "127.0.0.1:1".to_owned();
    let producer = Producer::new(&args, "ingest-test", Duration::from_millis(1500))?;
    let app = App::new(
        credentials,
        producer,
        RateLimits::new(limit(1000, 1000), limit(1000, 1000)),
        settings(),
    );
    Ok((db, router(app)))
}

/// An answer of the router: status, the named headers asked for, the body.
pub struct Answer {
    pub status: axum::http::StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// `POST uri` with `headers` and `body` through `router`.
pub async fn post(
    router: &Router,
    uri: &str,
    headers: &[(&str, &str)],
    body: axum::body::Body,
) -> Answer {
    use tower::ServiceExt;
    let mut request = axum::http::Request::post(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Messages on the topic (sum of high watermarks; every produced message counts, there are
/// no transaction markers).
pub async fn topic_count(args: &KafkaArgs, partitions: i32) -> i64 {
    let args = args.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::base_config(&args, "ingest-test-count")
            .create()
            .unwrap();
        // Right after the topic is created (or the broker restarted, as `broker_restart` does)
        // a partition may briefly have no leader; retry that until a deadline.
        let deadline = Instant::now() + Duration::from_secs(30);
        (0..partitions)
            .map(|p| loop {
                match consumer.fetch_watermarks(&args.telemetry_topic, p, Duration::from_secs(10)) {
                    Ok((low, high)) => break high - low,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(err) => panic!("watermarks of partition {p}: {err}"),
                }
            })
            .sum()
    })
    .await
    .unwrap()
}

/// A message read back from the topic.
#[derive(Debug)]
pub struct Consumed {
    pub key: String,
    pub partition: i32,
    pub traceparent: Option<String>,
    pub telemetry: Telemetry,
}

/// Reads every message of the topic (polling until the watermark count is reached or a
/// deadline passes).
pub async fn consume_all(args: &KafkaArgs, partitions: i32) -> Vec<Consumed> {
    let expected = topic_count(args, partitions).await;
    let args = args.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = plumbing::kafka::consumer_config(
            &args,
            "ingest-test-consumer",
            &plumbing::testing::unique_name("g"),
        )
        .create()
        .unwrap();
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(&args.telemetry_topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let codec = schemas::telemetry_codec().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while (out.len() as i64) < expected && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.unwrap();
            let traceparent = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == "traceparent")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8(v.to_vec()).unwrap())
            });
            out.push(Consumed {
                key: String::from_utf8(message.key().unwrap().to_vec()).unwrap(),
                partition: message.partition(),
                traceparent,
                telemetry: codec.decode(message.payload().unwrap()).unwrap(),
            });
        }
        assert_eq!(out.len() as i64, expected, "messages read back");
        out
    })
    .await
    .unwrap()
}
