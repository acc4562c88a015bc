//! `simulate --via mqtt`: one MQTT 3.1.1 connection per virtual device (rumqttc), its device
//! token as the username, readings published on `fleet/v1/telemetry`.
//!
//! A reading is accepted when its PUBACK arrives (QoS 1; ingest sends it after Kafka's ack)
//! or once it is written to the socket (QoS 0). PUBACKs are matched to readings by packet id:
//! each publish waits in a queue until the client writes it and names its packet id
//! (`Outgoing::Publish`); a re-sent publish (after a reconnect the client sends what was not
//! acknowledged again, the session being persistent) keeps its id and its waiter.
//!
//! Scale: each connection is a file descriptor, so the open-file limit is raised to
//! `--devices` plus a reserve first ([`crate::fd_limit`]; the log says what it found and
//! did). One client address reaches one server address from at most ~28,000 ephemeral ports
//! (Linux's default 32768–60999), so for more devices `--mqtt` takes several addresses
//! (`127.0.0.1:1883,127.0.0.2:1883,…`, all of them ingest's `MQTT_LISTEN`) and device `d`
//! connects to address `d mod n`.
//!
//! Every reading's wait is bounded by `--give-up-after`: for its turn on the connection, for
//! room in the client's queue (a device that cannot connect fills it) and for its PUBACK, so
//! devices that cannot connect do not hold the simulator's permits for longer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumbing::Shutdown;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet,
    QoS, Request,
};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, info, warn};

use crate::mqtt::payload::FLEET_TOPIC;
use crate::simulate::{post_message, Pending, SimulateArgs, SimulateError, Verdict};

/// Connections being set up at once.
const CONNECTING: usize = 256;

/// Publishes of one connection awaiting their PUBACK at most (rumqttc's default is 100; each
/// slot is memory held per connection, and ingest handles 16 at once by default).
const IN_FLIGHT: u16 = 16;

/// Connections up and reconnections, across the fleet.
#[derive(Debug, Default)]
struct ConnectionCounts {
    up: AtomicU64,
    reconnects: AtomicU64,
}

/// Readings of one device waiting for their acknowledgement.
#[derive(Default)]
struct Waiters {
    /// Published, packet id not known yet (in publish order).
    unassigned: VecDeque<oneshot::Sender<()>>,
    /// Written, waiting for the PUBACK.
    by_packet: HashMap<u16, oneshot::Sender<()>>,
}

struct Device {
    client: AsyncClient,
    waiters: Arc<Mutex<Waiters>>,
    /// Keeps a device's queue in the order its publishes reach the client.
    order: tokio::sync::Mutex<()>,
}

/// The virtual devices' connections.
pub(crate) struct Fleet {
    devices: Vec<Device>,
    qos: QoS,
    stop: Shutdown,
    counts: Arc<ConnectionCounts>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.devices.len())
            .field("qos", &self.qos)
            .finish()
    }
}

