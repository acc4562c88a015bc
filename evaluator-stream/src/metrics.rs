//! The evaluator's metrics, described once. Names: `fleetstream_evaluator_<thing>_<unit>`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const MESSAGES: &str = "fleetstream_evaluator_messages_total";
pub const UNDECODABLE: &str = "fleetstream_evaluator_undecodable_messages_total";
pub const EVALUATIONS: &str = "fleetstream_evaluator_rule_evaluations_total";
pub const TRANSITIONS: &str = "fleetstream_evaluator_transitions_total";
pub const REPLAYED_TRANSITIONS: &str = "fleetstream_evaluator_replayed_transitions_total";
pub const LATE: &str = "fleetstream_evaluator_late_messages_total";
pub const ALERT_LATENCY: &str = "fleetstream_evaluator_alert_latency_seconds";
pub const COMMIT_DURATION: &str = "fleetstream_evaluator_commit_duration_seconds";
pub const FENCED: &str = "fleetstream_evaluator_fenced_commits_total";
pub const DB_RETRIES: &str = "fleetstream_evaluator_database_retries_total";
pub const OUTBOX_PUBLISHED: &str = "fleetstream_evaluator_outbox_published_total";
pub const OUTBOX_PENDING: &str = "fleetstream_evaluator_outbox_pending";
pub const RULES: &str = "fleetstream_evaluator_rules";
pub const DEVICES: &str = "fleetstream_evaluator_devices";
pub const OPEN_ALERTS: &str = "fleetstream_evaluator_open_alerts";
pub const LAG: &str = "fleetstream_evaluator_consumer_lag_messages";
pub const ASSIGNED_PARTITIONS: &str = "fleetstream_evaluator_assigned_partitions";

/// Registers help text for every metric of the evaluator.
pub fn describe() {
    describe_counter!(MESSAGES, Unit::Count, "Telemetry messages evaluated.");
    describe_counter!(
        UNDECODABLE,
        Unit::Count,
        "Messages that could not be decoded (skipped; the sink dead-letters them)."
    );
    describe_counter!(
        EVALUATIONS,
        Unit::Count,
        "Rule evaluations (one rule against one message)."
    );
    describe_counter!(
        TRANSITIONS,
        Unit::Count,
        "Alert transitions committed, by target status."
    );
    describe_counter!(
        REPLAYED_TRANSITIONS,
        Unit::Count,
        "Transitions the alerts table already reflected (replays), written nowhere."
    );
    describe_counter!(
        LATE,
        Unit::Count,
        "Out-of-order messages: accepted within the allowed lateness, or dropped beyond it."
    );
    describe_histogram!(
        ALERT_LATENCY,
        Unit::Seconds,
        "From the message's received_at to the commit of the transition it caused."
    );
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Duration of one commit (transitions, outbox rows and offsets)."
    );
    describe_counter!(
        FENCED,
        Unit::Count,
        "Commits rolled back because another instance owns a partition now."
    );
    describe_counter!(
        DB_RETRIES,
        Unit::Count,
        "Database operations retried after an error."
    );
    describe_counter!(
        OUTBOX_PUBLISHED,
        Unit::Count,
        "Alert events published to alerts.v1."
    );
    describe_gauge!(
        OUTBOX_PENDING,
        Unit::Count,
        "Outbox rows not yet published."
    );
    describe_gauge!(RULES, Unit::Count, "Enabled alert rules.");
    describe_gauge!(DEVICES, Unit::Count, "Devices held in evaluation state.");
    describe_gauge!(
        OPEN_ALERTS,
        Unit::Count,
        "Pending or firing alerts held in state."
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "Messages behind the end of each partition."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Partitions assigned to this instance."
    );
}
