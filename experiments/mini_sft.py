"""LLaDA2.0-mini: the SFT stage on a TPU pod (spec §6–§8), starting from the mini_wsd run.

    python -m llada2_jax.main --config=experiments/mini_sft.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/mini_sft.py --workdir=gs://.../mini_sft \
        --config.distributed=True --config.init_from=gs://.../mini_wsd --config.sft.data=/data/sft.jsonl

Defined in `llada2_jax/configs/mini.py`; the same as `--config=experiments/mini.py:sft`.
"""
from llada2_jax.configs import mini


def get_config():
    return mini.get_config("sft")
