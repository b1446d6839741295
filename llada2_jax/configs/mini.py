"""LLaDA2.0-mini (16B total / 1.4B active BailingMoeV2, spec §1.1) on a 256-chip TPU pod.

Stages `wsd`, `sft`, `cap`, `dpo`; the recipe, mesh and smoke sizes are `bailing_pod`'s.
"""
from __future__ import annotations

import ml_collections

from llada2_jax.configs import bailing_pod


def wsd() -> ml_collections.ConfigDict:
    return bailing_pod.wsd_config(hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                                  intermediate_size=5120, moe_intermediate_size=512, lr=2e-5)


def get_config(stage: str = "wsd") -> ml_collections.ConfigDict:
    return bailing_pod.get_stage_config("mini", stage, wsd)
