"""Diffusion DPO of the tiny model on the synthetic GSM8K pairs, starting from tiny_cap (or tiny_sft).

    python -m llada2_jax.main --config=experiments/tiny_dpo.py --workdir=/tmp/tiny_dpo \
        --config.init_from=/tmp/tiny_cap

Defined in `llada2_jax/configs/tiny.py`; the same as `--config=experiments/tiny.py:dpo`.
"""
from llada2_jax.configs import tiny


def get_config():
    return tiny.get_config("dpo")