fn lock(waiters: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    match waiters.lock() {
        Ok(w) => w,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Fleet {
    /// Opens every device's connection (at most [`CONNECTING`] handshakes at once) and waits
    /// up to a minute for them: a freshly provisioned token reaches ingest's cache a moment
    /// later, until then its CONNECT is refused and retried.
    pub(crate) async fn connect(
        args: &SimulateArgs,
        tokens: Vec<String>,
        shutdown: &Shutdown,
    ) -> Result<Self, SimulateError> {
        let servers = args
            .mqtt
            .split(',')
            .map(|addr| {
                addr.trim()
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            })
            .collect::<Option<Vec<_>>>()
            .filter(|servers| !servers.is_empty())
            .ok_or(SimulateError::Settings(
                "--mqtt must be host:port[,host:port...]",
            ))?;
        raise_fd_limit(tokens.len());
        let counts = Arc::new(ConnectionCounts::default());
        let qos = if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let stop = shutdown.child_token();
        let connecting = Arc::new(Semaphore::new(CONNECTING));
        let mut devices = Vec::with_capacity(tokens.len());
        let mut connected = Vec::with_capacity(tokens.len());
        for (d, token) in tokens.into_iter().enumerate() {
            let (host, port) = &servers[d % servers.len()];
            let number = args.number(u32::try_from(d).unwrap_or(u32::MAX));
            let client_id = format!("{}-{number}", args.prefix);
            let mut options = MqttOptions::new(client_id, host.clone(), *port);
            options.set_credentials(token, "");
            options.set_keep_alive(Duration::from_secs(60));
            options.set_inflight(IN_FLIGHT);
            // Persistent: after a reconnect the client re-sends what was not acknowledged.
            options.set_clean_session(false);
            let (client, events) = AsyncClient::new(options, 16);
            let waiters = Arc::new(Mutex::new(Waiters::default()));
            let (up_tx, up_rx) = oneshot::channel();
            tokio::spawn(drive(
                events,
                waiters.clone(),
                up_tx,
                connecting.clone(),
                counts.clone(),
                stop.clone(),
            ));
            connected.push(up_rx);
            devices.push(Device {
                client,
                waiters,
                order: tokio::sync::Mutex::new(()),
            });
        }
        let mut up = 0usize;
        // A minute, and a second more per 2,000 devices (100,000 take about a minute to
        // connect on two cores).
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(60)
            + Duration::from_millis(devices.len() as u64 / 2);
        for rx in connected {
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, rx).await {
                up += 1;
            }
        }
        info!(
            connected = up,
            devices = devices.len(),
            "mqtt devices connected"
        );
        Ok(Fleet {
            devices,
            qos,
            stop,
            counts,
        })
    }

    /// Connections up now, and reconnections so far.
    pub(crate) fn connections(&self) -> (u64, u64) {
        (
            self.counts.up.load(Ordering::Relaxed),
            self.counts.reconnects.load(Ordering::Relaxed),
        )
    }

    /// Publishes each reading on its device's connection and waits for its acknowledgement,
    /// at most `give_up` from the start of each (the client keeps re-sending on its own
    /// meanwhile).
    pub(crate) async fn send(
        &self,
        batch: &[Pending],
        give_up: Duration,
    ) -> (Vec<Verdict>, Option<Duration>) {
        let mut verdicts = Vec::with_capacity(batch.len());
        for p in batch {
            verdicts.push(self.send_one(p, give_up).await);
        }
        (verdicts, None)
    }

    async fn send_one(&self, p: &Pending, give_up: Duration) -> Verdict {
        let Some(device) = self.devices.get(p.device as usize) else {
            return Verdict::Refused(401);
        };
        let Ok(payload) = serde_json::to_vec(&post_message(&p.reading)) else {
            return Verdict::Refused(400);
        };
        // Everything below, the wait for the client's queue included, is bounded by
        // `give_up`: a device that cannot connect fills its client's queue (16 requests), and
        // its readings must not hold the simulator's permits past that.
        let deadline = tokio::time::Instant::now() + give_up;
        let acked = {
            let Ok(_order) = tokio::time::timeout_at(deadline, device.order.lock()).await else {
                return Verdict::Refused(0);
            };
            let (tx, rx) = oneshot::channel();
            lock(&device.waiters).unassigned.push_back(tx);
            if !self.enqueue(device, payload, deadline).await {
                // Not queued (no other publish of this device got in meanwhile: the order
                // lock), so the waiter last in line is this one.
                lock(&device.waiters).unassigned.pop_back();
                return Verdict::Refused(0);
            }
            rx
        };
        match tokio::time::timeout_at(deadline, acked).await {
            Ok(Ok(())) => Verdict::Accepted,
            // Not acknowledged in time: final for the simulator (it may still arrive).
            _ => Verdict::Refused(0),
        }
    }

    /// Hands a publish to the device's client, waiting while its queue is full until
    /// `deadline`; false if it could not. `try_publish` either queues the publish or not, so
    /// giving up leaves no doubt about it (a cancelled `publish().await` may or may not have
    /// queued it, and the waiters would then no longer match the packets).
    async fn enqueue(
        &self,
        device: &Device,
        payload: Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut payload = payload;
        let mut wait = Duration::from_millis(10);
        loop {
            match device
                .client
                .try_publish(FLEET_TOPIC, self.qos, false, payload)
            {
                Ok(()) => return true,
                // Full (the connection is down, or its in-flight window and queue are full),
                // or closed (stopping): the publish comes back.
                Err(ClientError::TryRequest(Request::Publish(publish))) => {
                    payload = publish.payload.to_vec();
                }
                Err(_) => return false,
            }
            let now = tokio::time::Instant::now();
            if self.stop.is_cancelled() || now >= deadline {
                return false;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(wait.min(deadline - now)) => {}
            }
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends DISCONNECT on every connection and stops their tasks. A client whose queue is
    /// full (its connection is down, or its in-flight window is full) gets none: waiting for
    /// room there could wait for ever; stopping its task closes its socket.
    pub(crate) fn disconnect(&self) {
        for device in &self.devices {
            let _ = device.client.try_disconnect();
        }
        self.stop.cancel();
    }
}

/// Runs one device's connection: reconnects, and completes waiters on writes and PUBACKs.
async fn drive(
    mut events: EventLoop,
    waiters: Arc<Mutex<Waiters>>,
    up: oneshot::Sender<()>,
    connecting: Arc<Semaphore>,
    counts: Arc<ConnectionCounts>,
    stop: Shutdown,
) {
    let mut up = Some(up);
    let mut connected = false;
    let mut permit = connecting.clone().acquire_owned().await.ok();
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                permit = None;
                if !connected {
                    connected = true;
                    counts.up.fetch_add(1, Ordering::Relaxed);
                }
                match up.take() {
                    Some(up) => {
                        let _ = up.send(());
                    }
                    None => {
                        counts.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(packet))) => {
                let mut w = lock(&waiters);
                if packet == 0 {
                    // QoS 0: done once written.
                    if let Some(tx) = w.unassigned.pop_front() {
                        let _ = tx.send(());
                    }
                } else if !w.by_packet.contains_key(&packet) {
                    if let Some(tx) = w.unassigned.pop_front() {
                        w.by_packet.insert(packet, tx);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(tx) = lock(&waiters).by_packet.remove(&ack.pkid) {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(err) => {
                if connected {
                    connected = false;
                    counts.up.fetch_sub(1, Ordering::Relaxed);
                }
                match &err {
                    ConnectionError::ConnectionRefused(code) => {
                        debug!(?code, "mqtt connect refused; retrying")
                    }
                    _ if up.is_none() => warn!(error = %err, "mqtt connection lost; reconnecting"),
                    _ => debug!(error = %err, "mqtt connect failed; retrying"),
                }
                drop(permit.take());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                if up.is_some() {
                    permit = connecting.clone().acquire_owned().await.ok();
                }
            }
        }
    }
}

/// Raises the open-file limit for one connection per device (see [`crate::fd_limit`]).
fn raise_fd_limit(devices: usize) {
    let needed = devices as u64 + crate::fd_limit::RESERVE;
    match crate::fd_limit::raise(needed) {
        Ok(limit) if limit.allows(needed) => {
            info!(%limit, devices, "open-file limit for the devices' connections")
        }
        Ok(limit) => warn!(
            %limit,
            needed,
            devices,
            "open-file limit below one connection per device: connections past it fail"
        ),
        Err(err) => warn!(error = %err, "cannot read or raise the open-file limit"),
    }
}
