"""Diffusion DPO of the tiny model on the synthetic GSM8K pairs, starting from tiny_cap (or tiny_sft).

    python -m llada2_jax.main --config=experiments/tiny_dpo.py --workdir=/tmp/tiny_dpo \
        --config.init_from=/tmp/tiny_cap

The learning rate starts at the last rate logged by the init_from run (its SFT/CAP stage).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from posttrain_common import stage_overrides  # noqa: E402
from tiny_sft import TINY_SMOKE, tiny_config  # noqa: E402


def get_config():
    c = tiny_config("dpo", "/tmp/tiny_cap")
    c.dpo.update(dict(steps=100, lr=1e-4, beta=0.1))
    c.smoke_overrides = TINY_SMOKE + stage_overrides("dpo", [("steps", 3)])
    return c
