-- evaluator-stream: the transactional outbox for alerts.v1, the per-partition event-time
-- watermark stored beside the offsets, rule-change notifications, and stricter rule checks.

-- Highest event time a consumer group has seen per partition, committed with next_offset so
-- a restart resumes the same event-time clock (the sink leaves it NULL).
ALTER TABLE consumer_offsets ADD COLUMN event_time_watermark timestamptz;

-- Each alert transition, written in the transaction that stores the evaluator's offsets; a
-- publisher sends unsent rows to alerts.v1 and marks them sent. event_id is deterministic
-- (rule, device, episode start, status), so a replay after a crash produces the same id and
-- the primary key turns the second insert into a no-op.
CREATE TABLE alert_outbox (
    outbox_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   text NOT NULL UNIQUE,
    tenant_id  fleet_id NOT NULL,
    device_id  text NOT NULL,
    alert_id   bigint NOT NULL,
    -- The AlertEvent, Avro single-object encoded.
    payload    bytea NOT NULL,
    -- When the message that caused the transition reached ingest (NULL for timer-driven ones).
    source_received_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_at    timestamptz
);
CREATE INDEX alert_outbox_unsent ON alert_outbox (outbox_id) WHERE sent_at IS NULL;
CREATE INDEX alert_outbox_sent ON alert_outbox (sent_at) WHERE sent_at IS NOT NULL;

ALTER TABLE alert_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY writer_access ON alert_outbox TO fleet_writer USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON alert_outbox TO fleet_writer;
GRANT SELECT ON alert_outbox TO fleet_api;
CREATE POLICY tenant_isolation ON alert_outbox TO fleet_api
    USING (tenant_id = current_setting('app.tenant_id', true));
CREATE POLICY operator_read ON alert_outbox FOR SELECT TO fleet_api
    USING (current_setting('app.role', true) IN ('operator', 'operator_admin'));

-- Rule shape checks beyond 0001: a window needs a metric aggregate, a no-data rule's metric
-- is optional, hysteresis only makes sense for ordered comparisons, scope fields are ids.
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_resolve_needs_order
    CHECK (resolve_threshold IS NULL OR op IN ('>', '>=', '<', '<='));
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_threshold_finite
    CHECK (threshold IS NULL OR threshold BETWEEN -1e300 AND 1e300);
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_window_bounded
    CHECK (window_s IS NULL OR window_s <= 86400);
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_no_data_bounded
    CHECK (no_data_s IS NULL OR no_data_s <= 604800);
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_for_bounded CHECK (for_s <= 86400);
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_kind_fields
    CHECK ((kind = 'window') = (agg IS NOT NULL AND window_s IS NOT NULL));

-- Evaluators LISTEN on this channel and reload their rules (payload: the rule id).
CREATE FUNCTION alert_rules_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('alert_rules_changed',
                      COALESCE(NEW.rule_id, OLD.rule_id)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER alert_rules_changed AFTER INSERT OR UPDATE OR DELETE ON alert_rules
    FOR EACH ROW EXECUTE FUNCTION alert_rules_notify();

-- The evaluator reads telemetry (window warm start) and device_latest (no-data warm start);
-- both are already granted to fleet_writer in 0003.
