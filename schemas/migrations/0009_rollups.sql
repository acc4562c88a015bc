-- 1-minute rollups of telemetry (issue 7): one row per device, metric and minute, so a
-- device's day in 1-minute buckets is ~1,440 narrow rows instead of every raw jsonb reading.
--
-- Not a TimescaleDB continuous aggregate: metrics are a dynamic jsonb map, so the rollup is our
-- own table in both layouts, maintained by fleet_refresh_rollup_1m() (called by the sink's
-- maintenance task) and kept exact under late data by fleet_rollup_1m_invalidate() (called by
-- the sink inside every batch transaction).
--
-- Values follow query-api's series semantics exactly: a jsonb number is its float8 value, a
-- boolean is 1/0, anything else (string, null, object, array) is not a value and not counted.
-- A (device, metric, minute) with no value has no row.
--
-- Exactness. Let c be clock_timestamp() when a refresh starts, and read (after c) the oldest
-- xact_start of the other client sessions of this database in pg_stat_activity. The refresh
-- aggregates raw rows only below its horizon
--     h = floor_to_minute(min(c, that oldest xact_start) - settle)
-- and each statement of it runs with a fresh snapshot (READ COMMITTED, plpgsql). A batch
-- transaction S of the sink, whose invalidation call runs at clock time x_S (after S began,
-- so x_S >= its xact_start), records every row with time < x_S - settle in
-- telemetry_1m_invalid. Take a row of S with time t in [old watermark, h):
--   * S committed before the refresh's aggregate statement: the statement sees the row;
--   * S still open when pg_stat_activity was read: h <= xact_start(S) - settle
--     <= x_S - settle, so t < x_S - settle and S recorded an invalidation for t;
--   * S not yet visible in pg_stat_activity at that read: it began after the read, so
--     x_S > c and t < h <= c - settle < x_S - settle: again invalidated.
-- An invalidation row becomes visible only when S commits, i.e. together with S's rows, and
-- the refresh that deletes it recomputes its minutes with a later snapshot that sees them.
-- Rows of S at or after x_S - settle need no invalidation: by the same cases every refresh
-- keeps its horizon at or below them until S has committed. So every committed reading is
-- in the rollup once the watermark has passed it and the invalidations have been processed.
-- (Comparing with clock_timestamp() rather than S's transaction_timestamp() is the
-- conservative choice: a transaction's start time is taken a moment before it shows in
-- pg_stat_activity.)
--
-- Caveats, by design: a session that stays in a transaction holds the horizon back (the
-- lag is reported as sink_rollup_lag_seconds); telemetry written outside the sink after the
-- watermark passed its time must call fleet_rollup_1m_invalidate() in its transaction; rows
-- are only ever added to telemetry (retention drops whole days of both tables); raising
-- rollup_settle while the sink runs can miss rows of the batches in flight at that moment.

INSERT INTO fleetstream_settings (key, value) VALUES ('rollup_settle', '1 minute')
ON CONFLICT (key) DO NOTHING;

DO $rollups$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        CREATE TABLE telemetry_1m (
            tenant_id text NOT NULL,
            device_id text NOT NULL,
            metric    text NOT NULL,
            bucket    timestamptz NOT NULL,
            n         bigint NOT NULL,
            sum       double precision NOT NULL,
            min       double precision NOT NULL,
            max       double precision NOT NULL,
            last_time timestamptz NOT NULL,
            last      double precision NOT NULL,
            PRIMARY KEY (tenant_id, device_id, metric, bucket)
                INCLUDE (n, sum, min, max, last_time, last)
        );
        PERFORM create_hypertable('telemetry_1m', by_range('bucket', INTERVAL '7 days'),
                                  create_default_indexes => false);
    ELSE
        CREATE TABLE telemetry_1m (
            tenant_id text NOT NULL,
            device_id text NOT NULL,
            metric    text NOT NULL,
            bucket    timestamptz NOT NULL,
            n         bigint NOT NULL,
            sum       double precision NOT NULL,
            min       double precision NOT NULL,
            max       double precision NOT NULL,
            last_time timestamptz NOT NULL,
            last      double precision NOT NULL,
            PRIMARY KEY (tenant_id, device_id, metric, bucket)
                INCLUDE (n, sum, min, max, last_time, last)
        ) PARTITION BY RANGE (bucket);
        CREATE TABLE telemetry_1m_default PARTITION OF telemetry_1m DEFAULT;
    END IF;
