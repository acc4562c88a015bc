//! The InfluxDB-compatible endpoints (`/api/v2/write`, `/write`, `/query`) against a real
//! Kafka broker and PostgreSQL: what a `204` acknowledged is on the topic as the documented
//! readings (decoded from Avro and compared value by value), each refusal has InfluxDB's
//! status and body exactly, a partial write stores exactly the valid lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, Utc};
use common::{gzip, limit, slow_limit, Fixture, MAX_BODY};
use schemas::{MetricValue, Telemetry};
use serde_json::{json, Value};
use tower::ServiceExt;

const PARTITIONS: i32 = 2;

impl Fixture {
    async fn post(&self, uri: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Reply {
        let answer = common::post(&self.router, uri, headers, body.into()).await;
        Reply {
            status: answer.status,
            retry_after: answer.header("retry-after"),
            platform_code: answer.header("x-platform-error-code"),
            empty: answer.body.is_empty(),
            body: serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
        }
    }

    async fn v2(&self, token: &str, uri_query: &str, body: impl Into<Body>) -> Reply {
        let authorization = format!("Token {token}");
        self.post(
            &format!("/api/v2/write?org=o&bucket=b{uri_query}"),
            &[("authorization", &authorization)],
            body,
        )
        .await
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    retry_after: Option<String>,
    platform_code: Option<String>,
    empty: bool,
    body: Value,
}

/// Every message on the topic, decoded.
async fn consume_all(fx: &Fixture) -> Vec<Telemetry> {
    fx.consume_all()
        .await
        .into_iter()
        .map(|c| c.telemetry)
        .collect()
}

/// A timestamp a minute ago, whole milliseconds, in nanoseconds.
fn recent_ns() -> i64 {
    (Utc::now().timestamp_millis() - 60_000) * 1_000_000
}

fn at_ns(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(ns.div_euclid(1000)).unwrap()
}

fn metrics(pairs: &[(&str, MetricValue)]) -> BTreeMap<String, MetricValue> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn v2_error(code: &str, message: &str) -> Value {
    json!({"code": code, "message": message})
}

#[tokio::test]
async fn a_gzip_v2_write_is_204_after_the_merged_points_are_on_the_topic() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let t = recent_ns() + 123_456; // 123.456 µs past a millisecond: truncated to 123 µs.
    let body = format!(
        "cpu,host=d1,cpu=cpu0 usage_idle=99.5,usage_user=0.25 {t}\n\
         mem,host=d1 used=1024i,free=7u,ok=true,state=\"fine \\\"really\\\"\" {t}\r\n\
         mem,host=d2,site=east used=5i {t}\n"
    );
    let reply = fx
        .post(
            "/api/v2/write?org=o&bucket=b&precision=ns",
            &[
                ("authorization", "Token gw-acme"),
                ("content-encoding", "gzip"),
                ("content-type", "text/plain; charset=utf-8"),
            ],
            gzip(body.as_bytes()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply:?}");
    assert!(reply.empty);
    let mut got = consume_all(&fx).await;
    got.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(got.len(), 2, "{got:?}");
    let time = at_ns(t);
    assert_eq!(time.timestamp_subsec_micros() % 1000, 123);
    assert_eq!(
        (
            got[0].tenant_id.as_str(),
            got[0].device_id.as_str(),
            got[0].site_id.as_deref(),
            got[0].seq,
            got[0].time
        ),
        ("acme", "d1", Some("plant-1"), 0, time)
    );
    assert_eq!(
        got[0].metrics,
        metrics(&[
            ("cpu.usage_idle:cpu:cpu0", MetricValue::Double(99.5)),
            ("cpu.usage_user:cpu:cpu0", MetricValue::Double(0.25)),
            ("mem.used", MetricValue::Long(1024)),
            ("mem.free", MetricValue::Long(7)),
            ("mem.ok", MetricValue::Bool(true)),
            ("mem.state", MetricValue::String("fine \"really\"".into())),
        ])
    );
    assert_eq!(
        (
            got[1].device_id.as_str(),
            got[1].site_id.as_deref(),
            got[1].time
        ),
        ("d2", Some("east"), time)
    );
    assert_eq!(
        got[1].metrics,
        metrics(&[("mem.used", MetricValue::Long(5))])
    );
    Ok(())
}

#[tokio::test]
async fn a_v1_write_takes_basic_or_p_credentials_and_its_precisions() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let s = recent_ns() / 1_000_000_000;
    // Device token, no device tag: the token's device.
    let reply = fx
        .post(
            "/write?db=telegraf&rp=autogen&precision=s",
            // "telegraf:tok-d1"
            &[("authorization", "Basic dGVsZWdyYWY6dG9rLWQx")],
            format!("env temp=21.5 {s}\n"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply:?}");
    let reply = fx
        .post(
            "/write?db=x&u=any&p=tok-d2&precision=m",
            &[],
            format!("env temp=1i {}\n", s / 60),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply:?}");
    let mut got = consume_all(&fx).await;
    got.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(got.len(), 2);
    assert_eq!(
        (
            got[0].device_id.as_str(),
            got[0].time.timestamp(),
            &got[0].metrics
        ),
        (
            "d1",
            s,
            &metrics(&[("env.temp", MetricValue::Double(21.5))])
        )
    );
    assert_eq!(
        (
            got[1].device_id.as_str(),
            got[1].time.timestamp(),
            &got[1].metrics
        ),
        (
            "d2",
            s / 60 * 60,
            &metrics(&[("env.temp", MetricValue::Long(1))])
        )
    );
    Ok(())
}

#[tokio::test]
async fn a_partial_write_stores_the_valid_lines_and_lists_each_rejected_one() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let t = recent_ns();
    let old = t - 100 * 86_400 * 1_000_000_000;
    let body = format!(
        "m,host=d1 a=1i {t}\n\
         m,host=d1 a=\n\
         # a comment\n\
         m,host=nope a=1i {t}\n\
         m,host=g1 a=1i {t}\n\
         m,host=d2 a=2i {old}\n\
         disk,host=d2,path=/ used=3i {t}\n\
         m,host=d2 b=2i {t}\n"
    );
    let reply = fx.v2("gw-acme", "", body.clone()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.platform_code.as_deref(), Some("invalid"));
    let listed = "5 of 7 lines rejected: \
         line 2: no fields were provided; \
         line 4: device_id: unknown device; \
         line 5: device_id: unknown device; \
         line 6: time: older than the retention window of 7776000s; \
         line 7: metric name disk.used:path:/ (measurement.field:tag:value) must match \
         [A-Za-z0-9_.:-]{1,64}";
    assert_eq!(
        reply.body,
        v2_error("invalid", &format!("partial write: {listed}"))
    );
    // The same body on the 1.x endpoint: `{"error"}`.
    let reply = fx
        .post("/write?db=x", &[("authorization", "Token gw-acme")], body)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.platform_code, None);
    assert_eq!(
        reply.body,
        json!({"error": format!("partial write: {listed}")})
    );
    // Both writes stored lines 1 and 8, the same two points twice.
    let got = consume_all(&fx).await;
    let mut seen: Vec<(String, BTreeMap<String, MetricValue>)> =
        got.into_iter().map(|t| (t.device_id, t.metrics)).collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("d1".to_owned(), metrics(&[("m.a", MetricValue::Long(1))])),
            ("d1".to_owned(), metrics(&[("m.a", MetricValue::Long(1))])),
            ("d2".to_owned(), metrics(&[("m.b", MetricValue::Long(2))])),
            ("d2".to_owned(), metrics(&[("m.b", MetricValue::Long(2))])),
        ]
    );
    // No line stored.
    let reply = fx.v2("gw-acme", "", "m,host=nope a=1i\n").await;
    assert_eq!(
        (reply.status, reply.body),
        (
            StatusCode::BAD_REQUEST,
            v2_error(
                "invalid",
                "no line stored: 1 of 1 lines rejected: line 1: device_id: unknown device"
            )
        )
    );
    Ok(())
}

