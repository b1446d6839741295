"""Block-wise threshold decoding (spec §9.1) with an exact prefix KV cache (spec §9.2).

Layout: every prompt is left-aligned at position 0 of its own canvas row (B, T); row b decodes its
own block index, so rows of different prompt lengths run side by side and each row computes
exactly what it would compute alone. One loop iteration = one model forward for the whole batch;
per row it is either a denoising step on the row's current block, a cache refresh of the block
just completed (cached path only), or nothing (the row is done).

Both paths run in windows: a jitted `lax.while_loop` runs while every unfinished row's current
block ends inside the window, then the host picks the next window and re-enters (one compilation
per window length, reused by later calls).

Cached path: the prompt's full blocks are prefilled once (length bucketed, see `result.bucket`);
each step feeds only the L_B tokens of each row's current block at their absolute positions,
writes their K/V into the cache slots of that block and attends to slots < block end. The cache
holds only the window (a bucket of blocks, at most the canvas) and grows between windows,
so attention covers the live prefix rather than the whole canvas. A completed block's cache
still holds the K/V of its masked inputs, so it is refreshed with its final tokens: by default
inside the next block's first forward (`fuse_refresh`: that forward feeds 2 L_B tokens per row,
every other forward L_B; spec §9.2's "could be fused"), else by one extra forward of its own. Junk that the prefill or a
finished row writes into later slots is always overwritten before any query can see it, because
a block's queries only see slots up to their own block's end and every forward writes all slots
of the block it feeds (writes past the window are dropped; only finished rows make them).

Both paths run the output head only on the block rows that are still masked (`_propose_masked`).

Uncached path: every step runs the model on the canvas prefix x[:, :W] with the block-causal mask,
W = (max current block of the unfinished rows + 1) · L_B — the exact prefix of a single-prompt
run, so its window changes once per block.

Token editing (LLaDA2.1, spec §9.9; `edit_threshold` not None): the same forward that drives M2T
(mask-to-token, the rule above) also proposes a token at every committed, non-prompt position of
the current block, and T2T replaces it when the proposal differs with confidence > edit_threshold.
A step whose input block has no mask left is a "post step"; the block ends after a post step that
edits nothing, or after `max_post_steps` post steps (0: as soon as its last mask is filled).
Earlier blocks are never edited, so the prefix cache stays exact. With `edit_threshold=None` the
step is today's M2T-only step, unchanged.
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

from llada2_jax.core.masks import MaskSpec
from llada2_jax.inference import sampling
from llada2_jax.inference.result import (GenerationResult, bucket, check_prompts, check_sampling,
                                         check_token_id, cut_after_eos)
from llada2_jax.model.cache import KVCache


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one decode call (part of the jit cache key)."""
    block_size: int
    prefill_len: int  # cached path: prompt slots prefilled (0 = no full prompt block in any row)
    window: int  # cache length (cached) or model input length (uncached) of one window
    cached: bool
    fuse_refresh: bool  # cached path: refresh a completed block inside the next block's first forward
    greedy: bool
    top_k: int | None
    use_top_p: bool
    editing: bool = False  # T2T edits and post steps (edit_threshold is not None)


class _Rows(NamedTuple):
    prompt_len: jax.Array  # (B,)
    last_block: jax.Array  # (B,) index of the row's last canvas block
    gen_end: jax.Array  # (B,) prompt_len + gen_length


class _Knobs(NamedTuple):
    quota: jax.Array  # (block_size,) tokens to commit per step; entries past `steps` are never reached
    threshold: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    mask_id: jax.Array
    eos_id: jax.Array
    key: jax.Array  # (B,) base keys, see sampling.batch_keys
    edit_threshold: jax.Array | None = None  # T2T: replace a committed token whose proposal is this confident
    max_post_steps: jax.Array | None = None  # T2T: forwards a mask-free block may still spend on edits


class _Loop(NamedTuple):
    x: jax.Array  # (B, T) canvas
    block: jax.Array  # (B,) current block per row
    step: jax.Array  # (B,) denoising step within the current block
    refresh: jax.Array  # (B,) bool: the completed block's cache is stale (the next forward refreshes it)
    done: jax.Array  # (B,) bool
    forwards: jax.Array  # () model calls for the batch
    row_forwards: jax.Array  # (B,) model calls while the row was unfinished
    cache: KVCache | None
    post: jax.Array  # (B,) post steps (forwards on the mask-free current block) run so far
    edits: jax.Array  # (B,) T2T replacements inside the row's generated span


