#!/usr/bin/env bash
# Set up, then lint, type-check and run the whole test suite (real Redis, uvicorn, workers, SmolLM2).
# Tests start their own redis-server on a free port unless REDIS_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
