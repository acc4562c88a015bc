//! MQTT clients of the tests (rumqttc, 3.1.1 and 5) and the listener over a fixture's app.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ingest_producer::http::App;
use ingest_producer::mqtt::{Listen, MqttArgs, MqttListener};

/// Longest wait for one expected packet.
pub const WAIT: Duration = Duration::from_secs(30);

/// Listener settings of the tests (the listen address is the bound socket's).
pub fn args() -> MqttArgs {
    MqttArgs {
        mqtt_listen: Listen::off(),
        mqtt_max_packet_bytes: 65_536,
        mqtt_max_keep_alive: Duration::from_secs(300),
        mqtt_connect_timeout: Duration::from_secs(10),
        mqtt_max_connections: 1000,
        mqtt_max_in_flight: 16,
        mqtt_workers: 1,
        mqtt_tls_listen: Listen::off(),
        mqtt_tls_cert: None,
        mqtt_tls_key: None,
    }
}

/// A listener on an ephemeral port serving `app`.
pub fn listen(app: &App, args: &MqttArgs) -> MqttListener {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    MqttListener::start_on(socket, app.clone(), args).unwrap()
}

/// What became of a publish or a connection, as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// PUBACK (MQTT 5: with its reason code; 3.1.1: always 0).
    PubAck(u8),
    /// The connection ended before the PUBACK.
    Closed(String),
    /// CONNACK refusal code.
    Refused(u8),
    /// SUBACK return codes.
    SubAck(Vec<u8>),
}

pub mod v3 {
    use super::*;
    use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
        QoS, SubscribeReasonCode,
    };

    pub struct Client {
        pub client: AsyncClient,
        pub events: EventLoop,
    }

    pub fn options(addr: SocketAddr, id: &str, token: Option<&str>) -> MqttOptions {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(token) = token {
            options.set_credentials(token, "");
        }
        options
    }

    fn code(code: ConnectReturnCode) -> u8 {
        code as u8
    }

    /// Connects; `Err` is the CONNACK refusal (or the connection's end).
    pub async fn connect_with(options: MqttOptions) -> Result<Client, Seen> {
        let (client, mut events) = AsyncClient::new(options, 100);
        loop {
            match tokio::time::timeout(WAIT, events.poll()).await {
                Err(_) => return Err(Seen::Closed("timeout".into())),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    return Ok(Client { client, events })
                }
                Ok(Ok(_)) => {}
                Ok(Err(ConnectionError::ConnectionRefused(c))) => {
                    return Err(Seen::Refused(code(c)))
                }
                Ok(Err(err)) => return Err(Seen::Closed(err.to_string())),
            }
        }
    }

    pub async fn connect(addr: SocketAddr, token: &str) -> Result<Client, Seen> {
        connect_with(options(addr, &format!("c-{token}"), Some(token))).await
    }

    impl Client {
        /// Publishes and waits for its PUBACK (QoS 1) or for the packet to be written (QoS 0).
        pub async fn publish(&mut self, topic: &str, qos: u8, payload: &str) -> Seen {
            let qos = match qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            self.client
                .publish(topic, qos, false, payload.as_bytes().to_vec())
                .await
                .unwrap();
            self.wait(qos).await
        }

        async fn wait(&mut self, qos: QoS) -> Seen {
            loop {
                match tokio::time::timeout(WAIT, self.events.poll()).await {
                    Err(_) => return Seen::Closed("timeout".into()),
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return Seen::PubAck(0),
                    Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))))
                        if qos == QoS::AtMostOnce =>
                    {
                        return Seen::PubAck(0)
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Seen::Closed(err.to_string()),
                }
            }
        }

        /// Polls until the connection ends (or `within` passes: `None`).
        pub async fn closed_within(&mut self, within: Duration) -> Option<String> {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, self.events.poll()).await {
                    Err(_) => return None,
                    Ok(Err(err)) => return Some(err.to_string()),
                    Ok(Ok(_)) => {}
                }
            }
        }

        pub async fn subscribe(&mut self, filter: &str) -> Seen {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                match tokio::time::timeout(WAIT, self.events.poll()).await {
                    Err(_) => return Seen::Closed("timeout".into()),
                    Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                        return Seen::SubAck(
                            ack.return_codes
                                .iter()
                                .map(|c| match c {
                                    SubscribeReasonCode::Success(q) => *q as u8,
                                    SubscribeReasonCode::Failure => 0x80,
                                })
                                .collect(),
                        )
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Seen::Closed(err.to_string()),
                }
            }
        }
    }
}

