"""A pod-shaped job small enough for one CPU: a tiny BailingMoeV2 WSD run on an fsdp x expert mesh.

The same family as mini/flash (sigmoid group-limited routing over 8 experts, top-2, a shared
expert, QK-norm, aux-loss-free expert bias), shrunk to ~40k parameters so that a step takes a
fraction of a second and two processes compile it on two busy cores. The mesh is fsdp=4 x
expert=2 (8 devices: 2 processes x 4 CPU devices, or 1 x 8) and the training data is 2 shards
(`data.shards`), so every process count that divides 2 trains on the same global batches. See the
README section "On a TPU pod or a GPU cluster" and `bench/multiprocess_cpu.sh`.
"""
from __future__ import annotations

import ml_collections

from llada2_jax.configs.base import base_config, select


def wsd() -> ml_collections.ConfigDict:
    c = base_config()
    c.stages = "wsd"
    c.mesh.update(dict(data=1, fsdp=4, expert=2, tensor=1))
    c.model.arch.update(dict(
        model_type="bailing_moe_v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
        score_function="sigmoid", norm_topk_prob=True, use_expert_bias=True, qk_norm=True,
        routed_scaling_factor=1.0, max_position_embeddings=64))
    c.tokenizer.update(dict(vocab_size=512, train_max_bytes=200_000))
    c.data.update(dict(seq_len=32, max_bytes=150_000, heldout_fraction=0.05, shards=2))
    c.train.update(dict(batch_size=8, log_every=1, eval_batches=0, checkpoint_every=3, keep_checkpoints=3))
    # one BDLM phase at block 16 (one compiled step), masked-mean loss: 6 steps
    c.wsd.update(dict(warmup_sizes=(), steps_per_warmup=0, stable_steps=0, steps_per_decay=6, decay_min=16,
                      noise_steps=2, lr=3e-3, warmup_steps=0, weighting="masked_mean"))
    c.smoke_overrides = (("wsd.steps_per_decay", 2),)
    return c


def get_config(stage: str = "wsd") -> ml_collections.ConfigDict:
    return select("tiny_moe", stage, dict(wsd=wsd))
