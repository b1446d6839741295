"""The real SmolLM2-135M (GGUF, plus an added `[MASK]` id): WSD conversion -> merge -> eval, then
SFT, CAP and DPO on GSM8K.

Pick the stage after a colon (no colon: `wsd`), or use the stage's own file (smollm2_sft.py, ...):

    python -m llada2_jax.main --config=experiments/smollm2.py:sft --workdir=/tmp/smollm2_sft \
        --config.init_from=/tmp/smollm2_wsd

Defined in `llada2_jax/configs/smollm2.py`.
"""
from llada2_jax.configs.smollm2 import get_config  # noqa: F401
