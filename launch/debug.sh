#!/usr/bin/env bash
# One process on the first GPU if there is one, else on the CPU.
#   launch/debug.sh [configs/debug.yaml] [key.sub=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/debug.yaml}
shift || true
BIGTRAIN=${BIGTRAIN:-.venv/bin/bigtrain}
exec "$BIGTRAIN" train --config "$CONFIG" "$@"
