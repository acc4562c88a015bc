-- 1-minute rollups (0009, 0012, 0013): one device's data never stalls or floods the refresh
-- for the others (issue 14).
--
-- 1. Exact sums. `sum` was double precision: two readings of 1.5e308 (real devices send
--    DBL_MAX for "sensor absent") in one minute overflowed it, the refresh transaction failed,
--    was retried and failed again for ever, and every tenant's rollups stopped. It is now
--    `numeric`: the exact sum of the readings' values as stored (a jsonb number is a decimal;
--    converting it to numeric is exact and, unlike the float8 conversion, needs no text
--    round trip). No finite sum overflows it. min, max and last stay double precision (they
--    are readings' values). Averages are computed from the exact sums by the API and rounded
--    once to double precision (`fleet_float8`).
-- 2. A refresh step that still fails for a data reason (SQLSTATE class 22, e.g. a jsonb
--    number beyond double precision written outside the sink) is isolated: the step's
--    (tenant, device, minute) groups are bisected under savepoints until the failing ones
--    are found; those are recorded in telemetry_1m_rejected (and reported to the caller,
--    which logs and counts them) and the rest is written. The watermark moves on.
-- 3. Invalidation per device and minute. A batch used to record the late part of its whole
--    time range, so one 2-day-old reading among live ones invalidated ~2,880 minutes of the
--    whole fleet. A writer now asks the database for the cutoff (fleet_rollup_1m_cutoff())
--    and records the (tenant, device, minute) of each of its readings older than it
--    (fleet_rollup_1m_invalidate_minutes()); the refresh recomputes exactly those device
--    minutes, at most max_device_minutes per call, by primary-key range scans of telemetry.
--    The exactness argument of 0009 holds unchanged with x_S the cutoff's clock reading: it
--    is taken by a statement of S, after S began (S is then visible in pg_stat_activity).
--    fleet_rollup_1m_invalidate(lo, hi) stays for writers that cannot list their devices.
-- 4. The key columns take byte-order collation (as telemetry's and device_latest's did in
--    0010): the refresh sorts and inserts hundreds of thousands of keys per minute.

DROP VIEW telemetry_1m_view;
ALTER TABLE telemetry_1m
    ALTER COLUMN tenant_id TYPE text COLLATE "C",
    ALTER COLUMN device_id TYPE text COLLATE "C",
    ALTER COLUMN metric TYPE text COLLATE "C",
    -- float8 text output is the shortest exact decimal (extra_float_digits > 0, the default).
    ALTER COLUMN sum TYPE numeric USING (sum::text)::numeric;
CREATE VIEW telemetry_1m_view WITH (security_barrier) AS
SELECT tenant_id, device_id, metric, bucket, n, sum, min, max, last_time, last
FROM telemetry_1m
WHERE tenant_id = current_setting('app.tenant_id', true)
   OR current_setting('app.role', true) IN ('operator', 'operator_admin');
GRANT SELECT ON telemetry_1m_view TO fleet_api;

-- A numeric (an average of exact sums) rounded to double precision. The conversion goes
-- through text and strtod, which rounds correctly; it fails only below half the smallest
-- subnormal (rounds to zero with ERANGE), so those become 0. Values beyond double precision
-- fail as before: an average never exceeds the largest of its values.
CREATE FUNCTION fleet_float8(x numeric) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN abs(x) < 2.4703282292062328e-324 THEN 0::float8 ELSE x::float8 END
$fn$;

-- Device minutes written late, recorded by fleet_rollup_1m_invalidate_minutes(). Duplicates
-- are allowed (no unique index: concurrent batches never wait on each other here).
CREATE TABLE telemetry_1m_invalid_minutes (
    tenant_id text COLLATE "C" NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    bucket    timestamptz NOT NULL
);
CREATE INDEX telemetry_1m_invalid_minutes_key
    ON telemetry_1m_invalid_minutes (tenant_id, device_id, bucket);

-- Device minutes the refresh could not aggregate (item 2), with PostgreSQL's error.
CREATE TABLE telemetry_1m_rejected (
    tenant_id   text COLLATE "C" NOT NULL,
    device_id   text COLLATE "C" NOT NULL,
    bucket      timestamptz NOT NULL,
    sqlstate    text NOT NULL,
    error       text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id, bucket)
);

