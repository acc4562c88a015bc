//! MQTT device ingest (3.1.1 and 5), ThingsBoard's device API, on the HTTP ingest's one path.
//!
//! A device connects with its **token as the username** (ThingsBoard's access-token
//! scheme; the password is ignored) and publishes to a telemetry topic
//! ([`payload`] lists the topics and their payloads). Each PUBLISH goes through the steps of
//! `POST /v1/telemetry`: the payload becomes readings validated by the same function, each is
//! authorized against the token ([`crate::http::authorize_all`]), rate limited per device and
//! tenant in the same buckets, encoded and produced ([`crate::http::produce`]). A PUBLISH is
//! all or nothing (`produce`'s atomic mode): one refused reading refuses it whole.
//!
//! **The PUBACK of a QoS 1 publish goes out only after Kafka acknowledged every one of its
//! readings.** A publish Kafka did not take (broker away past `KAFKA_DELIVERY_TIMEOUT`, queue
//! full) gets no PUBACK: the connection is closed, and the client sends it again once it
//! reconnects (a re-sent reading is the same point, stored once). At most `MQTT_MAX_IN_FLIGHT`
//! publishes of one connection are handled at once (MQTT 5's receive maximum); the others wait
//! in the socket. PUBACKs of one connection go out in the order of the publishes, as MQTT
//! 3.1.1 requires, however the Kafka acknowledgements come back.
//!
//! Refusals:
//!
//! | | MQTT 5 | MQTT 3.1.1 |
//! |---|---|---|
//! | unknown or revoked token | CONNACK 0x86 | CONNACK 5 |
//! | no username, or the tenant suspended | CONNACK 0x87 | CONNACK 5 |
//! | connection limit reached | CONNACK 0x89 | CONNACK 3 |
//! | invalid payload or reading | PUBACK 0x99 | connection closed, no PUBACK |
//! | topic or device the token may not write | PUBACK 0x87 | connection closed, no PUBACK |
//! | rate limit | PUBACK 0x97 | connection closed, no PUBACK |
//! | Kafka did not acknowledge | connection closed, no PUBACK | connection closed, no PUBACK |
//! | QoS 2 publish | DISCONNECT 0x9B | connection closed |
//! | SUBSCRIBE | SUBACK 0x87 per filter | SUBACK 0x80 per filter |
//!
//! On 3.1.1, whose PUBACK has no reason code, a refused publish is counted, logged and the
//! connection closed, as ThingsBoard does for invalid payloads; a QoS 0 publish refused on
//! MQTT 5 is counted and logged. (ThingsBoard closes the connection on a rate limit on MQTT 5
//! too, with DISCONNECT 0x83; we answer PUBACK 0x97 and keep it.)
//!
//! Sessions: nothing is subscribed and inbound QoS 1 needs no server state, so a client that
//! asks for a persistent session (`clean session` 0) is told one is present: it then sends its
//! unacknowledged publishes again after a reconnect, as MQTT requires.
//!
//! A token revoked (or its tenant suspended) closes the device's open sessions at the next
//! credentials reload, which a NOTIFY triggers within a second.
//!
//! The server is `ntex-mqtt` on its own threads (an ntex `System` with `MQTT_WORKERS`
//! workers, default one per core, each a single-threaded tokio runtime); a publish's ingest
//! steps (validation, Avro, the Kafka produce and its acknowledgement) run on the worker that
//! holds its connection.
//!
//! **TLS.** With `MQTT_TLS_LISTEN` set, a second listener serves the same MQTT inside TLS 1.2
//! or 1.3 (rustls through ntex-tls, certificate chain and key from the PEM files
//! `MQTT_TLS_CERT` and `MQTT_TLS_KEY`); the same workers, limits and connection count serve
//! both. The files are read at start-up: a missing or unreadable file, one without a
//! certificate or key, or a key that does not match the certificate stops the service with an
//! error naming the setting. Devices authenticate with their token as on the plain listener
//! (no client certificates).

