-- Byte-order ("C") collation for the tenant and device keys of the two tables the sink writes
-- on every batch.
--
-- The cluster's locale is C.UTF-8, which PostgreSQL 15 does not recognise as "C": each text
-- comparison in a B-tree goes through strcoll() on copied, NUL-terminated strings, and
-- abbreviated keys are off. Every COPYed reading descends the telemetry primary key
-- (tenant_id, device_id, time) and the (tenant_id, time DESC) index, and every device_latest
-- upsert descends its primary key, so those comparisons are a large share of the sink's
-- database CPU. Measured on this machine, 1M readings inserted into the telemetry table
-- shape: 7.5-7.7 s with "C" keys against 8.4-9.1 s with the default collation.
--
-- Identifiers are limited to [A-Za-z0-9_.:-] (the fleet_id domain and the ingest validation),
-- for which C.UTF-8 order is byte order: listings keep their order and nothing visible
-- changes. Comparisons with default-collation values (parameters, other tables' columns)
-- take the column's collation, so the indexes stay usable.
--
-- A column used by a view or a policy cannot change collation, so telemetry_view and
-- device_latest's tenant_isolation policy are dropped and recreated unchanged. On
-- TimescaleDB, telemetry is a hypertable with compression enabled, whose columns cannot be
-- altered: there only device_latest (a plain table in both layouts) changes.

-- device_latest: both layouts.
DROP POLICY tenant_isolation ON device_latest;
ALTER TABLE device_latest
    ALTER COLUMN tenant_id TYPE text COLLATE "C",
    ALTER COLUMN device_id TYPE text COLLATE "C";
CREATE POLICY tenant_isolation ON device_latest
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

-- telemetry: plain PostgreSQL layout only.
DO $collation$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        DROP VIEW telemetry_view;
        ALTER TABLE telemetry
            ALTER COLUMN tenant_id TYPE text COLLATE "C",
            ALTER COLUMN device_id TYPE text COLLATE "C";
        CREATE VIEW telemetry_view WITH (security_barrier) AS
        SELECT time, tenant_id, device_id, site_id, msg_type, seq, metrics
        FROM telemetry
        WHERE tenant_id = current_setting('app.tenant_id', true)
           OR current_setting('app.role', true) IN ('operator', 'operator_admin');
        GRANT SELECT ON telemetry_view TO fleet_api;
    END IF;
END
$collation$;
