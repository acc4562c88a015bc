-- The rollup's settle time: 1 minute -> 30 seconds (issue 18: rollup lag under 2 minutes).
--
-- A minute is final once the database clock has passed its end by the settle time; readings
-- older than the clock minus the settle time are "late" and mark their device minute for the
-- rollup to recompute (0009's exactness argument holds for any settle time: lowering it only
-- makes more readings late, which costs a recompute, never a missed row). The settle time
-- therefore needs to cover what a live reading takes from its device to the sink's commit,
-- not more: that is 0.2-2.5 s at the 99th percentile at 20,000 msg/s on two cores
-- (BENCHMARKS.md), and a sink catching up after an outage holds the rollups back by itself
-- (0015). With 1 minute the rollup lag was 92-130 s in steady state (settle + up to a minute
-- + the refresh interval); with 30 s it is 30 s less.
--
-- Only the shipped default changes: an installation that set another value keeps it.
UPDATE fleetstream_settings SET value = '30 seconds'
WHERE key = 'rollup_settle' AND value = '1 minute';

CREATE OR REPLACE FUNCTION fleet_rollup_settle() RETURNS interval
LANGUAGE sql STABLE SET search_path = pg_catalog, public AS $fn$
    SELECT COALESCE((SELECT value::interval FROM public.fleetstream_settings
                     WHERE key = 'rollup_settle'), interval '30 seconds')
$fn$;
