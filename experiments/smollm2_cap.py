"""CAP stage of the converted SmolLM2-135M (real model), starting from the smollm2_sft run.

    python -m llada2_jax.main --config=experiments/smollm2_cap.py --workdir=/tmp/smollm2_cap \
        --config.init_from=/tmp/smollm2_sft

Defined in `llada2_jax/configs/smollm2.py`; the same as `--config=experiments/smollm2.py:cap`.
"""
from llada2_jax.configs import smollm2


def get_config():
    return smollm2.get_config("cap")
