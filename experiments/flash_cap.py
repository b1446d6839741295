"""LLaDA2.0-flash: the CAP stage on a TPU pod (spec §6–§8), starting from the flash_sft run.

    python -m llada2_jax.main --config=experiments/flash_cap.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/flash_cap.py --workdir=gs://.../flash_cap \
        --config.distributed=True --config.init_from=gs://.../flash_sft --config.cap.data=/data/cap.jsonl

Defined in `llada2_jax/configs/flash.py`; the same as `--config=experiments/flash.py:cap`.
"""
from llada2_jax.configs import flash


def get_config():
    return flash.get_config("cap")
