-- Announce changes to credentials (tenants, devices, gateway tokens) on channel
-- fleet_credentials, so ingest-producer reloads its token cache at once instead of at its
-- next periodic refresh. One notification per statement (bulk provisioning sends one), the
-- payload is the table name; PostgreSQL delivers it at commit and merges duplicates within a
-- transaction. Safe to re-run: the function is replaced and each trigger dropped first.

CREATE OR REPLACE FUNCTION fleet_notify_credentials() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleet_credentials', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

DO $notify$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['tenants', 'devices', 'gateway_tokens'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', tbl || '_notify_credentials', tbl);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION fleet_notify_credentials()',
                       tbl || '_notify_credentials', tbl);
    END LOOP;
END
$notify$;
