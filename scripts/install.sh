#!/usr/bin/env bash
# Install (or upgrade) Sluice as a systemd service. Run as root from a checkout:
#
#   sudo scripts/install.sh              # install, or upgrade in place; then `systemctl start sluice`
#   sudo scripts/install.sh --ingest     # also /etc/sluice/ingest.yaml and sluice-ingest.service, enabled
#   sudo scripts/install.sh --from sluice-bundle-0.1.0-aarch64.tar.gz   # offline, from scripts/bundle.sh
#
# What it does (every path below is prefixed with --root DIR when given):
#   user and group `sluice` (system account, no login, no home)     useradd
#   /opt/sluice/venv                   virtual environment with Sluice installed by pip
#   /opt/sluice/README.md, /opt/sluice/examples/{devices,gateway.yaml}
#   /etc/sluice (0750 root:sluice)     gateway.yaml and profiles/*.yaml copied only if missing, devices/ empty
#                                      (--ingest: ingest.yaml too, only if missing)
#   /var/lib/sluice (0750 sluice:sluice)  the outbox lives here (StateDirectory)
#   /etc/systemd/system/sluice.service (+ sluice-ingest.service)   enabled, not started
# Running it again upgrades: the venv and the units are replaced; configuration, profiles you
# changed and the outbox are never touched; a running service is restarted.
#
# Options:
#   --root DIR   install into DIR instead of / (for packaging and tests). Nothing on the live system
#                is changed: useradd/systemctl are printed as `skip: ...` instead of run, ownership is
#                printed but not applied (the user does not exist inside DIR). Modes are applied.
#   --ingest     also install /etc/sluice/ingest.yaml (if missing) and enable sluice-ingest.service (the
#                MQTT -> InfluxDB side; not needed on an edge box)
#   --from FILE  install from an offline bundle (scripts/bundle.sh) with no network: pip --no-index
#                from the bundle's wheelhouse; configuration and units come from the bundle too
#   --python P   the Python used to create the venv (default python3; 3.11 or newer)
#   --no-pip     create the venv but do not pip-install into it (tests; offline staging)
# Every file or directory it creates or replaces is printed as `install: PATH MODE OWNER:GROUP`.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
INGEST=0
PYTHON=python3
PIP=1
FROM=""
while (($#)); do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --ingest) INGEST=1; shift ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --no-pip) PIP=0; shift ;;
        --from) FROM="${2:?--from needs a bundle file}"; shift 2 ;;
        --from=*) FROM="${1#--from=}"; shift ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -n "$ROOT" ]]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
