-- Core relational tables: tenants, sites, devices, tokens, latest values, alerting, API keys,
-- consumer offsets. Tenant isolation (RLS, views, grants) is applied in 0003.

-- Roles are cluster-wide: several databases (and tests running in parallel) share them, so
-- creation tolerates a concurrent creator. Passwords/LOGIN are set by the deployment.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
        BEGIN
            CREATE ROLE fleet_api NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
        BEGIN
            CREATE ROLE fleet_writer NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END
$roles$;

-- Key/value facts about this database: the storage layout chosen at migration time,
-- retention and compression ages.
CREATE TABLE fleetstream_settings (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO fleetstream_settings (key, value)
VALUES ('storage_layout',
        CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
             THEN 'timescaledb' ELSE 'postgres' END);

-- Identifiers travel in Kafka keys ("tenant/device") and URLs: no '/', no spaces.
CREATE DOMAIN fleet_id AS text CHECK (VALUE ~ '^[A-Za-z0-9_.:-]{1,64}$');

CREATE TABLE tenants (
    tenant_id  fleet_id PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status     text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sites (
    tenant_id  fleet_id NOT NULL REFERENCES tenants ON DELETE CASCADE,
    site_id    fleet_id NOT NULL,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    attributes jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, site_id)
);

CREATE TABLE devices (
    tenant_id  fleet_id NOT NULL REFERENCES tenants ON DELETE CASCADE,
    device_id  fleet_id NOT NULL,
    site_id    fleet_id,
    name       text,
    -- Hex SHA-256 of the device token; the token itself is shown once and never stored.
    token_hash text UNIQUE,
    status     text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    attributes jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, site_id) REFERENCES sites (tenant_id, site_id) ON DELETE SET NULL (site_id)
);
CREATE INDEX devices_site ON devices (tenant_id, site_id) WHERE site_id IS NOT NULL;

-- Gateway tokens may write any device of their tenant.
CREATE TABLE gateway_tokens (
    token_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  fleet_id NOT NULL REFERENCES tenants ON DELETE CASCADE,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    token_hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX gateway_tokens_tenant ON gateway_tokens (tenant_id);

-- Last reading per device, upserted by the sink (only when newer than what is stored).
CREATE TABLE device_latest (
    tenant_id   text NOT NULL,
    device_id   text NOT NULL,
    site_id     text,
    time        timestamptz NOT NULL,
    msg_type    text NOT NULL,
    seq         bigint NOT NULL,
    metrics     jsonb NOT NULL,
    received_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id)
);
CREATE INDEX device_latest_site ON device_latest (tenant_id, site_id, device_id);

CREATE TABLE alert_rules (
    rule_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         fleet_id NOT NULL REFERENCES tenants ON DELETE CASCADE,
    name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    site_id           fleet_id,
    device_id         fleet_id,
    metric            text,
    kind              text NOT NULL CHECK (kind IN ('threshold', 'window', 'no_data')),
    agg               text CHECK (agg IN ('avg', 'min', 'max', 'count')),
    op                text CHECK (op IN ('>', '>=', '<', '<=', '==', '!=')),
    threshold         double precision,
    window_s          integer CHECK (window_s > 0),
    for_s             integer NOT NULL DEFAULT 0 CHECK (for_s >= 0),
    no_data_s         integer CHECK (no_data_s > 0),
    resolve_threshold double precision,
    severity          text NOT NULL DEFAULT 'warning' CHECK (severity IN ('info', 'warning', 'critical')),
    enabled           boolean NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (kind <> 'threshold' OR (metric IS NOT NULL AND op IS NOT NULL AND threshold IS NOT NULL)),
    CHECK (kind <> 'window' OR (metric IS NOT NULL AND op IS NOT NULL AND threshold IS NOT NULL
                                AND agg IS NOT NULL AND window_s IS NOT NULL)),
    CHECK (kind <> 'no_data' OR no_data_s IS NOT NULL)
);
CREATE INDEX alert_rules_tenant ON alert_rules (tenant_id);

CREATE TABLE alerts (
    alert_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       fleet_id NOT NULL,
    rule_id         bigint NOT NULL REFERENCES alert_rules ON DELETE CASCADE,
    device_id       text NOT NULL,
    site_id         text,
    status          text NOT NULL CHECK (status IN ('pending', 'firing', 'resolved')),
    severity        text NOT NULL,
    metric          text,
    value           double precision,
    threshold       double precision,
    started_at      timestamptz NOT NULL,
    fired_at        timestamptz,
    resolved_at     timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- One open alert per (rule, device).
CREATE UNIQUE INDEX alerts_one_open ON alerts (rule_id, tenant_id, device_id)
    WHERE status IN ('pending', 'firing');
CREATE INDEX alerts_tenant_started ON alerts (tenant_id, started_at DESC, alert_id DESC);

-- API keys: only a hash is stored. Tenant roles (viewer, admin) belong to one tenant;
-- operator roles see all tenants and have no tenant.
CREATE TABLE api_keys (
    key_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    fleet_id REFERENCES tenants ON DELETE CASCADE,
    role         text NOT NULL CHECK (role IN ('viewer', 'admin', 'operator', 'operator_admin')),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    key_prefix   text NOT NULL,
    key_hash     text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CHECK ((role IN ('viewer', 'admin')) = (tenant_id IS NOT NULL))
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Kafka offsets stored in the same transaction as the data they cover: the source of truth
-- for where each consumer group resumes (Kafka-side commits are only for lag tools).
CREATE TABLE consumer_offsets (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL CHECK (partition >= 0),
    next_offset    bigint NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
