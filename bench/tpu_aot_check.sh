#!/usr/bin/env bash
# AOT-compile the TPU kernels for a v5e topology without a TPU (see bench/tpu_aot_check.py).
# Makes a throw-away venv (system site-packages visible, so an installed jax stack is reused),
# installs the repo and the libtpu that the installed jax's `jax[tpu]` extra pins, runs the check.
# Prints "TPU AOT check skipped: <reason>" and exits 0 when libtpu cannot be installed.
# Usage: bash bench/tpu_aot_check.sh [--topology v5e:2x2]    (PYTHON=python3.12 to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
skip() { echo "TPU AOT check skipped: $*"; exit 0; }
# shellcheck source=bench/_libtpu_venv.sh
source bench/_libtpu_venv.sh
"$py" bench/tpu_aot_check.py "$@"
