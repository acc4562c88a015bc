//! `simulate --via mqtt`: one MQTT 3.1.1 connection per virtual device (rumqttc), its device
//! token as the username, readings published on `fleet/v1/telemetry`.
//!
//! A reading is accepted when its PUBACK arrives (QoS 1; ingest sends it after Kafka's ack)
//! or once it is written to the socket (QoS 0). PUBACKs are matched to readings by packet id:
//! each publish waits in a queue until the client writes it and names its packet id
//! (`Outgoing::Publish`); a re-sent publish (after a reconnect the client sends what was not
//! acknowledged again, the session being persistent) keeps its id and its waiter.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumbing::Shutdown;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, info, warn};

use crate::mqtt::payload::FLEET_TOPIC;
use crate::simulate::{post_message, Pending, SimulateArgs, SimulateError, Verdict};

/// Connections being set up at once.
const CONNECTING: usize = 256;

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
        let (host, port) = args
            .mqtt
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or(SimulateError::Settings("--mqtt must be host:port"))?;
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
            let mut options = MqttOptions::new(format!("{}-{d}", args.prefix), host.clone(), port);
            options.set_credentials(token, "");
            options.set_keep_alive(Duration::from_secs(60));
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
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
        Ok(Fleet { devices, qos, stop })
    }

    /// Publishes each reading on its device's connection and waits for its acknowledgement,
    /// at most `give_up` (the client keeps re-sending on its own meanwhile).
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
        let acked = {
            let _order = device.order.lock().await;
            let (tx, rx) = oneshot::channel();
            lock(&device.waiters).unassigned.push_back(tx);
            if device
                .client
                .publish(FLEET_TOPIC, self.qos, false, payload)
                .await
                .is_err()
            {
                lock(&device.waiters).unassigned.pop_back();
                return Verdict::Refused(0);
            }
            rx
        };
        match tokio::time::timeout(give_up, acked).await {
            Ok(Ok(())) => Verdict::Accepted,
            // Not acknowledged in time: final for the simulator (it may still arrive).
            _ => Verdict::Refused(0),
        }
    }

    /// Sends DISCONNECT on every connection and stops their tasks.
    pub(crate) async fn disconnect(&self) {
        for device in &self.devices {
            let _ = device.client.disconnect().await;
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
    stop: Shutdown,
) {
    let mut up = Some(up);
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
                if let Some(up) = up.take() {
                    let _ = up.send(());
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
