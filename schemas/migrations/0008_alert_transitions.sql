-- evaluator-stream: a commit's alert transitions applied in one call, in order, server-side
-- (one round trip instead of one per transition). Returns the alert id each transition
-- touched, in input order, or NULL where the table already reflected it (a replay).

CREATE FUNCTION fleet_apply_alert_transitions(
    p_tenant    text[],
    p_rule      bigint[],
    p_device    text[],
    p_site      text[],
    p_from      text[],
    p_to        text[],
    p_severity  text[],
    p_metric    text[],
    p_value     double precision[],
    p_threshold double precision[],
    p_started   timestamptz[],
    p_time      timestamptz[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[] := '{}';
    id  bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_rule, 1), 0) LOOP
        id := NULL;
        IF p_from[i] IS NULL THEN
            INSERT INTO alerts (tenant_id, rule_id, device_id, site_id, status, severity,
                                metric, value, threshold, started_at, fired_at)
            VALUES (p_tenant[i], p_rule[i], p_device[i], p_site[i], p_to[i], p_severity[i],
                    p_metric[i], p_value[i], p_threshold[i], p_started[i],
                    CASE WHEN p_to[i] = 'firing' THEN p_started[i] END)
            ON CONFLICT (rule_id, tenant_id, device_id) WHERE status IN ('pending', 'firing')
            DO NOTHING
            RETURNING alert_id INTO id;
        ELSIF p_from[i] = 'pending' AND p_to[i] = 'firing' THEN
            UPDATE alerts SET status = 'firing', fired_at = p_time[i], value = p_value[i],
                              updated_at = now()
            WHERE rule_id = p_rule[i] AND tenant_id = p_tenant[i] AND device_id = p_device[i]
              AND status = 'pending'
            RETURNING alert_id INTO id;
        ELSE
            UPDATE alerts SET status = 'resolved', resolved_at = p_time[i],
                              value = COALESCE(p_value[i], value), updated_at = now()
            WHERE rule_id = p_rule[i] AND tenant_id = p_tenant[i] AND device_id = p_device[i]
              AND status IN ('pending', 'firing')
            RETURNING alert_id INTO id;
        END IF;
        ids := ids || id;
    END LOOP;
    RETURN ids;
END
$$;

REVOKE ALL ON FUNCTION fleet_apply_alert_transitions(text[], bigint[], text[], text[], text[],
    text[], text[], text[], double precision[], double precision[], timestamptz[], timestamptz[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fleet_apply_alert_transitions(text[], bigint[], text[], text[], text[],
    text[], text[], text[], double precision[], double precision[], timestamptz[], timestamptz[])
    TO fleet_writer;
