"""LLaDA2.0-mini: the CAP stage on a TPU pod (spec §6–§8), starting from the mini_sft run.

    python -m llada2_jax.main --config=experiments/mini_cap.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/mini_cap.py --workdir=gs://.../mini_cap \
        --config.distributed=True --config.init_from=gs://.../mini_sft --config.cap.data=/data/cap.jsonl

Defined in `llada2_jax/configs/mini.py`; the same as `--config=experiments/mini.py:cap`.
"""
from llada2_jax.configs import mini


def get_config():
    return mini.get_config("cap")
