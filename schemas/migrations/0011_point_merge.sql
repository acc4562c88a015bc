-- One point per (tenant, device, time), and the newest value of each metric in device_latest.
--
-- telemetry: readings that share (tenant_id, device_id, time) are one point. The sink merges
-- them: the union of their metrics, the last write in partition order winning per metric
-- (InfluxDB's rule for fields of one series at one timestamp). Nothing changes in the table;
-- the sink's merge statement is `ON CONFLICT (tenant_id, device_id, time) DO UPDATE SET
-- metrics = telemetry.metrics || EXCLUDED.metrics` (timescale-sink/src/writer.rs).
--
-- device_latest: one row per device, holding per metric its newest value (ThingsBoard's
-- "latest per key"). A device that reports temperature and humidity in separate messages
-- shows both, each with its own time:
--
--   time          the newest time of any metric of the device;
--   metrics       every metric ever reported (until the row is deleted), with its newest value;
--   metric_times  jsonb object: metric name -> time of its newest value, in microseconds since
--                 the Unix epoch (a JSON integer), present only for metrics whose newest value
--                 is older than `time`. A metric absent from it has the row's `time`.
--                 Devices that send all their metrics in every reading keep it '{}', which
--                 keeps the sink's upsert as cheap as before.
--   site_id, msg_type, seq, received_at: of the newest reading (largest time; at equal time,
--                 the later in partition order).
--
-- A metric's value at equal times: the later write in partition order wins, as in telemetry,
-- so device_latest always equals, per metric, the value at that metric's newest time in
-- telemetry.
ALTER TABLE device_latest ADD COLUMN metric_times jsonb NOT NULL DEFAULT '{}';

-- Microseconds since the Unix epoch of a timestamptz (exact: extract() is numeric).
CREATE FUNCTION fleet_epoch_us(t timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (extract(epoch FROM t) * 1000000)::bigint;

-- The time of metric `name` in a device_latest row.
CREATE FUNCTION fleet_latest_metric_time(row_time timestamptz, metric_times jsonb, name text)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(to_timestamp((metric_times ->> name)::numeric / 1000000), row_time);

-- Merges two device_latest states of one device: `s` (stored) and `n` (newer in partition
-- order). Per metric the value with the larger time wins; at equal times `n` wins. The result
-- has the same shape as the inputs (see above). The sink calls it only when the cheap case
-- (n's time >= s's time, n's metrics all at n's time, and n reports every metric s has) does
-- not apply.
CREATE FUNCTION fleet_latest_merge(
    s_time timestamptz, s_metrics jsonb, s_times jsonb,
    n_time timestamptz, n_metrics jsonb, n_times jsonb,
    OUT latest_time timestamptz, OUT latest_metrics jsonb, OUT latest_metric_times jsonb)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    WITH pairs AS (
        SELECT coalesce(s.key, n.key) AS key, s.value AS s_value, n.value AS n_value,
               CASE WHEN s.key IS NOT NULL
                    THEN coalesce((s_times ->> s.key)::bigint, fleet_epoch_us(s_time)) END AS s_us,
               CASE WHEN n.key IS NOT NULL
                    THEN coalesce((n_times ->> n.key)::bigint, fleet_epoch_us(n_time)) END AS n_us
        FROM jsonb_each(s_metrics) s FULL JOIN jsonb_each(n_metrics) n ON s.key = n.key
    ), winners AS (
        SELECT key,
               CASE WHEN n_us IS NOT NULL AND (s_us IS NULL OR n_us >= s_us)
                    THEN n_value ELSE s_value END AS value,
               CASE WHEN n_us IS NOT NULL AND (s_us IS NULL OR n_us >= s_us)
                    THEN n_us ELSE s_us END AS us
        FROM pairs
    )
    SELECT greatest(s_time, n_time),
           coalesce(jsonb_object_agg(key, value), '{}'::jsonb),
           coalesce(jsonb_object_agg(key, us)
                        FILTER (WHERE us < fleet_epoch_us(greatest(s_time, n_time))),
                    '{}'::jsonb)
    FROM winners
$fn$;

GRANT EXECUTE ON FUNCTION fleet_epoch_us(timestamptz), fleet_latest_metric_time(timestamptz, jsonb, text),
    fleet_latest_merge(timestamptz, jsonb, jsonb, timestamptz, jsonb, jsonb) TO fleet_writer, fleet_api;
