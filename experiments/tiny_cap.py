"""CAP (SFT loss + λ · entropy of correct predictions) of the tiny model, starting from tiny_sft.

    python -m llada2_jax.main --config=experiments/tiny_cap.py --workdir=/tmp/tiny_cap \
        --config.init_from=/tmp/tiny_sft
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from posttrain_common import stage_overrides  # noqa: E402
from tiny_sft import TINY_SMOKE, tiny_config  # noqa: E402


def get_config():
    c = tiny_config("cap", "/tmp/tiny_sft")
    c.cap.update(dict(steps=100, lr=3e-4, lr_min=3e-5, cap_weight=2.0))
    c.smoke_overrides = TINY_SMOKE + stage_overrides("cap", [("steps", 3), ("eval_samples", 1)])
    return c
