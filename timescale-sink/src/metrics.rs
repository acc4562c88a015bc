//! The sink's metrics, described once. Names: `fleetstream_sink_<thing>_<unit>`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const ROWS_WRITTEN: &str = "fleetstream_sink_rows_written_total";
pub const BATCHES: &str = "fleetstream_sink_batches_total";
pub const BATCH_ROWS: &str = "fleetstream_sink_batch_rows";
pub const COPY_DURATION: &str = "fleetstream_sink_copy_duration_seconds";
pub const COMMIT_DURATION: &str = "fleetstream_sink_batch_commit_duration_seconds";
pub const STAGE_DURATION: &str = "fleetstream_sink_stage_duration_seconds";
pub const INGEST_TO_COMMIT: &str = "fleetstream_sink_ingest_to_commit_seconds";
pub const DUPLICATES: &str = "fleetstream_sink_duplicate_rows_total";
pub const MERGED: &str = "fleetstream_sink_merged_readings_total";
pub const DEAD_LETTERS: &str = "fleetstream_sink_dead_letters_total";
pub const FENCED_BATCHES: &str = "fleetstream_sink_fenced_batches_total";
pub const DB_RETRIES: &str = "fleetstream_sink_database_retries_total";
pub const LAG: &str = "fleetstream_sink_consumer_lag_messages";
pub const ASSIGNED_PARTITIONS: &str = "fleetstream_sink_assigned_partitions";
pub const ROLLUP_REFRESHES: &str = "fleetstream_sink_rollup_refreshes_total";
pub const ROLLUP_REFRESH_DURATION: &str = "fleetstream_sink_rollup_refresh_duration_seconds";
pub const ROLLUP_ROWS_WRITTEN: &str = "fleetstream_sink_rollup_rows_written_total";
pub const ROLLUP_MINUTES_RECOMPUTED: &str = "fleetstream_sink_rollup_minutes_recomputed_total";
pub const ROLLUP_LAG: &str = "fleetstream_sink_rollup_lag_seconds";
pub const ROLLUP_DEVICE_MINUTES_RECOMPUTED: &str =
    "fleetstream_sink_rollup_device_minutes_recomputed_total";
pub const ROLLUP_DEVICE_MINUTES_PENDING: &str = "fleetstream_sink_rollup_device_minutes_pending";
pub const ROLLUP_DEVICE_MINUTES_REJECTED: &str =
    "fleetstream_sink_rollup_device_minutes_rejected_total";
pub const ROLLUP_READINGS_AGGREGATED: &str = "fleetstream_sink_rollup_readings_aggregated_total";
pub const ROLLUP_DEVICE_MINUTES_TO_SQL: &str =
    "fleetstream_sink_rollup_device_minutes_to_sql_total";
pub const LATE_DEVICE_MINUTES: &str = "fleetstream_sink_late_device_minutes_total";
pub const LATE_RANGES: &str = "fleetstream_sink_late_ranges_total";
pub const LATEST_PENDING: &str = "fleetstream_sink_latest_pending_readings";
pub const LATEST_REPLAYED: &str = "fleetstream_sink_latest_replayed_readings_total";
pub const LATEST_FLUSH_DURATION: &str = "fleetstream_sink_latest_flush_duration_seconds";
pub const LATEST_FLUSHED_DEVICES: &str = "fleetstream_sink_latest_flushed_devices_total";

