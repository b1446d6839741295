"""LLaDA2.0-flash (100B total / 6.1B active BailingMoeV2, spec §1.1): WSD conversion on a TPU pod.

    python -m llada2_jax.main --config=experiments/flash_wsd.py --config.dry_run=True

Same recipe and sharding scheme as mini_wsd.py (256 chips = fsdp 16 x expert 16); only the
model is larger (d_model 4096, 32 layers, 32 query heads, expert width 1024).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from mini_wsd import pod_config  # noqa: E402


def get_config():
    c = pod_config(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=9216,
                   moe_intermediate_size=1024)
    c.wsd.lr = 1e-5
    return c
