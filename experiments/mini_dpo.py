"""LLaDA2.0-mini: the DPO stage on a TPU pod (spec §6–§8), starting from the mini_cap run.

    python -m llada2_jax.main --config=experiments/mini_dpo.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/mini_dpo.py --workdir=gs://.../mini_dpo \
        --config.distributed=True --config.init_from=gs://.../mini_cap --config.dpo.data=/data/dpo.jsonl

Defined in `llada2_jax/configs/mini.py`; the same as `--config=experiments/mini.py:dpo`.
"""
from llada2_jax.configs import mini


def get_config():
    return mini.get_config("dpo")
