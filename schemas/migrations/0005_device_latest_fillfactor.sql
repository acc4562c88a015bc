-- device_latest is rewritten once per reading of each device. Free room on every page lets
-- those updates be HOT (heap-only: no index writes, no new index entries to vacuum), since
-- the indexed columns (tenant_id, device_id, site_id) keep their values.
ALTER TABLE device_latest SET (fillfactor = 50);
