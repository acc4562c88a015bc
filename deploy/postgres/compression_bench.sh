#!/usr/bin/env bash
# CPU cost of TimescaleDB compression per reading, for telemetry shaped like the fleet's
# (4 metrics in jsonb, 10 tenants, one reading per device every 5 s), by rows per device in
# the chunk (a 5-minute chunk holds 60 per device, a 1-hour chunk 720, a 1-day chunk 17,280)
# and by compression settings. Prints one line per case: sizes before and after, the
# compressing backend's CPU (from /proc, so the server must run on this machine) and wall
# time, and µs of CPU per reading. Asserts nothing.
#
# usage: deploy/postgres/compression_bench.sh DEVICES ROWS_PER_DEVICE [SEGMENTBY [ORDERBY]]
#   defaults: segmentby 'tenant_id, device_id', orderby 'time DESC' (the schema's settings).
#   COMPRESS_SET='set timescaledb.enable_compression_indexscan = on;' runs that first.
# Needs DATABASE_URL (deps.sh env) pointing at a server offering timescaledb; uses and drops
# its own database.
set -euo pipefail

devices=${1:?devices}
rows=${2:?rows per device}
segmentby=${3:-tenant_id, device_id}
orderby=${4:-time DESC}
server=${DATABASE_URL%/*}
db="compression_bench_$$"

psql "$server/postgres" -qAtc "CREATE DATABASE $db"
trap 'psql "$server/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT

psql "$server/$db" -qAt -v ON_ERROR_STOP=1 <<SQL
CREATE EXTENSION IF NOT EXISTS timescaledb;
CREATE TABLE t (time timestamptz NOT NULL, tenant_id text NOT NULL, device_id text NOT NULL,
    site_id text, msg_type text NOT NULL DEFAULT 'telemetry', seq bigint NOT NULL,
    metrics jsonb NOT NULL, PRIMARY KEY (tenant_id, device_id, time));
SELECT create_hypertable('t', by_range('time', INTERVAL '100 days'), create_default_indexes => false) \g /dev/null
CREATE INDEX t_tenant_time ON t (tenant_id, time DESC);
ALTER TABLE t SET (timescaledb.compress, timescaledb.compress_segmentby = '$segmentby',
                   timescaledb.compress_orderby = '$orderby');
INSERT INTO t (time, tenant_id, device_id, seq, metrics)
SELECT '2026-01-01'::timestamptz + make_interval(secs => k * 5 + (d % 5)),
       'tenant-' || (d % 10), 'dev-' || lpad(d::text, 6, '0'), k,
       jsonb_build_object(
           'battery', round((100 - k * 0.005 - (d % 7))::numeric, 2),
           'humidity', round((50 + 10 * sin(k / 30.0 + d))::numeric, 2),
           'rssi', -50 - ((k * 7 + d) % 60),
           'temperature', round((20 + 5 * sin(k / 50.0 + d) + (d % 13) * 0.1)::numeric, 2))
FROM generate_series(1, $devices) d, generate_series(1, $rows) k;
VACUUM ANALYZE t;
SQL

# One session: its backend's CPU before and after compress_chunk.
python3 - "$server/$db" "$devices" "$rows" "$segmentby" "$orderby" "${COMPRESS_SET:-}" <<'PY'
import os, subprocess, sys, time
url, devices, rows, segmentby, orderby, preset = sys.argv[1:]
psql = subprocess.Popen(["psql", url, "-qAt"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True, bufsize=1)
def ask(sql):
    psql.stdin.write(sql + "\n")
    psql.stdin.flush()
    return psql.stdout.readline().strip()
pid = int(ask(preset + "SELECT pg_backend_pid();"))
def cpu():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
before = ask("SELECT pg_size_pretty(hypertable_size('t'));")
c0, t0 = cpu(), time.time()
ask("SELECT count(compress_chunk(c)) FROM show_chunks('t') c;")
c1, t1 = cpu(), time.time()
after = ask("SELECT pg_size_pretty(hypertable_size('t'));")
n = int(devices) * int(rows)
print(f"devices={devices} rows/device={rows} readings={n} segmentby='{segmentby}' "
      f"orderby='{orderby}'{' [' + preset.strip() + ']' if preset else ''}: {before} -> {after}; "
      f"CPU {c1 - c0:.2f} s, wall {t1 - t0:.2f} s: {(c1 - c0) / n * 1e6:.2f} us of CPU per reading")
psql.stdin.close()
psql.wait()
PY
