"""CAP (SFT loss + λ · entropy of correct predictions) of the tiny model, starting from tiny_sft.

    python -m llada2_jax.main --config=experiments/tiny_cap.py --workdir=/tmp/tiny_cap \
        --config.init_from=/tmp/tiny_sft

Defined in `llada2_jax/configs/tiny.py`; the same as `--config=experiments/tiny.py:cap`.
"""
from llada2_jax.configs import tiny


def get_config():
    return tiny.get_config("cap")
