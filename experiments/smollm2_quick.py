"""The README main job: the SmolLM2 conversion chain and its AR twin on a ~20-minute CPU budget.

    python -m llada2_jax.main --config=experiments/smollm2_quick.py --workdir=workdirs/quick

The `convert` preset (experiments/smollm2_convert.py) with one step per WSD phase, 10 SFT and 6 CAP
steps and a 32-item compare. Defined in `llada2_jax/configs/smollm2.py` (`smollm2.py:quick`).
"""
from llada2_jax.configs import smollm2


def get_config():
    return smollm2.get_config("quick")
