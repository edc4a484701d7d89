#!/usr/bin/env bash
# Set up everything the test suite needs (Debian servers, .venv) and run the whole suite.
# Extra arguments go to pytest. SLUICE_SOAK=1 runs the long soak tests in full.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers
set +e
.venv/bin/ruff check . || { echo "ruff found problems (see above)" >&2; exit 1; }
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit $rc
