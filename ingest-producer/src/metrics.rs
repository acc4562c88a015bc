//! The crate's metrics, each described once, written from one place.
//!
//! * `fleetstream_ingest_messages_total{outcome="accepted"|"rejected", reason}`
//! * `fleetstream_ingest_requests_total{status}`
//! * `fleetstream_ingest_request_duration_seconds` (histogram)
//! * `fleetstream_ingest_produce_duration_seconds` (histogram, enqueue → last ack of a request)
//! * `fleetstream_ingest_in_flight_requests` (gauge)
//! * `fleetstream_ingest_credentials_devices` (gauge, devices in the credentials cache)
//! * `fleetstream_ingest_line_protocol_requests_total{api="v1"|"v2"|"query", status}`
//! * `fleetstream_ingest_line_protocol_lines_total{api="v1"|"v2"|"import", outcome}`
//! * `fleetstream_ingest_mqtt_connections{protocol="3.1.1"|"5"}` (gauge, open sessions)
//! * `fleetstream_ingest_mqtt_connects_total{protocol, outcome="accepted"|"bad_token"|"not_authorized"|"connection_limit"}`
//! * `fleetstream_ingest_mqtt_publishes_total{qos="0"|"1", outcome="stored"|"invalid"|"not_authorized"|"quota_exceeded"|"unavailable"}`
//! * `fleetstream_ingest_mqtt_puback_duration_seconds{qos}` (histogram, PUBLISH read to
//!   PUBACK released; for QoS 0 to the end of handling)
//! * `fleetstream_ingest_mqtt_revoked_sessions_total`, `fleetstream_ingest_mqtt_subscribes_refused_total{protocol}`

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

const MESSAGES: &str = "fleetstream_ingest_messages_total";
const REQUESTS: &str = "fleetstream_ingest_requests_total";
const REQUEST_DURATION: &str = "fleetstream_ingest_request_duration_seconds";
const PRODUCE_DURATION: &str = "fleetstream_ingest_produce_duration_seconds";
const IN_FLIGHT: &str = "fleetstream_ingest_in_flight_requests";
const CREDENTIALS: &str = "fleetstream_ingest_credentials_devices";
const LP_REQUESTS: &str = "fleetstream_ingest_line_protocol_requests_total";
const LP_LINES: &str = "fleetstream_ingest_line_protocol_lines_total";
const MQTT_CONNECTIONS: &str = "fleetstream_ingest_mqtt_connections";
const MQTT_CONNECTS: &str = "fleetstream_ingest_mqtt_connects_total";
const MQTT_PUBLISHES: &str = "fleetstream_ingest_mqtt_publishes_total";
const MQTT_PUBACK: &str = "fleetstream_ingest_mqtt_puback_duration_seconds";
const MQTT_REVOKED: &str = "fleetstream_ingest_mqtt_revoked_sessions_total";
const MQTT_SUBSCRIBES: &str = "fleetstream_ingest_mqtt_subscribes_refused_total";

/// Registers help texts (call once at start).
pub fn describe() {
    describe_counter!(
        MESSAGES,
        Unit::Count,
        "Messages received, by outcome and rejection reason"
    );
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "HTTP ingest requests, by status code"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Ingest request latency, body read to reply"
    );
    describe_histogram!(
        PRODUCE_DURATION,
        Unit::Seconds,
        "Time from enqueueing a request's messages to their last Kafka acknowledgement"
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "Ingest requests being handled");
    describe_gauge!(CREDENTIALS, Unit::Count, "Devices in the credentials cache");
    describe_counter!(
        LP_REQUESTS,
        Unit::Count,
        "InfluxDB-compatible requests (/api/v2/write, /write, /query), by API and status"
    );
    describe_counter!(
        LP_LINES,
        Unit::Count,
        "Line-protocol lines read, by API (or import) and outcome (stored, rejected)"
    );
    describe_gauge!(
        MQTT_CONNECTIONS,
        Unit::Count,
        "Open MQTT sessions, by protocol"
    );
    describe_counter!(
        MQTT_CONNECTS,
        Unit::Count,
        "MQTT CONNECTs, by protocol and outcome (accepted or the refusal)"
    );
    describe_counter!(
        MQTT_PUBLISHES,
        Unit::Count,
        "MQTT PUBLISHes, by QoS and outcome"
    );
    describe_histogram!(
        MQTT_PUBACK,
        Unit::Seconds,
        "MQTT PUBLISH read to PUBACK (after Kafka acknowledged), by QoS"
    );
    describe_counter!(
        MQTT_REVOKED,
        Unit::Count,
        "MQTT sessions closed because their token was revoked"
    );
    describe_counter!(
        MQTT_SUBSCRIBES,
        Unit::Count,
        "MQTT SUBSCRIBEs refused (devices publish only)"
    );
}

