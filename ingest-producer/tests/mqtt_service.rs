//! The MQTT listener inside the whole service (`run_on`): a revoked token closes its open
//! sessions within seconds (through the NOTIFY reload), the connection limit, the CONNECT
//! timeout and the packet size hold, and with the broker stopped a QoS 1 publish gets no
//! PUBACK, then is stored exactly once after the broker returns and the client retransmits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use common::mqtt::{v3, v5, Seen};
use plumbing::config::KafkaArgs;
use plumbing::testing::{eventually, PrivateKafka, TestDb, TestTopics};
use schemas::LayoutChoice;
use tokio::io::AsyncReadExt;

/// A running service: its database, MQTT address, and how to stop it.
struct Service {
    db: TestDb,
    mqtt: SocketAddr,
    shutdown: plumbing::Shutdown,
    task: tokio::task::JoinHandle<Result<(), ingest_producer::Error>>,
}

fn free_port() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

impl Service {
    /// The service over a seeded database (see `common::seed`), credentials reloaded only on
    /// NOTIFY (the periodic reload is an hour).
    async fn start(kafka: &KafkaArgs, extra: &[&str]) -> Result<Self> {
        let db = TestDb::new(LayoutChoice::Postgres).await?;
        common::seed(&db).await?;
        let mqtt = free_port();
        let admin = free_port();
        let mut args = vec![
            "ingest-producer".to_owned(),
            "--database-url".into(),
            db.url.clone(),
            "--kafka-bootstrap-servers".into(),
            kafka.bootstrap_servers.clone(),
            "--telemetry-topic".into(),
            kafka.telemetry_topic.clone(),
            "--admin-listen".into(),
            admin.to_string(),
            "--credentials-refresh-interval".into(),
            "1h".into(),
            "--mqtt-listen".into(),
            mqtt.to_string(),
            "--instance-id".into(),
            "ingest-mqtt-test".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = ingest_producer::Config::try_parse_from(args)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let shutdown = plumbing::Shutdown::new();
        let task = tokio::spawn(ingest_producer::run_on(listener, config, shutdown.clone()));
        let client = reqwest::Client::new();
        eventually("ingest ready", Duration::from_secs(60), || async {
            let status = client
                .get(format!("http://{admin}/readyz"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .status();
            if status == 200 {
                Ok(())
            } else {
                Err(format!("/readyz {status}"))
            }
        })
        .await?;
        Ok(Service {
            db,
            mqtt,
            shutdown,
            task,
        })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_closes_its_open_sessions_within_seconds() {
    let kafka = plumbing::testing::kafka_args().await.unwrap();
    let topics = TestTopics::on(kafka, 1).await.unwrap();
    let service = Service::start(&topics.args, &[]).await.unwrap();
    let addr = service.mqtt;
    let mut d1 = v3::connect(addr, "tok-d1").await.unwrap();
    let mut d2 = v5::connect(addr, "tok-d2").await.unwrap();
    let mut gw = v3::connect(addr, "gw-acme").await.unwrap();
    let mut g1 = v5::connect(addr, "tok-g1").await.unwrap();
    assert_eq!(
        d1.publish("v1/devices/me/telemetry", 1, r#"{"t": 1}"#)
            .await,
        Seen::PubAck(0)
    );

    // A device's token replaced, a gateway token revoked (as the API does it).
    sqlx::query(
        "UPDATE devices SET token_hash = encode(sha256(('new-' || device_id)::bytea), 'hex') \
         WHERE device_id IN ('d1', 'd2')",
    )
    .execute(&service.db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE gateway_tokens SET revoked_at = now() WHERE tenant_id = 'acme'")
        .execute(&service.db.pool)
        .await
        .unwrap();
    let within = Duration::from_secs(10);
    assert!(
        d1.closed_within(within).await.is_some(),
        "3.1.1 device session"
    );
    let reason = d2.closed_within(within).await;
    assert!(reason.is_some(), "5 device session");
    assert!(gw.closed_within(within).await.is_some(), "gateway session");
    // Other sessions stay.
    assert_eq!(g1.closed_within(Duration::from_millis(500)).await, None);
    assert_eq!(
        g1.publish("v1/devices/me/telemetry", 1, r#"{"t": 1}"#)
            .await,
        Seen::PubAck(0)
    );
    // The old token cannot connect again.
    let refused = v3::connect_with(v3::options(addr, "again", Some("tok-d1")))
        .await
        .err();
    assert_eq!(refused, Some(Seen::Refused(5)));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_connect_timeout_and_packet_size_hold() {
    let kafka = plumbing::testing::kafka_args().await.unwrap();
    let topics = TestTopics::on(kafka, 1).await.unwrap();
    let service = Service::start(
        &topics.args,
        &[
            "--mqtt-max-connections",
            "2",
            "--mqtt-connect-timeout",
            "1s",
            "--mqtt-max-packet-bytes",
            "1024",
        ],
    )
    .await
    .unwrap();
    let addr = service.mqtt;
    let mut first = v3::connect(addr, "tok-d1").await.unwrap();
    let second = v5::connect(addr, "tok-d2").await.unwrap();
    // The third is refused: 3.1.1 code 3 (server unavailable), 5 reason 0x89 (server busy).
    let refused = v3::connect_with(v3::options(addr, "third", Some("tok-g1")))
        .await
        .err();
    assert_eq!(refused, Some(Seen::Refused(3)));
    let refused = v5::connect_with(v5::options(addr, "third", Some("tok-g1")))
        .await
        .err();
    assert_eq!(refused, Some(Seen::Refused(0x89)));
    // One closes: a place is free again (the count drops when the server sees the close).
    drop(second);
    eventually("a free connection", Duration::from_secs(10), || async {
        v3::connect_with(v3::options(addr, "third", Some("tok-g1")))
            .await
            .map(drop)
            .map_err(|seen| format!("{seen:?}"))
    })
    .await
    .unwrap();

    // A packet over 1,024 bytes closes the connection; nothing is produced.
    let big = format!(r#"{{"s": "{}"}}"#, "x".repeat(1500));
    assert!(matches!(
        first.publish("v1/devices/me/telemetry", 1, &big).await,
        Seen::Closed(_)
    ));

    // A connection that sends no CONNECT is closed after the timeout (1 s).
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed by the server: {read:?}"
    );
    assert_eq!(common::topic_count(&topics.args, 1).await, 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_stopped_no_puback_then_stored_exactly_once_after_the_retransmit() {
    let mut kafka = PrivateKafka::new().await.unwrap();
    let topics = TestTopics::on(kafka.kafka_args(), 1).await.unwrap();
    let service = Service::start(&topics.args, &["--kafka-delivery-timeout", "3s"])
        .await
        .unwrap();
    let addr = service.mqtt;
    let ts = chrono::Utc::now().timestamp_millis() - 1000;
    // A persistent session: after a reconnect the client sends its unacknowledged publishes
    // again (the server says a session is present).
    let mut options = v3::options(addr, "restart-client", Some("tok-d1"));
    options.set_clean_session(false);
    let mut client = v3::connect_with(options).await.unwrap();
    let first = format!(r#"{{"ts": {ts}, "values": {{"n": 1}}}}"#);
    assert_eq!(
        client.publish("v1/devices/me/telemetry", 1, &first).await,
        Seen::PubAck(0)
    );

    kafka.stop().await.unwrap();
    let second = format!(r#"{{"ts": {}, "values": {{"n": 2}}}}"#, ts + 1);
    // Kafka cannot take it: the connection is closed, no PUBACK.
    match client.publish("v1/devices/me/telemetry", 1, &second).await {
        Seen::Closed(_) => {}
        other => panic!("with the broker stopped: {other:?}"),
    }
    kafka.start().await.unwrap();
    // rumqttc reconnects and retransmits the publish; polled until its PUBACK.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut pubacks = 0;
    while pubacks == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no PUBACK after the broker returned"
        );
        match tokio::time::timeout(Duration::from_secs(30), client.events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => pubacks += 1,
            Ok(Ok(_)) | Err(_) => {}
            // Reconnect attempts while the broker is still coming up.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let records = common::consume_all(&topics.args, 1).await;
    let got: Vec<_> = records
        .iter()
        .map(|c| {
            (
                c.key.clone(),
                c.telemetry.time.timestamp_millis(),
                c.telemetry.metrics.clone(),
            )
        })
        .collect();
    let metrics = |n: i64| {
        std::collections::BTreeMap::from([("n".to_owned(), schemas::MetricValue::Long(n))])
    };
    assert_eq!(
        got,
        vec![
            ("acme/d1".to_owned(), ts, metrics(1)),
            ("acme/d1".to_owned(), ts + 1, metrics(2)),
        ]
    );
    service.stop().await;
}
