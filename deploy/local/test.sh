#!/usr/bin/env bash
# deploy/local/test.sh — README's test command: installs and starts PostgreSQL and Kafka
# (deps.sh up), then runs every test of the workspace against them. Extra arguments go to
# `cargo test` (e.g. `deploy/local/test.sh -p schemas`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

bash deploy/local/deps.sh up >/dev/null
eval "$(bash deploy/local/deps.sh env)"
# shellcheck source=deploy/local/toolchain.sh
source deploy/local/toolchain.sh

if [ "$#" -eq 0 ]; then
    set -- --workspace
fi
printf '[test] DATABASE_URL=%s KAFKA_BOOTSTRAP_SERVERS=%s CARGO_TARGET_DIR=%s\n' \
    "$DATABASE_URL" "$KAFKA_BOOTSTRAP_SERVERS" "$CARGO_TARGET_DIR" >&2
cargo test --locked "$@"
