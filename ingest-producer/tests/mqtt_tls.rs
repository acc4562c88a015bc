//! MQTT over TLS (`MQTT_TLS_LISTEN`): a certificate authority and a server certificate made in
//! the test (rcgen); Debian's `mosquitto_pub --cafile` (3.1.1 and 5) and rumqttc (rustls)
//! publish at QoS 1 through TLS and the readings are on the topic exactly as sent; a client
//! that does not trust the server's certificate gets nothing through; a missing or wrong
//! certificate or key ends ingest at start-up with an error naming the setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Parser;
use common::{mqtt, Fixture};
use ingest_producer::mqtt::{MqttArgs, MqttListener};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use schemas::MetricValue;

/// A scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(plumbing::testing::unique_name("mqtt_tls"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// A certificate authority (`ca.pem`) and a server certificate it signed for `localhost` and
/// 127.0.0.1 (`cert.pem`, key `key.pem`); `other-ca.pem` is an authority that signed nothing.
fn make_pki(dir: &Scratch) {
    let authority = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (params, key, cert)
    };
    let (ca_params, ca_key, ca_cert) = authority("fleetstream test CA");
    let (_, _, other_cert) = authority("another CA");
    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "fleetstream ingest");
    let issuer = Issuer::new(ca_params, ca_key);
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();
    std::fs::write(dir.path("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path("other-ca.pem"), other_cert.pem()).unwrap();
    std::fs::write(dir.path("cert.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path("key.pem"), server_key.serialize_pem()).unwrap();
}

fn tls_args(cert: &Path, key: &Path) -> MqttArgs {
    MqttArgs {
        mqtt_tls_cert: Some(cert.to_owned()),
        mqtt_tls_key: Some(key.to_owned()),
        ..mqtt::args()
    }
}

/// A plain and a TLS listener (ephemeral ports) serving the fixture's app.
fn listen_tls(f: &Fixture, dir: &Scratch) -> MqttListener {
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let args = tls_args(&dir.path("cert.pem"), &dir.path("key.pem"));
    MqttListener::start_tls_on(plain, tls, f.app.clone(), &args).unwrap()
}

async fn mosquitto_pub_tls(
    addr: SocketAddr,
    cafile: &Path,
    version: &str,
    payload: &str,
) -> Output {
    // By name: mosquitto checks the certificate against the host as a DNS name.
    tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &addr.port().to_string()])
        .args(["--cafile", cafile.to_str().unwrap()])
        .args(["-V", version, "-q", "1", "-d", "-i", "mosquitto-tls-test"])
        .args([
            "-u",
            "tok-d1",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            payload,
        ])
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

/// (key, time, temp) of every record on the topic.
async fn temps(f: &Fixture) -> Vec<(String, DateTime<Utc>, Option<MetricValue>)> {
    f.consume_all()
        .await
        .iter()
        .map(|c| {
            let t = &c.telemetry;
            (c.key.clone(), t.time, t.metrics.get("temp").cloned())
        })
        .collect()
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_publishes_over_tls_and_the_reading_is_produced_exactly() {
    let dir = Scratch::new();
    make_pki(&dir);
    let f = Fixture::new(1).await.unwrap();
    let listener = listen_tls(&f, &dir);
    let addr = listener.tls_local_addr().unwrap();
    let ts = Utc::now().timestamp_millis() - 1000;
    for (n, version) in ["mqttv311", "mqttv5"].into_iter().enumerate() {
        let payload = format!(
            r#"{{"ts": {}, "values": {{"temp": {n}.25}}}}"#,
            ts + n as i64
        );
        let output = mosquitto_pub_tls(addr, &dir.path("ca.pem"), version, &payload).await;
        let seen = text(&output);
        assert!(output.status.success(), "{seen}");
        let puback = match version {
            "mqttv5" => "received PUBACK (Mid: 1, RC:0)",
            _ => "received PUBACK (Mid: 1",
        };
        assert!(seen.contains(puback), "{seen}");
        // The PUBACK came after Kafka's acknowledgement.
        assert_eq!(f.topic_count().await, n as i64 + 1, "{seen}");
    }
    assert_eq!(
        temps(&f).await,
        vec![
            (
                "acme/d1".to_owned(),
                at(ts),
                Some(MetricValue::Double(0.25))
            ),
            (
                "acme/d1".to_owned(),
                at(ts + 1),
                Some(MetricValue::Double(1.25))
            ),
        ]
    );

    // A client that does not trust the certificate gets nothing through.
    let output = mosquitto_pub_tls(
        addr,
        &dir.path("other-ca.pem"),
        "mqttv311",
        r#"{"temp": 9}"#,
    )
    .await;
    let seen = text(&output);
    assert!(!output.status.success(), "{seen}");
    assert!(
        seen.to_lowercase().contains("certificate verify failed"),
        "{seen}"
    );
    // Plain MQTT on the TLS port is not understood either (the TLS handshake fails).
    let output = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-q", "1", "-u", "tok-d1", "-t", "v1/devices/me/telemetry"])
        .args(["-m", r#"{"temp": 9}"#])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    assert_eq!(f.topic_count().await, 2);
    listener.stop().await;
}

/// A rustls client configuration (ring) trusting the test authority only.
fn rustls_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_publishes_over_tls_on_3_1_1_and_5() {
    let dir = Scratch::new();
    make_pki(&dir);
    let f = Fixture::new(1).await.unwrap();
    let listener = listen_tls(&f, &dir);
    let addr = listener.tls_local_addr().unwrap();
    let tls = rustls::ClientConfig::clone(&rustls_client(&dir.path("ca.pem")));
    let ts = Utc::now().timestamp_millis() - 1000;

    let mut options = mqtt::v3::options(addr, "tls-v3", Some("tok-d1"));
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls.clone())),
    ));
    let mut v3 = mqtt::v3::connect_with(options).await.unwrap();
    let payload = format!(r#"{{"ts": {ts}, "values": {{"temp": 20.5}}}}"#);
    assert_eq!(
        v3.publish("v1/devices/me/telemetry", 1, &payload).await,
        mqtt::Seen::PubAck(0)
    );

    let mut options = mqtt::v5::options(addr, "tls-v5", Some("tok-d1"));
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    let mut v5 = mqtt::v5::connect_with(options).await.unwrap();
    let payload = format!(r#"{{"ts": {}, "values": {{"temp": 21.5}}}}"#, ts + 1);
    assert_eq!(
        v5.publish("v1/devices/me/telemetry", 1, &payload).await,
        mqtt::Seen::PubAck(0)
    );
    // A refusal inside TLS is the same as outside: MQTT 5 PUBACK 0x99.
    assert_eq!(
        v5.publish("v1/devices/me/telemetry", 1, r#"{"temp": {"x": 1}}"#)
            .await,
        mqtt::Seen::PubAck(0x99)
    );
    assert_eq!(
        temps(&f).await,
        vec![
            (
                "acme/d1".to_owned(),
                at(ts),
                Some(MetricValue::Double(20.5))
            ),
            (
                "acme/d1".to_owned(),
                at(ts + 1),
                Some(MetricValue::Double(21.5))
            ),
        ]
    );
    listener.stop().await;
}

/// Runs ingest with `extra` settings until it ends by itself (it must, within 30 s); its
/// error text.
async fn start_up_error(f: &Fixture, extra: &[&str]) -> String {
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut args = vec![
        "ingest-producer".to_owned(),
        "--mqtt-listen".into(),
        "off".into(),
        "--database-url".into(),
        f._db.url.clone(),
        "--kafka-bootstrap-servers".into(),
        f.topics.args.bootstrap_servers.clone(),
        "--telemetry-topic".into(),
        f.topics.args.telemetry_topic.clone(),
        "--admin-listen".into(),
        admin.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = ingest_producer::Config::try_parse_from(args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = plumbing::Shutdown::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        ingest_producer::run_on(listener, config, shutdown.clone()),
    )
    .await;
    shutdown.cancel();
    match ended {
        Ok(Err(err)) => err.to_string(),
        Ok(Ok(())) => panic!("ingest stopped without an error"),
        Err(_) => panic!("ingest still running after 30 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_or_key_ends_ingest_at_start_up_naming_the_setting() {
    let dir = Scratch::new();
    make_pki(&dir);
    let f = Fixture::new(1).await.unwrap();
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let missing = dir.path("missing.pem");
    let missing = missing.to_str().unwrap();
    let listen = ["--mqtt-tls-listen", "127.0.0.1:0"];
    let with = |extra: &[&'static str]| {
        let mut all: Vec<String> = listen.iter().map(|s| s.to_string()).collect();
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            with(&[]),
            "MQTT_TLS_LISTEN is set but MQTT_TLS_CERT is not".to_owned(),
        ),
        (
            [with(&["--mqtt-tls-cert"]), vec![cert.to_owned()]].concat(),
            "MQTT_TLS_LISTEN is set but MQTT_TLS_KEY is not".to_owned(),
        ),
        (
            [
                with(&["--mqtt-tls-cert"]),
                vec![missing.to_owned(), "--mqtt-tls-key".into(), key.to_owned()],
            ]
            .concat(),
            format!(
                "invalid setting `MQTT_TLS_CERT` ({missing}): cannot read it: \
                 No such file or directory (os error 2)"
            ),
        ),
        (
            [
                with(&["--mqtt-tls-cert"]),
                vec![cert.to_owned(), "--mqtt-tls-key".into(), missing.to_owned()],
            ]
            .concat(),
            format!(
                "invalid setting `MQTT_TLS_KEY` ({missing}): cannot read it: \
                 No such file or directory (os error 2)"
            ),
        ),
        // The certificate given as the key: a PEM file without a private key.
        (
            [
                with(&["--mqtt-tls-cert"]),
                vec![cert.to_owned(), "--mqtt-tls-key".into(), cert.to_owned()],
            ]
            .concat(),
            format!("invalid setting `MQTT_TLS_KEY` ({cert}): no PEM private key: no items found"),
        ),
        // The key given as the certificate.
        (
            [
                with(&["--mqtt-tls-cert"]),
                vec![key.to_owned(), "--mqtt-tls-key".into(), key.to_owned()],
            ]
            .concat(),
            format!("invalid setting `MQTT_TLS_CERT` ({key}): no CERTIFICATE in the file"),
        ),
    ];
    for (extra, expected) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        assert_eq!(start_up_error(&f, &extra).await, expected, "{extra:?}");
    }
    // A key that is not the certificate's: rustls refuses the pair.
    let other = KeyPair::generate().unwrap();
    std::fs::write(dir.path("other-key.pem"), other.serialize_pem()).unwrap();
    let other = dir.path("other-key.pem");
    let other = other.to_str().unwrap();
    let error = start_up_error(
        &f,
        &[
            listen[0],
            listen[1],
            "--mqtt-tls-cert",
            cert,
            "--mqtt-tls-key",
            other,
        ],
    )
    .await;
    assert!(
        error.starts_with(&format!("invalid setting `MQTT_TLS_KEY` ({other}): ")),
        "{error}"
    );
}
