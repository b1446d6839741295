"""The real SmolLM2-135M (GGUF of assets.md, plus an added `[MASK]` id): WSD conversion, then SFT, CAP, DPO.

Corpus: the CPython stdlib, plus the Python docs when `python3.11-doc` is installed. A full WSD
step on 4 x 256 tokens takes ~10-15 s on 2 CPU cores (assets.md), so the default budget is for
an accelerator; `--config.smoke=True` keeps the real model but runs a handful of short steps.
Post-training uses the spec's hyper-parameters (block 32, t ~ U[0.3, 0.8], AdamW(0.9, 0.999),
wd 0.1, clip 1.0, cosine) with sequence length 512 and batch 4 to fit a CPU; each stage starts
by default from `/tmp/smollm2_<previous stage>`.
"""
from __future__ import annotations

import os

import ml_collections

from llada2_jax.configs.base import base_config, select
from llada2_jax.configs.posttrain import (PREVIOUS, posttrain_config, posttrain_section, smoke_sizes,
                                          stage_overrides)

PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources"


def wsd() -> ml_collections.ConfigDict:
    c = base_config()
    c.stages = "wsd,merge,eval"
    c.model.source = "gguf:smollm2"  # add_mask_token appends id 49152
    c.tokenizer.kind = "smollm2"
    c.data.corpora = "stdlib,python_docs" if os.path.isdir(PYTHON_DOCS) else "stdlib"
    c.data.seq_len = 256
    c.train.update(dict(batch_size=8, log_every=10, eval_every=100, eval_batches=4, eval_batch_size=8,
                        checkpoint_every=100, keep_checkpoints=4))
    c.wsd.update(dict(warmup_sizes=(1, 4, 32, 64), decay_min=32, steps_per_warmup=100, stable_steps=1000,
                      steps_per_decay=100, lr=3e-5, warmup_steps=20, noise_steps=200))
    c.eval.update(dict(block_size=32, num_samples=3, prompt_length=32, gen_length=64))
    c.smoke_overrides = (
        ("data.seq_len", 64), ("data.max_bytes", 300_000), ("data.heldout_fraction", 0.05),
        ("train.batch_size", 1), ("train.eval_batch_size", 1), ("train.eval_batches", 1), ("train.eval_every", 0),
        ("train.log_every", 1), ("train.checkpoint_every", 2), ("train.keep_checkpoints", 2),
        ("wsd.warmup_sizes", (1, 4)), ("wsd.decay_min", 32), ("wsd.steps_per_warmup", 1), ("wsd.stable_steps", 1),
        ("wsd.steps_per_decay", 1), ("wsd.warmup_steps", 1), ("wsd.noise_steps", 2), ("merge.top_k", 2),
        ("eval.block_size", 32), ("eval.num_samples", 1), ("eval.prompt_length", 16), ("eval.gen_length", 32))
    return c


def _posttrain(stage: str, stage_fields: dict) -> ml_collections.ConfigDict:
    c = posttrain_config(stage, f"/tmp/smollm2_{PREVIOUS[stage]}")
    c.data.seq_len = 512
    c.train.update(dict(batch_size=4, eval_batch_size=4, eval_batches=4, log_every=10, checkpoint_every=50,
                        keep_checkpoints=2))
    c[stage].update(stage_fields)
    c.smoke_overrides = smoke_sizes(1) + stage_overrides(stage, [("steps", 2), ("eval_samples", 1)])
    return c


def sft() -> ml_collections.ConfigDict:
    return _posttrain("sft", dict(steps=200, lr=2e-5, lr_min=2e-6))


def cap() -> ml_collections.ConfigDict:
    return _posttrain("cap", dict(steps=100, lr=1e-5, lr_min=1e-6, cap_weight=2.0))


def dpo() -> ml_collections.ConfigDict:
    return _posttrain("dpo", dict(steps=100, lr=1e-6, beta=0.1))


