"""The tiny model (CPU, minutes): stdlib corpus -> sentencepiece -> tiny AR base -> WSD conversion
-> merge -> eval, then SFT, CAP and DPO on GSM8K.

Pick the stage after a colon (no colon: `wsd`), or use the stage's own file (tiny_sft.py, ...):

    python -m llada2_jax.main --config=experiments/tiny.py:sft --workdir=/tmp/tiny_sft \
        --config.init_from=/tmp/tiny_wsd

Defined in `llada2_jax/configs/tiny.py`.
"""
from llada2_jax.configs.tiny import get_config  # noqa: F401
