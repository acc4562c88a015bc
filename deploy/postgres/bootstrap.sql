-- Roles and database for fleetstream. Idempotent: safe to run on every start.
-- Run as a superuser:
--   * deploy/local/deps.sh pipes it into `psql` as the postgres OS user;
--   * deploy/docker-compose.yml mounts it into /docker-entrypoint-initdb.d/
--     (runs once, as POSTGRES_USER=fleet, when the volume is first created).
--
-- fleet         the migration owner: owns the schema, runs migrations, and in
--               tests creates one database per test (hence SUPERUSER: CREATE
--               DATABASE, CREATE EXTENSION timescaledb, roles, ...).
-- fleet_api     query-api's runtime role: no BYPASSRLS, so row-level security
--               applies; privileges are granted by the migrations.
-- fleet_writer  sink / evaluator / ingest runtime role; likewise no BYPASSRLS.
-- Passwords equal the role names: local development and CI only.
\set ON_ERROR_STOP on

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet') THEN
    CREATE ROLE fleet;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
    CREATE ROLE fleet_api;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
    CREATE ROLE fleet_writer;
  END IF;
END
$$;

-- Re-asserted every time so a role left in another state (other password,
-- BYPASSRLS from an old experiment) is put back to what tests expect.
ALTER ROLE fleet        WITH LOGIN SUPERUSER PASSWORD 'fleet';
ALTER ROLE fleet_api    WITH LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD 'fleet_api';
ALTER ROLE fleet_writer WITH LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD 'fleet_writer';

-- CREATE DATABASE cannot run inside a DO block / transaction: \gexec runs the
-- generated statement only when the database is missing.
SELECT 'CREATE DATABASE fleetstream OWNER fleet'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'fleetstream')
\gexec
ALTER DATABASE fleetstream OWNER TO fleet;
