"""LLaDA2.0-flash (100B total / 6.1B active BailingMoeV2, spec §1.1) on a 256-chip TPU pod.

Same recipe and mesh as mini (`bailing_pod`); only the model is larger (d_model 4096, 32 layers,
32 query heads, expert width 1024) and the WSD learning rate lower.
"""
from __future__ import annotations

import ml_collections

from llada2_jax.configs import bailing_pod


def wsd() -> ml_collections.ConfigDict:
    return bailing_pod.wsd_config(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                  intermediate_size=9216, moe_intermediate_size=1024, lr=1e-5)


def get_config(stage: str = "wsd") -> ml_collections.ConfigDict:
    return bailing_pod.get_stage_config("flash", stage, wsd)
