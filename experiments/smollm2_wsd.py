"""Convert the real SmolLM2-135M (GGUF of assets.md, plus an added `[MASK]` id) with the WSD ladder.

    python -m llada2_jax.main --config=experiments/smollm2_wsd.py --workdir=/tmp/smollm2_wsd

Defined in `llada2_jax/configs/smollm2.py`; the same as `--config=experiments/smollm2.py:wsd`.
"""
from llada2_jax.configs import smollm2


def get_config():
    return smollm2.get_config("wsd")