def slot_mask(positions, num_slots: int, block_size: int) -> MaskSpec:
    """Queries at `positions` (B, T) see cache slots of blocks <= their own (block_size 1 = causal)."""
    slots = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (positions.shape[0], num_slots))
    q_block, k_block = positions // block_size, slots // block_size
    return MaskSpec(jnp.zeros_like(q_block), q_block, jnp.ones_like(q_block),
                    jnp.zeros_like(k_block), k_block, jnp.ones_like(k_block), "block_causal")


def _block_hidden(model, loop: _Loop, idx, tokens, plan: _Plan):
    """Final hidden states (B, L_B, d) of each row's current block, and the updated cache.

    Fused refresh: when some row's previous block is stale, every row feeds its previous block's
    final tokens in front of its current block (2 L_B tokens): the previous block's K/V are
    rewritten exactly as a separate refresh forward would (its queries see blocks <= its own),
    and the current block attends to them. Rows whose previous block is already exact rewrite the
    same values; a row at block 0 feeds its block twice (same slots, same values).
    """
    if plan.cached:
        def forward(positions, tokens):
            return model.forward(tokens, positions, slot_mask(positions, plan.window, plan.block_size),
                                 cache=loop.cache, compute_logits=False)

        def plain():
            out = forward(idx, tokens)
            return out.hidden, out.cache

        def fused():
            prev = jnp.where(idx >= plan.block_size, idx - plan.block_size, idx)
            out = forward(jnp.concatenate([prev, idx], axis=1),
                          jnp.concatenate([jnp.take_along_axis(loop.x, prev, axis=1), tokens], axis=1))
            return out.hidden[:, plan.block_size:], out.cache

        if not plan.fuse_refresh:
            return plain()
        return jax.lax.cond(jnp.any(loop.refresh & ~loop.done), fused, plain)
    b, w = loop.x.shape[0], plan.window
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    spec = MaskSpec.block_causal(jnp.ones((b, w), jnp.int32), plan.block_size)
    hidden = model.forward(loop.x[:, :w], positions, spec, compute_logits=False).hidden
    return jnp.take_along_axis(hidden, jnp.minimum(idx, w - 1)[..., None], axis=1), None  # finished rows may lie beyond w


