#!/usr/bin/env bash
# Build an offline installation bundle of Sluice for an edge box without internet:
#
#   bash scripts/bundle.sh --platform x86_64|aarch64|armv7l --out DIR [--python 3.11]
#
# writes DIR/sluice-bundle-<version>-<platform>.tar.gz holding
#   wheelhouse/     the Sluice wheel and every dependency for that platform and Python (manylinux
#                   wheels up to glibc 2.36 = Debian 12 / Raspberry Pi OS bookworm, plus pure wheels)
#   scripts/install.sh, scripts/uninstall.sh, systemd/, config/, README.md
#   BUNDLE.txt      platform, Python, every file, and what has no wheel for the platform
# On the box (no network needed):  sudo bash install.sh --from sluice-bundle-….tar.gz
# (install.sh from the checkout, or from the unpacked bundle).
#
# A dependency that has no wheel on PyPI for the platform (armv7l: cffi, PyYAML) goes in as its
# source, with the pure wheels its build needs (setuptools, Cython); the box then needs a C compiler
# and headers to build it (README, "Offline installation"). The bundle is still written; it says so.
# Needs network (PyPI) here, where the bundle is built; runs as any user.
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORM=""
OUT=""
PYVER=3.11
while (($#)); do
    case "$1" in
        --platform) PLATFORM="${2:?--platform needs x86_64, aarch64 or armv7l}"; shift 2 ;;
        --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        --python) PYVER="${2:?--python needs a version such as 3.11}"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "bundle.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PLATFORM" in
    x86_64|aarch64|armv7l) ;;
    *) echo "bundle.sh: --platform must be x86_64, aarch64 or armv7l" >&2; exit 2 ;;
esac
[[ -n "$OUT" ]] || { echo "bundle.sh: give --out DIR" >&2; exit 2; }
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
NAME="sluice-bundle-$VERSION-$PLATFORM"
ABI="cp${PYVER/./}"

tmp="$(mktemp -d -t sluice-bundle-XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/$NAME"
mkdir -p "$stage/wheelhouse" "$stage/scripts"

# manylinux tags from 2_17 (manylinux2014) up to glibc 2.36, for the platform and another one
tags() {
    local out=(--platform "manylinux2014_$1") m
    for m in $(seq 17 36); do out+=(--platform "manylinux_2_${m}_$1"); done
    echo "${out[@]}"
}
pip_quiet() {  # pip without this machine's noise about index locations; its errors still show
    "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
target=(--only-binary :all: --python-version "$PYVER" --implementation cp --abi "$ABI")

echo "bundle: building the Sluice $VERSION wheel"
rm -rf build
pip_quiet wheel -q --no-deps --disable-pip-version-check -w "$stage/wheelhouse" . >/dev/null
rm -rf build
wheel="$(ls "$stage"/wheelhouse/sluice_gateway-*.whl)"

echo "bundle: dependencies for $PLATFORM, CPython $PYVER"
missing=()
# shellcheck disable=SC2046  # tags are words
if ! pip_quiet download -q --disable-pip-version-check --dest "$stage/wheelhouse" "${target[@]}" $(tags "$PLATFORM") \
        "$wheel" >/dev/null 2>"$tmp/download.log"; then
    # Some dependency has no wheel for this platform: resolve the versions where all have one
    # (x86_64), then take each for this platform, or its source.
    # shellcheck disable=SC2046
    pip_quiet download -q --disable-pip-version-check --dest "$tmp/resolved" "${target[@]}" $(tags x86_64) "$wheel" >/dev/null
    for file in "$tmp"/resolved/*.whl; do
        base="$(basename "$file")"
        req="${base%%-*}==$(cut -d- -f2 <<<"$base")"
        [[ "$base" == sluice_gateway-* ]] && continue
        # shellcheck disable=SC2046
        if ! pip_quiet download -q --disable-pip-version-check --no-deps --dest "$stage/wheelhouse" "${target[@]}" \
                $(tags "$PLATFORM") "$req" >/dev/null 2>&1; then
            pip_quiet download -q --disable-pip-version-check --no-deps --no-binary :all: --dest "$stage/wheelhouse" \
                "$req" >/dev/null
            missing+=("$req")
        fi
    done
    # What their builds need (build isolation, offline): setuptools >= 77 (cffi), Cython (PyYAML), wheel.
    # shellcheck disable=SC2046
    pip_quiet download -q --disable-pip-version-check --dest "$stage/wheelhouse" "${target[@]}" $(tags "$PLATFORM") \
        "setuptools>=77" wheel Cython >/dev/null
fi

cp -r config systemd README.md "$stage/"
cp scripts/install.sh scripts/uninstall.sh "$stage/scripts/"
{
    echo "Sluice $VERSION offline bundle for $PLATFORM (Linux, glibc >= 2.17), CPython $PYVER"
    echo "install: sudo bash scripts/install.sh --from $NAME.tar.gz   (no network needed)"
    if ((${#missing[@]})); then
        echo "NO WHEEL on PyPI for $PLATFORM, built from source at install: ${missing[*]}"
        echo "  the box needs: build-essential python3-dev libffi-dev (apt-get), see README 'Offline installation'"
    else
        echo "every dependency is a wheel: nothing is compiled on the box"
    fi
    echo "wheelhouse:"
    (cd "$stage/wheelhouse" && ls -1)
} >"$stage/BUNDLE.txt"

mkdir -p "$OUT"
tarball="$(cd "$OUT" && pwd)/$NAME.tar.gz"
tar -czf "$tarball" -C "$tmp" "$NAME"
size="$(du -h "$tarball" | cut -f1)"
echo "bundle: $tarball ($size, $(ls "$stage/wheelhouse" | wc -l) files in the wheelhouse)"
if ((${#missing[@]})); then
    echo "bundle: WARNING: no $PLATFORM wheel on PyPI for ${missing[*]}: their sources are in the bundle and" \
         "the box needs a C compiler and headers to build them (README, 'Offline installation')" >&2
fi
