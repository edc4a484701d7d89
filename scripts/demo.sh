#!/usr/bin/env bash
# Set up .venv and run the demo: simulated devices -> gateway -> outbox -> MQTT.
# Extra arguments go to `sluice demo` (e.g. --duration 30s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sluice demo "$@"