END
$rollups$;
-- The primary key covers every column, so a device's day is an index-only scan of ~20 leaf
-- pages in key order; the heap is in arrival (time) order, where one device's minutes sit on
-- as many pages as there are minutes (a series request read ~1,440 heap pages on the
-- benchmark's 50M readings before this). Index-only scans need the visibility map, which
-- vacuum (autovacuum after inserts) sets.
--
-- Recomputing late minutes deletes by bucket across devices; rows arrive in bucket order, so a
-- BRIN index finds them for a fraction of a B-tree's upkeep.
CREATE INDEX telemetry_1m_bucket ON telemetry_1m USING brin (bucket);

-- The end of the rolled-up range: every minute below it is in telemetry_1m (NULL until the
-- first refresh).
CREATE TABLE telemetry_1m_state (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    watermark    timestamptz,
    refreshed_at timestamptz
);
INSERT INTO telemetry_1m_state DEFAULT VALUES;

-- Ranges of reading times written late (below the writer's clock - settle), inclusive; the
-- next refresh recomputes their minutes below the watermark.
CREATE TABLE telemetry_1m_invalid (
    lo timestamptz NOT NULL,
    hi timestamptz NOT NULL
);

CREATE VIEW telemetry_1m_view WITH (security_barrier) AS
SELECT tenant_id, device_id, metric, bucket, n, sum, min, max, last_time, last
FROM telemetry_1m
WHERE tenant_id = current_setting('app.tenant_id', true)
   OR current_setting('app.role', true) IN ('operator', 'operator_admin');

CREATE FUNCTION fleet_rollup_settle() RETURNS interval
LANGUAGE sql STABLE SET search_path = pg_catalog, public AS $fn$
    SELECT COALESCE((SELECT value::interval FROM public.fleetstream_settings
                     WHERE key = 'rollup_settle'), interval '1 minute')
$fn$;

-- Called by every writer of telemetry inside its transaction, once, with the least and
-- greatest reading time it wrote. Records the late part of that range, if any (usually
-- nothing: live readings are newer than clock - settle). See the exactness argument above.
CREATE FUNCTION fleet_rollup_1m_invalidate(p_lo timestamptz, p_hi timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    cutoff timestamptz;
BEGIN
    IF p_lo IS NULL THEN
        RETURN false;
    END IF;
    cutoff := clock_timestamp() - fleet_rollup_settle();
    IF p_lo >= cutoff THEN
        RETURN false;
    END IF;
    INSERT INTO telemetry_1m_invalid (lo, hi) VALUES (p_lo, least(COALESCE(p_hi, p_lo), cutoff));
    RETURN true;
END
$fn$;

-- Aggregates the raw readings of [p_lo, p_hi) into telemetry_1m (the caller removed any rows
-- of those minutes first). Driven by tenants so each tenant's slice is an index range scan on
-- (tenant_id, time) (OFFSET 0 keeps the planner from flattening it into one scan of the whole
-- index with a time filter): telemetry of a tenant no longer in `tenants` is not rolled up
-- (nobody can read it: its devices are gone with it). `last` is taken with max() over [time in µs, value]
-- arrays, which hash-aggregates, instead of array_agg(... ORDER BY), which sorts per group;
-- the times of one device are distinct, so the value never decides. Memoize is off: the
-- planner would cache jsonb_each() per distinct metrics document, which never repeats, and
-- that cost four times the aggregation itself (10 minutes of 10,000 devices: 7.8 s → 2 s).
CREATE FUNCTION fleet_rollup_1m_insert(p_lo timestamptz, p_hi timestamptz) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, public SET enable_memoize = off AS $fn$
DECLARE
    inserted bigint;
BEGIN
    INSERT INTO telemetry_1m (tenant_id, device_id, metric, bucket, n, sum, min, max,
                              last_time, last)
    SELECT t.tenant_id, t.device_id, m.k,
           date_bin('1 minute', t.time, '2000-01-01 00:00:00+00'),
           count(*), sum(m.v), min(m.v), max(m.v), max(t.time),
           (max(ARRAY[(extract(epoch FROM t.time) * 1000000)::float8, m.v]))[2]
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
    -- Key order: the primary key's leaf pages are written in one pass, and a device's rows of
    -- this call lie together in the heap.
    ORDER BY t.tenant_id, t.device_id, m.k, 4;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN inserted;
END
$fn$;

-- One step of rollup upkeep, one transaction: (a) the horizon, (b) recompute the minutes of
-- pending invalidations below the watermark (at most max_minutes of them; the rest stay
-- pending), (c) aggregate [watermark, horizon), at most max_minutes of it, (d) advance the
-- watermark. Returns the new watermark, rollup rows written, minutes recomputed, and whether
-- work is left (call again). A concurrent call returns at once with nothing done.
--
-- The first call starts the watermark at the oldest telemetry minute (rolling up the whole
-- history, max_minutes per call), or at the horizon when there is no telemetry yet.
CREATE FUNCTION fleet_refresh_rollup_1m(max_minutes integer DEFAULT 10)
RETURNS TABLE (watermark timestamptz, rows_written bigint, minutes_recomputed integer,
               more boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public SET work_mem = '64MB' AS $fn$
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
    backlog boolean := false;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'fleet_refresh_rollup_1m needs READ COMMITTED (a snapshot per statement)';
    END IF;
    IF current_setting('track_activities') <> 'on' THEN
        RAISE EXCEPTION 'fleet_refresh_rollup_1m needs track_activities = on';
    END IF;
    -- "fleetrol"
    IF NOT pg_try_advisory_xact_lock(7380380137713348460) THEN
        RETURN QUERY SELECT s.watermark, 0::bigint, 0, false FROM public.telemetry_1m_state s;
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
          CROSS JOIN LATERAL (SELECT min(r.time) AS first_time FROM public.telemetry r
                              WHERE r.tenant_id = tn.tenant_id) f;
        old_wm := least(COALESCE(date_bin('1 minute', first_time, origin), horizon), horizon);
    END IF;

    -- (b) Invalidations: whole minutes below the watermark, overlapping ranges merged.
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
        DELETE FROM public.telemetry_1m r WHERE r.bucket >= los[i] AND r.bucket < upto;
        written := written + fleet_rollup_1m_insert(los[i], upto);
        recomputed := recomputed + (extract(epoch FROM upto - los[i]) / 60)::integer;
        used := used + (upto - los[i]);
        IF upto < his[i] THEN
            INSERT INTO public.telemetry_1m_invalid (lo, hi)
            VALUES (upto, his[i] - interval '1 minute');
            backlog := true;
        END IF;
    END LOOP;

    -- (c) New minutes, then (d) the watermark (never backwards).
    new_wm := greatest(old_wm, least(horizon, old_wm + budget));
    IF new_wm > old_wm THEN
        written := written + fleet_rollup_1m_insert(old_wm, new_wm);
    END IF;
    UPDATE public.telemetry_1m_state s SET watermark = new_wm, refreshed_at = clock_timestamp();

    RETURN QUERY SELECT new_wm, written, recomputed, backlog OR new_wm < horizon;
END
$fn$;

-- Plain layout: the rollup gets daily partitions like telemetry (same retention, so a range
-- is never in the rollup without its raw rows). Replaces 0002's versions; grants are kept.
CREATE OR REPLACE FUNCTION fleet_create_daily_partition(parent text, day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    part text := format('%s_p%s', parent, to_char(day, 'YYYYMMDD'));
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    col text := CASE parent WHEN 'telemetry_1m' THEN 'bucket' ELSE 'time' END;
BEGIN
    IF parent NOT IN ('telemetry', 'system_metrics', 'telemetry_1m') THEN
        RAISE EXCEPTION 'fleet_create_daily_partition: unknown table %', parent;
    END IF;
    IF to_regclass(format('public.%I', part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Serialise with writers of the default partition while rows move.
    EXECUTE format('LOCK TABLE public.%I IN SHARE ROW EXCLUSIVE MODE', parent || '_default');
    EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part, parent);
    EXECUTE format('WITH moved AS (DELETE FROM public.%I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                   'INSERT INTO public.%I SELECT * FROM moved', parent || '_default', col, col, part)
        USING lo, hi;
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    RETURN true;
END
$fn$;

CREATE OR REPLACE FUNCTION fleet_maintain_partitions(days_ahead integer DEFAULT 3)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    tbl text;
    col text;
    retention interval;
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
    i integer;
    part record;
    part_day date;
BEGIN
    IF (SELECT value FROM fleetstream_settings WHERE key = 'storage_layout') <> 'postgres' THEN
        RETURN;
    END IF;
    FOREACH tbl IN ARRAY ARRAY['telemetry', 'system_metrics', 'telemetry_1m'] LOOP
        col := CASE tbl WHEN 'telemetry_1m' THEN 'bucket' ELSE 'time' END;
        FOR i IN -1..days_ahead LOOP
            d := today + i;
            IF fleet_create_daily_partition(tbl, d) THEN
                RETURN NEXT format('created %s_p%s', tbl, to_char(d, 'YYYYMMDD'));
            END IF;
        END LOOP;
        retention := (SELECT value::interval FROM fleetstream_settings
                      WHERE key = CASE tbl WHEN 'telemetry_1m' THEN 'telemetry'
                                           ELSE tbl END || '_retention');
        IF retention IS NULL THEN
            CONTINUE;
        END IF;
        FOR part IN
            SELECT c.relname FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = format('public.%I', tbl)::regclass
              AND c.relname ~ ('^' || tbl || '_p[0-9]{8}$')
        LOOP
            part_day := to_date(right(part.relname, 8), 'YYYYMMDD');
            IF (part_day + 1)::timestamp AT TIME ZONE 'UTC' <= now() - retention THEN
                EXECUTE format('DROP TABLE public.%I', part.relname);
                RETURN NEXT format('dropped %s', part.relname);
            END IF;
        END LOOP;
        EXECUTE format('DELETE FROM public.%I WHERE %I < $1', tbl || '_default', col)
            USING now() - retention;
    END LOOP;
END
$fn$;

-- The refresh reads other sessions' xact_start; without pg_read_all_stats (or superuser) the
-- owner sees them hidden and the refresh refuses to run rather than guess.
DO $stats$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') THEN
        BEGIN
            EXECUTE format('GRANT pg_read_all_stats TO %I', current_user);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'role % lacks pg_read_all_stats: fleet_refresh_rollup_1m will refuse to run until it is granted',
                current_user;
        END;
    END IF;
END
$stats$;

-- Privileges: the API reads rollups only through the view (and the watermark, no tenant
-- data); writers call the two entry points; nothing else is reachable.
REVOKE ALL ON telemetry_1m, telemetry_1m_state, telemetry_1m_invalid FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_settle() FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_invalidate(timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_insert(timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_refresh_rollup_1m(integer) FROM PUBLIC;
GRANT SELECT ON telemetry_1m_view, telemetry_1m_state TO fleet_api;
GRANT EXECUTE ON FUNCTION fleet_rollup_1m_invalidate(timestamptz, timestamptz) TO fleet_writer;
GRANT EXECUTE ON FUNCTION fleet_refresh_rollup_1m(integer) TO fleet_writer;
