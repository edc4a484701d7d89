#!/usr/bin/env bash
# The offline bundle, tested as an edge box without internet would use it: build the x86_64 bundle
# (here, with network), then in a network namespace with no network at all (`unshare -n`, loopback
# only) install it with `install.sh --from ... --root DIR` and run the smoke stage (scripts/smoke.sh)
# against the installed venv. GS1's EPCIS schema is fetched before, outside the namespace, and
# given to the smoke stage as a file (what an offline user does with `--schema FILE`).
#
#   bash scripts/offline-test.sh          # needs root (or unprivileged user namespaces), unshare, ip
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
tmp="$(mktemp -d -t sluice-offline-XXXXXX)"
trap 'rm -rf "$tmp"' EXIT

bash scripts/bundle.sh --platform x86_64 --out "$tmp/out"
bundle="$(ls "$tmp"/out/sluice-bundle-*-x86_64.tar.gz)"
schema="$(XDG_CACHE_HOME="$tmp/cache" .venv/bin/python -c 'from gateway.trace.schema import cached_schema; print(cached_schema())')"

ns=(unshare -n)
[[ $(id -u) -eq 0 ]] || ns=(unshare -rn)
# shellcheck disable=SC2016  # expanded inside the namespace
"${ns[@]}" env BUNDLE="$bundle" ROOTDIR="$tmp/root" REPO="$REPO" SLUICE_SMOKE_SCHEMA="$schema" bash -euo pipefail -c '
    ip link set lo up
    if python3 -c "import socket; socket.create_connection((\"pypi.org\", 443), 5)" 2>/dev/null; then
        echo "offline-test: the namespace reaches the network: not an offline test" >&2; exit 1
    fi
    echo "offline-test: no network here; installing $(basename "$BUNDLE")"
    bash "$REPO/scripts/install.sh" --from "$BUNDLE" --root "$ROOTDIR" --python python3 >"$ROOTDIR.log" \
        || { cat "$ROOTDIR.log" >&2; exit 1; }
    grep -E "^(from bundle|install: /opt/sluice/venv)" "$ROOTDIR.log"
    bash "$REPO/scripts/smoke.sh" "$ROOTDIR/opt/sluice/venv"
'
echo "offline-test: the x86_64 bundle ($(du -h "$bundle" | cut -f1)) installed and passed the smoke stage with no network"
