//! `POST /v1/telemetry` against a real Kafka broker and PostgreSQL: what is accepted lands on
//! the topic exactly once, correctly keyed and decodable; what is refused gets its documented
//! status and body and puts nothing on the topic.
//!
//! "Nothing on the topic" is checked right after the replies: a message is produced only
//! before its reply is sent (the handler waits for Kafka's acknowledgement), so a refused
//! request that produced anything would already show in the end offsets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use chrono::{SecondsFormat, Utc};
use common::{gzip, limit, seed, settings, slow_limit, Fixture, MAX_BODY};
use ingest_producer::credentials::Credentials;
use ingest_producer::http::{router, App};
use ingest_producer::producer::Producer;
use ingest_producer::rate_limit::RateLimits;
use plumbing::testing::{TestDb, TestTopics};
use schemas::{LayoutChoice, MetricValue, Telemetry};
use serde_json::{json, Value};

const PARTITIONS: i32 = 4;

impl Fixture {
    async fn post(&self, token: Option<&str>, content_type: &str, body: impl Into<Body>) -> Reply {
        self.post_to("/v1/telemetry", token, content_type, body)
            .await
    }

    async fn post_to(
        &self,
        uri: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl Into<Body>,
    ) -> Reply {
        send(&self.router, uri, token, content_type, body.into()).await
    }

    async fn post_json(&self, token: &str, body: Value) -> Reply {
        self.post(Some(token), "application/json", body.to_string())
            .await
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    retry_after: Option<String>,
    accept_encoding: Option<String>,
    body: Value,
}

async fn send(
    router: &Router,
    uri: &str,
    token: Option<&str>,
    content_type: &str,
    body: Body,
) -> Reply {
    let authorization = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("content-type", content_type)];
    if let Some(authorization) = &authorization {
        headers.push(("authorization", authorization));
    }
    send_with_headers(router, uri, &headers, body).await
}

