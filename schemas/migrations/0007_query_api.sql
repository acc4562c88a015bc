-- query-api (issue 7): key verification that refuses suspended tenants and records use,
-- least-privilege updates of alerts, and key figures into system_metrics.

-- Definer functions read tenants to refuse keys of suspended tenants; under FORCE ROW LEVEL
-- SECURITY the owner needs its own policy for that (as 0003 gave it for the credentials).
DO $lookup$
BEGIN
    EXECUTE format('CREATE POLICY credential_lookup ON tenants FOR SELECT TO %I USING (true)', current_user);
END
$lookup$;

-- Verifies an API key by its hash: the key's id, tenant and role when it is not revoked and
-- its tenant (if any) is active. Records last_used_at at most once a minute per key, skipping
-- a key another request is recording just now, so concurrent requests never wait on the row.
CREATE FUNCTION api_key_authenticate(p_key_hash text)
RETURNS TABLE (key_id bigint, tenant_id text, role text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
#variable_conflict use_column
BEGIN
    UPDATE public.api_keys AS k SET last_used_at = now()
    WHERE k.key_id = (SELECT s.key_id FROM public.api_keys AS s
                      WHERE s.key_hash = p_key_hash AND s.revoked_at IS NULL
                        AND (s.last_used_at IS NULL OR s.last_used_at < now() - interval '1 minute')
                      FOR UPDATE SKIP LOCKED);
    RETURN QUERY
    SELECT k.key_id, k.tenant_id::text, k.role
    FROM public.api_keys AS k
    LEFT JOIN public.tenants AS t ON t.tenant_id = k.tenant_id
    WHERE k.key_hash = p_key_hash AND k.revoked_at IS NULL
      AND (k.tenant_id IS NULL OR t.status = 'active');
END
$fn$;
REVOKE ALL ON FUNCTION api_key_authenticate(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api_key_authenticate(text) TO fleet_api;

-- The API only acknowledges alerts; the evaluator owns every other column.
REVOKE UPDATE ON alerts FROM fleet_api;
GRANT UPDATE (acknowledged_at, acknowledged_by, updated_at) ON alerts TO fleet_api;

-- query-api's own figures (request rate, errors, latency) for the pipeline-health page. It
-- still reads system_metrics only through system_metrics_view (operators only).
GRANT INSERT ON system_metrics TO fleet_api;
