#!/usr/bin/env bash
# Compile the mini/flash train steps for 256-chip TPU slices without a TPU (see bench/aot_table.py).
# Makes a throw-away venv (system site-packages visible, so an installed jax stack is reused),
# installs the repo and the libtpu that the installed jax's `jax[tpu]` extra pins, runs the table
# script with the given flags. Prints "AOT table skipped: <reason>" and exits 0 when libtpu cannot
# be installed.
# Usage: bash bench/aot_table.sh [--cases=tiny,mini_wsd] [--nowrite]   (PYTHON=python3.12 to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 143' TERM INT  # so the EXIT trap cleans up under `timeout`
skip() { echo "AOT table skipped: $*"; exit 0; }

"${PYTHON:-python3}" -m venv --system-site-packages "$work/venv" || skip "cannot create a venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --no-cache-dir -e . >"$work/pip.log" 2>&1 \
  || { tail -5 "$work/pip.log"; skip "pip install -e . failed"; }
# the libtpu requirement of jax's "tpu" extra, e.g. libtpu==0.0.42.*
pin=$("$py" -c 'import importlib.metadata as m, re
print(next((re.split(r";", r)[0].replace(" ", "") for r in m.requires("jax") or []
            if r.startswith("libtpu") and "tpu" in r), ""))') || skip "cannot read jax metadata"
[ -n "$pin" ] || skip "the installed jax declares no libtpu pin"
echo "installing $pin (jax $("$py" -c 'import jax; print(jax.__version__)'))"
"$py" -m pip install -q --no-cache-dir --no-deps "$pin" >"$work/pip_tpu.log" 2>&1 \
  || { tail -5 "$work/pip_tpu.log"; skip "pip could not install $pin"; }
# libtpu logs its missing-host warnings (no TPU VM metadata here); they are harmless for AOT.
# in the background, so a TERM from `timeout` reaches the table script (which stops its compile)
"$py" bench/aot_table.py "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 143' TERM INT
wait "$pid"
