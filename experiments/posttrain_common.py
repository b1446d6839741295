"""Shared shape of the post-training experiments (sft / cap / dpo), built on `base_config()`.

Every post-training run starts from an earlier run's workdir: `init_from` (a config field, so
`--config.init_from=DIR` works) replaces `model.source` by `workdir:<init_from>` and the tokenizer
by `<init_from>/tokenizer` at start-up (`stage_sft.apply_init_from`). With `init_from=""` the
run uses `model.source` / `model.arch` as configured (how the mini/flash dry runs plan memory). Stage hyper-parameters default to the spec's (§6–§8):
block 32, mask rate t ~ U[0.3, 0.8], complementary masking, ELBO weights, CAP λ = 2, DPO β = 0.1,
cosine lr with 3 % warm-up, DPO starting at the previous stage's final lr.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402

import llada2_jax.training.stage_dpo  # noqa: E402,F401  (registers the `dpo` stage)
import llada2_jax.training.stage_sft  # noqa: E402,F401  (registers `sft` and `cap`)

STAGES = ("sft", "cap", "dpo")


def _sft_section(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        data="gsm8k", data_path="", heldout_size=256, steps=100, lr=1e-5, lr_min=1e-6, warmup_ratio=0.03,
        lr_schedule="cosine", block_size=32, t_min=0.3, t_max=0.8, weighting="elbo", complementary=True,
        eval_samples=2, **kw))


def posttrain_config(stage: str, init_from: str) -> ml_collections.ConfigDict:
    """A one-stage run of `stage` ('sft' | 'cap' | 'dpo') starting from the workdir `init_from`."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; expected one of {STAGES}")
    c = base_config()
    c.stages = stage
    c.init_from = init_from
    c.optimizer.update(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    c.sft = _sft_section()
    c.cap = _sft_section(cap_weight=2.0)
    c.dpo = ml_collections.ConfigDict(dict(
        data="gsm8k", data_path="", heldout_size=256, steps=100, beta=0.1, block_size=32, t_min=0.3, t_max=0.8,
        lr=1e-5, lr_from_init=True, lr_min=0.0, warmup_ratio=0.0, lr_schedule="constant", eval_samples=1))
    return c


def stage_overrides(stage: str, pairs) -> tuple:
    """(`<stage>.<field>`, value) smoke overrides from (field, value) pairs."""
    return tuple((f"{stage}.{k}", v) for k, v in pairs)


def pod_posttrain_config(stage: str, wsd_config) -> ml_collections.ConfigDict:
    """mini/flash post-training: the WSD run's model, runtime, mesh and smoke sizes + the stage.

    Spec §6 hyper-parameters: lr 1e-5 cosine (3 % warm-up) to 1e-6, AdamW(0.9, 0.999), wd 0.1,
    clip 1.0, block 32, t ~ U[0.3, 0.8]; packed rows of 4096 tokens, 256 rows per step over the
    256-chip fsdp 16 x expert 16 mesh (dFactory's global batch 8 x 2048 unpacked cannot be split
    over 256 chips). With `init_from=""` the architecture comes from `model.arch` (dry runs);
    a real run passes `--config.init_from=<the WSD / previous stage's workdir>`. The DPO step
    holds a second (frozen) copy of the parameters: add the printed param bytes once more.
    """
    c = posttrain_config(stage, "")
    for field in ("model", "mesh", "dry_run_devices"):
        c[field] = wsd_config[field]
    c.data.seq_len = 4096
    c.train.update(dict(batch_size=256, log_every=10, eval_every=200, eval_batches=4, eval_batch_size=256,
                        checkpoint_every=200, keep_checkpoints=3))
    c[stage].update(dict(steps=2000))
    if stage == "dpo":
        c.dpo.update(dict(lr=1e-6, steps=1000))
    c.smoke_overrides = tuple(wsd_config.smoke_overrides) + (
        ("data.seq_len", 256), ("train.batch_size", 2), ("train.eval_batch_size", 2),
        (f"{stage}.steps", 2), (f"{stage}.eval_samples", 1))
    return c
