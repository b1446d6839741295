#!/usr/bin/env bash
# Compile the mini/flash train steps for 256-chip TPU slices without a TPU (see bench/aot_table.py).
# Makes a throw-away venv (system site-packages visible, so an installed jax stack is reused),
# installs the repo and the libtpu that the installed jax's `jax[tpu]` extra pins, runs the table
# script with the given flags. Prints "AOT table skipped: <reason>" and exits 0 when libtpu cannot
# be installed.
# Usage: bash bench/aot_table.sh [--cases=tiny,mini_wsd] [--nowrite]   (PYTHON=python3.12 to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
skip() { echo "AOT table skipped: $*"; exit 0; }
# shellcheck source=bench/_libtpu_venv.sh
source bench/_libtpu_venv.sh
# in the background, so a TERM from `timeout` reaches the table script (which stops its compile)
"$py" bench/aot_table.py "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 143' TERM INT
wait "$pid"