async fn send_with_headers(
    router: &Router,
    uri: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Reply {
    let answer = common::post(router, uri, headers, body).await;
    Reply {
        status: answer.status,
        retry_after: answer.header("retry-after"),
        accept_encoding: answer.header("accept-encoding"),
        body: serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
    }
}

fn error(message: &str, field: Option<&str>, index: Option<usize>) -> Value {
    json!({"error": message, "field": field, "index": index})
}

fn expected_partition(key: &str) -> i32 {
    plumbing::testing::java_partition(key.as_bytes(), PARTITIONS)
}

fn reading(device: &str, seq: i64) -> Value {
    json!({"device_id": device, "seq": seq, "metrics": {"temp": 20.5, "ok": true, "n": seq}})
}

#[tokio::test]
async fn accepted_messages_are_on_the_topic_exactly_once_keyed_and_decodable() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let before = Utc::now();
    let batch: Vec<Value> = (0..20)
        .map(|seq| reading(if seq % 2 == 0 { "d1" } else { "d2" }, seq))
        .collect();
    let reply = fx.post_json("gw-acme", Value::Array(batch)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert_eq!(
        reply.body,
        // Readings without `time` share the request's ingest time: one point per device.
        json!({"accepted": 20, "points": 2, "merged": 18, "rejected": 0, "errors": []})
    );
    let consumed = fx.consume_all().await;
    assert_eq!(consumed.len(), 20);
    assert_eq!(fx.topic_count().await, 20);
    let mut seen = BTreeMap::new();
    for message in &consumed {
        let t = &message.telemetry;
        assert_eq!(message.key, format!("{}/{}", t.tenant_id, t.device_id));
        assert_eq!(message.partition, expected_partition(&message.key));
        assert_eq!(t.tenant_id, "acme");
        assert!(t.received_at >= before);
        let traceparent = message.traceparent.as_deref().unwrap();
        assert_eq!(traceparent.len(), 55);
        assert!(
            seen.insert(t.seq, t.clone()).is_none(),
            "seq {} twice",
            t.seq
        );
    }
    for seq in 0..20 {
        let t = &seen[&seq];
        assert_eq!(t.device_id, if seq % 2 == 0 { "d1" } else { "d2" });
        assert_eq!(t.metrics["temp"], MetricValue::Double(20.5));
        assert_eq!(t.metrics["ok"], MetricValue::Bool(true));
        assert_eq!(t.metrics["n"], MetricValue::Long(seq));
        assert_eq!(t.msg_type, "telemetry");
        // The registered site fills in when the message names none.
        let site = if seq % 2 == 0 {
            Some("plant-1".to_owned())
        } else {
            None
        };
        assert_eq!(t.site_id, site);
    }
    Ok(())
}

#[tokio::test]
async fn a_device_token_writes_its_own_device_without_naming_it() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let time = Utc::now() - chrono::Duration::seconds(10);
    let sent = time.to_rfc3339_opts(SecondsFormat::Micros, true);
    let reply = fx
        .post_json(
            "tok-d2",
            json!({"seq": 7, "time": sent, "msg_type": "event", "metrics": {"door": "open"}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.body, json!({"accepted": 1, "points": 1, "merged": 0}));
    let consumed = fx.consume_all().await;
    assert_eq!(consumed.len(), 1);
    let t = &consumed[0].telemetry;
    assert_eq!((t.tenant_id.as_str(), t.device_id.as_str()), ("acme", "d2"));
    assert_eq!(t.msg_type, "event");
    // Avro carries microseconds, as many as were sent.
    assert_eq!(t.time.to_rfc3339_opts(SecondsFormat::Micros, true), sent);
    Ok(())
}

/// name, token, content type, body, expected status, expected body.
type Case<'a> = (&'a str, Option<&'a str>, &'a str, String, StatusCode, Value);

#[tokio::test]
async fn each_bad_input_gets_its_status_and_body_and_puts_nothing_on_the_topic() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let json = "application/json";
    let ok = json!({"seq": 1, "metrics": {"t": 1}}).to_string();
    let future =
        (Utc::now() + chrono::Duration::minutes(6)).to_rfc3339_opts(SecondsFormat::Micros, true);
    let ancient =
        (Utc::now() - chrono::Duration::days(91)).to_rfc3339_opts(SecondsFormat::Micros, true);
    let many: serde_json::Map<String, Value> =
        (0..257).map(|i| (format!("m{i}"), json!(i))).collect();
    let name_pattern = "[A-Za-z0-9_.:-]{1,64}";

    let cases: Vec<Case> = vec![
        (
            "no token",
            None,
            json,
            ok.clone(),
            StatusCode::UNAUTHORIZED,
            error("missing bearer token", None, None),
        ),
        (
            "unknown token",
            Some("nope"),
            json,
            ok.clone(),
            StatusCode::UNAUTHORIZED,
            error("unknown or revoked token", None, None),
        ),
        (
            "revoked gateway token",
            Some("gw-revoked"),
            json,
            ok.clone(),
            StatusCode::UNAUTHORIZED,
            error("unknown or revoked token", None, None),
        ),
        (
            "too large",
            Some("tok-d1"),
            json,
            "x".repeat(MAX_BODY + 1),
            StatusCode::PAYLOAD_TOO_LARGE,
            error(&format!("body exceeds {MAX_BODY} bytes"), None, None),
        ),
        (
            "unsupported type",
            Some("tok-d1"),
            "text/plain",
            ok.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error(
                "content type must be application/json or application/x-ndjson",
                None,
                None,
            ),
        ),
        (
            "malformed json",
            Some("tok-d1"),
            json,
            r#"{"seq": 1,"#.to_owned(),
            StatusCode::BAD_REQUEST,
            error(
                "malformed json: EOF while parsing an object at line 1 column 10",
                None,
                None,
            ),
        ),
        (
            "number beyond a double",
            Some("tok-d1"),
            json,
            r#"{"seq":1,"metrics":{"x":1e999}}"#.to_owned(),
            StatusCode::BAD_REQUEST,
            error(
                "number outside the range of a 64-bit float",
                Some("metrics.x"),
                Some(0),
            ),
        ),
        (
            "empty batch",
            Some("tok-d1"),
            json,
            "[]".to_owned(),
            StatusCode::BAD_REQUEST,
            error("empty batch", None, None),
        ),
        (
            "not an object",
            Some("tok-d1"),
            json,
            "42".to_owned(),
            StatusCode::BAD_REQUEST,
            error("expected a json object", None, Some(0)),
        ),
        (
            "missing seq",
            Some("tok-d1"),
            json,
            json!({"metrics": {}}).to_string(),
            StatusCode::BAD_REQUEST,
            error("missing", Some("seq"), Some(0)),
        ),
        (
            "mistyped seq",
            Some("tok-d1"),
            json,
            json!({"seq": 1.5, "metrics": {}}).to_string(),
            StatusCode::BAD_REQUEST,
            error("expected a 64-bit integer", Some("seq"), Some(0)),
        ),
        (
            "missing metrics",
            Some("tok-d1"),
            json,
            json!({"seq": 1}).to_string(),
            StatusCode::BAD_REQUEST,
            error("missing", Some("metrics"), Some(0)),
        ),
        (
            "unknown field",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "metrics": {}, "temp": 3}).to_string(),
            StatusCode::BAD_REQUEST,
            error("unknown field", Some("temp"), Some(0)),
        ),
        (
            "too many metrics",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "metrics": many}).to_string(),
            StatusCode::BAD_REQUEST,
            error("more than 256 metrics", Some("metrics"), Some(0)),
        ),
        (
            "bad metric name",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "metrics": {"a/b": 1}}).to_string(),
            StatusCode::BAD_REQUEST,
            error(
                &format!("metric name must match {name_pattern}"),
                Some("metrics.a/b"),
                Some(0),
            ),
        ),
        (
            "long string",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "metrics": {"s": "x".repeat(1025)}}).to_string(),
            StatusCode::BAD_REQUEST,
            error("string longer than 1024 bytes", Some("metrics.s"), Some(0)),
        ),
        (
            "future time",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "time": future, "metrics": {}}).to_string(),
            StatusCode::BAD_REQUEST,
            error("more than 300s in the future", Some("time"), Some(0)),
        ),
        (
            "ancient time",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "time": ancient, "metrics": {}}).to_string(),
            StatusCode::BAD_REQUEST,
            error(
                "older than the retention window of 7776000s",
                Some("time"),
                Some(0),
            ),
        ),
        (
            "bad time",
            Some("tok-d1"),
            json,
            json!({"seq": 1, "time": "yesterday", "metrics": {}}).to_string(),
            StatusCode::BAD_REQUEST,
            error("expected an rfc 3339 timestamp", Some("time"), Some(0)),
        ),
        (
            "device token, other device",
            Some("tok-d1"),
            json,
            json!({"device_id": "d2", "seq": 1, "metrics": {}}).to_string(),
            StatusCode::FORBIDDEN,
            error(
                "device token may only write its own device",
                Some("device_id"),
                Some(0),
            ),
        ),
        (
            "device token, other tenant",
            Some("tok-d1"),
            json,
            json!({"tenant_id": "globex", "seq": 1, "metrics": {}}).to_string(),
            StatusCode::FORBIDDEN,
            error(
                "token may not write this tenant",
                Some("tenant_id"),
                Some(0),
            ),
        ),
        (
            "gateway, other tenant",
            Some("gw-acme"),
            json,
            json!({"tenant_id": "globex", "device_id": "g1", "seq": 1, "metrics": {}}).to_string(),
            StatusCode::FORBIDDEN,
            error(
                "token may not write this tenant",
                Some("tenant_id"),
                Some(0),
            ),
        ),
        (
            "gateway, other tenant's device",
            Some("gw-acme"),
            json,
            json!({"device_id": "g1", "seq": 1, "metrics": {}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            error("unknown device", Some("device_id"), Some(0)),
        ),
        (
            "gateway, no device",
            Some("gw-acme"),
            json,
            json!({"seq": 1, "metrics": {}}).to_string(),
            StatusCode::BAD_REQUEST,
            error(
                "missing (required with a gateway token)",
                Some("device_id"),
                Some(0),
            ),
        ),
        (
            "unknown device",
            Some("gw-acme"),
            json,
            json!({"device_id": "ghost", "seq": 1, "metrics": {}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            error("unknown device", Some("device_id"), Some(0)),
        ),
        (
            "disabled device",
            Some("gw-acme"),
            json,
            json!({"device_id": "off", "seq": 1, "metrics": {}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            error("device disabled", Some("device_id"), Some(0)),
        ),
        (
            "disabled device's own token",
            Some("tok-off"),
            json,
            ok.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            error("device disabled", Some("device_id"), Some(0)),
        ),
    ];
    for (name, token, content_type, body, status, expected) in cases {
        let reply = fx.post(token, content_type, body).await;
        assert_eq!(reply.status, status, "{name}: {:?}", reply.body);
        assert_eq!(reply.body, expected, "{name}");
    }

    // A streamed body without a declared length is cut off at the limit too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b' '; MAX_BODY / 4])).collect();
    let reply = fx
        .post(
            Some("tok-d1"),
            json,
            Body::from_stream(futures::stream::iter(chunks)),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(fx.topic_count().await, 0);
    Ok(())
}

#[tokio::test]
async fn a_mixed_batch_puts_exactly_the_valid_messages() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let batch = json!([
        reading("d1", 1),
        {"device_id": "d1", "metrics": {}},
        reading("d2", 3),
        reading("ghost", 4),
        reading("d1", 5),
    ]);
    let reply = fx.post_json("gw-acme", batch).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        reply.body,
        json!({"accepted": 3, "points": 2, "merged": 1, "rejected": 2, "errors": [
            {"error": "missing", "field": "seq", "index": 1, "status": 400},
            {"error": "unknown device", "field": "device_id", "index": 3, "status": 422},
        ]})
    );
    let mut seqs: Vec<i64> = fx
        .consume_all()
        .await
        .iter()
        .map(|m| m.telemetry.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 3, 5]);
    Ok(())
}

#[tokio::test]
async fn ndjson_lines_stand_on_their_own() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let body = format!("{}\n{{broken\n\n{}\n", reading("d1", 1), reading("d2", 2));
    let reply = fx.post(Some("gw-acme"), "application/x-ndjson", body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        reply.body,
        json!({"accepted": 2, "points": 2, "merged": 0, "rejected": 1, "errors": [
            {"error": "malformed json: key must be a string at line 1 column 2", "field": null, "index": 1, "status": 400},
        ]})
    );
    assert_eq!(fx.consume_all().await.len(), 2);
    Ok(())
}

#[tokio::test]
async fn an_atomic_batch_with_one_bad_message_puts_nothing() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let batch = json!([reading("d1", 1), reading("ghost", 2), reading("d2", 3)]);
    let reply = fx
        .post_to(
            "/v1/telemetry?atomic=true",
            Some("gw-acme"),
            "application/json",
            batch.to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reply.body,
        json!({"accepted": 0, "points": 0, "merged": 0, "rejected": 1, "errors": [
            {"error": "unknown device", "field": "device_id", "index": 1, "status": 422},
        ]})
    );
    assert_eq!(fx.topic_count().await, 0);

    // Without errors the atomic batch goes through whole.
    let batch = json!([reading("d1", 1), reading("d2", 3)]);
    let reply = fx
        .post_to(
            "/v1/telemetry?atomic=true",
            Some("gw-acme"),
            "application/json",
            batch.to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(fx.consume_all().await.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_device_over_its_rate_gets_429_with_retry_after() -> Result<()> {
    let fx = Fixture::with_limits(PARTITIONS, slow_limit(3), limit(100_000, 100_000)).await?;
    let first_sent = std::time::Instant::now();
    for seq in 0..3 {
        let reply = fx
            .post_json("tok-d1", json!({"seq": seq, "metrics": {}}))
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    let reply = fx
        .post_json("tok-d1", json!({"seq": 3, "metrics": {}}))
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    // The next cell is an hour after the first request, rounded up to whole seconds.
    let retry_after: u64 = reply.retry_after.as_deref().expect("Retry-After").parse()?;
    let elapsed = first_sent.elapsed().as_secs();
    assert!(
        (3_600 - elapsed - 1..=3_600).contains(&retry_after),
        "Retry-After {retry_after} s, {elapsed} s after the first request"
    );
    assert_eq!(
        reply.body,
        error("rate limit exceeded for device", Some("device_id"), Some(0))
    );
    // Another device of the same tenant is not affected.
    let reply = fx
        .post_json("tok-d2", json!({"seq": 0, "metrics": {}}))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(fx.topic_count().await, 4);
    Ok(())
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_with_retry_after() -> Result<()> {
    let fx = Fixture::with_limits(PARTITIONS, limit(1000, 1000), slow_limit(4)).await?;
    let batch = json!([reading("d1", 1), reading("d2", 2), reading("d1", 3)]);
    let reply = fx.post_json("gw-acme", batch.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let reply = fx.post_json("gw-acme", batch).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(reply.retry_after.is_some());
    assert_eq!(
        reply.body,
        error("rate limit exceeded for tenant", None, None)
    );
    // Another tenant has its own bucket.
    let reply = fx
        .post_json("tok-g1", json!({"seq": 1, "metrics": {}}))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(fx.topic_count().await, 4);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_broker_gets_503_after_a_bounded_wait_never_202() -> Result<()> {
    let (_db, router) = common::unreachable_broker_router().await?;
    let started = Instant::now();
    let reply = send(
        &router,
        "/v1/telemetry",
        Some("tok-d1"),
        "application/json",
        Body::from(json!({"seq": 1, "metrics": {}}).to_string()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.retry_after.as_deref(), Some("5"));
    assert_eq!(
        reply.body,
        error("kafka did not acknowledge the message", None, Some(0))
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_full_producer_queue_refuses_the_overflow_with_503_and_retry_after() -> Result<()> {
    let db = TestDb::new(LayoutChoice::Postgres).await?;
    seed(&db).await?;
    let topics = TestTopics::new(PARTITIONS).await?;
    let credentials = Credentials::default();
    credentials.reload(&db.pool).await?;
    let mut args = topics.args.clone();
    // Room for one message in librdkafka's local queue.
    args.options
        .push(("queue.buffering.max.messages".to_owned(), "1".to_owned()));
    let producer = Producer::new(&args, "ingest-test", Duration::from_secs(10))?;
    let app = App::new(
        credentials,
        producer,
        RateLimits::new(limit(1000, 1000), limit(1000, 1000)),
        settings(),
    );
    let router = router(app);
    let batch = json!([
        reading("d1", 1),
        reading("d1", 2),
        reading("d2", 3),
        reading("d2", 4)
    ]);
    let reply = send(
        &router,
        "/v1/telemetry",
        Some("gw-acme"),
        "application/json",
        Body::from(batch.to_string()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    let full = |index: usize| json!({"error": "kafka producer queue is full", "field": null, "index": index, "status": 503});
    assert_eq!(
        reply.body,
        json!({"accepted": 1, "points": 1, "merged": 0, "rejected": 3, "errors": [full(1), full(2), full(3)]})
    );
    assert_eq!(common::topic_count(&topics.args, PARTITIONS).await, 1);
    Ok(())
}

const OUT_OF_I64: &str =
    "integer outside the signed 64-bit range (-9223372036854775808 to 9223372036854775807)";
const NUL_STRING: &str = "string contains U+0000, which PostgreSQL cannot store";

#[tokio::test]
async fn each_value_postgresql_would_not_store_as_sent_gets_400_naming_message_and_field(
) -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let json = "application/json";
    let now = Utc::now();
    let micros = now.format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    let nanos = format!("{micros}001Z");
    // The current minute's second 60: within the allowed clock skew, but a leap second.
    let leap = now.format("%Y-%m-%dT%H:%M:60Z").to_string();
    let not_a_number = |literal: &str| {
        error(
            &format!(
                "malformed json: {literal} at line 1 column 29 is not a json number; \
                 send null instead"
            ),
            None,
            None,
        )
    };
    let one = |field: &str, message: &str| error(message, Some(field), Some(0));
    let cases: Vec<(&str, String, Value)> = vec![
        (
            "U+0000 in a string metric",
            r#"{"seq":1,"metrics":{"ok":1,"s":"a\u0000b"}}"#.to_owned(),
            one("metrics.s", NUL_STRING),
        ),
        (
            "U+0000 in a metric name",
            r#"{"seq":1,"metrics":{"t\u0000":1}}"#.to_owned(),
            one(
                "metrics.t\u{0}",
                "key contains U+0000, which PostgreSQL cannot store",
            ),
        ),
        (
            "U+0000 in device_id",
            r#"{"device_id":"d1\u0000","seq":1,"metrics":{}}"#.to_owned(),
            one("device_id", NUL_STRING),
        ),
        (
            "U+0000 in tenant_id",
            r#"{"tenant_id":"acme\u0000","seq":1,"metrics":{}}"#.to_owned(),
            one("tenant_id", NUL_STRING),
        ),
        (
            "U+0000 in site_id",
            r#"{"site_id":"\u0000","seq":1,"metrics":{}}"#.to_owned(),
            one("site_id", NUL_STRING),
        ),
        (
            "U+0000 in msg_type",
            r#"{"msg_type":"telemetry\u0000","seq":1,"metrics":{}}"#.to_owned(),
            one("msg_type", NUL_STRING),
        ),
        (
            "U+0000 in time",
            format!(r#"{{"time":"{micros}Z\u0000","seq":1,"metrics":{{}}}}"#),
            one("time", NUL_STRING),
        ),
        (
            "unsigned 64-bit counter",
            r#"{"seq":1,"metrics":{"if_in_octets":18446744073709551615}}"#.to_owned(),
            one("metrics.if_in_octets", OUT_OF_I64),
        ),
        (
            "integer above u64",
            r#"{"seq":1,"metrics":{"c":18446744073709551616}}"#.to_owned(),
            one("metrics.c", OUT_OF_I64),
        ),
        (
            "integer below i64",
            r#"{"seq":1,"metrics":{"c":-9223372036854775809}}"#.to_owned(),
            one("metrics.c", OUT_OF_I64),
        ),
        (
            "seq above i64",
            r#"{"seq":9223372036854775808,"metrics":{}}"#.to_owned(),
            one("seq", OUT_OF_I64),
        ),
        (
            "negative overflow",
            r#"{"seq":1,"metrics":{"x":-1e400}}"#.to_owned(),
            one("metrics.x", "number outside the range of a 64-bit float"),
        ),
        (
            "underflow",
            r#"{"seq":1,"metrics":{"x":1.0e-400}}"#.to_owned(),
            one(
                "metrics.x",
                "number too small for a 64-bit float (it would be stored as 0)",
            ),
        ),
        (
            "lone surrogate",
            r#"{"seq":1,"metrics":{"s":"\ud800"}}"#.to_owned(),
            one(
                "metrics.s",
                "string contains a lone surrogate escape, which is not unicode",
            ),
        ),
        (
            "duplicate metric",
            r#"{"seq":1,"metrics":{"t":1,"h":2,"t":3}}"#.to_owned(),
            one("metrics.t", "duplicate key"),
        ),
        (
            "duplicate field",
            r#"{"seq":1,"metrics":{},"seq":2}"#.to_owned(),
            one("seq", "duplicate key"),
        ),
        (
            "nanoseconds",
            format!(r#"{{"time":"{nanos}","seq":1,"metrics":{{}}}}"#),
            one(
                "time",
                "more precise than a microsecond (PostgreSQL stores 6 fractional digits)",
            ),
        ),
        (
            "leap second",
            format!(r#"{{"time":"{leap}","seq":1,"metrics":{{}}}}"#),
            one("time", "leap second (second 60) cannot be stored as sent"),
        ),
        // As Python's json.dumps writes float("nan"), float("inf"), float("-inf").
        (
            "NaN",
            r#"{"seq": 1, "metrics": {"x": NaN}}"#.to_owned(),
            not_a_number("NaN"),
        ),
        (
            "Infinity",
            r#"{"seq": 1, "metrics": {"x": Infinity}}"#.to_owned(),
            not_a_number("Infinity"),
        ),
        (
            "-Infinity",
            r#"{"seq": 1, "metrics": {"x": -Infinity}}"#.to_owned(),
            not_a_number("-Infinity"),
        ),
    ];
    for (name, body, expected) in cases {
        let reply = fx.post(Some("tok-d1"), json, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{name}: {:?}",
            reply.body
        );
        assert_eq!(reply.body, expected, "{name}");
    }

    // In a batch, the message is named by its index.
    let refused = |error: &str, field: Option<&str>, index: usize| json!({"error": error, "field": field, "index": index, "status": 400});
    let batch = r#"[{"device_id":"d1","seq":1,"metrics":{"t":1}},
                    {"device_id":"d2","seq":2,"metrics":{"c":18446744073709551615}}]"#;
    let reply = fx
        .post_to("/v1/telemetry?atomic=true", Some("gw-acme"), json, batch)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body,
        json!({"accepted": 0, "points": 0, "merged": 0, "rejected": 1, "errors": [
            refused(OUT_OF_I64, Some("metrics.c"), 1),
        ]})
    );
    let batch = r#"[{"device_id":"d1","seq":1,"metrics":{"s":"\u0000"}},
                    {"device_id":"d2","seq":1,"seq":2,"metrics":{}}]"#;
    let reply = fx.post(Some("gw-acme"), json, batch).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body,
        json!({"accepted": 0, "points": 0, "merged": 0, "rejected": 2, "errors": [
            refused(NUL_STRING, Some("metrics.s"), 0),
            refused("duplicate key", Some("seq"), 1),
        ]})
    );
    let ndjson = "{\"device_id\":\"d1\",\"seq\":1,\"metrics\":{}}\n\
                  {\"device_id\":\"d1\",\"seq\":2,\"metrics\":{\"x\":NaN}}\n";
    let reply = fx
        .post_to(
            "/v1/telemetry?atomic=true",
            Some("gw-acme"),
            "application/x-ndjson",
            ndjson,
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body,
        json!({"accepted": 0, "points": 0, "merged": 0, "rejected": 1, "errors": [
            refused(
                "malformed json: NaN at line 1 column 42 is not a json number; send null instead",
                None,
                1,
            ),
        ]})
    );

    assert_eq!(fx.topic_count().await, 0);
    Ok(())
}

#[tokio::test]
async fn a_batch_of_one_device_without_time_is_one_point_and_the_reply_says_so() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let before = Utc::now();
    // A device reporting its sensors separately, all in one request, without `time`.
    let batch = json!([
        {"seq": 1, "metrics": {"temperature": 21.5}},
        {"seq": 2, "metrics": {"humidity": 40}},
        {"seq": 3, "metrics": {"temperature": 21.7}},
    ]);
    let reply = fx.post_json("tok-d1", batch).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        reply.body,
        json!({"accepted": 3, "points": 1, "merged": 2, "rejected": 0, "errors": []})
    );
    // All three are produced with the same time: the sink merges them into one row.
    let consumed = fx.consume_all().await;
    assert_eq!(consumed.len(), 3);
    let times: std::collections::BTreeSet<_> = consumed.iter().map(|m| m.telemetry.time).collect();
    assert_eq!(times.len(), 1);
    assert!(*times.first().unwrap() >= before);

    // A gateway batch: points are per device and time; refused messages do not count.
    let t1 = (before - chrono::Duration::seconds(60)).to_rfc3339_opts(SecondsFormat::Micros, true);
    let t2 = (before - chrono::Duration::seconds(30)).to_rfc3339_opts(SecondsFormat::Micros, true);
    let batch = json!([
        {"device_id": "d1", "seq": 10, "metrics": {"t": 1}},
        {"device_id": "d2", "seq": 11, "metrics": {"t": 1}},
        {"device_id": "d1", "seq": 12, "metrics": {"h": 1}},
        {"device_id": "d1", "seq": 13, "time": t1, "metrics": {"t": 2}},
        {"device_id": "d1", "seq": 13, "time": t1, "metrics": {"t": 2}},
        {"device_id": "d1", "seq": 14, "time": t2, "metrics": {"t": 3}},
        {"device_id": "ghost", "seq": 15, "time": t2, "metrics": {"t": 3}},
        {"device_id": "d2", "seq": 16, "time": t1, "metrics": {"t": 4}},
    ]);
    let reply = fx.post_json("gw-acme", batch).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        reply.body,
        json!({"accepted": 7, "points": 5, "merged": 2, "rejected": 1, "errors": [
            {"error": "unknown device", "field": "device_id", "index": 6, "status": 422},
        ]})
    );
    assert_eq!(fx.topic_count().await, 10);
    Ok(())
}

#[tokio::test]
async fn gzip_bodies_are_decompressed_and_their_readings_land_on_the_topic() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let time =
        (Utc::now() - chrono::Duration::seconds(5)).to_rfc3339_opts(SecondsFormat::Micros, true);
    let post =
        |encoding: &'static str, content_type: &'static str, token: &'static str, body: Vec<u8>| {
            let authorization = format!("Bearer {token}");
            let router = fx.router.clone();
            async move {
                send_with_headers(
                    &router,
                    "/v1/telemetry",
                    &[
                        ("authorization", &authorization),
                        ("content-type", content_type),
                        ("content-encoding", encoding),
                    ],
                    Body::from(body),
                )
                .await
            }
        };
    let batch = json!([
        {"device_id": "d1", "seq": 1, "time": time, "metrics": {"t": 1.5, "s": "é😀"}},
        {"device_id": "d2", "seq": 2, "time": time, "metrics": {"c": i64::MAX}},
    ]);
    let reply = post(
        "gzip",
        "application/json",
        "gw-acme",
        gzip(batch.to_string().as_bytes()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert_eq!(
        reply.body,
        json!({"accepted": 2, "points": 2, "merged": 0, "rejected": 0, "errors": []})
    );
    let single = json!({"seq": 3, "time": time, "metrics": {"b": true}}).to_string();
    let reply = post(
        "x-gzip",
        "application/json",
        "tok-d2",
        gzip(single.as_bytes()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.body, json!({"accepted": 1, "points": 1, "merged": 0}));
    let ndjson = format!("{}\n", json!({"seq": 4, "metrics": {"n": null}}));
    let reply = post(
        "identity",
        "application/x-ndjson",
        "tok-d1",
        ndjson.into_bytes(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);

    let consumed = fx.consume_all().await;
    let by_seq: BTreeMap<i64, &Telemetry> = consumed
        .iter()
        .map(|m| (m.telemetry.seq, &m.telemetry))
        .collect();
    assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(by_seq[&1].metrics["t"], MetricValue::Double(1.5));
    assert_eq!(by_seq[&1].metrics["s"], MetricValue::String("é😀".into()));
    assert_eq!(by_seq[&2].metrics["c"], MetricValue::Long(i64::MAX));
    assert_eq!(by_seq[&3].device_id, "d2");
    assert_eq!(by_seq[&3].metrics["b"], MetricValue::Bool(true));
    assert_eq!(by_seq[&4].metrics["n"], MetricValue::Null);
    Ok(())
}

#[tokio::test]
async fn gzip_bombs_get_413_unknown_encodings_415_and_nothing_lands() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let send = |token: Option<&'static str>, encoding: &'static str, body: Vec<u8>| {
        let router = fx.router.clone();
        async move {
            let length = body.len().to_string();
            let authorization = token.map(|t| format!("Bearer {t}"));
            let mut headers = vec![
                ("content-type", "application/json"),
                ("content-encoding", encoding),
                ("content-length", length.as_str()),
            ];
            if let Some(authorization) = &authorization {
                headers.push(("authorization", authorization));
            }
            send_with_headers(&router, "/v1/telemetry", &headers, Body::from(body)).await
        }
    };
    // 4 MiB of zeros in about 4 KiB: under the limit as sent, far over it decompressed.
    let bomb = gzip(&vec![0; 4 << 20]);
    assert!(bomb.len() < MAX_BODY, "{}", bomb.len());
    let reply = send(Some("tok-d1"), "gzip", bomb.clone()).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        reply.body,
        error(
            &format!("decompressed body exceeds {MAX_BODY} bytes"),
            None,
            None
        )
    );
    // The same bomb without a token is refused before it is read.
    let reply = send(None, "gzip", bomb.clone()).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // A 10 MB bomb (10 GiB of zeros) is over the limit as sent.
    let member = gzip(&vec![0; 16 << 20]);
    let big_bomb: Vec<u8> = member
        .iter()
        .copied()
        .cycle()
        .take(member.len() * (10_000_000 / member.len() + 1))
        .collect();
    assert!(big_bomb.len() >= 10_000_000);
    let reply = send(Some("tok-d1"), "gzip", big_bomb).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        reply.body,
        error(&format!("body exceeds {MAX_BODY} bytes"), None, None)
    );

    let ok = json!({"seq": 1, "metrics": {"t": 1}})
        .to_string()
        .into_bytes();
    for encoding in ["br", "compress", "deflate", "gzip, gzip"] {
        let reply = send(Some("tok-d1"), encoding, gzip(&ok)).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{encoding}"
        );
        assert_eq!(reply.accept_encoding.as_deref(), Some("gzip, identity"));
        assert_eq!(
            reply.body,
            error(
                &format!("content-encoding {encoding} is not supported; send gzip or identity"),
                Some("content-encoding"),
                None
            ),
            "{encoding}"
        );
    }
    // A plain body labelled gzip, and a truncated gzip body.
    let reply = send(Some("tok-d1"), "gzip", ok.clone()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body,
        error("malformed gzip body: invalid gzip header", None, None)
    );
    let mut truncated = gzip(&ok);
    truncated.truncate(truncated.len() - 8);
    let reply = send(Some("tok-d1"), "gzip", truncated).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body,
        error("malformed gzip body: unexpected end of file", None, None)
    );

    assert_eq!(fx.topic_count().await, 0);
    Ok(())
}
