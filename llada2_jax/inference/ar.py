"""Autoregressive baseline decoder with a causal KV cache, for comparing an AR checkpoint with its
converted dLLM on the same prompts.

Prompts are left-aligned at position 0 of their row (as in the block decoder); the prompt is
prefilled once (length bucketed, see `result.bucket`), then each forward feeds one token per row at
that row's own next position. Slots past a row's prompt that the prefill filled with padding are
overwritten by the row's own tokens before any query can see them (a query at position p sees
slots <= p, and slot p is written by the same forward).

As in the block decoder, the cache holds only a window of slots (a bucket, at least
`MIN_WINDOW`) and grows between windows, so each step attends over the live prefix rather than the
whole prompt + max_new_tokens: a jitted `lax.while_loop` runs while every unfinished row's next
position lies inside the window, then the host picks the next window.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada2_jax.inference import sampling
from llada2_jax.inference.decode import slot_mask
from llada2_jax.inference.result import (GenerationResult, bucket, check_prompts, check_sampling,
                                         check_token_id, cut_after_eos)
from llada2_jax.model.cache import KVCache


MIN_WINDOW = 16  # smallest cache window (slots): fewer compilations for short generations


@dataclasses.dataclass(frozen=True)
class _Plan:
    prefill_len: int
    max_new_tokens: int
    greedy: bool
    top_k: int | None
    use_top_p: bool
    window: int = 0  # cache slots of the current window (set per window by `_decode`)


class _Knobs(NamedTuple):
    temperature: jax.Array
    top_p: jax.Array
    eos_id: jax.Array  # -1 = no early stop
    key: jax.Array  # (B,) base keys, see sampling.batch_keys


class _Loop(NamedTuple):
    out: jax.Array  # (B, N) generated ids
    count: jax.Array  # (B,) ids generated so far
    done: jax.Array  # (B,) bool
    forwards: jax.Array  # ()
    row_forwards: jax.Array  # (B,)
    cache: KVCache


def _next_tokens(logits, loop_count, knobs: _Knobs, plan: _Plan):
    keys = sampling.row_keys(knobs.key, loop_count)
    tokens, _ = sampling.propose(logits, keys[:, None], temperature=knobs.temperature, greedy=plan.greedy, top_k=plan.top_k,
                                 top_p=knobs.top_p if plan.use_top_p else None)
    return tokens[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _prefill(graphdef, state, x, prompt_len, knobs: _Knobs, plan: _Plan) -> _Loop:
    """The prompt's cache (the first window) and the first generated token of every row."""
    model = nnx.merge(graphdef, state)
    batch = x.shape[0]
    positions = jnp.broadcast_to(jnp.arange(plan.prefill_len, dtype=jnp.int32), (batch, plan.prefill_len))
    prefill = model.forward(x[:, :plan.prefill_len], positions, slot_mask(positions, plan.window, 1),
                            cache=KVCache.create(model.config, batch, plan.window), compute_logits=False)
    last = jnp.take_along_axis(prefill.hidden, (prompt_len - 1)[:, None, None], axis=1)
    first = _next_tokens(model.logits_from_hidden(last), jnp.zeros_like(prompt_len), knobs, plan)
    out = jnp.zeros((batch, plan.max_new_tokens), jnp.int32).at[:, 0].set(first)
    return _Loop(out, jnp.ones_like(prompt_len), (first == knobs.eos_id) | (plan.max_new_tokens == 1),
                 jnp.ones((), jnp.int32), jnp.ones_like(prompt_len), prefill.cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _decode_window(graphdef, state, loop: _Loop, prompt_len, knobs: _Knobs, plan: _Plan) -> _Loop:
    """Token steps while every unfinished row's next position lies inside the window."""
    model = nnx.merge(graphdef, state)
    rows = jnp.arange(prompt_len.shape[0])
    max_new = plan.max_new_tokens

    def step(lp: _Loop) -> _Loop:
        active = ~lp.done
        pos = (prompt_len + lp.count - 1)[:, None]
        prev = jnp.take_along_axis(lp.out, (lp.count - 1)[:, None], axis=1)
        res = model.forward(prev, pos, slot_mask(pos, plan.window, 1), cache=lp.cache)
        tok = _next_tokens(res.logits, lp.count, knobs, plan)
        out = lp.out.at[rows, jnp.where(active, lp.count, max_new)].set(tok, mode="drop")  # finished rows: no write
        count = lp.count + active
        done = lp.done | (tok == knobs.eos_id) | (count >= max_new)
        return _Loop(out, count, done, lp.forwards + 1, lp.row_forwards + active, res.cache)

    def inside(lp: _Loop):
        return ~jnp.all(lp.done) & jnp.all(lp.done | (prompt_len + lp.count - 1 < plan.window))

    loop = loop._replace(cache=loop.cache.grow(plan.window))
    return jax.lax.while_loop(inside, step, loop)


def _window(needed: int, slots: int) -> int:
    return min(max(bucket(needed), MIN_WINDOW), slots)


def _decode(graphdef, state, prompt_len: np.ndarray, x, knobs: _Knobs, plan: _Plan) -> _Loop:
    """Host loop over cache windows (never shrinking: rows the prefill finished may be the longest)."""
    slots, lengths = x.shape[1], jnp.asarray(prompt_len)
    window = _window(plan.prefill_len, slots)
    loop = _prefill(graphdef, state, x, lengths, knobs, dataclasses.replace(plan, window=window))
    while True:
        done, count = jax.device_get((loop.done, loop.count))
        if done.all():
            return loop
        next_pos = prompt_len + count - 1
        window = max(window, _window(int(next_pos[~done].max()) + 1, slots))
        loop = _decode_window(graphdef, state, loop, lengths, knobs, dataclasses.replace(plan, window=window))


def generate_ar(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, eos_id: int | None, rng=None) -> GenerationResult:
    """Greedy (temperature 0) or filtered-sampling next-token decoding of a batch of prompts.

    forwards = the prefill (which yields the first token) + one per further token; a row stops at
    EOS or after max_new_tokens. Rows equal single-prompt runs with the same rng, sampled ones too
    (`sampling.batch_keys`: one key, or one key per prompt).
    """
    config = model.config
    arrays = check_prompts(prompts, config.vocab_size, allow_empty=False)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if eos_id is not None:
        check_token_id("eos_id", eos_id, config.vocab_size)
    check_sampling(temperature, top_k, top_p)
    prompt_len = np.array([a.size for a in arrays], np.int32)
    longest = int(prompt_len.max()) + max_new_tokens
    if longest > config.max_position_embeddings:
        raise ValueError(f"prompt length {int(prompt_len.max())} + max_new_tokens={max_new_tokens} = {longest} "
                         f"exceeds max_position_embeddings={config.max_position_embeddings}")

    x = np.zeros((len(arrays), bucket(longest)), np.int32)
    for i, a in enumerate(arrays):
        x[i, :a.size] = a
    plan = _Plan(prefill_len=bucket(int(prompt_len.max())), max_new_tokens=max_new_tokens,
                 greedy=temperature == 0, top_k=top_k, use_top_p=top_p is not None)
    knobs = _Knobs(jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p or 1.0),
                   jnp.int32(-1 if eos_id is None else eos_id), sampling.batch_keys(rng, arrays))
    graphdef, state = nnx.split(model)

    start = time.perf_counter()
    loop = _decode(graphdef, state, prompt_len, x, knobs, plan)
    ids, count, forwards, row_forwards = jax.device_get((loop.out, loop.count, loop.forwards, loop.row_forwards))
    wall = time.perf_counter() - start

    tokens, counted = [], 0
    for i in range(len(arrays)):
        row, n = cut_after_eos(ids[i, :count[i]], eos_id)
        tokens.append(row)
        counted += n
    return GenerationResult(tokens, int(forwards), [int(r) for r in row_forwards], counted, wall)