def convert() -> ml_collections.ConfigDict:
    """The real conversion and its AR twin in one run, on reasoning-gym tasks (docs/DECISIONS.md).

    wsd (ladder 1 -> 4 | MDLM at 256 | 128 -> ... -> 16) -> sft -> cap on the task chats, ar_sft
    (the AR twin: the same GGUF, next-token SFT on the same chats for as many data tokens as
    wsd + sft + cap together), then `compare` decodes every stage on 200 held-out items at
    threshold 0.9 (`python -m llada2_jax.evaluate` runs the other thresholds and any count). Every layer trains, in both models; block 16.
    SFT and CAP draw t from [0.3, 1]: decoding starts each block fully masked (t = 1), which the
    spec's [0.3, 0.8] never shows a model this briefly trained. Sized for ~100 minutes on 2 CPU cores.
    """
    c = base_config()
    c.stages = "wsd,sft,cap,ar_sft,compare"
    c.model.source = "gguf:smollm2"
    c.model.runtime.attention_impl = "auto"  # CPU: xla_sparse on the block-diffusion mask (bench/train_step.py)
    c.tokenizer.kind = "smollm2"
    c.data.update(dict(corpora="gym", seq_len=256))
    c.gym.update(dict(tasks="word_sequence_reversal,rotate_matrix", seed=0, train_items=4000, heldout_items=32))
    c.train.update(dict(batch_size=4, log_every=5, eval_batches=1, eval_batch_size=4, checkpoint_every=20,
                        keep_checkpoints=1, frozen_layers=0))
    c.optimizer.update(dict(b1=0.9, b2=0.999, weight_decay=0.1, grad_clip=1.0))
    # masked_mean in WSD: with 4 rows per step the 1/t ELBO weights make the loss too noisy to use
    c.wsd.update(dict(warmup_sizes=(1, 4), decay_min=16, steps_per_warmup=4, stable_steps=16,
                      steps_per_decay=4, lr=1e-4, warmup_steps=2, lr_schedule="constant", weighting="masked_mean",
                      noise_steps=8, eval_samples=1))
    c.sft = posttrain_section(steps=120, lr=1e-4, lr_min=1e-5, block_size=16, complementary=False, data="gym",
                              t_max=1.0, eval_samples=1)
    c.cap = posttrain_section(steps=30, lr=3e-5, lr_min=3e-6, block_size=16, complementary=False, data="gym",
                              t_max=1.0, eval_samples=1, cap_weight=0.5)
    c.ar_sft = posttrain_section(steps=0, lr=1e-4, lr_min=1e-5, block_size=16, data="gym")  # 0: the chain's steps
    # 200 items at the target threshold; the frontier over every threshold is a separate evaluate run
    c.compare.update(dict(count=200, thresholds=(0.9,), gen_length=64, batch_size=40, speed_items=4))
    c.smoke_overrides = (
        ("gym.train_items", 32), ("gym.heldout_items", 4), ("data.seq_len", 256), ("train.log_every", 1),
        ("train.checkpoint_every", 2), ("wsd.warmup_sizes", (1, 4)), ("wsd.steps_per_warmup", 1),
        ("wsd.stable_steps", 1), ("wsd.steps_per_decay", 1), ("wsd.decay_min", 64), ("wsd.warmup_steps", 1),
        ("wsd.noise_steps", 1), ("sft.steps", 1), ("cap.steps", 1), ("train.frozen_layers", 20),
        ("compare.count", 2), ("compare.thresholds", (0.9,)), ("compare.speed_items", 1),
        ("compare.gen_length", 32), ("compare.batch_size", 2), ("sft.block_size", 64), ("cap.block_size", 64),
        ("ar_sft.block_size", 64))
    return c


def quick() -> ml_collections.ConfigDict:
    """`convert` on a budget that fits the README's ~20 minutes on 2 CPU cores: the same stages and
    ladder with one step per phase, 10 SFT and 6 CAP steps, only the top 10 of the 30 layers
    trained, no held-out loss evaluations, and a compare on 32 items at thresholds 0.7 and 0.9.
    It shows the whole chain run; `convert` (and more, bench/gpu_convert.sh) is what moves accuracy."""
    c = convert()
    c.train.update(dict(batch_size=4, eval_batches=0, log_every=1, frozen_layers=20))
    c.wsd.update(dict(warmup_sizes=(1, 4), steps_per_warmup=1, stable_steps=2, steps_per_decay=1, warmup_steps=1,
                      noise_steps=2))
    c.sft.steps, c.cap.steps = 10, 6
    c.compare.update(dict(count=32, thresholds=(0.7, 0.9), batch_size=32, speed_items=2))
    return c


def get_config(stage: str = "wsd") -> ml_collections.ConfigDict:
    return select("smollm2", stage, dict(wsd=wsd, sft=sft, cap=cap, dpo=dpo, convert=convert, quick=quick))