pub mod payload;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Args;
use futures::channel::oneshot;
use ntex::service::cfg::SharedCfg;
use ntex::service::{chain_factory, fn_factory_with_config, fn_service, ServiceFactory};
use ntex::time::{Millis, Seconds};
use ntex::util::{ByteString, Bytes};
use ntex_mqtt::{v3, v5, MqttServer, MqttServiceConfig, QoS};
use plumbing::config::parse_duration;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{debug, info, warn};

use crate::credentials::{token_hash, Principal};
use crate::error::Rejection;
use crate::http::{authorize_all, produce, App};
use payload::Topic;

/// How often a worker looks whether the credentials were reloaded (and its sessions' tokens
/// must be checked again).
const REVOCATION_CHECK: Millis = Millis(250);

/// The MQTT listener's settings, from flags or the environment.
#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// Address of the MQTT listener (3.1.1 and 5), or several separated by commas; `off`
    /// disables it. (A client host reaches one address from at most ~28,000 ephemeral ports;
    /// several addresses let one load generator hold more connections.)
    #[arg(long, env = "MQTT_LISTEN", default_value = "127.0.0.1:1883", value_parser = parse_listen)]
    pub mqtt_listen: Listen,
    /// Largest MQTT packet accepted, in bytes (a larger one closes the connection).
    #[arg(long, env = "MQTT_MAX_PACKET_BYTES", default_value_t = 65_536)]
    pub mqtt_max_packet_bytes: u32,
    /// Longest keep-alive a client may use; a client asking for more (or for none) is held to
    /// it (MQTT 5 is told so in the CONNACK), and the connection is closed after 1.5 times the
    /// keep-alive without a packet.
    #[arg(long, env = "MQTT_MAX_KEEP_ALIVE", default_value = "300s", value_parser = parse_duration)]
    pub mqtt_max_keep_alive: Duration,
    /// Time a new connection has to send its CONNECT (slow-loris guard).
    #[arg(long, env = "MQTT_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub mqtt_connect_timeout: Duration,
    /// Open MQTT connections at most; more are refused (CONNACK 3 / 0x89).
    #[arg(long, env = "MQTT_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub mqtt_max_connections: usize,
    /// Publishes of one connection handled at once (MQTT 5 receive maximum).
    #[arg(long, env = "MQTT_MAX_IN_FLIGHT", default_value_t = 16)]
    pub mqtt_max_in_flight: u16,
    /// Threads serving MQTT connections and their publishes (default: one per core).
    #[arg(long, env = "MQTT_WORKERS", default_value_t = default_workers())]
    pub mqtt_workers: usize,
    /// Address of the MQTT-over-TLS listener (e.g. `0.0.0.0:8883`), or several separated by
    /// commas; `off` disables it. Needs `MQTT_TLS_CERT` and `MQTT_TLS_KEY`.
    #[arg(long, env = "MQTT_TLS_LISTEN", default_value = "off", value_parser = parse_listen)]
    pub mqtt_tls_listen: Listen,
    /// The TLS listener's certificate chain, PEM, the server's own certificate first.
    #[arg(long, env = "MQTT_TLS_CERT")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// The TLS listener's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "MQTT_TLS_KEY")]
    pub mqtt_tls_key: Option<PathBuf>,
}

/// `MQTT_LISTEN`, `MQTT_TLS_LISTEN`: addresses; none when disabled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listen(pub Vec<SocketAddr>);

impl Listen {
    /// No listener.
    pub fn off() -> Self {
        Listen(Vec::new())
    }
}

