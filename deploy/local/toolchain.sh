#!/usr/bin/env bash
# deploy/local/toolchain.sh — sourced by test.sh and run.sh: makes sure the Rust toolchain and
# the system packages the build needs are present (Debian, as root), and points cargo at a
# target directory outside the checkout so a second run (or a fresh clone) reuses the build.
set -euo pipefail

tc_log() { printf '[toolchain] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    tc_log "ERROR: cargo not found; install Rust (rustup) first"
    exit 1
fi

# librdkafka is built from source by rdkafka-sys (C compiler, make, zlib headers);
# sqlx/rustls need nothing from the system.
missing=()
for pkg in build-essential pkg-config zlib1g-dev cmake; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    tc_log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${missing[@]}" >&2
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/fleetstream/target}
mkdir -p "$CARGO_TARGET_DIR"
