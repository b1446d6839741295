"""LLaDA2.0 BailingMoeV2 models (mini, flash) on a 256-chip TPU pod: the recipe both sizes share.

Sharding plan [I]: 256 chips = fsdp 16 x expert 16. Routed experts (256) split 16 ways over
`expert` and their d_model over `fsdp`; dense weights split d_model over fsdp x expert (ZeRO-3);
the batch (256 sequences of 4096 tokens per step) over fsdp x expert. WSD ladder as in the
paper: 1 -> 4 -> 32 -> 64 -> 4096 | 4096 | 2048 -> ... -> 32. Step counts and LR are not
disclosed (spec §3.2); the values below are placeholders sized ~5% warm-up / 80% stable / 15% decay.

Post-training (spec §6): lr 1e-5 cosine (3 % warm-up) to 1e-6, AdamW(0.9, 0.999), wd 0.1,
clip 1.0, block 32, t ~ U[0.3, 0.8]; packed rows of 4096 tokens, 256 rows per step over the
same mesh (dFactory's global batch 8 x 2048 unpacked cannot be split over 256 chips). With
`init_from=""` the architecture comes from `model.arch` (dry runs); a real run passes
`--config.init_from=<the previous stage's workdir>`. The DPO step holds a second (frozen) copy
of the parameters: add the printed param bytes once more.

Smoke mode keeps the family (MoE, sigmoid group routing, QK-norm, partial RoPE) shrunk to seconds
on a CPU; its 256 positions fit the post-training smoke rows (256 tokens).
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from llada2_jax.configs.base import base_config, select
from llada2_jax.configs.posttrain import STAGES, posttrain_config

BAILING_COMMON = dict(
    model_type="bailing_moe_v2", vocab_size=157184, num_key_value_heads=4, head_dim=128, first_k_dense_replace=1,
    num_experts=256, num_experts_per_tok=8, num_shared_experts=1, n_group=8, topk_group=4,
    score_function="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True, use_expert_bias=True,
    qk_norm=True, rope_theta=600000.0, partial_rotary_factor=0.5, rms_norm_eps=1e-6, tie_word_embeddings=False,
    max_position_embeddings=32768, mask_token_id=156895, eos_token_id=156892, pad_token_id=156892)

TINY_BAILING = tuple(  # smoke: the same family, shrunk to seconds on a CPU
    ("model.arch." + k, v) for k, v in dict(
        vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, max_position_embeddings=256, mask_token_id=None, eos_token_id=None,
        pad_token_id=None).items())


def wsd_config(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, moe_intermediate_size,
               lr) -> ml_collections.ConfigDict:
    """The WSD conversion run of a model of the given width, depth and expert width."""
    c = base_config()
    c.stages = "wsd,merge,eval"
    c.model.arch.update(dict(BAILING_COMMON, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                             num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                             moe_intermediate_size=moe_intermediate_size))
    c.model.runtime.update(dict(param_dtype="float32", dtype="bfloat16",
                                remat_policy="dots_with_no_batch_dims_saveable", attention_impl="auto"))
    c.mesh.update(dict(data=1, fsdp=16, expert=16, tensor=1))
    c.dry_run_devices = 256
    c.data.seq_len = 4096
    c.train.update(dict(batch_size=256, log_every=10, eval_every=500, eval_batches=8, eval_batch_size=256,
                        checkpoint_every=500, keep_checkpoints=5))
    c.wsd.update(dict(warmup_sizes=(1, 4, 32, 64), decay_min=32, steps_per_warmup=500, stable_steps=40000,
                      steps_per_decay=1000, lr=lr, warmup_steps=200, noise_steps=1000))
    c.merge.top_k = 3
    c.smoke_overrides = TINY_BAILING + (
        ("mesh.fsdp", 1), ("mesh.expert", 1), ("mesh.data", -1), ("dry_run_devices", 0),
        ("model.runtime.dtype", "float32"), ("model.runtime.remat_policy", "none"),
        ("model.runtime.attention_impl", "xla"), ("tokenizer.vocab_size", 512),
        ("tokenizer.train_max_bytes", 300_000), ("data.max_bytes", 300_000), ("data.seq_len", 32),
        ("data.heldout_fraction", 0.05), ("train.batch_size", 4), ("train.eval_batch_size", 4),
        ("train.eval_batches", 1), ("train.eval_every", 0), ("train.log_every", 1), ("train.checkpoint_every", 2),
        ("train.keep_checkpoints", 2), ("wsd.warmup_sizes", (1, 4)), ("wsd.decay_min", 16),
        ("wsd.steps_per_warmup", 1), ("wsd.stable_steps", 2), ("wsd.steps_per_decay", 1), ("wsd.warmup_steps", 1),
        ("wsd.noise_steps", 2), ("merge.top_k", 2), ("eval.block_size", 16), ("eval.num_samples", 1),
        ("eval.prompt_length", 8), ("eval.gen_length", 16))
    return c


def posttrain(stage: str, wsd: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Post-training `stage` with the WSD run's model, runtime, mesh and smoke sizes."""
    c = posttrain_config(stage, "")
    for field in ("model", "mesh", "dry_run_devices"):
        c[field] = wsd[field]
    c.data.seq_len = 4096
    c.train.update(dict(batch_size=256, log_every=10, eval_every=200, eval_batches=4, eval_batch_size=256,
                        checkpoint_every=200, keep_checkpoints=3))
    c[stage].update(dict(steps=2000))
    if stage == "dpo":
        c.dpo.update(dict(lr=1e-6, steps=1000))
    c.smoke_overrides = tuple(wsd.smoke_overrides) + (
        ("data.seq_len", 256), ("train.batch_size", 2), ("train.eval_batch_size", 2),
        (f"{stage}.steps", 2), (f"{stage}.eval_samples", 1))
    return c


def get_stage_config(size: str, stage: str, wsd: Callable[[], ml_collections.ConfigDict]):
    """`wsd()` for 'wsd', else the post-training `stage` built on it."""
    builders = {"wsd": wsd, **{name: (lambda name=name: posttrain(name, wsd())) for name in STAGES}}
    return select(size, stage, builders)