elif [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (sudo), or give --root DIR to stage into a directory" >&2
    exit 1
fi

if [[ -n "$FROM" ]]; then
    [[ -f "$FROM" ]] || { echo "install.sh: --from $FROM: no such file" >&2; exit 1; }
    unpacked="$(mktemp -d -t sluice-install-XXXXXX)"
    trap 'rm -rf "$unpacked"' EXIT
    tar -xzf "$FROM" -C "$unpacked"
    SRC="$(echo "$unpacked"/sluice-bundle-*)"
    [[ -d "$SRC/wheelhouse" && -f "$SRC/BUNDLE.txt" ]] || { echo "install.sh: $FROM is not a Sluice bundle" >&2; exit 1; }
    want="$(sed -n '1s/.*CPython \([0-9.]*\).*/\1/p' "$SRC/BUNDLE.txt")"
    have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [[ "$want" != "$have" ]]; then
        echo "install.sh: the bundle is for CPython $want, $PYTHON is $have — build one with" \
             "scripts/bundle.sh --python $have, or give --python python$want" >&2
        exit 1
    fi
    echo "from bundle: $(head -1 "$SRC/BUNDLE.txt")"
fi

USER_NAME=sluice
live() { [[ -z "$ROOT" ]]; }
# run a command that changes the live system, or only say it would have, under --root
system() {
    if live; then "$@"; else echo "skip: $*"; fi
}
own() {  # own PATH MODE OWNER:GROUP
    chmod "$2" "$ROOT$1"
    if live; then chown "$3" "$ROOT$1"; fi
    echo "install: $1 $2 $3"
}
dir() { mkdir -p "$ROOT$1"; own "$@"; }
file_replace() {  # file_replace SRC DEST MODE OWNER:GROUP — always replaced (code, units)
    install -m "$3" "$1" "$ROOT$2"
    own "$2" "$3" "$4"
}
file_keep() {  # file_keep SRC DEST MODE OWNER:GROUP — copied only if missing (configuration)
    if [[ -e "$ROOT$2" ]]; then
        echo "keep: $2"
    else
        install -m "$3" "$1" "$ROOT$2"
        own "$2" "$3" "$4"
    fi
}

# 1. the service account
if live; then
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/sluice --no-create-home \
            --shell /usr/sbin/nologin --comment "Sluice edge gateway" "$USER_NAME"
    fi
else
    echo "skip: useradd --system --user-group --home-dir /var/lib/sluice --no-create-home --shell /usr/sbin/nologin $USER_NAME"
fi

# 2. code: a virtual environment under /opt/sluice, replaced on upgrade
dir /opt/sluice 0755 root:root
if [[ ! -x "$ROOT/opt/sluice/venv/bin/python" ]]; then
    if ((PIP)); then "$PYTHON" -m venv "$ROOT/opt/sluice/venv"; else "$PYTHON" -m venv --without-pip "$ROOT/opt/sluice/venv"; fi
fi
own /opt/sluice/venv 0755 root:root
if ((PIP)) && [[ -n "$FROM" ]]; then
    # Offline: only the bundle's wheelhouse, never an index.
    PIP_CONFIG_FILE=/dev/null "$ROOT/opt/sluice/venv/bin/python" -m pip install -q --disable-pip-version-check \
        --no-index --find-links "$SRC/wheelhouse" --upgrade sluice-gateway
elif ((PIP)); then
    "$ROOT/opt/sluice/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$SRC"
else
    echo "skip: pip install $SRC"
fi
file_replace "$SRC/README.md" /opt/sluice/README.md 0644 root:root
dir /opt/sluice/examples 0755 root:root
dir /opt/sluice/examples/devices 0755 root:root
file_replace "$SRC/config/gateway.yaml" /opt/sluice/examples/gateway.yaml 0644 root:root
for f in "$SRC"/config/devices/*.yaml; do
    file_replace "$f" "/opt/sluice/examples/devices/$(basename "$f")" 0644 root:root
done

# 3. configuration (never overwritten) and state (never touched once it exists)
dir /etc/sluice 0750 root:$USER_NAME
dir /etc/sluice/devices 0750 root:$USER_NAME
dir /etc/sluice/profiles 0750 root:$USER_NAME
file_keep "$SRC/config/gateway.yaml" /etc/sluice/gateway.yaml 0640 root:$USER_NAME
for f in "$SRC"/config/profiles/*.yaml; do
    file_keep "$f" "/etc/sluice/profiles/$(basename "$f")" 0640 root:$USER_NAME
done
((INGEST)) && file_keep "$SRC/config/ingest.yaml" /etc/sluice/ingest.yaml 0640 root:$USER_NAME
dir /var/lib/sluice 0750 $USER_NAME:$USER_NAME

# 4. units
dir /etc/systemd/system 0755 root:root
units=(sluice.service)
((INGEST)) && units+=(sluice-ingest.service)
for unit in sluice.service sluice-ingest.service; do
    file_replace "$SRC/systemd/$unit" "/etc/systemd/system/$unit" 0644 root:root
done
system systemctl daemon-reload
system systemctl enable "${units[@]}"
# An upgrade restarts what was running; a fresh install is left for the operator to start
# once the configuration is edited.
system systemctl try-restart "${units[@]}"

echo "done. Edit /etc/sluice/gateway.yaml and add devices under /etc/sluice/devices/ (examples in"
echo "/opt/sluice/examples), check with: sudo -u sluice /opt/sluice/venv/bin/sluice check -c /etc/sluice"
echo "then: systemctl start sluice; journalctl -u sluice -f; /opt/sluice/venv/bin/sluice status -c /etc/sluice"
if ((INGEST)); then
    echo "ingest: edit /etc/sluice/ingest.yaml (broker, topics, InfluxDB), check with:"
    echo "  sudo -u sluice /opt/sluice/venv/bin/sluice ingest check -c /etc/sluice/ingest.yaml"
    echo "then: systemctl start sluice-ingest; journalctl -u sluice-ingest -f"
fi
