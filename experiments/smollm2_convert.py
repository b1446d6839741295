"""Convert the real SmolLM2-135M-Instruct into a block-diffusion LM on reasoning-gym tasks, train its
AR twin on the same data, and print the AR-vs-dLLM table (the `convert` preset).

    python -m llada2_jax.main --config=experiments/smollm2_convert.py --workdir=workdirs/convert

Stages wsd -> sft -> cap, ar_sft, compare in one workdir; rerunning resumes. Defined in
`llada2_jax/configs/smollm2.py`; the same as `--config=experiments/smollm2.py:convert`.
"""
from llada2_jax.configs import smollm2


def get_config():
    return smollm2.get_config("convert")
