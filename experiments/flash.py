"""LLaDA2.0-flash (100B total / 6.1B active BailingMoeV2) on a 256-chip TPU pod: WSD conversion,
then SFT, CAP and DPO.

Pick the stage after a colon (no colon: `wsd`), or use the stage's own file (flash_sft.py, ...):

    python -m llada2_jax.main --config=experiments/flash.py:sft --config.dry_run=True

Defined in `llada2_jax/configs/flash.py`.
"""
from llada2_jax.configs.flash import get_config  # noqa: F401
