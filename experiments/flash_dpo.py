"""LLaDA2.0-flash: the DPO stage on a TPU pod (spec §6–§8), starting from the flash_cap run.

    python -m llada2_jax.main --config=experiments/flash_dpo.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/flash_dpo.py --workdir=gs://.../flash_dpo \
        --config.distributed=True --config.init_from=gs://.../flash_cap --config.dpo.data=/data/dpo.jsonl

Defined in `llada2_jax/configs/flash.py`; the same as `--config=experiments/flash.py:dpo`.
"""
from llada2_jax.configs import flash


def get_config():
    return flash.get_config("dpo")
