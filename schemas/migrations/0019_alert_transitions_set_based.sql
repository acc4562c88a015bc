-- evaluator-stream: a commit's alert transitions applied set-based (issue #18). 0008 ran one
-- INSERT or UPDATE per transition in a PL/pgSQL loop; at start-up thousands of devices open
-- alerts at once, and on a loaded two-core machine those calls took 1.1–4.9 s each.
--
-- Same contract as 0008: the transitions are applied in input order, and the result holds,
-- in input order, the alert id each transition touched, or NULL where the table already
-- reflected it (a replay, or a transition whose alert is not in the state it expects).
--
-- How: openings are what a start-up burst is made of, and what a set-based statement does
-- best (one INSERT of many rows: twice as fast per transition as the loop at 500 per call);
-- a firing or a resolution costs the same either way (its UPDATE writes a new row version
-- and index entries whatever drives it), so those stay one statement each, as in 0008.
--
-- The order: only transitions of the same alert (rule, tenant, device) affect each other,
-- so the call is cut into rounds, round k holding each alert's k-th transition. Within a
-- round every alert appears once, so the round's openings go in one INSERT and its other
-- transitions one by one; the rounds run one after another, so round k+1 sees what round k
-- wrote. Almost every call is one round. Alert ids stay unique and follow input order
-- within a round; an alert reopened later in the same call gets its id after the first
-- round's.
--
-- The INSERT is planned for its call (EXECUTE) with its arrays' real lengths, and reads them
-- unfiltered: a filtered input is estimated at a few rows, and the map from opened alerts
-- back to their input became a nested loop (500 × 500 comparisons per call where a hash
-- join does 500). Fewer than 8 openings in a round go one by one, which costs less than
-- planning.

CREATE OR REPLACE FUNCTION fleet_apply_alert_transitions(
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
LANGUAGE plpgsql AS $fn$
DECLARE
    n           int := coalesce(array_length(p_rule, 1), 0);
    rounds      int := 1;
    opens       int;
    i           int;
    id          bigint;
    ids         bigint[];
    one_by_one  int[];
    s_pos       int[];
    s_ids       bigint[];
    s_tenant    text[];
    s_rule      bigint[];
    s_device    text[];
    s_site      text[];
    s_to        text[];
    s_severity  text[];
    s_metric    text[];
    s_value     double precision[];
    s_threshold double precision[];
    s_started   timestamptz[];
    -- One round's openings ($1..$10, in input order); the opened alert's id for each, or
    -- NULL where its alert is open already.
    open_sql    CONSTANT text := $sql$
        WITH input AS (
            SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 WITH ORDINALITY AS u(tenant_id, rule_id, device_id, site_id, to_status,
                                      severity, metric, value, threshold, started_at, j)
        ), opened AS (
            INSERT INTO alerts (tenant_id, rule_id, device_id, site_id, status, severity,
                                metric, value, threshold, started_at, fired_at)
            SELECT tenant_id, rule_id, device_id, site_id, to_status, severity, metric, value,
                   threshold, started_at, CASE WHEN to_status = 'firing' THEN started_at END
            FROM input
            ON CONFLICT (rule_id, tenant_id, device_id) WHERE status IN ('pending', 'firing')
            DO NOTHING
            RETURNING alert_id, rule_id, tenant_id, device_id
        )
        SELECT array_agg(opened.alert_id ORDER BY input.j)
        FROM input LEFT JOIN opened
          ON opened.rule_id = input.rule_id AND opened.tenant_id = input.tenant_id
         AND opened.device_id = input.device_id$sql$;
BEGIN
    IF n = 0 THEN
        RETURN '{}';
    END IF;
    ids := array_fill(NULL::bigint, ARRAY[n]);
    IF n >= 8 THEN
        SELECT max(per_alert), count(*) FILTER (WHERE f IS NULL) INTO rounds, opens
        FROM (SELECT count(*) OVER (PARTITION BY r, t, d) AS per_alert, f
              FROM unnest(p_rule, p_tenant, p_device, p_from) AS u(r, t, d, f)) AS per_row;
    END IF;

    FOR k IN 1 .. rounds LOOP
        s_pos := NULL;
        IF n < 8 OR opens = 0 THEN
            one_by_one := ARRAY(SELECT generate_series(1, n));
        ELSIF rounds = 1 AND opens = n THEN
            one_by_one := '{}';
            s_tenant := p_tenant; s_rule := p_rule; s_device := p_device; s_site := p_site;
            s_to := p_to; s_severity := p_severity; s_metric := p_metric; s_value := p_value;
            s_threshold := p_threshold; s_started := p_started;
            s_pos := ARRAY(SELECT generate_series(1, n));
        ELSE
            SELECT array_agg(pos ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(pos ORDER BY pos) FILTER (WHERE from_status IS NOT NULL),
                   array_agg(tenant_id ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(rule_id ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(device_id ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(site_id ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(to_status ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(severity ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(metric ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(value ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(threshold ORDER BY pos) FILTER (WHERE from_status IS NULL),
                   array_agg(started_at ORDER BY pos) FILTER (WHERE from_status IS NULL)
            INTO s_pos, one_by_one, s_tenant, s_rule, s_device, s_site, s_to, s_severity,
                 s_metric, s_value, s_threshold, s_started
            FROM (
                SELECT u.*, row_number() OVER (PARTITION BY u.rule_id, u.tenant_id, u.device_id
                                               ORDER BY u.pos) AS round
                FROM unnest(p_tenant, p_rule, p_device, p_site, p_from, p_to, p_severity,
                            p_metric, p_value, p_threshold, p_started)
                     WITH ORDINALITY AS u(tenant_id, rule_id, device_id, site_id, from_status,
                                          to_status, severity, metric, value, threshold,
                                          started_at, pos)
            ) AS numbered
            WHERE round = k;
            IF coalesce(array_length(s_pos, 1), 0) < 8 THEN
                one_by_one := ARRAY(SELECT unnest(s_pos || coalesce(one_by_one, '{}'))
                                    ORDER BY 1);
                s_pos := NULL;
            END IF;
        END IF;

        IF s_pos IS NOT NULL THEN
            EXECUTE open_sql INTO s_ids
            USING s_tenant, s_rule, s_device, s_site, s_to, s_severity, s_metric, s_value,
                  s_threshold, s_started;
            FOR m IN 1 .. array_length(s_pos, 1) LOOP
                ids[s_pos[m]] := s_ids[m];
            END LOOP;
        END IF;

        -- 0008's statements, one transition at a time.
        FOREACH i IN ARRAY coalesce(one_by_one, '{}') LOOP
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
            ids[i] := id;
        END LOOP;
    END LOOP;
    RETURN ids;
END
$fn$;
