-- 1-minute rollups (0009): the same rows, for ~25 % less CPU per refresh (issue 18).
--
-- fleet_rollup_1m_insert took each group's `last` value as max() over [time in µs, value]
-- arrays: one array built, detoasted and compared per metric value, which cost about a third
-- of the aggregation (1.2M readings of 100,000 devices, 4 metrics each: 17.2 s; this version
-- 12.9 s on the same data). Now the aggregation keeps only max(time) per group, and `last`
-- is read from the reading at that time (the primary key makes it one reading; it holds the
-- metric with a value, since the group's max(time) was taken over its readings that do), by
-- a hash join with a second scan of the same range. One statement, one snapshot: both scans
-- see the same rows.
CREATE OR REPLACE FUNCTION fleet_rollup_1m_insert(p_lo timestamptz, p_hi timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, public SET enable_memoize = off AS $fn$
DECLARE
    inserted bigint;
BEGIN
    WITH agg AS MATERIALIZED (
        SELECT t.tenant_id, t.device_id, m.k,
               date_bin('1 minute', t.time, '2000-01-01 00:00:00+00') AS bucket,
               count(*) AS n, sum(m.v) AS s, min(m.v) AS lo, max(m.v) AS hi,
               max(t.time) AS last_time
        FROM tenants tn
        CROSS JOIN LATERAL (
            SELECT r.time, r.tenant_id, r.device_id, r.metrics FROM telemetry r
            WHERE r.tenant_id = tn.tenant_id AND r.time >= p_lo AND r.time < p_hi
            OFFSET 0) t
        CROSS JOIN LATERAL (
            SELECT e.key AS k,
                   CASE jsonb_typeof(e.value)
                       WHEN 'number' THEN e.value::float8
                       WHEN 'boolean' THEN CASE WHEN e.value::boolean THEN 1.0 ELSE 0.0 END
                   END AS v
            FROM jsonb_each(CASE WHEN jsonb_typeof(t.metrics) = 'object' THEN t.metrics
                                 ELSE '{}'::jsonb END) e) m
        WHERE m.v IS NOT NULL
        GROUP BY t.tenant_id, t.device_id, m.k, 4
    ),
    readings AS (
        SELECT r.time, r.tenant_id, r.device_id, r.metrics
        FROM tenants tn
        CROSS JOIN LATERAL (
            SELECT r.time, r.tenant_id, r.device_id, r.metrics FROM telemetry r
            WHERE r.tenant_id = tn.tenant_id AND r.time >= p_lo AND r.time < p_hi
            OFFSET 0) r
    )
    INSERT INTO telemetry_1m (tenant_id, device_id, metric, bucket, n, sum, min, max,
                              last_time, last)
    SELECT a.tenant_id, a.device_id, a.k, a.bucket, a.n, a.s, a.lo, a.hi, a.last_time,
           CASE jsonb_typeof(r.metrics -> a.k)
               WHEN 'number' THEN (r.metrics -> a.k)::float8
               WHEN 'boolean' THEN CASE WHEN (r.metrics -> a.k)::boolean THEN 1.0 ELSE 0.0 END
           END
    FROM agg a
    JOIN readings r
      ON r.tenant_id = a.tenant_id AND r.device_id = a.device_id AND r.time = a.last_time
    -- Key order: the primary key's leaf pages are written in one pass, and a device's rows of
    -- this call lie together in the heap.
    ORDER BY a.tenant_id, a.device_id, a.k, a.bucket;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted;
END
$fn$;
