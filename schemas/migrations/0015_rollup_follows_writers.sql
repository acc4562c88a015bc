-- The rollup horizon follows what the telemetry writers have stored (issue 18).
--
-- The refresh aggregated every minute older than the clock minus the settle time (0009).
-- A sink that had fallen further behind than that then wrote readings into minutes already
-- aggregated: each was late, its device minute (or, for a sink catching up, the whole
-- minute: see the sink's classify_late) was recorded and recomputed. So a minute of the
-- fleet was aggregated twice while the sink was behind, and the extra work fell on the
-- database just when the sink needed it: a sink behind fell further behind.
--
-- Now each writer stores, with its fenced offset update, the newest ingest time
-- (`received_at`) of the partition's readings it has stored (`consumer_offsets.
-- stored_through`). The horizon is also at most, over those partitions, stored_through plus
-- the time since that commit (`now - (commit's transaction start - stored_through)`: the
-- partition's lag at its last commit), minus the settle time. A sink behind by L holds the
-- rollups L back, so the minutes it is still writing are not aggregated yet and nothing is
-- recomputed; the rollup lag (now - watermark) then includes the sink's lag, as it should.
-- An idle partition or a stopped sink holds the horizon back by its lag at its last commit
-- only, and a writer that has committed nothing for 15 minutes (a group given up, a sink
-- stopped for long) not at all: the rollups go on, and what it writes later is late as
-- before.
--
-- Exactness does not depend on this bound: the horizon only moves earlier than 0014's, and
-- the writers' cutoff (fleet_rollup_1m_cutoff, the clock minus the settle time) is
-- unchanged, so 0009's argument holds as it was. Readings a lagging sink writes are still
-- recorded as late; those at or past the watermark cost the refresh nothing (it drops them).
-- Rows of consumers that write no telemetry (the evaluator's group) leave it NULL.

ALTER TABLE consumer_offsets ADD COLUMN stored_through timestamptz;

CREATE OR REPLACE FUNCTION fleet_refresh_rollup_1m(max_minutes integer DEFAULT 10,
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
