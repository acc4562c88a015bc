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
//! workers, each a single-threaded runtime); the ingest steps run on the service's tokio
//! runtime.

pub mod payload;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Args;
use futures::channel::oneshot;
use ntex::service::cfg::SharedCfg;
use ntex::service::{fn_factory_with_config, fn_service};
use ntex::time::{Millis, Seconds};
use ntex::util::{ByteString, Bytes};
use ntex_mqtt::{v3, v5, MqttServer, MqttServiceConfig, QoS};
use plumbing::config::parse_duration;
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
    /// Address of the MQTT listener (3.1.1 and 5); `off` disables it.
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
    /// Threads serving MQTT connections.
    #[arg(long, env = "MQTT_WORKERS", default_value_t = 1)]
    pub mqtt_workers: usize,
}

/// `MQTT_LISTEN`: an address, or disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(value: &str) -> Result<Listen, String> {
    match value.trim() {
        "" | "off" | "none" | "disabled" => Ok(Listen(None)),
        addr => addr
            .parse()
            .map(|addr| Listen(Some(addr)))
            .map_err(|err| format!("{err}: expected host:port or off")),
    }
}

/// Errors starting the listener.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("mqtt listener thread ended before the server started")]
    NotStarted,
}

/// What every connection shares, across workers.
#[derive(Debug)]
struct Shared {
    app: App,
    runtime: tokio::runtime::Handle,
    args: MqttArgs,
    connections: AtomicUsize,
    next_id: AtomicU64,
}

/// A running MQTT listener.
#[derive(Debug)]
pub struct MqttListener {
    addr: SocketAddr,
    server: ntex::server::Server,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MqttListener {
    /// Binds `MQTT_LISTEN` and starts serving; `None` when the listener is disabled. Call from
    /// the service's tokio runtime: publishes are handled on it.
    pub fn start(app: App, args: &MqttArgs) -> Result<Option<Self>, MqttError> {
        let Some(addr) = args.mqtt_listen.0 else {
            return Ok(None);
        };
        let listener = std::net::TcpListener::bind(addr)?;
        Self::start_on(listener, app, args).map(Some)
    }

    /// Starts serving on a bound listener (tests bind port 0).
    pub fn start_on(
        listener: std::net::TcpListener,
        app: App,
        args: &MqttArgs,
    ) -> Result<Self, MqttError> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            app,
            runtime: tokio::runtime::Handle::current(),
            args: args.clone(),
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
        });
        let config = MqttServiceConfig::new()
            .set_max_qos(QoS::AtLeastOnce)
            .set_max_size(args.mqtt_max_packet_bytes)
            .set_max_receive(args.mqtt_max_in_flight.max(1))
            .set_max_receive_size(0)
            .set_connect_timeout(seconds(args.mqtt_connect_timeout))
            .set_handshake_timeout(seconds(args.mqtt_connect_timeout))
            .protocol_version_timeout(seconds(args.mqtt_connect_timeout));
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
                        let builder =
                            ntex::server::build()
                                .listen("mqtt", listener, async move |_| worker(shared.clone()));
                        let server = match builder {
                            Ok(builder) => builder
                                .config("mqtt", SharedCfg::new("MQTT").add(config))
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
        info!(%addr, "mqtt listening");
        Ok(MqttListener {
            addr,
            server,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
fn worker(
    shared: Arc<Shared>,
) -> impl ntex::service::ServiceFactory<
    ntex::io::Io,
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
        Ok(bytes) => {
            let app = conn.shared.app.clone();
            let principal = conn.principal.clone();
            let topic = topic.to_owned();
            match conn
                .shared
                .runtime
                .spawn(async move { ingest(&app, &principal, &topic, &bytes).await })
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(Rejection::internal()),
            }
        }
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

/// The ingest steps of one publish, on the service's runtime: the readings of the payload,
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
