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
SUMMARY=${FLEETSTREAM_TEST_SUMMARY:-$CARGO_TARGET_DIR/test-summary.txt}
set +e
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$CARGO_TARGET_DIR/test-output.log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one `test result:` line per binary,
# the last of which is often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' \
    "$CARGO_TARGET_DIR/test-output.log" | tee "$SUMMARY"
exit "$status"
