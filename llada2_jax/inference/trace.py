"""Block threshold decoding of one prompt, step by step on the host, recording what each step unmasks.

API
  trace_decode(model, prompt, *, gen_length, block_size=32, threshold=0.95, steps=None,
               mask_id=None, eos_id) -> DecodeTrace

Why: `generate` runs its steps inside one jitted loop and returns only the final tokens; to show
(or test) the order in which positions are committed, this walks the same greedy rule of spec
§9.1 one forward at a time, as `generate(..., use_cache=False)` does (the block-causal prefix up
to the current block), so its tokens and forward count equal `generate`'s. It is for looking, not
for speed: one host round trip per step, no KV cache, and M2T only (no token editing, `edit_threshold`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada2_jax.core.masks import MaskSpec
from llada2_jax.inference import sampling
from llada2_jax.inference.result import check_prompts, check_token_id, cut_after_eos


@dataclasses.dataclass(frozen=True)
class TraceStep:
    """One forward: the block it denoised, the absolute positions it committed and their tokens."""
    block: int
    positions: list[int]
    tokens: list[int]


@dataclasses.dataclass(frozen=True)
class DecodeTrace:
    """prompt_len; tokens: generated ids cut after the first EOS (as `GenerationResult.tokens[0]`);
    steps: one `TraceStep` per forward, in order; canvas: the final ids from position 0."""
    prompt_len: int
    tokens: list[int]
    steps: list[TraceStep]
    canvas: list[int]

    @property
    def forwards(self) -> int:
        return len(self.steps)

    def commit_step(self) -> np.ndarray:
        """int (len(canvas),): the step index that committed each position, -1 for prompt positions."""
        order = np.full(len(self.canvas), -1, np.int32)
        for i, step in enumerate(self.steps):
            order[step.positions] = i
        return order


@functools.partial(nnx.jit, static_argnames=("block_size",))
def _block_logits(model, window, block_start, *, block_size: int):
    """fp32 logits (1, L_B, V) of one block under the block-causal mask over the prefix `window` (1, W)."""
    width = window.shape[1]
    positions = jnp.arange(width, dtype=jnp.int32)[None]
    spec = MaskSpec.block_causal(jnp.ones((1, width), jnp.int32), block_size)
    hidden = model.forward(window, positions, spec, compute_logits=False).hidden
    rows = jnp.arange(block_size, dtype=jnp.int32) + block_start
    return model.logits_from_hidden(hidden[:, rows]).astype(jnp.float32)


def trace_decode(model, prompt, *, gen_length: int, block_size: int = 32, threshold: float = 0.95,
                 steps: int | None = None, mask_id: int | None = None, eos_id: int | None) -> DecodeTrace:
    """Greedy block threshold decoding of `prompt` (a list of ids), one recorded step per forward.

    Arguments mean what they mean for `inference.generate` (greedy, temperature 0).
    """
    prompt = check_prompts([prompt], model.config.vocab_size, allow_empty=True)[0]
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    if mask_id is None:
        raise ValueError("no mask_id given and model.config.mask_token_id is None")
    check_token_id("mask_id", mask_id, model.config.vocab_size)
    if eos_id is not None:
        check_token_id("eos_id", eos_id, model.config.vocab_size)
    if not isinstance(gen_length, (int, np.integer)) or gen_length < 1:
        raise ValueError(f"gen_length={gen_length!r} must be a positive integer")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    p = prompt.size
    if p + gen_length > model.config.max_position_embeddings:
        raise ValueError(f"prompt length {p} + gen_length={gen_length} exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    n_blocks = -(-(p + gen_length) // block_size)
    x = np.full(n_blocks * block_size, mask_id, np.int32)
    x[:p] = prompt
    quota = np.ones(block_size, np.int32)
    schedule = sampling.quota_schedule(block_size, min(steps or block_size, gen_length, block_size))
    quota[:schedule.size] = schedule
    gen_end = p + gen_length
    record: list[TraceStep] = []
    for block in range(p // block_size, n_blocks):
        idx = np.arange(block * block_size, (block + 1) * block_size)
        step = 0
        while True:
            need = (x[idx] == mask_id) & (idx >= p)
            if not need.any():
                break
            window = jnp.asarray(x[None, :(block + 1) * block_size])
            logits = _block_logits(model, window, block * block_size, block_size=block_size)
            cand, conf = sampling.propose(logits, None, temperature=1.0, greedy=True, exclude_id=mask_id)
            conf = jnp.where(jnp.asarray(need)[None], conf, -jnp.inf)
            take = np.asarray(sampling.accept(conf, jnp.asarray(need)[None],
                                              jnp.asarray([quota[min(step, block_size - 1)]]), threshold))[0]
            cand = np.asarray(cand)[0]
            x[idx[take]] = cand[take]
            record.append(TraceStep(block, idx[take].tolist(), cand[take].tolist()))
            step += 1
        generated = x[p:min(gen_end, (block + 1) * block_size)]
        if eos_id is not None and (generated == eos_id).any():
            break
    tokens, _ = cut_after_eos(x[p:gen_end], eos_id)
    return DecodeTrace(p, tokens, record, x.tolist())
