"""The tiny model, CPU-sized: stdlib corpus -> sentencepiece -> AR base -> WSD conversion, then SFT, CAP, DPO.

`wsd` is the main job, sized to finish in ~9 minutes on 2 quiet CPU cores: a 1.05M-parameter
Llama-style model (4 layers, d=128, vocab 2048, tied embeddings), L = 256, ladder
1 -> 4 -> 32 -> 64 -> 256 | 256 | 128 -> 64 -> 32, then merge and eval. The post-training
stages (a few minutes each) use the spec's hyper-parameters (block 32, t ~ U[0.3, 0.8],
complementary masking) with learning rates suited to a ~3M-parameter model; each starts by
default from `/tmp/tiny_<previous stage>`.
"""
from __future__ import annotations

import ml_collections

from llada2_jax.configs.base import base_config, select
from llada2_jax.configs.posttrain import PREVIOUS, posttrain_config, smoke_sizes, stage_overrides


def wsd() -> ml_collections.ConfigDict:
    c = base_config()
    c.stages = "ar_pretrain,wsd,merge,eval"
    c.model.arch.update(dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512))
    c.tokenizer.vocab_size = 2048
    c.data.seq_len = 256
    c.train.update(dict(batch_size=8, log_every=5, eval_batches=2, eval_batch_size=8, checkpoint_every=10,
                        keep_checkpoints=4))
    c.ar_pretrain.update(dict(steps=800, lr=1e-3, warmup_steps=20, lr_schedule="cosine"))
    # masked_mean (dFactory) instead of the 1/t-weighted ELBO: with 8 sequences per step the 1/t
    # weights (up to 1000) make the training loss too noisy to read; held-out evaluation stays the ELBO.
    c.wsd.update(dict(steps_per_warmup=20, stable_steps=60, steps_per_decay=20, lr=3e-4, warmup_steps=10,
                      noise_steps=30, weighting="masked_mean"))
    c.merge.top_k = 3
    c.eval.update(dict(block_size=32, num_samples=3, prompt_length=32, gen_length=64))
    c.smoke_overrides = (
        ("tokenizer.vocab_size", 512), ("tokenizer.train_max_bytes", 300_000), ("data.max_bytes", 400_000),
        ("data.seq_len", 32), ("data.heldout_fraction", 0.05), ("model.arch.hidden_size", 32),
        ("model.arch.intermediate_size", 64), ("model.arch.num_hidden_layers", 1),
        ("train.batch_size", 4), ("train.eval_batch_size", 4), ("train.eval_batches", 1), ("train.log_every", 2),
        ("train.checkpoint_every", 2), ("train.keep_checkpoints", 2), ("ar_pretrain.steps", 4),
        ("ar_pretrain.warmup_steps", 1), ("wsd.warmup_sizes", (1, 4)), ("wsd.decay_min", 16),
        ("wsd.steps_per_warmup", 1), ("wsd.stable_steps", 2), ("wsd.steps_per_decay", 1),
        ("wsd.warmup_steps", 1), ("wsd.noise_steps", 2), ("merge.top_k", 2), ("eval.block_size", 16),
        ("eval.num_samples", 1), ("eval.prompt_length", 8), ("eval.gen_length", 16))
    return c


def _posttrain(stage: str, stage_fields: dict, smoke_fields: list) -> ml_collections.ConfigDict:
    c = posttrain_config(stage, f"/tmp/tiny_{PREVIOUS[stage]}")
    c.data.seq_len = 512
    c.train.update(dict(batch_size=8, eval_batch_size=8, eval_batches=2, log_every=10, checkpoint_every=50,
                        keep_checkpoints=2))
    c[stage].update(stage_fields)
    c.smoke_overrides = smoke_sizes(2) + stage_overrides(stage, smoke_fields)
    return c


def sft() -> ml_collections.ConfigDict:
    return _posttrain("sft", dict(steps=150, lr=1e-3, lr_min=1e-4), [("steps", 3), ("eval_samples", 1)])


def cap() -> ml_collections.ConfigDict:
    return _posttrain("cap", dict(steps=100, lr=3e-4, lr_min=3e-5, cap_weight=2.0), [("steps", 3), ("eval_samples", 1)])


def dpo() -> ml_collections.ConfigDict:
    """Starts at the last learning rate logged by the `init_from` run (its SFT or CAP stage)."""
    return _posttrain("dpo", dict(steps=100, lr=1e-4, beta=0.1), [("steps", 3)])


def get_config(stage: str = "wsd") -> ml_collections.ConfigDict:
    return select("tiny", stage, dict(wsd=wsd, sft=sft, cap=cap, dpo=dpo))
