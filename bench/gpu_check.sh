#!/usr/bin/env bash
# GPU check of the Pallas kernels (correctness fwd+bwd vs XLA references, timings at L=4096).
# Needs jax with CUDA + numpy + absl + this repo only (PYTHONPATH below: no install needed). Writes
# bench/results/gpu_check.md; exit status 1 on any mismatch or error.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python3 bench/gpu_check.py "$@"
