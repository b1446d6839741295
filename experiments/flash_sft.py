"""LLaDA2.0-flash: the SFT stage on a TPU pod (spec §6–§8), starting from the flash_wsd run.

    python -m llada2_jax.main --config=experiments/flash_sft.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/flash_sft.py --workdir=gs://.../flash_sft \
        --config.distributed=True --config.init_from=gs://.../flash_wsd --config.sft.data=/data/sft.jsonl

Defined in `llada2_jax/configs/flash.py`; the same as `--config=experiments/flash.py:sft`.
"""
from llada2_jax.configs import flash


def get_config():
    return flash.get_config("sft")
