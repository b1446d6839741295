"""Shared shape of the post-training stages (sft / cap / dpo), built on `base_config()`.

Every post-training run starts from an earlier run's workdir: `init_from` (a config field, so
`--config.init_from=DIR` works) makes the run load its model from `workdir:<init_from>` and its
tokenizer from `<init_from>/tokenizer`. With `init_from=""` the run uses `model.source` /
`model.arch` as configured (how the mini/flash dry runs plan memory). Stage hyper-parameters
default to the spec's (§6–§8): block 32, mask rate t ~ U[0.3, 0.8], complementary masking, ELBO
weights, CAP λ = 2, DPO β = 0.1, cosine lr with 3 % warm-up, DPO starting at the previous
stage's final lr. `sft.edit_rate` / `cap.edit_rate` > 0 adds the LLaDA2.1 token-editing stream
(weight `edit_weight`; see `diffusion.editing`); 0 keeps the LLaDA2.0 objective.
"""
from __future__ import annotations

import ml_collections

from llada2_jax.configs.base import base_config

STAGES = ("sft", "cap", "dpo")
PREVIOUS = {"sft": "wsd", "cap": "sft", "dpo": "cap"}  # the run each stage starts from


def posttrain_section(**overrides) -> ml_collections.ConfigDict:
    """An `sft`-shaped stage section (also `cap`, `ar_sft`): the spec's defaults, then `overrides`."""
    c = ml_collections.ConfigDict(dict(
        data="gsm8k", data_path="", heldout_size=256, steps=100, lr=1e-5, lr_min=1e-6, warmup_ratio=0.03,
        lr_schedule="cosine", block_size=32, t_min=0.3, t_max=0.8, weighting="elbo", complementary=True,
        eval_samples=2,
        edit_rate=0.0, edit_weight=1.0))  # LLaDA2.1 token editing: corruption rate of visible tokens, loss weight
    c.update(overrides)
    return c


def posttrain_config(stage: str, init_from: str) -> ml_collections.ConfigDict:
    """A one-stage run of `stage` ('sft' | 'cap' | 'dpo') starting from the workdir `init_from`."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; expected one of {STAGES}")
    c = base_config()
    c.stages = stage
    c.init_from = init_from
    c.optimizer.update(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    c.sft = posttrain_section()
    c.cap = posttrain_section(cap_weight=2.0)
    c.dpo = ml_collections.ConfigDict(dict(
        data="gsm8k", data_path="", heldout_size=256, steps=100, beta=0.1, block_size=32, t_min=0.3, t_max=0.8,
        lr=1e-5, lr_from_init=True, lr_min=0.0, warmup_ratio=0.0, lr_schedule="constant", eval_samples=1))
    return c


def stage_overrides(stage: str, pairs) -> tuple:
    """(`<stage>.<field>`, value) smoke overrides from (field, value) pairs."""
    return tuple((f"{stage}.{k}", v) for k, v in pairs)


def smoke_sizes(batch_size: int) -> tuple:
    """Smoke overrides of a CPU post-training run: rows of 256 tokens, a checkpoint every 2 steps."""
    return (("data.seq_len", 256), ("train.batch_size", batch_size), ("train.eval_batch_size", batch_size),
            ("train.eval_batches", 1), ("train.log_every", 1), ("train.checkpoint_every", 2),
            ("train.keep_checkpoints", 1))
