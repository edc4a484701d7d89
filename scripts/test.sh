#!/usr/bin/env bash
# Set up everything the test suite needs (Debian servers, .venv) and run the whole suite, then the
# smoke stage against the INSTALLED wheel: the wheel is built, installed (not editable) into a
# clean venv outside the checkout, and scripts/smoke.sh runs it from an empty directory.
# Extra arguments go to pytest. SLUICE_SOAK=1 runs the long soak tests in full; SLUICE_SMOKE=0
# skips the smoke stage (never in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers
set +e
.venv/bin/ruff check . || { echo "ruff found problems (see above)" >&2; exit 1; }
# The type gate: mypy --strict over gateway/, drivers/ and simulators/ ([tool.mypy] in pyproject.toml).
.venv/bin/mypy || { echo "mypy found type errors (see above)" >&2; exit 1; }
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
if [[ $rc -ne 0 ]]; then
    exit $rc
fi
if [[ "${SLUICE_SMOKE:-1}" == "0" && "${CI:-}" != "true" ]]; then
    echo "smoke stage skipped (SLUICE_SMOKE=0)"
    exit 0
fi
# The smoke stage: what a user installs is what is tested.
stage="$(mktemp -d -t sluice-wheel-XXXXXX)"
trap 'rm -rf "$stage"' EXIT
rm -rf build  # setuptools would reuse build/lib, stale files included
.venv/bin/python -m pip wheel -q --no-deps --disable-pip-version-check -w "$stage/dist" . >/dev/null
rm -rf build
python3 -m venv "$stage/venv"
"$stage/venv/bin/python" -m pip install -q --disable-pip-version-check "$stage"/dist/sluice_gateway-*.whl \
    2>"$stage/pip.log" || { cat "$stage/pip.log" >&2; exit 1; }
"$stage/venv/bin/python" -m pip check >/dev/null || { "$stage/venv/bin/python" -m pip check; exit 1; }
bash scripts/smoke.sh "$stage/venv"
# The offline bundle: built for x86_64, installed and smoke-tested with no network (unshare -n).
bash scripts/offline-test.sh