fn parse_listen(value: &str) -> Result<Listen, String> {
    match value.trim() {
        "" | "off" | "none" | "disabled" => Ok(Listen::off()),
        list => list
            .split(',')
            .map(|addr| {
                addr.trim().parse().map_err(|err| {
                    format!("{addr}: {err}: expected host:port[,host:port...] or off")
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Listen),
    }
}

/// Errors starting the listener.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot listen on {setting} {addr}: {source}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MQTT_TLS_LISTEN is set but {0} is not")]
    TlsSettingMissing(&'static str),
    #[error("invalid setting `{setting}` ({path}): {reason}")]
    Tls {
        setting: &'static str,
        path: String,
        reason: String,
    },
    #[error("mqtt listener thread ended before the server started")]
    NotStarted,
}

/// The TLS listener's server configuration from `MQTT_TLS_CERT` and `MQTT_TLS_KEY`.
pub fn tls_config(args: &MqttArgs) -> Result<Arc<rustls::ServerConfig>, MqttError> {
    let cert_path = args
        .mqtt_tls_cert
        .as_deref()
        .ok_or(MqttError::TlsSettingMissing("MQTT_TLS_CERT"))?;
    let key_path = args
        .mqtt_tls_key
        .as_deref()
        .ok_or(MqttError::TlsSettingMissing("MQTT_TLS_KEY"))?;
    let invalid = |setting: &'static str, path: &Path, reason: String| MqttError::Tls {
        setting,
        path: path.display().to_string(),
        reason,
    };
    // Read first, so that a missing file is reported as such (the PEM readers say "no items").
    let cert_pem = std::fs::read(cert_path)
        .map_err(|err| invalid("MQTT_TLS_CERT", cert_path, format!("cannot read it: {err}")))?;
    let key_pem = std::fs::read(key_path)
        .map_err(|err| invalid("MQTT_TLS_KEY", key_path, format!("cannot read it: {err}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid("MQTT_TLS_CERT", cert_path, format!("not PEM: {err}")))?;
    if chain.is_empty() {
        return Err(invalid(
            "MQTT_TLS_CERT",
            cert_path,
            "no CERTIFICATE in the file".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| {
        invalid(
            "MQTT_TLS_KEY",
            key_path,
            format!("no PEM private key: {err}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| invalid("MQTT_TLS_CERT", cert_path, err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        // The chain parsed; what fails here is the key (unsupported, or not the certificate's).
        .map_err(|err| invalid("MQTT_TLS_KEY", key_path, err.to_string()))?;
    Ok(Arc::new(config))
}

/// One MQTT worker per core the process may use.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn bind(setting: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, MqttError> {
    std::net::TcpListener::bind(addr).map_err(|source| MqttError::Bind {
        setting,
        addr,
        source,
    })
}

/// What every connection shares, across workers.
#[derive(Debug)]
struct Shared {
    app: App,
    args: MqttArgs,
    connections: AtomicUsize,
    next_id: AtomicU64,
}

/// A running MQTT listener (plain, TLS, or both).
#[derive(Debug)]
pub struct MqttListener {
    addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    server: ntex::server::Server,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Bound sockets of the TLS listener, and its configuration.
type TlsSockets = (Vec<std::net::TcpListener>, Arc<rustls::ServerConfig>);

impl MqttListener {
    /// Binds `MQTT_LISTEN` and `MQTT_TLS_LISTEN` and starts serving; `None` when both are
    /// disabled.
    pub fn start(app: App, args: &MqttArgs) -> Result<Option<Self>, MqttError> {
        // The certificate and key first: a bad path fails before anything is bound.
        let tls = if args.mqtt_tls_listen.0.is_empty() {
            None
        } else {
            Some(tls_config(args)?)
        };
        let plain = (args.mqtt_listen.0.iter())
            .map(|addr| bind("MQTT_LISTEN", *addr))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match tls {
            Some(config) => {
                let sockets = (args.mqtt_tls_listen.0.iter())
                    .map(|addr| bind("MQTT_TLS_LISTEN", *addr))
                    .collect::<Result<Vec<_>, _>>()?;
                Some((sockets, config))
            }
            None => None,
        };
        if plain.is_empty() && tls.is_none() {
            return Ok(None);
        }
        raise_fd_limit(args.mqtt_max_connections);
        Self::serve(plain, tls, app, args).map(Some)
    }

    /// Starts serving on a bound listener (tests bind port 0).
    pub fn start_on(
        listener: std::net::TcpListener,
        app: App,
        args: &MqttArgs,
    ) -> Result<Self, MqttError> {
        Self::serve(vec![listener], None, app, args)
    }

    /// Starts serving MQTT on `listener` and MQTT over TLS on `tls_listener`, with the
    /// certificate and key of `args` (tests bind port 0).
    pub fn start_tls_on(
        listener: std::net::TcpListener,
        tls_listener: std::net::TcpListener,
        app: App,
        args: &MqttArgs,
    ) -> Result<Self, MqttError> {
        let config = tls_config(args)?;
        Self::serve(
            vec![listener],
            Some((vec![tls_listener], config)),
            app,
            args,
        )
    }

    fn serve(
        plain: Vec<std::net::TcpListener>,
        tls: Option<TlsSockets>,
        app: App,
        args: &MqttArgs,
    ) -> Result<Self, MqttError> {
        let addrs = (plain.iter())
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let tls_addrs = (tls.iter().flat_map(|(sockets, _)| sockets))
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            app,
            args: args.clone(),
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
        });
        let service_args = args.clone();
        let workers = args.mqtt_workers.max(1);
        // Per worker; a little over the limit so that connections past it are answered with
        // a CONNACK refusal instead of waiting in the accept queue.
        let maxconn = args.mqtt_max_connections / workers + 1024;
        let (started, server) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mqtt".to_owned())
            .spawn(move || {
                ntex::rt::System::build()
                    .name("mqtt")
                    .build(ntex::rt::DefaultRuntime)
                    .block_on(async move {
                        let builder = build_server(plain, tls, shared, &service_args);
                        let server = match builder {
                            Ok(builder) => builder
                                .workers(workers)
                                .maxconn(maxconn)
                                .disable_signals()
                                .run(),
                            Err(err) => {
                                let _ = started.send(Err(err));
                                return;
                            }
                        };
                        let _ = started.send(Ok(server.clone()));
                        if let Err(err) = server.await {
                            warn!(error = %err, "mqtt server ended");
                        }
                    });
            })?;
        let server = server.recv().map_err(|_| MqttError::NotStarted)??;
        for addr in &addrs {
            info!(%addr, "mqtt listening");
        }
        for addr in &tls_addrs {
            info!(%addr, "mqtt over tls listening");
        }
        Ok(MqttListener {
            addrs,
            tls_addrs,
            server,
            thread: Some(thread),
        })
    }

    /// The (first) plain listener's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addrs.first().copied()
    }

    /// The (first) TLS listener's address.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_addrs.first().copied()
    }

    /// Stops accepting, closes the connections and waits for the listener's thread.
    pub async fn stop(mut self) {
        self.server.stop(false).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        info!("mqtt stopped");
    }
}

/// Raises the open-file limit for `MQTT_MAX_CONNECTIONS` connections (see
/// [`crate::fd_limit`]); says what it did, and warns when the limit stays too low.
fn raise_fd_limit(max_connections: usize) {
    let needed = max_connections as u64 + crate::fd_limit::RESERVE;
    match crate::fd_limit::raise(needed) {
        Ok(limit) if limit.allows(needed) => {
            if limit.now != limit.before {
                info!(%limit, max_connections, "open-file limit raised for MQTT_MAX_CONNECTIONS");
            }
        }
        Ok(limit) => warn!(
            %limit,
            needed,
            max_connections,
            "open-file limit below what MQTT_MAX_CONNECTIONS needs: connections past it fail"
        ),
        Err(err) => warn!(error = %err, "cannot read or raise the open-file limit"),
    }
}

/// The ntex server with its listeners: `mqtt-<n>` (plain) and `mqtts-<n>` (TLS in front of
/// the same MQTT service).
fn build_server(
    plain: Vec<std::net::TcpListener>,
    tls: Option<TlsSockets>,
    shared: Arc<Shared>,
    args: &MqttArgs,
) -> std::io::Result<ntex::server::ServerBuilder> {
    let mut builder = ntex::server::build();
    for (n, listener) in plain.into_iter().enumerate() {
        let name = format!("mqtt-{n}");
        let shared = shared.clone();
        builder = builder
            .listen(&name, listener, async move |_| worker(shared.clone()))?
            .config(&name, SharedCfg::new("MQTT").add(service_config(args)));
    }
    let Some((sockets, tls)) = tls else {
        return Ok(builder);
    };
    for (n, listener) in sockets.into_iter().enumerate() {
        let name = format!("mqtts-{n}");
        let (shared, tls) = (shared.clone(), tls.clone());
        let handshake =
            ntex_tls::TlsConfig::new().set_handshake_timeout(seconds(args.mqtt_connect_timeout));
        builder = builder
            .listen(&name, listener, async move |_| {
                chain_factory(ntex_tls::rustls::TlsAcceptor::new(tls.clone()))
                    // A failed handshake ends that connection only.
                    .map_err(|err| {
                        debug!(error = %err, "mqtt tls handshake failed");
                        ntex_mqtt::MqttError::Service(Closed)
                    })
                    .and_then(worker(shared.clone()))
            })?
            .config(
                &name,
                SharedCfg::new("MQTTS")
                    .add(service_config(args))
                    .add(handshake),
            );
    }
    Ok(builder)
}

/// The MQTT codec's limits and timeouts.
fn service_config(args: &MqttArgs) -> MqttServiceConfig {
    MqttServiceConfig::new()
        .set_max_qos(QoS::AtLeastOnce)
        .set_max_size(args.mqtt_max_packet_bytes)
        .set_max_receive(args.mqtt_max_in_flight.max(1))
        .set_max_receive_size(0)
        .set_connect_timeout(seconds(args.mqtt_connect_timeout))
        .set_handshake_timeout(seconds(args.mqtt_connect_timeout))
        .protocol_version_timeout(seconds(args.mqtt_connect_timeout))
}

fn seconds(duration: Duration) -> Seconds {
    Seconds(u16::try_from(duration.as_secs().max(1)).unwrap_or(u16::MAX))
}

/// An open session in a worker's registry: what to re-check and how to close it.
struct Entry {
    hash: String,
    principal: Principal,
    sink: Sink,
}

enum Sink {
    V3(v3::MqttSink),
    V5(v5::MqttSink),
}

/// A worker's open sessions (ntex sessions live on their worker's thread).
#[derive(Default)]
struct Registry {
    sessions: RefCell<HashMap<u64, Entry>>,
}

/// One connection's state.
struct Conn {
    id: u64,
    shared: Arc<Shared>,
    registry: Rc<Registry>,
    principal: Principal,
    protocol: &'static str,
    /// Completion of the previous publish of this connection: a publish answers after it, so
    /// PUBACKs keep the order of the publishes.
    previous: RefCell<Option<oneshot::Receiver<()>>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.registry.sessions.borrow_mut().remove(&self.id);
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::mqtt_disconnected(self.protocol);
    }
}

/// Why a CONNECT was refused.
enum Refusal {
    BadToken,
    NotAuthorized,
    Busy,
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::Busy => "connection_limit",
        }
    }
}

impl Shared {
    /// Checks the token and the connection limit; on success the connection is counted.
    fn admit(&self, username: Option<&ByteString>) -> Result<(Principal, String), Refusal> {
        let Some(token) = username.map(|u| u.as_str()).filter(|t| !t.is_empty()) else {
            return Err(Refusal::NotAuthorized);
        };
        let hash = token_hash(token);
        let principal = self
            .app
            .credentials()
            .authenticate_hash(&hash)
            .map_err(|rejection| match rejection.status.as_u16() {
                401 => Refusal::BadToken,
                _ => Refusal::NotAuthorized,
            })?;
        let open = self.connections.fetch_add(1, Ordering::AcqRel);
        if open >= self.args.mqtt_max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Busy);
        }
        Ok((principal, hash))
    }

    /// The keep-alive a client gets: its own, at most `MQTT_MAX_KEEP_ALIVE` (and that when it
    /// asked for none).
    fn keep_alive(&self, asked: u16) -> u16 {
        let max = u16::try_from(self.args.mqtt_max_keep_alive.as_secs().max(1)).unwrap_or(u16::MAX);
        if asked == 0 || asked > max {
            max
        } else {
            asked
        }
    }
}

/// Error of the publish services: the connection is closed without an acknowledgement.
#[derive(Debug)]
struct Closed;

impl From<()> for Closed {
    fn from((): ()) -> Self {
        Closed
    }
}

impl TryFrom<Closed> for v5::PublishAck {
    type Error = Closed;

    fn try_from(closed: Closed) -> Result<Self, Closed> {
        Err(closed)
    }
}

/// Builds one worker's server: the registry of its sessions, the task that closes revoked
/// ones, the 3.1.1 and 5 services.
/// Generic over the I/O filter: the plain listeners' sockets, or TLS over them.
fn worker<F: ntex::io::Filter>(
    shared: Arc<Shared>,
) -> impl ServiceFactory<
    ntex::io::Io<F>,
    SharedCfg,
    Response = (),
    Error = ntex_mqtt::MqttError<Closed>,
    InitError = (),
> {
    let registry = Rc::new(Registry::default());
    ntex::rt::spawn(close_revoked(shared.clone(), registry.clone()));
    let (s3, r3) = (shared.clone(), registry.clone());
    let (s5, r5) = (shared, registry);
    MqttServer::new()
        .v3(v3::MqttServer::new(move |hs: v3::Handshake| {
            let (shared, registry) = (s3.clone(), r3.clone());
            async move { Ok::<_, Closed>(handshake_v3(hs, shared, registry)) }
        })
        .protocol(fn_factory_with_config(async |_: v3::Session<Conn>| {
            Ok::<_, Closed>(fn_service(async |msg: v3::ProtocolMessage| {
                Ok::<_, Closed>(match msg {
                    v3::ProtocolMessage::Subscribe(mut subscribe) => {
                        crate::metrics::mqtt_subscribe_refused("3.1.1");
                        subscribe.iter_mut().for_each(|mut s| s.fail());
                        subscribe.ack()
                    }
                    msg => msg.ack(),
                })
            }))
        }))
        .publish(fn_factory_with_config(
            async |session: v3::Session<Conn>| {
                Ok::<_, Closed>(fn_service(move |publish: v3::Publish| {
                    let session = session.clone();
                    async move {
                        let outcome = handle(
                            &session,
                            publish.qos(),
                            publish.publish_topic(),
                            publish.read_all().await,
                        )
                        .await;
                        match outcome {
                            Ok(()) => Ok(()),
                            // 3.1.1 has no PUBACK reason: the connection is closed (ThingsBoard).
                            Err(_) => Err(Closed),
                        }
                    }
                }))
            },
        )))
        .v5(v5::MqttServer::new(move |hs: v5::Handshake| {
            let (shared, registry) = (s5.clone(), r5.clone());
            async move { Ok::<_, Closed>(handshake_v5(hs, shared, registry)) }
        })
        .protocol(fn_factory_with_config(async |_: v5::Session<Conn>| {
            Ok::<_, Closed>(fn_service(async |msg: v5::ProtocolMessage| {
                Ok::<_, Closed>(match msg {
                    v5::ProtocolMessage::Subscribe(mut subscribe) => {
                        crate::metrics::mqtt_subscribe_refused("5");
                        subscribe
                            .iter_mut()
                            .for_each(|mut s| s.fail(v5::codec::SubscribeAckReason::NotAuthorized));
                        subscribe.ack()
                    }
                    msg => msg.ack(),
                })
            }))
        }))
        .publish(fn_factory_with_config(
            async |session: v5::Session<Conn>| {
                Ok::<_, Closed>(fn_service(move |publish: v5::Publish| {
                    let session = session.clone();
                    async move {
                        let outcome = handle(
                            &session,
                            publish.qos(),
                            publish.publish_topic(),
                            publish.read_all().await,
                        )
                        .await;
                        match outcome {
                            Ok(()) => Ok(publish.ack()),
                            Err(Failure::Refused(reason, rejection)) => Ok(publish
                                .ack()
                                .reason_code(reason)
                                .reason(ByteString::from(rejection.error))),
                            Err(Failure::Close) => Err(Closed),
                        }
                    }
                }))
            },
        )))
}

fn handshake_v3(
    hs: v3::Handshake,
    shared: Arc<Shared>,
    registry: Rc<Registry>,
) -> v3::HandshakeAck<Conn> {
    let packet = hs.packet();
    match shared.admit(packet.username.as_ref()) {
        Ok((principal, hash)) => {
            let idle = keep_alive_idle(shared.keep_alive(packet.keep_alive));
            let persistent = !packet.clean_session;
            let conn = open(
                &shared,
                &registry,
                principal,
                hash,
                "3.1.1",
                Sink::V3(hs.sink()),
            );
            hs.ack(conn, persistent).idle_timeout(Seconds(idle))
        }
        Err(refusal) => {
            crate::metrics::mqtt_connect_refused("3.1.1", refusal.label());
            match refusal {
                // ThingsBoard answers 4 for an unknown token sent as username; the issue (and
                // many device SDKs' error tables) expect 5, "not authorized".
                Refusal::BadToken | Refusal::NotAuthorized => hs.not_authorized(),
                Refusal::Busy => hs.service_unavailable(),
            }
        }
    }
}

fn handshake_v5(
    hs: v5::Handshake,
    shared: Arc<Shared>,
    registry: Rc<Registry>,
) -> v5::HandshakeAck<Conn> {
    let packet = hs.packet();
    match shared.admit(packet.username.as_ref()) {
        Ok((principal, hash)) => {
            let asked = packet.keep_alive;
            let keep_alive = shared.keep_alive(asked);
            let persistent = !packet.clean_start;
            let conn = open(
                &shared,
                &registry,
                principal,
                hash,
                "5",
                Sink::V5(hs.sink()),
            );
            hs.ack(conn)
                .keep_alive(keep_alive_idle(keep_alive))
                .with(|ack| {
                    ack.session_present = persistent;
                    if keep_alive != asked {
                        ack.server_keepalive_sec = Some(keep_alive);
                    }
                })
        }
        Err(refusal) => {
            crate::metrics::mqtt_connect_refused("5", refusal.label());
            hs.failed(match refusal {
                Refusal::BadToken => v5::codec::ConnectAckReason::BadUserNameOrPassword,
                Refusal::NotAuthorized => v5::codec::ConnectAckReason::NotAuthorized,
                Refusal::Busy => v5::codec::ConnectAckReason::ServerBusy,
            })
        }
    }
}

/// Seconds without a packet after which a connection is closed: 1.5 times its keep-alive.
fn keep_alive_idle(keep_alive: u16) -> u16 {
    keep_alive.saturating_add(keep_alive / 2).max(1)
}

fn open(
    shared: &Arc<Shared>,
    registry: &Rc<Registry>,
    principal: Principal,
    hash: String,
    protocol: &'static str,
    sink: Sink,
) -> Conn {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    registry.sessions.borrow_mut().insert(
        id,
        Entry {
            hash,
            principal: principal.clone(),
            sink,
        },
    );
    crate::metrics::mqtt_connected(protocol);
    debug!(
        id,
        tenant_id = principal.tenant_id(),
        protocol,
        "mqtt session opened"
    );
    Conn {
        id,
        shared: shared.clone(),
        registry: registry.clone(),
        principal,
        protocol,
        previous: RefCell::new(None),
    }
}

/// Closes the sessions whose token no longer authenticates as it did, each time the
/// credentials were reloaded.
async fn close_revoked(shared: Arc<Shared>, registry: Rc<Registry>) {
    let credentials = shared.app.credentials().clone();
    let mut seen = credentials.generation();
    loop {
        ntex::time::sleep(REVOCATION_CHECK).await;
        let generation = credentials.generation();
        if generation == seen {
            continue;
        }
        seen = generation;
        let sessions = registry.sessions.borrow();
        for (id, entry) in sessions.iter() {
            let still = credentials
                .authenticate_hash(&entry.hash)
                .is_ok_and(|p| p == entry.principal);
            if still {
                continue;
            }
            info!(
                id,
                tenant_id = entry.principal.tenant_id(),
                "token revoked: closing the mqtt session"
            );
            crate::metrics::mqtt_revoked();
            match &entry.sink {
                Sink::V3(sink) => sink.close(),
                Sink::V5(sink) => sink.close_with_reason(v5::codec::Disconnect {
                    reason_code: v5::codec::DisconnectReasonCode::NotAuthorized,
                    ..Default::default()
                }),
            }
        }
    }
}

/// How a publish failed.
#[derive(Debug)]
enum Failure {
    /// Answered (MQTT 5) with this reason code.
    Refused(v5::codec::PublishAckReason, Rejection),
    /// Not acknowledged: the connection is closed.
    Close,
}

/// One PUBLISH: ingest its readings, then wait for the previous publish of the connection.
async fn handle(
    conn: &Conn,
    qos: QoS,
    topic: &str,
    payload: Result<Bytes, ntex_mqtt::error::PayloadError>,
) -> Result<(), Failure> {
    let started = Instant::now();
    let (done, previous) = if qos == QoS::AtMostOnce {
        (None, None)
    } else {
        let (tx, rx) = oneshot::channel::<()>();
        (Some(tx), conn.previous.replace(Some(rx)))
    };
    let qos_label = if qos == QoS::AtMostOnce { "0" } else { "1" };
    let outcome = match payload {
        Err(err) => {
            warn!(error = %err, "cannot read an mqtt payload");
            Err(Rejection::bad_request("cannot read the payload"))
        }
        // On this worker's own runtime: handing each publish to the service's runtime and
        // back cost two cross-thread wake-ups and a task per reading (about 3 µs, 7 % of ingest's
        // CPU per MQTT reading, BENCHMARKS.md); Kafka's acknowledgement wakes this worker
        // directly.
        Ok(bytes) => ingest(&conn.shared.app, &conn.principal, topic, &bytes).await,
    };
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let result = match outcome {
        Ok(_) => {
            crate::metrics::mqtt_publish(qos_label, "stored", started.elapsed());
            Ok(())
        }
        Err(rejection) => {
            let (reason, label) = match rejection.status.as_u16() {
                401 | 403 | 422 => (v5::codec::PublishAckReason::NotAuthorized, "not_authorized"),
                429 => (v5::codec::PublishAckReason::QuotaExceeded, "quota_exceeded"),
                500..=599 => {
                    crate::metrics::mqtt_publish(qos_label, "unavailable", started.elapsed());
                    warn!(
                        error = %rejection.error,
                        protocol = conn.protocol,
                        "publish not acknowledged by kafka: closing the mqtt connection without a PUBACK"
                    );
                    drop(done);
                    return Err(Failure::Close);
                }
                _ => (v5::codec::PublishAckReason::PayloadFormatInvalid, "invalid"),
            };
            crate::metrics::mqtt_publish(qos_label, label, started.elapsed());
            warn!(
                error = %rejection.error,
                field = rejection.field.as_deref().unwrap_or(""),
                topic,
                protocol = conn.protocol,
                "mqtt publish refused"
            );
            Err(Failure::Refused(reason, rejection))
        }
    };
    drop(done);
    result
}

/// The ingest steps of one publish, on its MQTT worker: the readings of the payload,
/// authorized, rate limited and produced together, as `POST /v1/telemetry?atomic=true` does.
/// Returns the number of readings Kafka acknowledged.
pub(crate) async fn ingest(
    app: &App,
    principal: &Principal,
    topic: &str,
    payload: &[u8],
) -> Result<usize, Rejection> {
    let outcome = async {
        let topic = Topic::of(topic, principal)?;
        let received_at = Utc::now();
        let readings = payload::readings(topic, payload, received_at, app.settings().time_limits)?;
        let mut outcomes = authorize_all(app, principal, readings, received_at);
        if let Some(refused) = first_refusal(&outcomes) {
            return Err(refused);
        }
        let headers = axum::http::HeaderMap::new();
        produce(app, principal, &mut outcomes, &headers, true).await?;
        match first_refusal(&outcomes) {
            Some(refused) => Err(refused),
            None => Ok(outcomes.len()),
        }
    }
    .await;
    match &outcome {
        Ok(n) => crate::metrics::accepted(*n),
        Err(rejection) => crate::metrics::rejected(rejection.code, 1),
    }
    outcome
}

fn first_refusal(outcomes: &[Result<schemas::Telemetry, Rejection>]) -> Option<Rejection> {
    outcomes.iter().find_map(|o| o.as_ref().err().cloned())
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("protocol", &self.protocol)
            .finish()
    }
}
