//! MQTT ingest with real clients (rumqttc, 3.1.1 and 5) against the real broker: each payload
//! form produces exactly the record its `POST /v1/telemetry` equivalent produces; tokens,
//! topics and refusals answer with the documented codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::body::Body;
use chrono::{DateTime, SecondsFormat, Utc};
use common::mqtt::{self, v3, v5, Seen};
use common::{post, Consumed, Fixture};
use schemas::Telemetry;
use serde_json::{json, Value};

/// One publish and the HTTP request that must make the same records.
struct Case {
    token: &'static str,
    topic: &'static str,
    payload: String,
    http: Value,
    /// True when the readings take the ingest clock (no `ts`/`time`).
    server_time: bool,
}

fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn cases() -> Vec<Case> {
    let t = Utc::now().timestamp_millis() - 60_000;
    vec![
        Case {
            token: "tok-d1",
            topic: "v1/devices/me/telemetry",
            payload: r#"{"temp": 21.5, "on": true, "count": 7, "state": "ok", "none": null}"#
                .into(),
            http: json!({"seq": 0, "metrics": {"temp": 21.5, "on": true, "count": 7, "state": "ok", "none": null}}),
            server_time: true,
        },
        Case {
            token: "tok-d1",
            topic: "v1/devices/me/telemetry",
            payload: format!(r#"{{"ts": {t}, "values": {{"temp": 22, "hum": 40.25}}}}"#),
            http: json!({"seq": 0, "time": rfc3339(t), "metrics": {"temp": 22, "hum": 40.25}}),
            server_time: false,
        },
        Case {
            token: "tok-d2",
            topic: "v1/devices/me/telemetry",
            payload: format!(
                r#"[{{"ts": {}, "values": {{"temp": 1}}}}, {{"ts": {}, "values": {{"temp": 2}}}}]"#,
                t + 1,
                t + 2
            ),
            http: json!([
                {"seq": 0, "time": rfc3339(t + 1), "metrics": {"temp": 1}},
                {"seq": 0, "time": rfc3339(t + 2), "metrics": {"temp": 2}}
            ]),
            server_time: false,
        },
        Case {
            token: "gw-acme",
            topic: "v1/gateway/telemetry",
            payload: format!(
                r#"{{"d1": [{{"ts": {}, "values": {{"v": 1.5}}}}], "d2": [{{"ts": {}, "values": {{"v": 2}}}}, {{"ts": {}, "values": {{"w": "x"}}}}]}}"#,
                t + 3,
                t + 4,
                t + 5
            ),
            http: json!([
                {"device_id": "d1", "seq": 0, "time": rfc3339(t + 3), "metrics": {"v": 1.5}},
                {"device_id": "d2", "seq": 0, "time": rfc3339(t + 4), "metrics": {"v": 2}},
                {"device_id": "d2", "seq": 0, "time": rfc3339(t + 5), "metrics": {"w": "x"}}
            ]),
            server_time: false,
        },
        Case {
            token: "tok-d1",
            topic: "fleet/v1/telemetry",
            payload: json!({"seq": 9, "msg_type": "status", "site_id": "plant-1",
                "time": "2026-01-02T03:04:05.123456Z", "metrics": {"temp": 3}})
            .to_string()
            .replace("2026-01-02T03:04:05.123456Z", &rfc3339(t + 6)),
            http: json!({"seq": 9, "msg_type": "status", "site_id": "plant-1",
                "time": rfc3339(t + 6), "metrics": {"temp": 3}}),
            server_time: false,
        },
    ]
}

/// A record with the ingest clock blanked (and, for server-time readings, the time, after
/// checking it is the ingest clock).
fn normalized(consumed: &Consumed, server_time: bool) -> (String, Telemetry) {
    let mut t = consumed.telemetry.clone();
    if server_time {
        assert_eq!(
            t.time, t.received_at,
            "server-time reading: time is the ingest clock"
        );
        t.time = DateTime::UNIX_EPOCH;
    }
    t.received_at = DateTime::UNIX_EPOCH;
    (consumed.key.clone(), t)
}

async fn forms_produce_what_http_produces(v5: bool) {
    let f = Fixture::new(1).await.unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    let cases = cases();
    // Over MQTT, each publish acknowledged before the next, so the topic holds them in order.
    let mut per_case = Vec::new();
    for case in &cases {
        let before = f.topic_count().await;
        let seen = if v5 {
            let mut c = v5::connect(addr, case.token).await.unwrap();
            c.publish(case.topic, 1, &case.payload).await
        } else {
            let mut c = v3::connect(addr, case.token).await.unwrap();
            c.publish(case.topic, 1, &case.payload).await
        };
        assert_eq!(seen, Seen::PubAck(0), "{}", case.payload);
        // The PUBACK came after Kafka's ack: the records are on the topic already.
        per_case.push((f.topic_count().await - before) as usize);
    }
    let over_mqtt = f.consume_all().await;
    // The same readings over HTTP.
    for case in &cases {
        let answer = post(
            &f.router,
            "/v1/telemetry",
            &[
                ("authorization", &format!("Bearer {}", case.token)),
                ("content-type", "application/json"),
            ],
            Body::from(case.http.to_string()),
        )
        .await;
        assert_eq!(
            answer.status,
            202,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let all = f.consume_all().await;
    let over_http = &all[over_mqtt.len()..];
    assert_eq!(over_mqtt.len(), over_http.len());
    assert_eq!(over_mqtt.len(), per_case.iter().sum::<usize>());
    let mut at = 0;
    for (case, n) in cases.iter().zip(per_case) {
        for i in at..at + n {
            assert_eq!(
                normalized(&over_mqtt[i], case.server_time),
                normalized(&over_http[i], case.server_time),
                "record {i} of {}",
                case.payload
            );
        }
        at += n;
    }
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_each_payload_form_produces_the_record_its_http_equivalent_produces() {
    forms_produce_what_http_produces(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_each_payload_form_produces_the_record_its_http_equivalent_produces() {
    forms_produce_what_http_produces(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_missing_token_is_refused_with_the_documented_codes() {
    let f = Fixture::new(1).await.unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    // 3.1.1: return code 5 (not authorized) for an unknown, a revoked and a missing token.
    for token in [Some("nope"), Some("gw-revoked"), None] {
        let refused = v3::connect_with(v3::options(addr, "x", token)).await.err();
        assert_eq!(refused, Some(Seen::Refused(5)), "{token:?}");
    }
    // 5: 0x86 bad user name or password for an unknown or revoked token, 0x87 without one.
    for (token, code) in [
        (Some("nope"), 0x86),
        (Some("gw-revoked"), 0x86),
        (None, 0x87),
    ] {
        let refused = v5::connect_with(v5::options(addr, "x", token)).await.err();
        assert_eq!(refused, Some(Seen::Refused(code)), "{token:?}");
    }
    assert_eq!(f.topic_count().await, 0);
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_refusals_carry_puback_reason_codes_and_produce_nothing() {
    let f = Fixture::with_limits(1, common::slow_limit(2), common::limit(1000, 1000))
        .await
        .unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    let mut d1 = v5::connect(addr, "tok-d1").await.unwrap();
    let refused = [
        // Another device's readings, another tenant's, the gateway topic, an unknown topic.
        (
            "fleet/v1/telemetry",
            r#"{"device_id": "d2", "seq": 1, "metrics": {"t": 1}}"#,
            0x87,
        ),
        (
            "fleet/v1/telemetry",
            r#"{"tenant_id": "globex", "seq": 1, "metrics": {"t": 1}}"#,
            0x87,
        ),
        ("v1/gateway/telemetry", r#"{"d1": [{"t": 1}]}"#, 0x87),
        ("v1/devices/d2/telemetry", r#"{"t": 1}"#, 0x87),
        // Not JSON, a nested value, a bad `ts`, a batch with one bad reading.
        ("v1/devices/me/telemetry", "temp=1", 0x99),
        ("v1/devices/me/telemetry", r#"{"t": {"a": 1}}"#, 0x99),
        (
            "v1/devices/me/telemetry",
            r#"{"ts": "now", "values": {"t": 1}}"#,
            0x99,
        ),
        (
            "v1/devices/me/telemetry",
            r#"[{"t": 1}, {"bad name": 1}]"#,
            0x99,
        ),
    ];
    for (topic, payload, code) in refused {
        assert_eq!(
            d1.publish(topic, 1, payload).await,
            Seen::PubAck(code),
            "{payload}"
        );
    }
    assert_eq!(
        f.topic_count().await,
        0,
        "a refused publish produces nothing"
    );
    // The device's bucket holds 2: two readings pass, the third is over the limit (0x97),
    // and a publish of two when one cell is left is refused whole.
    assert_eq!(
        d1.publish("v1/devices/me/telemetry", 1, r#"{"t": 1}"#)
            .await,
        Seen::PubAck(0)
    );
    assert_eq!(
        d1.publish(
            "v1/devices/me/telemetry",
            1,
            r#"[{"ts": 1, "values": {"t": 1}}]"#
        )
        .await,
        Seen::PubAck(0x99),
        "ts 1 (1970) is older than retention"
    );
    assert_eq!(
        d1.publish("v1/devices/me/telemetry", 1, r#"{"t": 2}"#)
            .await,
        Seen::PubAck(0)
    );
    assert_eq!(
        d1.publish("v1/devices/me/telemetry", 1, r#"{"t": 3}"#)
            .await,
        Seen::PubAck(0x97)
    );
    assert_eq!(f.topic_count().await, 2);
    // The connection stays open after refusals.
    assert_eq!(d1.closed_within(Duration::from_millis(300)).await, None);
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_refusals_close_the_connection_without_a_puback() {
    let f = Fixture::new(1).await.unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    for (topic, payload) in [
        (
            "fleet/v1/telemetry",
            r#"{"device_id": "d2", "seq": 1, "metrics": {"t": 1}}"#,
        ),
        ("v1/gateway/telemetry", r#"{"d1": [{"t": 1}]}"#),
        ("v1/devices/me/telemetry", "not json"),
    ] {
        let mut d1 = v3::connect(addr, "tok-d1").await.unwrap();
        match d1.publish(topic, 1, payload).await {
            Seen::Closed(_) => {}
            other => panic!("{payload}: {other:?}"),
        }
    }
    assert_eq!(f.topic_count().await, 0);
    // A valid publish on a new connection is stored.
    let mut d1 = v3::connect(addr, "tok-d1").await.unwrap();
    assert_eq!(
        d1.publish("v1/devices/me/telemetry", 1, r#"{"t": 1}"#)
            .await,
        Seen::PubAck(0)
    );
    assert_eq!(f.topic_count().await, 1);
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_is_produced_qos_2_and_subscribe_are_refused() {
    let f = Fixture::new(1).await.unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    // QoS 0: no PUBACK; the reading arrives (polled: nothing tells the client when).
    let mut c = v3::connect(addr, "tok-d1").await.unwrap();
    assert_eq!(
        c.publish("v1/devices/me/telemetry", 0, r#"{"t": 1}"#).await,
        Seen::PubAck(0)
    );
    let mut c5 = v5::connect(addr, "tok-d2").await.unwrap();
    assert_eq!(
        c5.publish("v1/devices/me/telemetry", 0, r#"{"t": 2}"#)
            .await,
        Seen::PubAck(0)
    );
    plumbing::testing::eventually(
        "two QoS 0 readings on the topic",
        Duration::from_secs(20),
        || async {
            match f.topic_count().await {
                2 => Ok(()),
                n => Err(format!("{n} messages")),
            }
        },
    )
    .await
    .unwrap();
    // SUBSCRIBE: every filter refused.
    assert_eq!(
        c.subscribe("v1/devices/me/attributes").await,
        Seen::SubAck(vec![0x80])
    );
    assert_eq!(
        c5.subscribe("v1/devices/me/attributes").await,
        Seen::SubAck(vec![0x87])
    );
    // QoS 2: the connection is closed, nothing produced.
    assert!(matches!(
        c.publish("v1/devices/me/telemetry", 2, r#"{"t": 3}"#).await,
        Seen::Closed(_)
    ));
    assert!(matches!(
        c5.publish("v1/devices/me/telemetry", 2, r#"{"t": 4}"#)
            .await,
        Seen::Closed(_)
    ));
    assert_eq!(f.topic_count().await, 2);
    listener.stop().await;
}
