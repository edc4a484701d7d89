#!/usr/bin/env bash
# Set up a Python virtual environment for Sluice in .venv (idempotent).
# With --servers, also install the Debian packages the tests start (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--servers" ]]; then
    need=()
    command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto mosquitto-clients)
    command -v socat >/dev/null 2>&1 || need+=(socat)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    command -v influxd >/dev/null 2>&1 || need+=(influxdb)
    command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
    python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
    # the offline-bundle test (scripts/offline-test.sh): a network namespace with loopback only
    command -v unshare >/dev/null 2>&1 || need+=(util-linux)
    command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || need+=(iproute2)
    if ((${#need[@]})); then
        echo "installing Debian packages: ${need[*]}"
        sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
        "${sudo_cmd[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        # Debian starts a system-wide broker/database on install; the tests start their own.
        for svc in mosquitto influxdb victoria-metrics; do
            "${sudo_cmd[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
        done
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
