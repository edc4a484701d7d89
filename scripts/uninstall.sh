#!/usr/bin/env bash
# Remove Sluice's service and code. Keeps the configuration (/etc/sluice) and the outbox
# (/var/lib/sluice, with readings not yet delivered) unless --purge is given.
#
#   sudo scripts/uninstall.sh            # stop, disable, remove units and /opt/sluice
#   sudo scripts/uninstall.sh --purge    # also /etc/sluice, /var/lib/sluice*, and the sluice user
#
# --root DIR works as for install.sh: paths are under DIR, and systemctl/userdel are printed as
# `skip: ...` instead of run. Every path removed is printed as `remove: PATH`, every path kept
# as `keep: PATH`.
set -euo pipefail

ROOT=""
PURGE=0
while (($#)); do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -n "$ROOT" ]]; then
    ROOT="$(cd "$ROOT" && pwd)"
elif [[ $(id -u) -ne 0 ]]; then
    echo "uninstall.sh: run as root (sudo), or give --root DIR" >&2
    exit 1
fi

system() {
    if [[ -z "$ROOT" ]]; then "$@" || true; else echo "skip: $*"; fi
}
remove() {
    if [[ -e "$ROOT$1" || -L "$ROOT$1" ]]; then
        rm -rf -- "$ROOT$1"
        echo "remove: $1"
    fi
}
keep() {
    if [[ -e "$ROOT$1" ]]; then echo "keep: $1"; fi
}

system systemctl disable --now sluice.service sluice-ingest.service
remove /etc/systemd/system/sluice.service
remove /etc/systemd/system/sluice-ingest.service
system systemctl daemon-reload
remove /opt/sluice

if ((PURGE)); then
    remove /etc/sluice
    remove /var/lib/sluice
    remove /var/lib/sluice-ingest
    if [[ -z "$ROOT" ]]; then
        if getent passwd sluice >/dev/null; then userdel sluice; fi
    else
        echo "skip: userdel sluice"
    fi
else
    keep /etc/sluice
    keep /var/lib/sluice
    keep /var/lib/sluice-ingest
    echo "configuration and outbox kept (readings not yet delivered are in /var/lib/sluice); --purge removes them"
fi
