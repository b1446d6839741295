"""Shared defaults of every experiment; each preset in this package starts from `base_config()`.

Sections: mesh, model (source + arch + runtime), tokenizer, data, train, optimizer, and one
section per stage (`ar_pretrain`, `wsd`, `merge`, `eval`). `config.stages` chains stage names.
`smoke_overrides` are (dotted field, value) pairs applied when `--config.smoke=True`;
`--config.dry_run=True` plans the run abstractly instead of training.
"""
from __future__ import annotations

from typing import Callable

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.smoke = False
    c.dry_run = False
    c.dry_run_devices = 0  # devices to plan for in a dry run (0 = the visible ones)
    c.distributed = False  # call jax.distributed.initialize() (one process per host)
    c.stages = "wsd,merge,eval"
    c.smoke_overrides = ()

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

    c.model = ml_collections.ConfigDict()
    c.model.source = "init"  # init | hf:<dir> | gguf:<path>|gguf:smollm2 | workdir:<dir>
    c.model.arch = ml_collections.ConfigDict(dict(  # ModelConfig fields, used by source=init
        model_type="llama", vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    c.model.runtime = ml_collections.ConfigDict(dict(  # applied to every source
        param_dtype="float32", dtype="float32", remat_policy="none", attention_impl="xla"))

    c.tokenizer = ml_collections.ConfigDict(dict(
        kind="sentencepiece",  # sentencepiece (trained on the train split) | smollm2 | dir (tokenizer.path:
        # a saved tokenizer or an HF checkpoint dir) | hf (model.source=hf:DIR's own tokenizer files)
        vocab_size=4096, train_max_bytes=4_000_000, path=""))

    c.data = ml_collections.ConfigDict(dict(
        corpora="stdlib",  # comma-separated corpus names or paths (see data.corpora), or "gym", or
        # stream specs arrayrecord:<glob> | parquet:<glob> | jsonl:<glob> (see data.streaming)
        seq_len=256, heldout_fraction=0.01, max_bytes=0, align_to_block=0,
        text_field="text",  # the JSONL key / Parquet column of each document (jsonl: and parquet: corpora)
        shards=0))  # training data shards (0: one per process); a resumed stage keeps its checkpoint's
    # reasoning-gym task items (data.gym_tasks): the corpus "gym" and the post-training data "gym"
    c.gym = ml_collections.ConfigDict(dict(
        tasks="word_sequence_reversal,rotate_matrix", seed=0, train_items=2000, heldout_items=64))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, grad_accum=1, log_every=10, eval_every=0, eval_batches=4, eval_batch_size=8,
        checkpoint_every=100, keep_checkpoints=3, max_nonfinite_streak=10,
        frozen_layers=0,  # >0: train only the layers above the bottom N (no backward pass through them)
        stop_after_steps=0))  # >0: save and exit 0 after this many steps (time-limited job slots)

    c.optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))

    c.ar_pretrain = ml_collections.ConfigDict(dict(steps=100, lr=1e-3, warmup_steps=10, lr_schedule="cosine"))

    c.wsd = ml_collections.ConfigDict(dict(
        warmup_sizes=(1, 4, 32, 64), decay_min=32, steps_per_warmup=10, stable_steps=50, steps_per_decay=10,
        lr=3e-4, warmup_steps=10, lr_schedule="constant", t_min=1e-3, t_max=1.0, weighting="elbo",
        noise_scale=1.0, noise_steps=20, expert_bias_rate=1e-3, eval_samples=1,
        stratified_t=True))  # one shared uniform spread over the batch (BD3-LM): lower-variance loss

    c.merge = ml_collections.ConfigDict(dict(top_k=3, source_stage="wsd"))

    c.eval = ml_collections.ConfigDict(dict(block_size=32, num_samples=3, prompt_length=32, gen_length=64,
                                            threshold=0.9))

    # the `compare` stage: every trained stage of the run decoded on held-out `gym` items
    c.compare = ml_collections.ConfigDict(dict(count=200, seed=0, thresholds=(0.5, 0.7, 0.8, 0.9, 0.95),
                                               gen_length=64, batch_size=8, speed_items=8,
                                               presets=()))  # token-editing presets: quality, speed
    return c


def select(size: str, stage: str, builders: dict[str, Callable[[], ml_collections.ConfigDict]]):
    """`builders[stage]()`; an unknown stage names the valid ones (`--config=experiments/<size>.py:<stage>`)."""
    if stage not in builders:
        raise ValueError(f"experiments/{size}.py has no stage {stage!r}; expected one of {', '.join(builders)}")
    return builders[stage]()
