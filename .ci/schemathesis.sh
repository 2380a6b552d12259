#!/usr/bin/env bash
# Runs schemathesis (PyPI) against the OpenAPI document a fresh `keel serve` serves, with a
# valid operator key, every check, and the examples, coverage and fuzzing phases; then
# `promtool check metrics` on that server's /metrics, which by then holds a series for every
# route and outcome the fuzzer reached. Any failure fails CI. Called by .ci/run; runnable by
# hand (`bash .ci/schemathesis.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
SCHEMATHESIS_VERSION=4.32.5
VENV="${KEEL_VENV:-$HOME/.cache/keel-venv}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"

if ! command -v promtool >/dev/null; then
  echo "promtool is missing; installing prometheus (which ships it) with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
promtool --version | head -n1

if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    echo "python3 venv support is missing; installing it with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$VENV/bin/st" --version

cargo build -q --bin keel
KEEL="$CARGO_TARGET_DIR/debug/keel"

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key="schemathesis-key-$(date +%s%N)"
digest=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)

# One served queue, so the fuzzer also meets the runnable-kind checks; a short default
# deadline, so `POST /v1/process` on work no worker takes ends in 504 quickly; and short
# long polls, so a fuzzed lease on an empty queue does not wait up to 30 s.
KEEL_MAX_LEASE_WAIT=100ms \
KEEL_DATABASE_URL="sqlite://$work/keel.db" \
KEEL_ADDR="127.0.0.1:$port" \
KEEL_ADMIN_ADDR=off \
KEEL_GRPC_ADDR=off \
KEEL_API_KEYS="default=$digest:operator" \
KEEL_QUEUES=schemathesis-served:1 \
KEEL_REQUEST_TIMEOUT=500ms \
  "$KEEL" serve >"$work/keel.log" 2>&1 &
keel_pid=$!
stop_keel() { kill "$keel_pid" 2>/dev/null || true; wait "$keel_pid" 2>/dev/null || true; }
trap stop_keel EXIT

for _ in $(seq 1 100); do
  if curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; then break; fi
  if ! kill -0 "$keel_pid" 2>/dev/null; then
    echo "FATAL: keel serve exited before it was ready:" >&2
    cat "$work/keel.log" >&2
    exit 1
  fi
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "FATAL: keel never became ready" >&2; exit 1; }

# One worker: a bounded run (about a minute) whose failures replay with the printed seed.
status=0
timeout 600 "$VENV/bin/st" --config-file .ci/schemathesis.toml \
  run "http://127.0.0.1:$port/v1/openapi.json" \
  --checks all \
  -H "Authorization: Bearer $key" \
  --phases examples,coverage,fuzzing \
  --max-examples 100 \
  --workers 1 \
  --no-color || status=$?

if ! kill -0 "$keel_pid" 2>/dev/null; then
  echo "FATAL: keel serve died during the run:" >&2
  tail -50 "$work/keel.log" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "FATAL: schemathesis reported failures (exit $status); keel's log: $work/keel.log" >&2
  exit "$status"
fi
echo "schemathesis: no failures"

# Every metric family has HELP and TYPE, names and labels are well formed (promtool's lint).
metrics="$work/metrics.txt"
curl -sf "http://127.0.0.1:$port/metrics" -o "$metrics"
if ! promtool check metrics <"$metrics"; then
  echo "FATAL: promtool check metrics failed on /metrics (saved in $metrics)" >&2
  exit 1
fi
echo "promtool check metrics: $(grep -c '^# HELP' "$metrics") metric families, no problems"