def head_sizes(block_size: int) -> tuple[int, ...]:
    """Row counts the output head is compiled for; a step uses the smallest that holds its masked rows."""
    return tuple(sorted({0, block_size} | {-(-block_size * eighths // 8) for eighths in (1, 2, 4, 6)}))


def _propose_masked(model, hidden, need, knobs: _Knobs, plan: _Plan, key_of):
    """Candidates and confidences (B, L_B) at the positions in `need` (-inf elsewhere).

    Why: a committed position needs no logits, and the output head (d x V) is a large part of a
    block step (tiny_wsd: ~40 % of its matmul work; LLaDA2's vocabulary is 157k). The rows still
    needed are moved to the front and the head runs on the smallest size of `head_sizes` that
    holds the most any row needs (`lax.switch`, so shapes stay static); a refresh forward needs none.
    `key_of(order)` gives the PRNG keys (B, n) of the block positions `order` (B, n).
    """
    size = need.shape[1]
    order = jnp.argsort(~need, axis=1, stable=True)  # needed positions first, in position order
    back = jnp.argsort(order, axis=1)  # inverse permutation
    rows = jnp.take_along_axis(hidden, order[..., None], axis=1)
    sizes = head_sizes(size)

    def head(n):
        def run(rows, order):
            cand, conf = jnp.zeros(need.shape, jnp.int32), jnp.full(need.shape, -jnp.inf, jnp.float32)
            if n == 0:
                return cand, conf
            c, p = sampling.propose(model.logits_from_hidden(rows[:, :n]), key_of(order[:, :n]),
                                    temperature=knobs.temperature, greedy=plan.greedy, top_k=plan.top_k,
                                    top_p=knobs.top_p if plan.use_top_p else None, exclude_id=knobs.mask_id)
            return cand.at[:, :n].set(c), conf.at[:, :n].set(p)
        return run

    branch = jnp.searchsorted(jnp.asarray(sizes), jnp.max(jnp.sum(need, axis=1)))
    cand, conf = jax.lax.switch(branch, [head(n) for n in sizes], rows, order)
    return jnp.take_along_axis(cand, back, axis=1), jnp.where(need, jnp.take_along_axis(conf, back, axis=1), -jnp.inf)


def _step(model, loop: _Loop, rows: _Rows, knobs: _Knobs, plan: _Plan) -> _Loop:
    """One forward for the batch, then commit accepted tokens and move rows between phases."""
    size = plan.block_size
    batch, length = loop.x.shape
    idx = loop.block[:, None] * size + jnp.arange(size, dtype=jnp.int32)  # (B, L_B) absolute positions
    tokens = jnp.take_along_axis(loop.x, idx, axis=1)
    hidden, cache = _block_hidden(model, loop, idx, tokens, plan)

    active = ~loop.done
    decoding = active & ~loop.refresh if not plan.fuse_refresh else active
    generated_pos = idx >= rows.prompt_len[:, None]
    undecided = (tokens == knobs.mask_id) & generated_pos
    need = undecided & decoding[:, None]
    # T2T needs a proposal at the committed positions too
    proposed = generated_pos & decoding[:, None] if plan.editing else need
    # keys from (row, block, step, position): the cached and uncached paths draw the same numbers;
    # with editing a block may take up to size + max_post_steps steps, so its counters are spaced further
    steps_per_block = size + knobs.max_post_steps if plan.editing else size
    key_of = functools.partial(sampling.position_keys, knobs.key, loop.block * steps_per_block + loop.step)
    cand, conf = _propose_masked(model, hidden, proposed, knobs, plan, key_of)
    quota = knobs.quota[jnp.minimum(loop.step, size - 1)]
    take = sampling.accept(conf, need, quota, knobs.threshold)
    complete = decoding & ~jnp.any(undecided & ~take, axis=-1)
    post, edits = loop.post, loop.edits
    if plan.editing:
        edit = proposed & ~undecided & (cand != tokens) & (conf > knobs.edit_threshold)
        take = take | edit
        post_step = decoding & ~jnp.any(undecided, axis=-1)
        post = post + post_step
        complete = complete & ((post >= knobs.max_post_steps) | (post_step & ~jnp.any(edit, axis=-1)))
        edits = edits + jnp.sum(edit & (idx < rows.gen_end[:, None]), axis=-1, dtype=jnp.int32)
    x = loop.x.at[jnp.arange(batch)[:, None], idx].set(jnp.where(take, cand, tokens))

    col = jnp.arange(length, dtype=jnp.int32)
    seen_end = jnp.minimum(rows.gen_end, (loop.block + 1) * size)
    generated = (col >= rows.prompt_len[:, None]) & (col < seen_end[:, None])
    eos = jnp.any((x == knobs.eos_id) & generated, axis=-1)
    finish = complete & (eos | (loop.block == rows.last_block))
    if plan.cached and not plan.fuse_refresh:
        advance, refresh = active & loop.refresh, complete & ~finish
    else:  # uncached: nothing to refresh; fused: the next forward refreshes (every stale row at once)
        advance = complete & ~finish
        refresh = advance if plan.cached else loop.refresh
    return _Loop(x, loop.block + advance, jnp.where(advance, 0, loop.step + decoding), refresh,
                 loop.done | finish, loop.forwards + 1, loop.row_forwards + active, cache,
                 jnp.where(advance, 0, post), edits)


def _initial_loop(x, rows: _Rows, block_size: int, cache, forwards, row_forwards) -> _Loop:
    batch = x.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    false = jnp.zeros((batch,), bool)
    return _Loop(x, rows.prompt_len // block_size, zeros, false, false, forwards, row_forwards, cache, zeros, zeros)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _prefill(graphdef, state, x, rows: _Rows, plan: _Plan) -> _Loop:
    """The first window's cache, with the prompt's full blocks written into it."""
    model = nnx.merge(graphdef, state)
    batch = x.shape[0]
    cache = KVCache.create(model.config, batch, plan.window)
    forwards, row_forwards = jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32)
    if plan.prefill_len:
        positions = jnp.broadcast_to(jnp.arange(plan.prefill_len, dtype=jnp.int32), (batch, plan.prefill_len))
        cache = model.forward(x[:, :plan.prefill_len], positions, slot_mask(positions, plan.window, plan.block_size),
                              cache=cache, compute_logits=False).cache
        forwards = forwards + 1
        row_forwards = (rows.prompt_len >= plan.block_size).astype(jnp.int32)  # rows that own a full block
    return _initial_loop(x, rows, plan.block_size, cache, forwards, row_forwards)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _decode_window(graphdef, state, loop: _Loop, rows: _Rows, knobs: _Knobs, plan: _Plan) -> _Loop:
    """Steps while every unfinished row's current block lies inside the window."""
    model = nnx.merge(graphdef, state)
    if plan.cached:
        loop = loop._replace(cache=loop.cache.grow(plan.window))

    def inside(lp):
        return ~jnp.all(lp.done) & jnp.all(lp.done | ((lp.block + 1) * plan.block_size <= plan.window))

    return jax.lax.while_loop(inside, lambda lp: _step(model, lp, rows, knobs, plan), loop)


def _window(plan: _Plan, blocks_needed: int, canvas_blocks: int) -> int:
    """Window length: the exact prefix when uncached; a bucket of blocks (see `bucket`) for the cache."""
    if not plan.cached:
        return blocks_needed * plan.block_size
    return plan.block_size * min(bucket(blocks_needed), canvas_blocks)


def _decode(graphdef, state, x, rows: _Rows, knobs: _Knobs, plan: _Plan, first_blocks: int):
    """Host loop over windows; returns (canvas, forwards, row_forwards, row_edits).

    first_blocks: blocks the first window must hold (the longest prompt's first decoded block + 1).
    """
    batch, length = x.shape
    canvas_blocks = length // plan.block_size
    if plan.cached:
        loop = _prefill(graphdef, state, x, rows,
                        dataclasses.replace(plan, window=_window(plan, first_blocks, canvas_blocks)))
    else:
        loop = _initial_loop(jnp.asarray(x), rows, plan.block_size, None, jnp.zeros((), jnp.int32),
                             jnp.zeros((batch,), jnp.int32))
    while True:
        done, block = jax.device_get((loop.done, loop.block))
        if done.all():
            return loop.x, loop.forwards, loop.row_forwards, loop.edits
        window = _window(plan, int(block[~done].max()) + 1, canvas_blocks)
        loop = _decode_window(graphdef, state, loop, rows, knobs, dataclasses.replace(plan, window=window))


# LLaDA2.1 model-card modes (spec §9.9): M2T threshold and T2T edit threshold
PRESETS = {"quality": dict(threshold=0.7, edit_threshold=0.5), "speed": dict(threshold=0.5, edit_threshold=0.0)}


def preset_settings(name: str) -> dict:
    """`threshold` and `edit_threshold` of a named decoding mode ('quality' | 'speed')."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}; expected one of {tuple(PRESETS)}")
    return dict(PRESETS[name])


def _check_editing(edit_threshold, max_post_steps) -> None:
    if edit_threshold is not None and not 0.0 <= edit_threshold <= 1.0:
        raise ValueError(f"edit_threshold={edit_threshold} must be in [0, 1] (or None for no token editing)")
    if not isinstance(max_post_steps, (int, np.integer)) or max_post_steps < 0:
        raise ValueError(f"max_post_steps={max_post_steps!r} must be an integer >= 0")


def _check_args(config, longest_prompt, gen_length, block_size, threshold, steps, mask_id, eos_id) -> None:
    if not isinstance(gen_length, (int, np.integer)) or gen_length <= 0:
        raise ValueError(f"gen_length={gen_length!r} must be a positive integer")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in [0, 1]")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} must be >= 1 (or None for one token per step)")
    if mask_id is None:
        raise ValueError("no mask_id given and model.config.mask_token_id is None: this model has no [MASK] "
                         "token (convert an AR checkpoint with llada2_jax.interop.convert.add_mask_token)")
    check_token_id("mask_id", mask_id, config.vocab_size)
    if eos_id is not None:
        check_token_id("eos_id", eos_id, config.vocab_size)
    if longest_prompt + gen_length > config.max_position_embeddings:
        raise ValueError(f"prompt length {longest_prompt} + gen_length={gen_length} = {longest_prompt + gen_length} "
                         f"exceeds max_position_embeddings={config.max_position_embeddings}")


def generate(model, prompts, *, gen_length: int, block_size: int = 32, threshold: float = 0.95,
             steps: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, mask_id: int | None = None, eos_id: int | None, use_cache: bool = True,
             fuse_refresh: bool = True, rng=None, edit_threshold: float | None = None, max_post_steps: int = 16,
             preset: str | None = None) -> GenerationResult:
    """Block-wise threshold decoding of a batch of prompts (lists of token ids).

    Per block and step: commit every masked position whose confidence exceeds `threshold`, else
    the quota[step] most confident ones (quota: block_size split over `steps`, default one per
    step; steps is clamped to min(steps, gen_length, block_size) as in HF). `[MASK]` is never
    proposed. A row stops after the block in which it produced EOS, or after gen_length tokens
    (eos_id=None: no EOS stop). mask_id defaults to model.config.mask_token_id. With
    temperature > 0 a draw depends on (row key, block, step, position), so use_cache changes no
    token. rng is one key or one key per prompt (`sampling.batch_keys`); either way each row equals
    running its prompt alone with the same key, and repeated prompts in one batch sample
    differently. Greedy rows always equal single-prompt runs. `fuse_refresh` (cached path) folds
    each completed block's cache refresh into the next block's first forward instead of spending
    a forward on it; the tokens are the same either way.

    Token editing (LLaDA2.1): with `edit_threshold` set, each step also replaces every committed,
    non-prompt token of the current block whose proposal differs with confidence > edit_threshold
    (T2T), and a mask-free block keeps stepping while it edits, at most `max_post_steps` times
    (see the module docstring). `preset` ('quality' | 'speed', `PRESETS`) sets threshold and
    edit_threshold, replacing the values passed. `edit_threshold=None` is the M2T-only decoder.
    """
    if preset is not None:
        settings = preset_settings(preset)
        threshold, edit_threshold = settings["threshold"], settings["edit_threshold"]
    arrays = check_prompts(prompts, model.config.vocab_size, allow_empty=True)
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    prompt_len = np.array([a.size for a in arrays], np.int32)
    _check_args(model.config, int(prompt_len.max()), gen_length, block_size, threshold, steps, mask_id, eos_id)
    _check_editing(edit_threshold, max_post_steps)
    check_sampling(temperature, top_k, top_p)

    num_blocks = -(-(prompt_len + gen_length) // block_size)
    length = block_size * bucket(int(num_blocks.max()))
    full_blocks = int((prompt_len // block_size).max())
    x = np.full((len(arrays), length), mask_id, np.int32)
    for i, a in enumerate(arrays):
        x[i, :a.size] = a
    quota = np.ones((block_size,), np.int32)
    # HF: steps = min(steps, gen_length); more steps than block_size would only add empty steps
    schedule = sampling.quota_schedule(block_size, min(steps or block_size, gen_length, block_size))
    quota[:schedule.size] = schedule
    plan = _Plan(block_size=block_size,
                 prefill_len=block_size * bucket(full_blocks) if use_cache and full_blocks else 0,
                 window=0, cached=use_cache, fuse_refresh=use_cache and fuse_refresh, greedy=temperature == 0,
                 top_k=top_k, use_top_p=top_p is not None, editing=edit_threshold is not None)
    rows = _Rows(jnp.asarray(prompt_len), jnp.asarray(num_blocks - 1, jnp.int32),
                 jnp.asarray(prompt_len + gen_length, jnp.int32))
    knobs = _Knobs(jnp.asarray(quota), jnp.float32(threshold), jnp.float32(max(temperature, 1e-6)),
                   jnp.float32(top_p or 1.0), jnp.int32(mask_id), jnp.int32(-1 if eos_id is None else eos_id),
                   sampling.batch_keys(rng, arrays), jnp.float32(edit_threshold or 0.0), jnp.int32(max_post_steps))
    graphdef, state = nnx.split(model)

    start = time.perf_counter()
    canvas, forwards, row_forwards, row_edits = jax.device_get(
        _decode(graphdef, state, x, rows, knobs, plan, full_blocks + 1))
    wall = time.perf_counter() - start

    tokens, counts = [], []
    for i, p in enumerate(prompt_len):
        ids, n = cut_after_eos(canvas[i, p:p + gen_length], eos_id)
        tokens.append(ids)
        counts.append(n)
    return GenerationResult(tokens, int(forwards), [int(r) for r in row_forwards], sum(counts), wall,
                            row_generated=counts, row_edits=[int(e) for e in row_edits])
