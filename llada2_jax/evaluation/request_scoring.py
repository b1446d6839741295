"""Score (context, continuation) token pairs with the Monte-Carlo ELBO, the same whatever the batching.

API
  request_key(seed, context, continuation)               -> PRNG key of one request
  request_row(context, continuation, *, block_size, max_length) -> (tokens, segment_ids, eligible) (L,)
  score_requests(model, pairs, *, block_size, n_samples, seed, mask_id, batch_size) -> [(elbo, is_greedy)]
  rolling_windows(n_tokens, max_length, context_length)  -> [(context_start, start, end)]

Why a module of its own: an evaluation harness hands over requests in an order and batching of its
choosing, and a reported number must not depend on either. So every request is defined as ONE row:
its tokens, padded with segment-0 padding to a multiple of `block_size` (the layout needs it),
scored by `likelihood.mc_elbo_loglik` with its own key `request_key(seed, ...)`. `score_requests`
batches rows of the same padded length and draws each row's t and mask exactly as that one-row
call does, so its numbers equal the one-row calls up to float rounding.

`is_greedy` is the block analogue of an AR model's greedy check: one forward with every
continuation token masked (the clean earlier blocks visible, as in the ELBO layout), and the
continuation is greedy when the argmax (never `[MASK]`) equals it at every position.
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada2_jax.diffusion import layout, losses, noising

T_MIN = 1e-3  # `likelihood.mc_elbo_loglik`'s default lower end of t


def request_key(seed: int, context: Sequence[int], continuation: Sequence[int]) -> jax.Array:
    """fold_in(PRNGKey(seed), crc32 of the ids): a request's noise depends on its tokens only."""
    data = np.asarray([*context, -1, *continuation], np.int64).tobytes()
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(data) & 0x7FFFFFFF)


def request_row(context: Sequence[int], continuation: Sequence[int], *, block_size: int,
                max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One request as (tokens, segment_ids, eligible), int32/int32/bool of a length that is a multiple of block_size.

    The continuation is scored (eligible); the context conditions it. When the pair is longer than
    `max_length` (rounded down to whole blocks) the context loses its oldest tokens, then the
    continuation does. Padding has segment 0, so no real token attends to it.
    """
    if not continuation:
        raise ValueError("the continuation is empty: there is nothing to score")
    limit = max_length // block_size * block_size
    if limit < 1:
        raise ValueError(f"block_size={block_size} exceeds the model's max length {max_length}")
    ids = [*context, *continuation][-limit:]
    n_cont = min(len(continuation), len(ids))
    length = -(-len(ids) // block_size) * block_size
    tokens = np.zeros(length, np.int32)
    tokens[:len(ids)] = ids
    segment_ids = (np.arange(length) < len(ids)).astype(np.int32)
    eligible = (np.arange(length) >= len(ids) - n_cont) & (segment_ids > 0)
    return tokens, segment_ids, eligible


@functools.partial(nnx.jit, static_argnames=("block_size", "mask_id", "vocab_size"))
def _sample_rows(model, tokens, segment_ids, eligible, keys, *, block_size, mask_id, vocab_size):
    """One ELBO sample per row; row b draws (t, mask) as a one-row `_one_sample` with keys[b] does."""
    def draw(key, row_eligible):
        k_t, k_mask = jax.random.split(key)
        t = noising.sample_t(k_t, 1, T_MIN, 1.0)
        return t[0], noising.sample_mask(k_mask, t, row_eligible[None], at_least_one=False)[0]

    t, noise_mask = jax.vmap(draw)(keys, eligible)
    batch = layout.build_diffusion_batch(tokens, segment_ids, None, eligible, noise_mask, t, mask_id=mask_id,
                                         block_size=block_size, vocab_size=vocab_size)
    return losses.sequence_elbo(model, batch)


@functools.partial(nnx.jit, static_argnames=("block_size", "mask_id", "vocab_size"))
def _greedy_rows(model, tokens, segment_ids, eligible, *, block_size, mask_id, vocab_size):
    """bool (B,): the argmax with the whole continuation masked equals it everywhere."""
    t = jnp.ones(tokens.shape[:1], jnp.float32)
    batch = layout.build_diffusion_batch(tokens, segment_ids, None, eligible, eligible, t, mask_id=mask_id,
                                         block_size=block_size, vocab_size=vocab_size)
    logits, _ = losses.query_logits(model, batch)
    best = jnp.argmax(logits.at[..., mask_id].set(-jnp.inf), axis=-1)
    return jnp.all((best == tokens) | ~eligible, axis=-1)


def score_requests(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, block_size: int,
                   n_samples: int, seed: int, mask_id: int, batch_size: int = 8,
                   max_length: int | None = None, progress=None) -> list[tuple[float, bool]]:
    """(ELBO of the continuation given the context, is_greedy) per (context ids, continuation ids) pair.

    Each number equals `likelihood.mc_elbo_loglik` on `request_row(...)` as a batch of one with
    rng=`request_key(seed, ...)` (module docstring). `max_length` defaults to the model's
    max_position_embeddings; `progress(n)` is called after each batch of n requests.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    layout.check_token_id("mask_id", mask_id, model.config.vocab_size)
    max_length = model.config.max_position_embeddings if max_length is None else max_length
    rows = [request_row(c, x, block_size=block_size, max_length=max_length) for c, x in pairs]
    keys = [request_key(seed, c, x) for c, x in pairs]
    by_length: dict[int, list[int]] = {}
    for i, (tokens, _, _) in enumerate(rows):
        by_length.setdefault(tokens.size, []).append(i)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    static = dict(block_size=block_size, mask_id=mask_id, vocab_size=model.config.vocab_size)
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape per length
            tokens, segment_ids, eligible = (jnp.asarray(np.stack([rows[i][k] for i in padded])) for k in range(3))
            sample_keys = jnp.stack([jax.random.split(keys[i], n_samples) for i in padded], axis=1)  # (n, B, 2)
            samples = jnp.stack([_sample_rows(model, tokens, segment_ids, eligible, k, **static) for k in sample_keys])
            elbo = np.asarray(jnp.mean(samples, axis=0))
            greedy = np.asarray(_greedy_rows(model, tokens, segment_ids, eligible, **static))
            for j, i in enumerate(chunk):
                out[i] = (float(elbo[j]), bool(greedy[j]))
            if progress is not None:
                progress(len(chunk))
    return out


def rolling_windows(n_tokens: int, max_length: int, context_length: int) -> list[tuple[int, int, int]]:
    """Windows (context_start, start, end) that score every token of a long text exactly once.

    The first window scores tokens [0, max_length) with no context; each later one scores the
    next max_length - context_length tokens given the context_length tokens before them.
    """
    if not 0 <= context_length < max_length:
        raise ValueError(f"context_length={context_length} must be in [0, max_length={max_length})")
    windows, start = [], 0
    while start < n_tokens:
        if start == 0:
            end = min(n_tokens, max_length)
            windows.append((0, 0, end))
        else:
            end = min(n_tokens, start + max_length - context_length)
            windows.append((start - context_length, start, end))
        start = end
    return windows