pub(crate) fn mqtt_connected(protocol: &'static str) {
    counter!(MQTT_CONNECTS, "protocol" => protocol, "outcome" => "accepted").increment(1);
    gauge!(MQTT_CONNECTIONS, "protocol" => protocol).increment(1.0);
    crate::stats::STATS.mqtt_connection(1);
}

pub(crate) fn mqtt_disconnected(protocol: &'static str) {
    gauge!(MQTT_CONNECTIONS, "protocol" => protocol).decrement(1.0);
    crate::stats::STATS.mqtt_connection(-1);
}

pub(crate) fn mqtt_connect_refused(protocol: &'static str, reason: &'static str) {
    counter!(MQTT_CONNECTS, "protocol" => protocol, "outcome" => reason).increment(1);
}

pub(crate) fn mqtt_publish(qos: &'static str, outcome: &'static str, elapsed: Duration) {
    counter!(MQTT_PUBLISHES, "qos" => qos, "outcome" => outcome).increment(1);
    if outcome != "unavailable" {
        histogram!(MQTT_PUBACK, "qos" => qos).record(elapsed.as_secs_f64());
    }
    crate::stats::STATS.mqtt_publish(elapsed.as_secs_f64());
}

pub(crate) fn mqtt_revoked() {
    counter!(MQTT_REVOKED).increment(1);
}

pub(crate) fn mqtt_subscribe_refused(protocol: &'static str) {
    counter!(MQTT_SUBSCRIBES, "protocol" => protocol).increment(1);
}

pub(crate) fn line_protocol_request(api: &'static str, status: u16) {
    counter!(LP_REQUESTS, "api" => api, "status" => status.to_string()).increment(1);
}

pub(crate) fn line_protocol_lines(api: &'static str, stored: usize, rejected: usize) {
    counter!(LP_LINES, "api" => api, "outcome" => "stored").increment(stored as u64);
    counter!(LP_LINES, "api" => api, "outcome" => "rejected").increment(rejected as u64);
}

pub(crate) fn accepted(n: usize) {
    counter!(MESSAGES, "outcome" => "accepted", "reason" => "").increment(n as u64);
    crate::stats::STATS.accepted(n as u64);
}

pub(crate) fn rejected(reason: &'static str, n: usize) {
    counter!(MESSAGES, "outcome" => "rejected", "reason" => reason).increment(n as u64);
    crate::stats::STATS.rejected(n as u64);
}

pub(crate) fn request(status: u16, elapsed: Duration) {
    counter!(REQUESTS, "status" => status.to_string()).increment(1);
    histogram!(REQUEST_DURATION).record(elapsed.as_secs_f64());
    crate::stats::STATS.request(elapsed.as_secs_f64());
}

pub(crate) fn produce_duration(elapsed: Duration) {
    histogram!(PRODUCE_DURATION).record(elapsed.as_secs_f64());
}

pub(crate) fn in_flight(delta: f64) {
    gauge!(IN_FLIGHT).increment(delta);
}

pub(crate) fn credentials_loaded(devices: usize) {
    gauge!(CREDENTIALS).set(devices as f64);
}