CREATE VIEW telemetry_1m_rejected_view WITH (security_barrier) AS
SELECT tenant_id, device_id, bucket, sqlstate, error, recorded_at
FROM telemetry_1m_rejected
WHERE tenant_id = current_setting('app.tenant_id', true)
   OR current_setting('app.role', true) IN ('operator', 'operator_admin');

-- The clock a writer compares its reading times with (see 0009's exactness argument): read
-- it in the batch transaction, after its first statement.
CREATE FUNCTION fleet_rollup_1m_cutoff() RETURNS timestamptz
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
    SELECT clock_timestamp() - public.fleet_rollup_settle()
$fn$;

-- Records device minutes for the rollup to recompute: the minutes (aligned to 2000-01-01) of
-- the caller's readings older than the cutoff it read in this transaction. Returns how many.
CREATE FUNCTION fleet_rollup_1m_invalidate_minutes(p_tenants text[], p_devices text[],
                                                   p_buckets timestamptz[])
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    recorded integer;
BEGIN
    INSERT INTO public.telemetry_1m_invalid_minutes (tenant_id, device_id, bucket)
    SELECT k.t, k.d, date_bin('1 minute', k.b, '2000-01-01 00:00:00+00')
    FROM unnest(p_tenants, p_devices, p_buckets) AS k (t, d, b)
    WHERE k.t IS NOT NULL AND k.d IS NOT NULL AND k.b IS NOT NULL;
    GET DIAGNOSTICS recorded = ROW_COUNT;
    RETURN recorded;
END
$fn$;

-- Aggregates readings into telemetry_1m (the caller removed any rows of those groups first).
-- `p_source` is a query of (time, tenant_id, device_id, metrics) over $1..$5 (range bounds
-- and key arrays, see the two callers below); it is read twice in one statement (one
-- snapshot): once to aggregate, once to fetch each group's last reading (0012).
CREATE FUNCTION fleet_rollup_1m_write(p_source text, p_lo timestamptz, p_hi timestamptz,
                                      p_tenants text[], p_devices text[],
                                      p_buckets timestamptz[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, public SET enable_memoize = off AS $fn$
DECLARE
    inserted bigint;
BEGIN
    EXECUTE format($sql$
        WITH agg AS MATERIALIZED (
            SELECT t.tenant_id, t.device_id, m.k,
                   date_bin('1 minute', t.time, '2000-01-01 00:00:00+00') AS bucket,
                   count(*) AS n, sum(m.v) AS s, min(m.v) AS lo, max(m.v) AS hi,
                   max(t.time) AS last_time
            FROM (%1$s) t
            CROSS JOIN LATERAL (
                SELECT e.key AS k,
                       CASE jsonb_typeof(e.value)
                           WHEN 'number' THEN e.value::numeric
                           WHEN 'boolean' THEN CASE WHEN e.value::boolean THEN 1 ELSE 0 END
                       END AS v
                FROM jsonb_each(CASE WHEN jsonb_typeof(t.metrics) = 'object' THEN t.metrics
                                     ELSE '{}'::jsonb END) e) m
            WHERE m.v IS NOT NULL
            GROUP BY t.tenant_id, t.device_id, m.k, 4
        ),
        readings AS (%1$s)
        INSERT INTO telemetry_1m (tenant_id, device_id, metric, bucket, n, sum, min, max,
                                  last_time, last)
        SELECT a.tenant_id, a.device_id, a.k, a.bucket, a.n, a.s, a.lo::float8, a.hi::float8,
               a.last_time,
               CASE jsonb_typeof(r.metrics -> a.k)
                   WHEN 'number' THEN (r.metrics -> a.k)::float8
                   WHEN 'boolean' THEN CASE WHEN (r.metrics -> a.k)::boolean THEN 1.0 ELSE 0.0 END
               END
        FROM agg a
        JOIN readings r
          ON r.tenant_id = a.tenant_id AND r.device_id = a.device_id AND r.time = a.last_time
        -- Key order: the primary key's leaf pages are written in one pass, and a device's
        -- rows of this call lie together in the heap.
        ORDER BY a.tenant_id, a.device_id, a.k, a.bucket
    $sql$, p_source)
    USING p_lo, p_hi, p_tenants, p_devices, p_buckets;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted;
END
$fn$;

-- The readings of [p_lo, p_hi), driven by tenants so each tenant's slice is an index range
-- scan on (tenant_id, time) (0009).
CREATE OR REPLACE FUNCTION fleet_rollup_1m_insert(p_lo timestamptz, p_hi timestamptz)
RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog, public AS $fn$
    SELECT public.fleet_rollup_1m_write($src$
        SELECT r.time, r.tenant_id, r.device_id, r.metrics
        FROM public.tenants tn
        CROSS JOIN LATERAL (
            SELECT r.time, r.tenant_id, r.device_id, r.metrics FROM public.telemetry r
            WHERE r.tenant_id = tn.tenant_id AND r.time >= $1 AND r.time < $2
            OFFSET 0) r
    $src$, p_lo, p_hi, NULL, NULL, NULL)
$fn$;

-- The readings of the given device minutes: one primary-key range scan each.
CREATE FUNCTION fleet_rollup_1m_insert_keys(p_tenants text[], p_devices text[],
                                            p_buckets timestamptz[])
RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog, public AS $fn$
    SELECT public.fleet_rollup_1m_write($src$
        SELECT r.time, r.tenant_id, r.device_id, r.metrics
        FROM unnest($3, $4, $5) AS k (tenant_id, device_id, bucket)
        JOIN public.tenants tn ON tn.tenant_id = k.tenant_id
        CROSS JOIN LATERAL (
            SELECT r.time, r.tenant_id, r.device_id, r.metrics FROM public.telemetry r
            WHERE r.tenant_id = k.tenant_id AND r.device_id = k.device_id
              AND r.time >= k.bucket AND r.time < k.bucket + interval '1 minute'
            OFFSET 0) r
    $src$, NULL, NULL, p_tenants, p_devices, p_buckets)
$fn$;

-- Writes the given device minutes, bisecting under savepoints when a data error (SQLSTATE
-- class 22) stops the statement: a failing single device minute is recorded in
-- telemetry_1m_rejected (and a WARNING names it) instead. Returns rows written and the number
-- of device minutes rejected.
CREATE FUNCTION fleet_rollup_1m_insert_isolating(p_tenants text[], p_devices text[],
                                                 p_buckets timestamptz[],
                                                 OUT rows_written bigint,
                                                 OUT rejected integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, public AS $fn$
DECLARE
    n integer := COALESCE(array_length(p_tenants, 1), 0);
    half integer;
    a record;
    b record;
    state text;
    message text;
BEGIN
    rows_written := 0;
    rejected := 0;
    IF n = 0 THEN
        RETURN;
    END IF;
    BEGIN
        rows_written := public.fleet_rollup_1m_insert_keys(p_tenants, p_devices, p_buckets);
        -- Minutes rejected earlier and now aggregated are no longer rejected.
        IF EXISTS (SELECT 1 FROM public.telemetry_1m_rejected) THEN
            DELETE FROM public.telemetry_1m_rejected x
            USING unnest(p_tenants, p_devices, p_buckets) AS k (tenant_id, device_id, bucket)
            WHERE x.tenant_id = k.tenant_id AND x.device_id = k.device_id
              AND x.bucket = k.bucket;
        END IF;
        RETURN;
    EXCEPTION WHEN data_exception THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
    END;
    IF n = 1 THEN
        INSERT INTO public.telemetry_1m_rejected (tenant_id, device_id, bucket, sqlstate, error)
        VALUES (p_tenants[1], p_devices[1], p_buckets[1], state, left(message, 1000))
        ON CONFLICT (tenant_id, device_id, bucket) DO UPDATE
            SET sqlstate = EXCLUDED.sqlstate, error = EXCLUDED.error,
                recorded_at = EXCLUDED.recorded_at;
        RAISE WARNING 'rollup: device minute not aggregated: tenant %, device %, minute %: % (%)',
            p_tenants[1], p_devices[1], p_buckets[1], left(message, 300), state;
        rejected := 1;
        RETURN;
    END IF;
    half := n / 2;
    SELECT * INTO a FROM public.fleet_rollup_1m_insert_isolating(
        p_tenants[1:half], p_devices[1:half], p_buckets[1:half]);
    SELECT * INTO b FROM public.fleet_rollup_1m_insert_isolating(
        p_tenants[half + 1:n], p_devices[half + 1:n], p_buckets[half + 1:n]);
    rows_written := a.rows_written + b.rows_written;
    rejected := a.rejected + b.rejected;
END
$fn$;

-- [p_lo, p_hi) for all devices; on a data error, the range's device minutes one group at a
-- time (bisected). The rejected device minutes' earlier rows are deleted by the caller.
CREATE FUNCTION fleet_rollup_1m_insert_range_isolating(p_lo timestamptz, p_hi timestamptz,
                                                       OUT rows_written bigint,
                                                       OUT rejected integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, public AS $fn$
DECLARE
    ts text[];
    ds text[];
    bs timestamptz[];
    r record;
BEGIN
    rejected := 0;
    BEGIN
        rows_written := public.fleet_rollup_1m_insert(p_lo, p_hi);
        DELETE FROM public.telemetry_1m_rejected x WHERE x.bucket >= p_lo AND x.bucket < p_hi;
        RETURN;
    EXCEPTION WHEN data_exception THEN
        NULL;
    END;
    SELECT array_agg(k.tenant_id ORDER BY k.tenant_id, k.device_id, k.bucket),
           array_agg(k.device_id ORDER BY k.tenant_id, k.device_id, k.bucket),
           array_agg(k.bucket ORDER BY k.tenant_id, k.device_id, k.bucket)
      INTO ts, ds, bs
      FROM (SELECT DISTINCT t.tenant_id, t.device_id,
                   date_bin('1 minute', t.time, '2000-01-01 00:00:00+00') AS bucket
            FROM public.tenants tn
            CROSS JOIN LATERAL (
                SELECT x.time, x.tenant_id, x.device_id FROM public.telemetry x
                WHERE x.tenant_id = tn.tenant_id AND x.time >= p_lo AND x.time < p_hi
                OFFSET 0) t) k;
    SELECT * INTO r FROM public.fleet_rollup_1m_insert_isolating(ts, ds, bs);
    rows_written := r.rows_written;
    rejected := r.rejected;
END
$fn$;

-- One step of rollup upkeep, one transaction (0009), now also recomputing up to
-- max_device_minutes invalidated device minutes, and isolating data errors. New columns:
-- device minutes recomputed, device minutes rejected (this call), device minutes still
-- pending.
DROP FUNCTION fleet_refresh_rollup_1m(integer);
CREATE FUNCTION fleet_refresh_rollup_1m(max_minutes integer DEFAULT 10,
                                        max_device_minutes integer DEFAULT 20000)
RETURNS TABLE (watermark timestamptz, rows_written bigint, minutes_recomputed integer,
               device_minutes_recomputed integer, device_minutes_rejected integer,
               device_minutes_pending bigint, more boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public SET work_mem = '256MB' AS $fn$
DECLARE
    origin constant timestamptz := '2000-01-01 00:00:00+00';
    budget constant interval := make_interval(mins => greatest(max_minutes, 1));
    settle interval := fleet_rollup_settle();
    started timestamptz;
    oldest_xact timestamptz;
    hidden bigint;
    horizon timestamptz;
    old_wm timestamptz;
    new_wm timestamptz;
    first_time timestamptz;
    los timestamptz[];
    his timestamptz[];
    upto timestamptz;
    used interval := interval '0';
    written bigint := 0;
    recomputed integer := 0;
    dev_recomputed integer := 0;
    dev_rejected integer := 0;
    dev_pending bigint := 0;
    backlog boolean := false;
    ts text[];
    ds text[];
    bs timestamptz[];
    r record;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'fleet_refresh_rollup_1m needs READ COMMITTED (a snapshot per statement)';
    END IF;
    IF current_setting('track_activities') <> 'on' THEN
        RAISE EXCEPTION 'fleet_refresh_rollup_1m needs track_activities = on';
    END IF;
    -- "fleetrol"
    IF NOT pg_try_advisory_xact_lock(7380380137713348460) THEN
        RETURN QUERY SELECT s.watermark, 0::bigint, 0, 0, 0, 0::bigint, false
                     FROM public.telemetry_1m_state s;
        RETURN;
    END IF;

    -- (a) The horizon. clock_timestamp() first, pg_stat_activity in a later statement.
    started := clock_timestamp();
    SELECT min(a.xact_start) FILTER (WHERE a.backend_type = 'client backend'
                                     AND a.pid <> pg_backend_pid()),
           count(*) FILTER (WHERE a.query = '<insufficient privilege>')
      INTO oldest_xact, hidden
      FROM pg_stat_activity a
     WHERE a.datname = current_database();
    IF hidden > 0 THEN
        RAISE EXCEPTION 'fleet_refresh_rollup_1m: % sessions are hidden from role %; it needs pg_read_all_stats',
            hidden, current_user;
    END IF;
    horizon := date_bin('1 minute', least(started, COALESCE(oldest_xact, started)) - settle, origin);

    SELECT s.watermark INTO old_wm FROM public.telemetry_1m_state s FOR UPDATE;
    IF old_wm IS NULL THEN
        SELECT min(f.first_time) INTO first_time
          FROM public.tenants tn
          CROSS JOIN LATERAL (SELECT min(x.time) AS first_time FROM public.telemetry x
                              WHERE x.tenant_id = tn.tenant_id) f;
        old_wm := least(COALESCE(date_bin('1 minute', first_time, origin), horizon), horizon);
    END IF;

    -- (b) Range invalidations (fleet_rollup_1m_invalidate): whole minutes below the
    -- watermark, overlapping ranges merged.
    WITH gone AS (
        DELETE FROM public.telemetry_1m_invalid i RETURNING i.lo, i.hi
    ), minutes AS (
        SELECT date_bin('1 minute', g.lo, origin) AS lo,
               least(date_bin('1 minute', g.hi, origin) + interval '1 minute', old_wm) AS hi
        FROM gone g
    ), ordered AS (
        SELECT m.lo, m.hi,
               max(m.hi) OVER (ORDER BY m.lo, m.hi
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reach
        FROM minutes m WHERE m.lo < m.hi
    ), islands AS (
        SELECT o.lo, o.hi,
               sum(CASE WHEN o.reach IS NULL OR o.lo > o.reach THEN 1 ELSE 0 END)
                   OVER (ORDER BY o.lo, o.hi) AS island
        FROM ordered o
    ), merged AS (
        SELECT min(x.lo) AS lo, max(x.hi) AS hi FROM islands x GROUP BY x.island
    )
    SELECT array_agg(g.lo ORDER BY g.lo), array_agg(g.hi ORDER BY g.lo) INTO los, his
    FROM merged g;

    FOR i IN 1 .. COALESCE(array_length(los, 1), 0) LOOP
        IF used >= budget THEN
            -- Over this call's budget: left for the next call (hi is inclusive there).
            INSERT INTO public.telemetry_1m_invalid (lo, hi)
            VALUES (los[i], his[i] - interval '1 minute');
            backlog := true;
            CONTINUE;
        END IF;
        upto := least(his[i], los[i] + (budget - used));
        DELETE FROM public.telemetry_1m x WHERE x.bucket >= los[i] AND x.bucket < upto;
        SELECT * INTO r FROM public.fleet_rollup_1m_insert_range_isolating(los[i], upto);
        written := written + r.rows_written;
        dev_rejected := dev_rejected + r.rejected;
        recomputed := recomputed + (extract(epoch FROM upto - los[i]) / 60)::integer;
        used := used + (upto - los[i]);
        IF upto < his[i] THEN
            INSERT INTO public.telemetry_1m_invalid (lo, hi)
            VALUES (upto, his[i] - interval '1 minute');
            backlog := true;
        END IF;
    END LOOP;

    -- (b') Device minutes (fleet_rollup_1m_invalidate_minutes): at most max_device_minutes
    -- distinct ones, oldest first; those at or past the watermark need nothing (the new
    -- minutes below include them). Rows recorded while this runs stay for the next call.
    WITH pick AS (
        SELECT DISTINCT i.tenant_id, i.device_id, i.bucket
        FROM public.telemetry_1m_invalid_minutes i
        ORDER BY i.bucket, i.tenant_id, i.device_id
        LIMIT greatest(max_device_minutes, 1)
    ), gone AS (
        DELETE FROM public.telemetry_1m_invalid_minutes i
        USING pick p
        WHERE i.tenant_id = p.tenant_id AND i.device_id = p.device_id AND i.bucket = p.bucket
        RETURNING i.tenant_id, i.device_id, i.bucket
    ), keys AS (
        SELECT DISTINCT g.tenant_id, g.device_id, g.bucket FROM gone g WHERE g.bucket < old_wm
    )
    SELECT array_agg(k.tenant_id ORDER BY k.tenant_id, k.device_id, k.bucket),
           array_agg(k.device_id ORDER BY k.tenant_id, k.device_id, k.bucket),
           array_agg(k.bucket ORDER BY k.tenant_id, k.device_id, k.bucket)
      INTO ts, ds, bs
      FROM keys k;
    IF ts IS NOT NULL THEN
        DELETE FROM public.telemetry_1m x
        USING unnest(ts, ds, bs) AS k (tenant_id, device_id, bucket)
        WHERE x.tenant_id = k.tenant_id AND x.device_id = k.device_id AND x.bucket = k.bucket;
        SELECT * INTO r FROM public.fleet_rollup_1m_insert_isolating(ts, ds, bs);
        written := written + r.rows_written;
        dev_rejected := dev_rejected + r.rejected;
        dev_recomputed := array_length(ts, 1);
    END IF;
    SELECT count(*) INTO dev_pending FROM public.telemetry_1m_invalid_minutes;

    -- (c) New minutes, then (d) the watermark (never backwards).
    new_wm := greatest(old_wm, least(horizon, old_wm + budget));
    IF new_wm > old_wm THEN
        SELECT * INTO r FROM public.fleet_rollup_1m_insert_range_isolating(old_wm, new_wm);
        written := written + r.rows_written;
        dev_rejected := dev_rejected + r.rejected;
    END IF;
    UPDATE public.telemetry_1m_state s SET watermark = new_wm, refreshed_at = clock_timestamp();

    RETURN QUERY SELECT new_wm, written, recomputed, dev_recomputed, dev_rejected, dev_pending,
                        backlog OR dev_pending > 0 OR new_wm < horizon;
END
$fn$;

REVOKE ALL ON telemetry_1m_invalid_minutes, telemetry_1m_rejected FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_write(text, timestamptz, timestamptz, text[], text[],
                                             timestamptz[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_insert_keys(text[], text[], timestamptz[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_insert_isolating(text[], text[], timestamptz[])
    FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_insert_range_isolating(timestamptz, timestamptz)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_cutoff() FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_invalidate_minutes(text[], text[], timestamptz[])
    FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_refresh_rollup_1m(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fleet_rollup_1m_cutoff() TO fleet_writer;
GRANT EXECUTE ON FUNCTION fleet_rollup_1m_invalidate_minutes(text[], text[], timestamptz[])
    TO fleet_writer;
GRANT EXECUTE ON FUNCTION fleet_refresh_rollup_1m(integer, integer) TO fleet_writer;
GRANT SELECT ON telemetry_1m_rejected TO fleet_writer;
GRANT SELECT ON telemetry_1m_rejected_view TO fleet_api;
