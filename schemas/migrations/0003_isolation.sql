-- Tenant isolation, enforced by PostgreSQL (DESIGN §5):
--
-- * relational tenant-owned tables: row-level security, forced even for the table owner,
--   policy tenant_isolation (own tenant, reads and writes, WITH CHECK) and operator_read
--   (operators read every tenant); operator_admin may write every tenant (provisioning);
--   fleet_writer (sink, evaluator, ingest) is trusted across tenants by design.
-- * time-series tables (no RLS, see 0002): fleet_api has no privilege on them and reads
--   through security_barrier views that apply the same predicate.
--
-- query-api sets app.tenant_id and app.role with set_config(..., true) inside each
-- transaction; an unset tenant matches nothing (ids are never empty).

DO $rls$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['tenants', 'sites', 'devices', 'gateway_tokens', 'device_latest',
                               'alert_rules', 'alerts', 'api_keys'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', tbl);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', tbl);
        EXECUTE format($p$CREATE POLICY tenant_isolation ON %I
                          USING (tenant_id = current_setting('app.tenant_id', true))
                          WITH CHECK (tenant_id = current_setting('app.tenant_id', true))$p$, tbl);
        EXECUTE format($p$CREATE POLICY operator_read ON %I FOR SELECT
                          USING (current_setting('app.role', true) IN ('operator', 'operator_admin'))$p$, tbl);
        EXECUTE format($p$CREATE POLICY operator_admin_write ON %I
                          USING (current_setting('app.role', true) = 'operator_admin')
                          WITH CHECK (current_setting('app.role', true) = 'operator_admin')$p$, tbl);
        EXECUTE format('CREATE POLICY writer_access ON %I TO fleet_writer USING (true) WITH CHECK (true)', tbl);
    END LOOP;
END
$rls$;

CREATE VIEW telemetry_view WITH (security_barrier) AS
SELECT time, tenant_id, device_id, site_id, msg_type, seq, metrics
FROM telemetry
WHERE tenant_id = current_setting('app.tenant_id', true)
   OR current_setting('app.role', true) IN ('operator', 'operator_admin');

CREATE VIEW system_metrics_view WITH (security_barrier) AS
SELECT time, metric_name, instance, tags, value
FROM system_metrics
WHERE current_setting('app.role', true) IN ('operator', 'operator_admin');

-- Credential look-ups happen before a tenant is known, so they go through definer functions
-- that return only the matching, non-revoked row. Under FORCE ROW LEVEL SECURITY the owner
-- itself is subject to policies, hence the owner-only policies.
DO $lookup$
BEGIN
    EXECUTE format('CREATE POLICY credential_lookup ON api_keys FOR SELECT TO %I USING (true)', current_user);
    EXECUTE format('CREATE POLICY credential_lookup ON devices FOR SELECT TO %I USING (true)', current_user);
    EXECUTE format('CREATE POLICY credential_lookup ON gateway_tokens FOR SELECT TO %I USING (true)', current_user);
    EXECUTE format('CREATE POLICY owner_update ON api_keys FOR UPDATE TO %I USING (true) WITH CHECK (true)', current_user);
END
$lookup$;

CREATE FUNCTION api_key_lookup(p_key_hash text)
RETURNS TABLE (key_id bigint, tenant_id text, role text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
    SELECT k.key_id, k.tenant_id::text, k.role
    FROM public.api_keys k
    WHERE k.key_hash = p_key_hash AND k.revoked_at IS NULL
$fn$;

-- Privileges. Nothing by default; each role gets what its service needs.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
REVOKE ALL ON FUNCTION api_key_lookup(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_create_daily_partition(text, date) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_maintain_partitions(integer) FROM PUBLIC;

DO $grants$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO fleet_api, fleet_writer',
                   current_database());
END
$grants$;
GRANT USAGE ON SCHEMA public TO fleet_api, fleet_writer;

-- query-api: provisioning and dashboards; time series only through the views.
GRANT SELECT ON fleetstream_settings TO fleet_api;
GRANT SELECT, INSERT, UPDATE ON tenants TO fleet_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON sites, devices, gateway_tokens, alert_rules, api_keys TO fleet_api;
GRANT SELECT ON device_latest TO fleet_api;
GRANT SELECT, UPDATE ON alerts TO fleet_api;
GRANT SELECT ON telemetry_view, system_metrics_view TO fleet_api;
GRANT EXECUTE ON FUNCTION api_key_lookup(text) TO fleet_api;

-- sink, evaluator, ingest: write time series, latest values, offsets and alerts; read
-- provisioning data (device tokens for ingest, rules for the evaluator).
GRANT SELECT ON fleetstream_settings TO fleet_writer;
GRANT SELECT, INSERT ON telemetry, system_metrics TO fleet_writer;
GRANT SELECT, INSERT, UPDATE ON device_latest, consumer_offsets TO fleet_writer;
GRANT SELECT ON tenants, sites, devices, gateway_tokens, alert_rules TO fleet_writer;
GRANT SELECT, INSERT, UPDATE ON alerts TO fleet_writer;
GRANT EXECUTE ON FUNCTION fleet_maintain_partitions(integer) TO fleet_writer;
