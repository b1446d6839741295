"""LLaDA2.0-mini (16B total / 1.4B active BailingMoeV2) on a 256-chip TPU pod: WSD conversion,
then SFT, CAP and DPO.

Pick the stage after a colon (no colon: `wsd`), or use the stage's own file (mini_sft.py, ...):

    python -m llada2_jax.main --config=experiments/mini.py:sft --config.dry_run=True

Defined in `llada2_jax/configs/mini.py`.
"""
from llada2_jax.configs.mini import get_config  # noqa: F401
