#!/usr/bin/env bash
# A multi-controller job on one machine: NUM_PROCESSES processes on localhost, each with
# DEVICES_PER_PROCESS CPU devices, joined by JAX's coordinator (gloo collectives between them).
#
#   bench/multiprocess_cpu.sh WORKDIR [--config.flag=value ...]
#
# runs `python -m llada2_jax.main --config=$CONFIG --config.distributed=True --workdir=WORKDIR ...`
# in every process, with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set as a
# cluster launcher would. Each process logs to WORKDIR/process_<i>.log; if one fails the others
# are stopped. Exits with the first non-zero exit code (0 when all succeed).
# Environment: CONFIG (experiments/tiny_moe.py), NUM_PROCESSES (2), DEVICES_PER_PROCESS (4),
# PORT (a free one), PYTHON (python3).
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 WORKDIR [--config.flag=value ...]" >&2
  exit 2
fi
workdir=$1; shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
config=${CONFIG:-experiments/tiny_moe.py}
count=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
mkdir -p "$workdir"

pids=()
for ((i = 0; i < count; i++)); do
  JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$count" JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$python" -m llada2_jax.main --config="$config" --config.distributed=True --workdir="$workdir" "$@" \
    >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
remaining=$count
while [ "$remaining" -gt 0 ]; do
  wait -n
  rc=$?
  remaining=$((remaining - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "a process exited with code $rc; stopping the others (logs: $workdir/process_*.log)" >&2
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  fi
done
exit "$status"
