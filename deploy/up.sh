#!/usr/bin/env bash
# Set up, then run Redis (if none answers at REDIS_URL), the gateway on 127.0.0.1:8000 and one
# worker on SmolLM2-135M-Instruct. Extra arguments go to `tokenrelay up` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
exec .venv/bin/tokenrelay up "$@"