pub mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode,
    };
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub events: EventLoop,
    }

    pub fn options(addr: SocketAddr, id: &str, token: Option<&str>) -> MqttOptions {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(token) = token {
            options.set_credentials(token, "");
        }
        options
    }

    /// The MQTT 5 reason code of a CONNACK refusal.
    fn connect_code(code: ConnectReturnCode) -> u8 {
        use ConnectReturnCode::*;
        match code {
            Success => 0,
            UnspecifiedError => 0x80,
            BadUserNamePassword => 0x86,
            NotAuthorized => 0x87,
            ServerUnavailable => 0x88,
            ServerBusy => 0x89,
            _ => 0xff,
        }
    }

    pub fn puback_code(reason: PubAckReason) -> u8 {
        use PubAckReason::*;
        match reason {
            Success => 0,
            NoMatchingSubscribers => 0x10,
            UnspecifiedError => 0x80,
            ImplementationSpecificError => 0x83,
            NotAuthorized => 0x87,
            TopicNameInvalid => 0x90,
            PacketIdentifierInUse => 0x91,
            QuotaExceeded => 0x97,
            PayloadFormatInvalid => 0x99,
        }
    }

    pub async fn connect_with(options: MqttOptions) -> Result<Client, Seen> {
        let (client, mut events) = AsyncClient::new(options, 100);
        loop {
            match tokio::time::timeout(WAIT, events.poll()).await {
                Err(_) => return Err(Seen::Closed("timeout".into())),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    return Ok(Client { client, events })
                }
                Ok(Ok(_)) => {}
                Ok(Err(ConnectionError::ConnectionRefused(c))) => {
                    return Err(Seen::Refused(connect_code(c)))
                }
                Ok(Err(err)) => return Err(Seen::Closed(err.to_string())),
            }
        }
    }

    pub async fn connect(addr: SocketAddr, token: &str) -> Result<Client, Seen> {
        connect_with(options(addr, &format!("c5-{token}"), Some(token))).await
    }

    impl Client {
        pub async fn publish(&mut self, topic: &str, qos: u8, payload: &str) -> Seen {
            let qos = match qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            self.client
                .publish(topic, qos, false, payload.as_bytes().to_vec())
                .await
                .unwrap();
            loop {
                match tokio::time::timeout(WAIT, self.events.poll()).await {
                    Err(_) => return Seen::Closed("timeout".into()),
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        return Seen::PubAck(puback_code(ack.reason))
                    }
                    Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))))
                        if qos == QoS::AtMostOnce =>
                    {
                        return Seen::PubAck(0)
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Seen::Closed(err.to_string()),
                }
            }
        }

        pub async fn closed_within(&mut self, within: Duration) -> Option<String> {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, self.events.poll()).await {
                    Err(_) => return None,
                    Ok(Err(err)) => return Some(err.to_string()),
                    Ok(Ok(Event::Incoming(Packet::Disconnect(d)))) => {
                        return Some(format!("disconnect {:?}", d.reason_code))
                    }
                    Ok(Ok(_)) => {}
                }
            }
        }

        pub async fn subscribe(&mut self, filter: &str) -> Seen {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                match tokio::time::timeout(WAIT, self.events.poll()).await {
                    Err(_) => return Seen::Closed("timeout".into()),
                    Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                        return Seen::SubAck(
                            ack.return_codes
                                .iter()
                                .map(|c| match c {
                                    SubscribeReasonCode::Success(q) => *q as u8,
                                    SubscribeReasonCode::NotAuthorized => 0x87,
                                    SubscribeReasonCode::Failure => 0x80,
                                    _ => 0xff,
                                })
                                .collect(),
                        )
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Seen::Closed(err.to_string()),
                }
            }
        }
    }
}
