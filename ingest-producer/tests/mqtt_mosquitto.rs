//! A third-party MQTT client against the listener: Debian's `mosquitto_pub` (installed by
//! `deploy/local/deps.sh`), MQTT 3.1.1 and 5, as ThingsBoard's documentation tells devices to
//! use it (`-u <token>`, topic `v1/devices/me/telemetry`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Output;

use chrono::{DateTime, Utc};
use common::{mqtt, Fixture};
use schemas::MetricValue;

async fn mosquitto_pub(addr: SocketAddr, version: &str, token: &str, payload: &str) -> Output {
    tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-V", version, "-q", "1", "-d", "-i", "mosquitto-test"])
        .args(["-u", token, "-t", "v1/devices/me/telemetry", "-m", payload])
        .output()
        .await
        .expect("mosquitto_pub (Debian mosquitto-clients; deploy/local/deps.sh up installs it)")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_publishes_thingsboard_telemetry_over_3_1_1_and_5() {
    let f = Fixture::new(1).await.unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    let ts = Utc::now().timestamp_millis() - 1000;
    for (n, version) in ["mqttv311", "mqttv5"].into_iter().enumerate() {
        let payload = format!(
            r#"{{"ts": {}, "values": {{"temp": {n}.5}}}}"#,
            ts + n as i64
        );
        let output = mosquitto_pub(addr, version, "tok-d1", &payload).await;
        let seen = text(&output);
        assert!(output.status.success(), "{seen}");
        // mosquitto_pub -d logs the PUBACK it received (with its reason code on MQTT 5).
        let puback = match version {
            "mqttv5" => "received PUBACK (Mid: 1, RC:0)",
            _ => "received PUBACK (Mid: 1",
        };
        assert!(seen.contains(puback), "{seen}");
        // The PUBACK came after Kafka's acknowledgement: the record is there already.
        assert_eq!(f.topic_count().await, n as i64 + 1, "{seen}");
    }
    let records = f.consume_all().await;
    let got: Vec<_> = records
        .iter()
        .map(|c| {
            let t = &c.telemetry;
            (c.key.clone(), t.seq, t.time, t.metrics.get("temp").cloned())
        })
        .collect();
    let at = |n: i64| DateTime::<Utc>::from_timestamp_millis(ts + n).unwrap();
    assert_eq!(
        got,
        vec![
            (
                "acme/d1".to_owned(),
                0,
                at(0),
                Some(MetricValue::Double(0.5))
            ),
            (
                "acme/d1".to_owned(),
                0,
                at(1),
                Some(MetricValue::Double(1.5))
            ),
        ]
    );
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_sees_the_refusals() {
    let f = Fixture::new(1).await.unwrap();
    let listener = mqtt::listen(&f.app, &mqtt::args());
    let addr = listener.local_addr().unwrap();
    // A bad token: CONNACK refused, mosquitto_pub fails.
    for version in ["mqttv311", "mqttv5"] {
        let output = mosquitto_pub(addr, version, "nope", r#"{"t": 1}"#).await;
        let seen = text(&output);
        assert!(!output.status.success(), "{seen}");
        assert!(
            seen.to_lowercase().contains("connection refused")
                || seen.to_lowercase().contains("not authori")
                || seen.to_lowercase().contains("bad user name or password"),
            "{seen}"
        );
    }
    // An invalid payload over MQTT 5: PUBACK 0x99 (153).
    let output = mosquitto_pub(addr, "mqttv5", "tok-d1", r#"{"t": {"nested": 1}}"#).await;
    let seen = text(&output);
    assert!(seen.contains("received PUBACK (Mid: 1, RC:153)"), "{seen}");
    assert_eq!(f.topic_count().await, 0);
    listener.stop().await;
}
