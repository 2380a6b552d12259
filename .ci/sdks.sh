#!/usr/bin/env bash
# The SDKs' own suites (sdks/SCENARIOS.md and the client tests), each against real
# `keel serve` child processes on SQLite and Postgres: Python with pytest in a venv outside
# the clone, TypeScript with node's test runner. Called by .ci/run after `make test`;
# runnable by hand. Installs what it needs from PyPI and npm (caches outside the clone), and
# fails loudly when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build -q --bin keel
export KEEL_BIN="$CARGO_TARGET_DIR/debug/keel"

echo "== Python SDK (sdks/python)"
VENV="$HOME/.cache/keel-venv-sdk"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || {
    echo "FATAL: cannot create a Python venv (install python3-venv)" >&2
    exit 1
  }
fi
PIP_CACHE_DIR="$HOME/.cache/pip" "$VENV/bin/pip" install -q --disable-pip-version-check \
  --force-reinstall "./sdks/python[test]"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider sdks/python/tests

echo "== TypeScript SDK (sdks/typescript)"
if ! command -v node >/dev/null 2>&1; then
  echo "node is missing; installing it with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "FATAL: the TypeScript SDK needs Node 20 or newer (found $(node --version))" >&2
  exit 1
fi
(
  cd sdks/typescript
  npm ci --cache "$HOME/.cache/keel-npm" --no-audit --no-fund --loglevel=error
  npm test
)