/// Path and query, headers, body, expected status and body.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, StatusCode, Value);

#[tokio::test]
async fn each_request_level_error_has_influxdb_status_and_body() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    let line = "m,host=d1 a=1i\n";
    let unauthorized = |message: &str| v2_error("unauthorized", message);
    let cases: Vec<Case> = vec![
        (
            "/api/v2/write?bucket=b",
            vec![],
            line.into(),
            StatusCode::UNAUTHORIZED,
            unauthorized("missing token: send Authorization: Token <device or gateway token>"),
        ),
        (
            "/api/v2/write?bucket=b",
            vec![("authorization", "Token nope")],
            line.into(),
            StatusCode::UNAUTHORIZED,
            unauthorized("unknown or revoked token"),
        ),
        (
            "/write?db=x",
            vec![],
            line.into(),
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing token: send Authorization: Token <device or gateway token>, \
                    HTTP Basic with the token as password, or the token as query parameter p"}),
        ),
        (
            "/write?db=x&p=nope",
            vec![],
            line.into(),
            StatusCode::UNAUTHORIZED,
            json!({"error": "unknown or revoked token"}),
        ),
        (
            "/api/v2/write?bucket=b&precision=m",
            vec![("authorization", "Token gw-acme")],
            line.into(),
            StatusCode::BAD_REQUEST,
            v2_error("invalid", "invalid precision \"m\": use ns, us, ms or s"),
        ),
        (
            "/write?db=x&precision=d",
            vec![("authorization", "Token gw-acme")],
            line.into(),
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid precision \"d\": use n, ns, u, µ, ms, s, m or h"}),
        ),
        (
            "/api/v2/write?bucket=b",
            vec![("authorization", "Token gw-acme")],
            b"\n# only a comment\n".to_vec(),
            StatusCode::BAD_REQUEST,
            v2_error("invalid", "writing requires points"),
        ),
        (
            "/api/v2/write?bucket=b",
            vec![("authorization", "Token gw-acme")],
            line.repeat(MAX_BODY / line.len() + 1).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            v2_error("request too large", "body exceeds 8192 bytes"),
        ),
        (
            "/api/v2/write?bucket=b",
            vec![
                ("authorization", "Token gw-acme"),
                ("content-encoding", "gzip"),
            ],
            // A gzip bomb: 4 MiB of newlines in 4 KiB, within the limit as sent.
            gzip(&vec![b'\n'; 4 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            v2_error("request too large", "decompressed body exceeds 8192 bytes"),
        ),
        (
            "/write?db=x",
            vec![
                ("authorization", "Token gw-acme"),
                ("content-encoding", "gzip"),
            ],
            gzip(&vec![b'\n'; 4 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": "decompressed body exceeds 8192 bytes"}),
        ),
        (
            "/api/v2/write?bucket=b",
            vec![
                ("authorization", "Token gw-acme"),
                ("content-encoding", "br"),
            ],
            line.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            v2_error(
                "unsupported media type",
                "content-encoding br is not supported; send gzip or identity",
            ),
        ),
        (
            "/api/v2/write?bucket=b",
            vec![
                ("authorization", "Token gw-acme"),
                ("content-encoding", "gzip"),
            ],
            b"not gzip".to_vec(),
            StatusCode::BAD_REQUEST,
            v2_error("invalid", "malformed gzip body: unexpected end of file"),
        ),
    ];
    for (uri, headers, body, status, expected) in cases {
        let reply = fx.post(uri, &headers, body).await;
        assert_eq!(
            (reply.status, &reply.body),
            (status, &expected),
            "{uri} {headers:?}"
        );
        if uri.starts_with("/api/v2/") {
            assert_eq!(
                reply.platform_code.as_deref(),
                expected["code"].as_str(),
                "{uri}"
            );
        }
    }
    assert_eq!(consume_all(&fx).await.len(), 0);
    Ok(())
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_in_influxdb_shape() -> Result<()> {
    let fx = Fixture::with_limits(PARTITIONS, slow_limit(2), limit(100_000, 100_000)).await?;
    let first_sent = Instant::now();
    let t = recent_ns();
    // Two points of d1 take its burst; its third is refused, d2's point is stored.
    let body = format!("m,host=d1 a=1i {t}\nm,host=d1 a=1i {}\n", t + 1000);
    assert_eq!(
        fx.v2("gw-acme", "", body).await.status,
        StatusCode::NO_CONTENT
    );
    let body = format!("m,host=d1 a=1i {}\nm,host=d2 a=1i {t}\n", t + 2000);
    let reply = fx.v2("gw-acme", "", body).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.platform_code.as_deref(), Some("too many requests"));
    // The next cell is an hour after the first request, in whole seconds.
    let retry_after: u64 = reply.retry_after.as_deref().unwrap().parse()?;
    let elapsed = first_sent.elapsed().as_secs();
    assert!(
        (3_600 - elapsed - 1..=3_600).contains(&retry_after),
        "{retry_after}"
    );
    assert_eq!(
        reply.body,
        v2_error(
            "too many requests",
            "rate limit exceeded for device: 1 of 2 lines not stored, retry the request"
        )
    );
    let got = consume_all(&fx).await;
    let mut devices: Vec<&str> = got.iter().map(|t| t.device_id.as_str()).collect();
    devices.sort_unstable();
    assert_eq!(devices, vec!["d1", "d1", "d2"]);
    Ok(())
}

#[tokio::test]
async fn query_answers_create_database_as_influxdb_does() -> Result<()> {
    let fx = Fixture::new(PARTITIONS).await?;
    // Telegraf's 1.x output: a form body with q, HTTP Basic.
    let reply = fx
        .post(
            "/query",
            &[
                ("authorization", "Basic dGVsZWdyYWY6Z3ctYWNtZQ=="),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "q=CREATE+DATABASE+%22telegraf%22",
        )
        .await;
    assert_eq!(
        (reply.status, reply.body),
        (StatusCode::OK, json!({"results": [{"statement_id": 0}]}))
    );
    let reply = fx
        .post("/query?q=SHOW%20DATABASES&p=gw-acme", &[], "")
        .await;
    assert_eq!(
        (reply.status, reply.body),
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "only CREATE DATABASE is answered here (the tenant comes from the token); \
                    read data through query-api"})
        )
    );
    let reply = fx.post("/query?q=CREATE%20DATABASE%20x", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_broker_gets_503_with_retry_after_never_204() -> Result<()> {
    let (_db, router) = common::unreachable_broker_router().await?;
    let response = router
        .oneshot(
            Request::post("/write?db=x")
                .header("authorization", "Token gw-acme")
                .body(Body::from("m,host=d1 a=1i\nm,host=d2 a=2i\n"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").unwrap().to_str()?,
        "5"
    );
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    assert_eq!(
        serde_json::from_slice::<Value>(&body)?,
        json!({"error": "kafka did not acknowledge the message: 2 of 2 lines not stored, \
                retry the request"})
    );
    Ok(())
}
