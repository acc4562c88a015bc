#!/usr/bin/env bash
# deploy/local/run.sh — README's run command: starts PostgreSQL and Kafka (deps.sh up), builds
# the services in release mode, migrates the database and runs all four services in the
# foreground until Ctrl-C (then stops them cleanly). Logs: $FLEETSTREAM_STATE/logs/<service>.log.
#
# Ports: ingest HTTP 8080; query-api (API, dashboard, /docs) 8081; admin (/metrics, /healthz,
# /readyz) of ingest-producer 9101, timescale-sink 9102, evaluator-stream 9103, query-api 9104.
# query-api connects as fleet_api (row-level security applies; the superuser would bypass it);
# an operator_admin API key is created and printed for the dashboard.
#
# Simulated devices: once ingest is ready, `ingest-producer simulate --provision` drives
# SIM_DEVICES devices (default 10,000; the design's full profile is 100,000) every
# SIM_INTERVAL (5s) over HTTP. SIM_DEVICES=0 starts no simulator.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
STATE=${FLEETSTREAM_STATE:-/var/lib/fleetstream}
LOGS="$STATE/logs"
mkdir -p "$LOGS"

bash deploy/local/deps.sh up >/dev/null
eval "$(bash deploy/local/deps.sh env)"
# shellcheck source=deploy/local/toolchain.sh
source deploy/local/toolchain.sh

cargo build --locked --release --bins
BIN="$CARGO_TARGET_DIR/release"

"$BIN/query-api" migrate
# The API role's URL: same server and database, user fleet_api (deploy/postgres/bootstrap.sql).
API_DATABASE_URL=${API_DATABASE_URL:-$(printf '%s' "$DATABASE_URL" | sed -E 's#^(postgres(ql)?://)[^@]*@#\1fleet_api:fleet_api@#')}
API_KEY=$(DATABASE_URL="$API_DATABASE_URL" "$BIN/query-api" create-key --role operator_admin --name "run.sh $(date -u +%FT%TZ)")

pids=()
stop() {
    printf '[run] stopping\n' >&2
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap stop INT TERM

start() {
    local name=$1 port=$2
    shift 2
    ADMIN_LISTEN="127.0.0.1:$port" "$BIN/$name" "$@" >>"$LOGS/$name.log" 2>&1 &
    pids+=("$!")
    printf '[run] %s started (pid %s, admin http://127.0.0.1:%s, log %s)\n' "$name" "$!" "$port" "$LOGS/$name.log" >&2
}
start ingest-producer 9101
start timescale-sink 9102
start evaluator-stream 9103
DATABASE_URL="$API_DATABASE_URL" HTTP_LISTEN=127.0.0.1:8081 start query-api 9104

SIM_DEVICES=${SIM_DEVICES:-10000}
if [ "$SIM_DEVICES" -gt 0 ]; then
    for _ in $(seq 1 120); do
        curl -fsS http://127.0.0.1:9101/readyz >/dev/null 2>&1 && break
        sleep 0.5
    done
    "$BIN/ingest-producer" simulate --provision --devices "$SIM_DEVICES" \
        --interval "${SIM_INTERVAL:-5s}" --tenants "${SIM_TENANTS:-3}" \
        >>"$LOGS/simulator.log" 2>&1 &
    pids+=("$!")
    printf '[run] simulator started: %s devices every %s (log %s)\n' "$SIM_DEVICES" "${SIM_INTERVAL:-5s}" "$LOGS/simulator.log" >&2
fi
printf '[run] dashboard: http://127.0.0.1:8081/ (API docs: /docs); sign in with this operator_admin key:\n[run]   %s\n' "$API_KEY" >&2
printf '[run] all services running; Ctrl-C stops them\n' >&2
wait
