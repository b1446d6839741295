"""Block-diffusion SFT of the tiny model on GSM8K, starting from the tiny_wsd run.

    python -m llada2_jax.main --config=experiments/tiny_sft.py --workdir=/tmp/tiny_sft \
        --config.init_from=/tmp/tiny_wsd

Defined in `llada2_jax/configs/tiny.py`; the same as `--config=experiments/tiny.py:sft`.
"""
from llada2_jax.configs import tiny


def get_config():
    return tiny.get_config("sft")
