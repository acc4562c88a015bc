-- Time-series tables in one of two layouts, chosen by whether the timescaledb extension is
-- installed in this database (the migrator installs it when the server offers it, unless the
-- plain layout is forced):
--
--   timescaledb: hypertables (telemetry: 1-day chunks; system_metrics: 1-hour chunks),
--                telemetry compressed by (tenant_id, device_id) ordered by time DESC.
--                Compression and retention policies are set by the migrator (configurable ages).
--   postgres:    declarative range partitions by day plus a DEFAULT partition, so a row outside
--                every daily partition is stored, never lost; fleet_maintain_partitions()
--                creates partitions ahead and drops those past retention.
--
-- Neither table has row-level security: TimescaleDB refuses RLS on compressed hypertables.
-- Tenants read them only through the security_barrier views of 0003.
DO $timeseries$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        CREATE TABLE telemetry (
            time      timestamptz NOT NULL,
            tenant_id text NOT NULL,
            device_id text NOT NULL,
            site_id   text,
            msg_type  text NOT NULL DEFAULT 'telemetry',
            seq       bigint NOT NULL,
            metrics   jsonb NOT NULL,
            PRIMARY KEY (tenant_id, device_id, time)
        );
        PERFORM create_hypertable('telemetry', by_range('time', INTERVAL '1 day'),
                                  create_default_indexes => false);
        CREATE INDEX telemetry_tenant_time ON telemetry (tenant_id, time DESC);
        ALTER TABLE telemetry SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'tenant_id, device_id',
            timescaledb.compress_orderby = 'time DESC'
        );

        CREATE TABLE system_metrics (
            time        timestamptz NOT NULL,
            metric_name text NOT NULL,
            instance    text NOT NULL,
            tags        jsonb NOT NULL DEFAULT '{}',
            value       double precision NOT NULL
        );
        PERFORM create_hypertable('system_metrics', by_range('time', INTERVAL '1 hour'),
                                  create_default_indexes => false);
        CREATE INDEX system_metrics_name_time ON system_metrics (metric_name, time DESC);
    ELSE
        CREATE TABLE telemetry (
            time      timestamptz NOT NULL,
            tenant_id text NOT NULL,
            device_id text NOT NULL,
            site_id   text,
            msg_type  text NOT NULL DEFAULT 'telemetry',
            seq       bigint NOT NULL,
            metrics   jsonb NOT NULL,
            PRIMARY KEY (tenant_id, device_id, time)
        ) PARTITION BY RANGE (time);
        CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
        CREATE INDEX telemetry_tenant_time ON telemetry (tenant_id, time DESC);

        CREATE TABLE system_metrics (
            time        timestamptz NOT NULL,
            metric_name text NOT NULL,
            instance    text NOT NULL,
            tags        jsonb NOT NULL DEFAULT '{}',
            value       double precision NOT NULL
        ) PARTITION BY RANGE (time);
        CREATE TABLE system_metrics_default PARTITION OF system_metrics DEFAULT;
        CREATE INDEX system_metrics_name_time ON system_metrics (metric_name, time DESC);
    END IF;
END
$timeseries$;

INSERT INTO fleetstream_settings (key, value) VALUES
    ('telemetry_retention', '90 days'),
    ('system_metrics_retention', '30 days'),
    ('telemetry_compress_after', '1 day');

-- Creates the daily partition of `parent` that holds `day` (plain layout). Rows of that day
-- already in the DEFAULT partition are moved into the new partition before it is attached,
-- because ATTACH would otherwise fail on them.
CREATE FUNCTION fleet_create_daily_partition(parent text, day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    part text := format('%s_p%s', parent, to_char(day, 'YYYYMMDD'));
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF parent NOT IN ('telemetry', 'system_metrics') THEN
        RAISE EXCEPTION 'fleet_create_daily_partition: unknown table %', parent;
    END IF;
    IF to_regclass(format('public.%I', part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Serialise with writers of the default partition while rows move.
    EXECUTE format('LOCK TABLE public.%I IN SHARE ROW EXCLUSIVE MODE', parent || '_default');
    EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part, parent);
    EXECUTE format('WITH moved AS (DELETE FROM public.%I WHERE time >= $1 AND time < $2 RETURNING *) '
                   'INSERT INTO public.%I SELECT * FROM moved', parent || '_default', part)
        USING lo, hi;
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    RETURN true;
END
$fn$;

-- Plain layout upkeep, run periodically by the sink under an advisory lock: daily partitions
-- from yesterday to `days_ahead` days ahead, and whole partitions past retention dropped.
-- Returns a line per action. A no-op in the TimescaleDB layout (policies do this there).
CREATE FUNCTION fleet_maintain_partitions(days_ahead integer DEFAULT 3)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    tbl text;
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
    FOREACH tbl IN ARRAY ARRAY['telemetry', 'system_metrics'] LOOP
        FOR i IN -1..days_ahead LOOP
            d := today + i;
            IF fleet_create_daily_partition(tbl, d) THEN
                RETURN NEXT format('created %s_p%s', tbl, to_char(d, 'YYYYMMDD'));
            END IF;
        END LOOP;
        retention := (SELECT value::interval FROM fleetstream_settings
                      WHERE key = tbl || '_retention');
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
        EXECUTE format('DELETE FROM public.%I WHERE time < $1', tbl || '_default')
            USING now() - retention;
    END LOOP;
END
$fn$;
