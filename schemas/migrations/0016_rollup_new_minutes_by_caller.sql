-- A rollup step's new minutes may be aggregated by its caller (issue 18).
--
-- Aggregating the new minutes in SQL (0009-0015: jsonb_each per reading, a hash aggregate of
-- exact numeric sums, and a second pass over the readings for each group's last value) was
-- the largest cost of the refresh, ~10 us of database CPU per reading at 20,000 readings/s,
-- in bursts of seconds once a minute. The sink now reads the new minutes' readings with one
-- COPY, aggregates them itself (exact decimal sums; see timescale-sink's rollup module) and
-- COPYs the rollup rows back, in the same transaction.
--
-- * fleet_refresh_rollup_1m_plan() is 0015's step without the new minutes: it takes the lock,
--   computes the horizon, recomputes invalidated minutes and device minutes, moves the
--   watermark, and returns the new range [new_from, new_to) for the caller to aggregate in a
--   later statement of its transaction. Exactness is 0009's argument unchanged: that
--   statement's snapshot is taken after the horizon's pg_stat_activity check, as the SQL
--   aggregation's was. Device minutes the caller cannot aggregate exactly (a value beyond
--   double precision, a sum beyond its exact range) go through
--   fleet_rollup_1m_write_device_minutes(), the SQL path with its isolation of data errors.
-- * fleet_refresh_rollup_1m() keeps its signature and results: the plan, then the new minutes
--   in SQL. Callers without their own aggregation (and the tests that compare the two) use it.
-- * The sink's role may now insert into telemetry_1m (the rollup rows it COPYs).

CREATE FUNCTION fleet_refresh_rollup_1m_plan(max_minutes integer DEFAULT 10,
                                             max_device_minutes integer DEFAULT 20000)
RETURNS TABLE (watermark timestamptz, rows_written bigint, minutes_recomputed integer,
               device_minutes_recomputed integer, device_minutes_rejected integer,
               device_minutes_pending bigint, more boolean, new_from timestamptz,
               new_to timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public SET work_mem = '256MB' AS $fn$
DECLARE
    origin constant timestamptz := '2000-01-01 00:00:00+00';
    budget constant interval := make_interval(mins => greatest(max_minutes, 1));
    settle interval := fleet_rollup_settle();
    started timestamptz;
    oldest_xact timestamptz;
    stored_bound timestamptz;
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
        RETURN QUERY SELECT s.watermark, 0::bigint, 0, 0, 0, 0::bigint, false,
                            NULL::timestamptz, NULL::timestamptz
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
    -- The telemetry writers' progress: per partition, the ingest time stored through, moved
    -- on by the time since that commit (a partition that is idle, or a sink that stopped,
    -- holds the rollups back by the lag it had, no more; after 15 minutes, not at all).
    SELECT min(c.stored_through + (started - c.updated_at)) INTO stored_bound
      FROM public.consumer_offsets c
     WHERE c.stored_through IS NOT NULL AND c.updated_at > started - interval '15 minutes';
    horizon := date_bin('1 minute',
                        least(started, COALESCE(oldest_xact, started),
                              COALESCE(stored_bound, started)) - settle,
                        origin);

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

    -- (c) The new minutes [old_wm, new_wm) are the caller's to aggregate, in this transaction
    -- and in a later statement (so with a snapshot taken after (a)); rejections recorded for
    -- them before are void. (d) The watermark (never backwards).
    new_wm := greatest(old_wm, least(horizon, old_wm + budget));
    IF new_wm > old_wm AND EXISTS (SELECT 1 FROM public.telemetry_1m_rejected) THEN
        DELETE FROM public.telemetry_1m_rejected x
        WHERE x.bucket >= old_wm AND x.bucket < new_wm;
    END IF;
    UPDATE public.telemetry_1m_state s SET watermark = new_wm, refreshed_at = clock_timestamp();

    RETURN QUERY SELECT new_wm, written, recomputed, dev_recomputed, dev_rejected, dev_pending,
                        backlog OR dev_pending > 0 OR new_wm < horizon, old_wm, new_wm;
END
$fn$;


-- 0015's step as one call: the plan, then the new minutes aggregated in SQL.
CREATE OR REPLACE FUNCTION fleet_refresh_rollup_1m(max_minutes integer DEFAULT 10,
                                        max_device_minutes integer DEFAULT 20000)
RETURNS TABLE (watermark timestamptz, rows_written bigint, minutes_recomputed integer,
               device_minutes_recomputed integer, device_minutes_rejected integer,
               device_minutes_pending bigint, more boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public SET work_mem = '256MB' AS $fn$
DECLARE
    p record;
    r record;
    written bigint;
    dev_rejected integer;
BEGIN
    SELECT * INTO p FROM public.fleet_refresh_rollup_1m_plan(max_minutes, max_device_minutes);
    written := p.rows_written;
    dev_rejected := p.device_minutes_rejected;
    IF p.new_from < p.new_to THEN
        SELECT * INTO r FROM public.fleet_rollup_1m_insert_range_isolating(p.new_from, p.new_to);
        written := written + r.rows_written;
        dev_rejected := dev_rejected + r.rejected;
    END IF;
    RETURN QUERY SELECT p.watermark, written, p.minutes_recomputed, p.device_minutes_recomputed,
                        dev_rejected, p.device_minutes_pending, p.more;
END
$fn$;

-- The given device minutes aggregated in SQL, data errors isolated (0014), for a caller
-- that aggregates the rest itself. Returns rows written and device minutes rejected.
CREATE FUNCTION fleet_rollup_1m_write_device_minutes(p_tenants text[], p_devices text[],
                                                     p_buckets timestamptz[],
                                                     OUT rows_written bigint,
                                                     OUT rejected integer)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public
SET work_mem = '256MB' AS $fn$
    SELECT r.rows_written, r.rejected
    FROM public.fleet_rollup_1m_insert_isolating(p_tenants, p_devices, p_buckets) r
$fn$;

REVOKE ALL ON FUNCTION fleet_refresh_rollup_1m_plan(integer, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_rollup_1m_write_device_minutes(text[], text[], timestamptz[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fleet_refresh_rollup_1m_plan(integer, integer) TO fleet_writer;
GRANT EXECUTE ON FUNCTION fleet_rollup_1m_write_device_minutes(text[], text[], timestamptz[])
    TO fleet_writer;
GRANT INSERT ON telemetry_1m TO fleet_writer;
