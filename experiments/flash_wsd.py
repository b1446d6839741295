"""LLaDA2.0-flash (100B total / 6.1B active BailingMoeV2, spec §1.1): WSD conversion on a TPU pod.

    python -m llada2_jax.main --config=experiments/flash_wsd.py --config.dry_run=True

Defined in `llada2_jax/configs/flash.py`; the same as `--config=experiments/flash.py:wsd`.
"""
from llada2_jax.configs import flash


def get_config():
    return flash.get_config("wsd")
