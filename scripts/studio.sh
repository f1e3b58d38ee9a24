#!/usr/bin/env bash
# Set up (first run only) and start the studio on http://127.0.0.1:7860 with the embedded default model.
# Extra arguments go to `mactuner studio` (e.g. --port 7861 --root ~/mt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mactuner studio "$@"
