"""Block-diffusion SFT of the tiny model on GSM8K, starting from the tiny_wsd run.

    python -m llada2_jax.main --config=experiments/tiny_sft.py --workdir=/tmp/tiny_sft \
        --config.init_from=/tmp/tiny_wsd

A few minutes on 2 CPU cores. Spec hyper-parameters (block 32, t ~ U[0.3, 0.8], complementary
masking), with a learning rate suited to a ~3M-parameter model.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from posttrain_common import posttrain_config, stage_overrides  # noqa: E402

# Tiny-model sizes shared by tiny_sft / tiny_cap / tiny_dpo.
TINY = dict(seq_len=512, batch_size=8, eval_batch_size=8, eval_batches=2)
TINY_SMOKE = (("data.seq_len", 256), ("train.batch_size", 2), ("train.eval_batch_size", 2),
              ("train.eval_batches", 1), ("train.log_every", 1), ("train.checkpoint_every", 2),
              ("train.keep_checkpoints", 1))


def tiny_config(stage: str, init_from: str):
    c = posttrain_config(stage, init_from)
    c.data.seq_len = TINY["seq_len"]
    c.train.update(dict(batch_size=TINY["batch_size"], eval_batch_size=TINY["eval_batch_size"],
                        eval_batches=TINY["eval_batches"], log_every=10, checkpoint_every=50, keep_checkpoints=2))
    return c


def get_config():
    c = tiny_config("sft", "/tmp/tiny_wsd")
    c.sft.update(dict(steps=150, lr=1e-3, lr_min=1e-4))
    c.smoke_overrides = TINY_SMOKE + stage_overrides("sft", [("steps", 3), ("eval_samples", 1)])
    return c
