"""The main job: stdlib corpus -> sentencepiece -> tiny AR base -> WSD conversion -> merge -> eval.

    python -m llada2_jax.main --config=experiments/tiny_wsd.py --workdir=/tmp/tiny_wsd

Defined in `llada2_jax/configs/tiny.py`; the same as `--config=experiments/tiny.py:wsd`.
"""
from llada2_jax.configs import tiny


def get_config():
    return tiny.get_config("wsd")