/// Registers help text for every metric of the sink.
pub fn describe() {
    describe_counter!(
        ROWS_WRITTEN,
        Unit::Count,
        "Telemetry rows committed to the database."
    );
    describe_counter!(
        BATCHES,
        Unit::Count,
        "Batches by outcome (committed, fenced, empty)."
    );
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per committed batch.");
    describe_histogram!(
        COPY_DURATION,
        Unit::Seconds,
        "Duration of the binary COPY of one batch."
    );
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Duration of one batch transaction, from BEGIN to COMMIT."
    );
    describe_histogram!(
        STAGE_DURATION,
        Unit::Seconds,
        "Time one batch spends in each stage (label `stage`: decode, offsets, copy, latest, \
         commit), to see where a batch's time goes."
    );
    describe_histogram!(
        INGEST_TO_COMMIT,
        Unit::Seconds,
        "Time from a reading's received_at (ingest clock) to its batch committing."
    );
    describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Readings that changed nothing: every metric already stored at their (tenant, device, \
         time) with the same value (exact re-sends)."
    );
    describe_counter!(
        MERGED,
        Unit::Count,
        "Readings merged into a point (tenant, device, time) stored before or earlier in the \
         same batch: the union of metrics, the later value winning per metric."
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Messages sent to the DLQ, by stage."
    );
    describe_counter!(
        FENCED_BATCHES,
        Unit::Count,
        "Batches rolled back because the stored offset no longer matched (partition moved)."
    );
    describe_counter!(
        DB_RETRIES,
        Unit::Count,
        "Batch transactions retried after a transient error."
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "Messages behind the partition's high watermark."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Partitions assigned to this instance."
    );
    describe_counter!(
        ROLLUP_REFRESHES,
        Unit::Count,
        "Rollup steps (one transaction each) by outcome (ok, error, cancelled)."
    );
    describe_histogram!(
        ROLLUP_REFRESH_DURATION,
        Unit::Seconds,
        "Duration of one rollup step (one transaction: plan, new minutes, commit)."
    );
    describe_counter!(
        ROLLUP_ROWS_WRITTEN,
        Unit::Count,
        "Rows written to the 1-minute rollup (new minutes and recomputed ones)."
    );
    describe_counter!(
        ROLLUP_MINUTES_RECOMPUTED,
        Unit::Count,
        "Rolled-up minutes recomputed because late readings arrived in them."
    );
    describe_counter!(
        ROLLUP_DEVICE_MINUTES_RECOMPUTED,
        Unit::Count,
        "Device minutes of the 1-minute rollup recomputed because late readings arrived in them."
    );
    describe_gauge!(
        ROLLUP_DEVICE_MINUTES_PENDING,
        Unit::Count,
        "Device minutes invalidated by late readings and not yet recomputed (after the last refresh step)."
    );
    describe_counter!(
        ROLLUP_DEVICE_MINUTES_REJECTED,
        Unit::Count,
        "Device minutes the rollup refresh could not aggregate (a data error; recorded in telemetry_1m_rejected)."
    );
    describe_counter!(
        ROLLUP_READINGS_AGGREGATED,
        Unit::Count,
        "Readings of new minutes read and aggregated by this sink for the 1-minute rollup."
    );
    describe_counter!(
        ROLLUP_DEVICE_MINUTES_TO_SQL,
        Unit::Count,
        "Device minutes of new minutes left to the SQL aggregation (a value of more than 38 significant digits, or a sum beyond 128 bits)."
    );
    describe_counter!(
        LATE_DEVICE_MINUTES,
        Unit::Count,
        "Device minutes this sink marked for the rollup to recompute (readings older than the database clock minus rollup_settle)."
    );
    describe_counter!(
        LATE_RANGES,
        Unit::Count,
        "Batches whose many recent late readings (a sink catching up) were recorded as one range of whole minutes for the rollup."
    );
    describe_gauge!(
        LATEST_PENDING,
        Unit::Count,
        "Stored (or replayed) readings waiting to be folded into device_latest, over all writers (SINK_LATEST_INTERVAL)."
    );
    describe_counter!(
        LATEST_REPLAYED,
        Unit::Count,
        "Readings stored before a restart or rebalance and read again for device_latest only (latest_next_offset behind next_offset)."
    );
    describe_histogram!(
        LATEST_FLUSH_DURATION,
        Unit::Seconds,
        "Time to fold the pending readings into device_latest, from its first transaction to its last (a timed flush writes slices of 5,000 devices spread over at most half of SINK_LATEST_INTERVAL, pauses included)."
    );
    describe_counter!(
        LATEST_FLUSHED_DEVICES,
        Unit::Count,
        "Device rows written to device_latest by flushes of pending readings."
    );
    describe_gauge!(
        ROLLUP_LAG,
        Unit::Seconds,
        "Now minus the rollup watermark (the end of the rolled-up range)."
    );
}
