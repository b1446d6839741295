"""DPO stage of the converted SmolLM2-135M (real model), starting from the smollm2_cap run.

    python -m llada2_jax.main --config=experiments/smollm2_dpo.py --workdir=/tmp/smollm2_dpo \
        --config.init_from=/tmp/smollm2_cap

Spec hyper-parameters (block 32, t ~ U[0.3, 0.8], AdamW(0.9, 0.999), wd 0.1, clip 1.0, cosine);
sequence length 512 and batch 4 to fit a CPU (about 10-15 s per step; a GPU is advised).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from posttrain_common import posttrain_config, stage_overrides  # noqa: E402


def get_config():
    c = posttrain_config("dpo", "/tmp/smollm2_cap")
    c.data.seq_len = 512
    c.train.update(dict(batch_size=4, eval_batch_size=4, eval_batches=4, log_every=10, checkpoint_every=50,
                        keep_checkpoints=2))
    c.dpo.update(dict(steps=100, lr=1e-6, beta=0.1))
    c.smoke_overrides = (("data.seq_len", 256), ("train.batch_size", 1), ("train.eval_batch_size", 1),
                         ("train.eval_batches", 1), ("train.log_every", 1), ("train.checkpoint_every", 2),
                         ("train.keep_checkpoints", 1)) + stage_overrides("dpo", [("steps", 2), ("eval_samples", 1)])
    return c
