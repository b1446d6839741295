"""Tile-skipping attention in plain XLA (runs anywhere, with its own flash-style backward).

The non-empty (query tile, key tile) pairs of the tile map are listed per batch row (row-major,
so pairs of one query tile are adjacent) and a `fori_loop` visits them one pair per step with an
online softmax per query tile -- flash attention over the pair list. Each step's working set (one
query tile, one key tile) stays in cache, which is what makes this fast on CPU; the backward
recomputes each pair's probabilities from the saved log-sum-exp. Work scales with the number of
non-empty tiles and memory with T + S (plus one bool element mask per listed pair).

Static shapes: the pair list has a static length P.
  * concrete MaskSpec features (eager call, or features closed over as constants): P is the
    exact maximum count over the batch, computed on the host;
  * traced features (inside jit): P is a budget from the rule and shapes -- the tile count of
    the canonical single-document layout with block size = tile size, plus one tile of slack per
    query tile row (block boundaries not aligned with tiles). A `lax.cond` checks the real count
    at run time and falls back to the dense-mask reference when it exceeds the budget, so results
    are always exact; only speed depends on the layout matching the budget (BDLM with L_B <= tile
    size, causal, decode). The cond sits inside the custom VJP: differentiating through it would
    keep the dense branch's (T, S) residuals alive, as zeros, even when the sparse branch runs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

from kernels_pallas import tilemap
from llada2_jax.core.masks import CLEAN, NOISY, MaskSpec, allowed
from llada2_jax.ops.reference import xla_attention

DEFAULT_BLOCK = 64  # 2-core CPU, L = 2048: 64 is as fast as 128 and skips within 1.2 points of the true sparsity


def attention(q, k, v, spec: MaskSpec, *, scale: float | None = None,
              block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK):
    """q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D) in q's dtype; fp32 softmax."""
    b, t, hq, d, s, hkv = tilemap.check_shapes(q, k, spec)
    scale = d ** -0.5 if scale is None else scale
    bq, bk = min(block_q, tilemap.round_up(t, 8)), min(block_k, tilemap.round_up(s, 8))
    feats = tilemap.pad_features(spec, bq, bk)
    classes = tilemap.classify(feats, bq, bk)
    nq, nk = classes.shape[1:]
    nonempty = (classes != tilemap.EMPTY).reshape(b, nq * nk)

    exact = _concrete_count(nonempty)
    budget = exact if exact is not None else _traced_budget(spec.rule, t, s, bq, bk)
    if budget >= nq * nk:
        return _dense(q, k, v, spec, scale)
    count = nonempty.sum(-1).max()  # pairs of the longest row
    pairs = _list_pairs(feats, nonempty, count, max(budget, 1), bq, bk)
    fits = None if exact is not None else count <= budget  # None: known to fit
    return _attend(q, k, v, spec, pairs, fits, scale)


def skipped_fraction(spec: MaskSpec, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> float:
    """Fraction of (padded) tiles the sparse path never touches (concrete features only)."""
    classes = tilemap.classify(tilemap.pad_features(spec, block_q, block_k), block_q, block_k)
    return float(np.mean(np.asarray(classes) == tilemap.EMPTY))


def _concrete_count(nonempty) -> int | None:
    try:
        return int(np.asarray(nonempty).sum(-1).max())
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


@functools.lru_cache(maxsize=None)
def _traced_budget(rule: str, t: int, s: int, bq: int, bk: int) -> int:
    """Tile-map count of the canonical single-document layout, + one tile per query-tile row.

    The canonical features are built in numpy: MaskSpec's jnp constructors fail inside
    `shard_map` under a mesh context (jnp.broadcast_to asks the manual mesh for a sharding).
    """
    nq, nk = -(-t // bq), -(-s // bk)
    if rule == "bidirectional" or t != s:
        return nq * nk
    block_size = max(bq, bk)
    position = np.arange(t, dtype=np.int32)[None]
    stream = np.zeros_like(position)
    if rule == "causal":
        block = position
    elif rule == "block_causal":
        block = position // block_size
    elif t % 2 == 0 and (t // 2) % block_size == 0:  # block_diffusion over [x_t ; x_0]
        block = position % (t // 2) // block_size
        stream = np.where(position < t // 2, NOISY, CLEAN).astype(np.int32)
    else:
        return nq * nk
    canonical = MaskSpec(stream, block, np.ones_like(position), stream, block, np.ones_like(position), rule)
    with jax.ensure_compile_time_eval():  # a constant even under jit
        classes = tilemap.classify(tilemap.pad_features(canonical, bq, bk), bq, bk)
        count = int(np.sum(np.asarray(classes) != tilemap.EMPTY))
    return min(nq * nk, count + nq)


def _dense(q, k, v, spec, scale):
    return xla_attention(q, k, v, spec.dense(), scale=scale)


class _Pairs(NamedTuple):
    """Non-empty tile pairs per batch row, query tiles ascending (so a tile's pairs are adjacent)."""
    q_tile: jax.Array  # (B, P)
    k_tile: jax.Array  # (B, P)
    allow: jax.Array  # (B, P, bq, bk) element mask; all False for the padding at the end of the list
    steps: jax.Array  # () pairs of the longest row: loops stop there


def _list_pairs(feats, nonempty, count, n_pairs, bq, bk) -> _Pairs:
    """The first n_pairs non-empty tiles per row, with their element masks.

    The masks are built here, once and vectorised: inside the loop XLA would recompute them in
    every fusion that reads the scores (that doubled the forward time).
    """
    b = nonempty.shape[0]
    nq, nk = feats.q_block.shape[1] // bq, feats.k_block.shape[1] // bk
    flat = jax.vmap(lambda row: jnp.nonzero(row, size=n_pairs, fill_value=nq * nk)[0])(nonempty)
    q_tile, k_tile = jnp.minimum(flat // nk, nq - 1), flat % nk
    f_q = [_gather(x.reshape(b, nq, bq), q_tile)[:, :, :, None] for x in (feats.q_stream, feats.q_block, feats.q_segment)]
    f_k = [_gather(x.reshape(b, nk, bk), k_tile)[:, :, None, :] for x in (feats.k_stream, feats.k_block, feats.k_segment)]
    allow = allowed(feats.rule, *f_q, *f_k) & (flat < nq * nk)[:, :, None, None]
    return _Pairs(q_tile, k_tile, allow, jnp.minimum(count, n_pairs))


def _gather(x, idx):
    """x (B, n, ...), idx (B, P) -> (B, P, ...)."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, spec, pairs, fits, scale):
    """Flash attention over the listed pairs, or the dense reference where `fits` is False."""
    return _attend_fwd(q, k, v, spec, pairs, fits, scale)[0]


def _attend_fwd(q, k, v, spec, pairs, fits, scale):
    sparse = lambda: _sparse_forward(q, k, v, pairs, scale)  # noqa: E731
    if fits is None:
        out, lse = sparse()
    else:
        lse_shape = jax.eval_shape(sparse)[1]
        dense = lambda: (_dense(q, k, v, spec, scale), jnp.zeros(lse_shape.shape, lse_shape.dtype))  # noqa: E731
        out, lse = jax.lax.cond(fits, sparse, dense)
    return out, (q, k, v, spec, pairs, fits, out, lse)


def _attend_bwd(scale, res, d_out):
    q, k, v, spec, pairs, fits, out, lse = res
    sparse = lambda: _sparse_backward(q, k, v, pairs, out, lse, d_out, scale)  # noqa: E731
    if fits is None:
        grads = sparse()
    else:
        dense = lambda: jax.vjp(lambda q, k, v: _dense(q, k, v, spec, scale), q, k, v)[1](d_out)  # noqa: E731
        grads = jax.lax.cond(fits, sparse, dense)
    return (*grads, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _to_rows(x, bq, hkv):
    """(B, T, Hq, D) -> (B, nq, Hkv, g*bq, D): the g query heads of a kv head stacked per tile, so
    every tile pair is one plain matmul per kv head (as in ops.reference.xla_attention)."""
    b, t, hq, d = x.shape
    nq, g = -(-t // bq), hq // hkv
    x = jnp.pad(x, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    return x.reshape(b, nq, bq, hkv, g, d).transpose(0, 1, 3, 4, 2, 5).reshape(b, nq, hkv, g * bq, d)


def _from_rows(x, t, bq):
    b, nq, hkv, r, d = x.shape
    x = x.reshape(b, nq, hkv, r // bq, bq, d).transpose(0, 1, 4, 2, 3, 5)
    return x.reshape(b, nq * bq, -1, d)[:, :t]


def _to_tiles(x, bk):
    """(B, S, Hkv, D) -> (B, nk, Hkv, bk, D)."""
    b, s, hkv, d = x.shape
    nk = -(-s // bk)
    x = jnp.pad(x, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
    return x.reshape(b, nk, bk, hkv, d).transpose(0, 1, 3, 2, 4)


def _from_tiles(x, s):
    b, nk, hkv, bk, d = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(b, nk * bk, hkv, d)[:, :s]


def _sparse_forward(q, k, v, pairs, scale):
    """(out (B, T, Hq, D) in q's dtype, log-sum-exp (B, nq, Hkv, g*bq); +inf on fully masked rows)."""
    bq, bk = pairs.allow.shape[2:]
    q_rows, k_tiles, v_tiles = _to_rows(q, bq, k.shape[2]), _to_tiles(k, bk), _to_tiles(v, bk)
    batch = jnp.arange(q.shape[0])

    def body(carry, pair):
        m, l, acc = carry
        s, _, _ = _pair_scores(q_rows, k_tiles, pair, scale)
        i = pair.q_tile
        m_new = jnp.maximum(m[batch, i], s.max(-1))  # m starts finite, so masked scores give exp(-inf) = 0
        p = jnp.exp(s - m_new[..., None])
        decay = jnp.exp(m[batch, i] - m_new)
        pv = jnp.einsum("bhrk,bhkd->bhrd", p.astype(v_tiles.dtype), v_tiles[batch, pair.k_tile],
                        preferred_element_type=jnp.float32)
        return (m.at[batch, i].set(m_new), l.at[batch, i].set(l[batch, i] * decay + p.sum(-1)),
                acc.at[batch, i].set(acc[batch, i] * decay[..., None] + pv))

    shape = q_rows.shape[:-1]
    m, l, acc = _loop_pairs(body, (jnp.full(shape, -1e30, jnp.float32), jnp.zeros(shape, jnp.float32),
                                   jnp.zeros(q_rows.shape, jnp.float32)), pairs)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # +inf: p = 0 in the backward
    return _from_rows(out, q.shape[1], bq).astype(q.dtype), lse


def _sparse_backward(q, k, v, pairs, out, lse, d_out, scale):
    """Flash-style backward: each pair's probabilities are recomputed from the saved log-sum-exp."""
    bq, bk = pairs.allow.shape[2:]
    hkv = k.shape[2]
    q_rows, k_tiles, v_tiles = _to_rows(q, bq, hkv), _to_tiles(k, bk), _to_tiles(v, bk)
    do_rows = _to_rows(d_out.astype(jnp.float32), bq, hkv)
    delta = jnp.sum(do_rows * _to_rows(out.astype(jnp.float32), bq, hkv), axis=-1)  # (B, nq, Hkv, rows)
    batch = jnp.arange(q.shape[0])

    def body(carry, pair):
        dq, dk, dv = carry
        s, q_t, k_t = _pair_scores(q_rows, k_tiles, pair, scale)
        i, j = pair.q_tile, pair.k_tile
        p = jnp.exp(s - lse[batch, i][..., None])
        do = do_rows[batch, i]
        dp = jnp.einsum("bhrd,bhkd->bhrk", do, v_tiles[batch, j].astype(jnp.float32))
        ds = p * (dp - delta[batch, i][..., None]) * scale
        return (dq.at[batch, i].add(jnp.einsum("bhrk,bhkd->bhrd", ds, k_t.astype(jnp.float32))),
                dk.at[batch, j].add(jnp.einsum("bhrk,bhrd->bhkd", ds, q_t.astype(jnp.float32))),
                dv.at[batch, j].add(jnp.einsum("bhrk,bhrd->bhkd", p, do)))

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    dq, dk, dv = _loop_pairs(body, (zeros(q_rows), zeros(k_tiles), zeros(v_tiles)), pairs)
    return (_from_rows(dq, q.shape[1], bq).astype(q.dtype), _from_tiles(dk, k.shape[1]).astype(k.dtype),
            _from_tiles(dv, v.shape[1]).astype(v.dtype))


def _pair_scores(q_rows, k_tiles, pair, scale):
    """Masked fp32 scores (B, Hkv, g*bq, bk) of one pair per batch row, plus the gathered operands."""
    batch = jnp.arange(q_rows.shape[0])
    q_t, k_t = q_rows[batch, pair.q_tile], k_tiles[batch, pair.k_tile]
    b, hkv, r, _ = q_t.shape
    bq, bk = pair.allow.shape[1:]
    s = jnp.einsum("bhrd,bhkd->bhrk", q_t, k_t, preferred_element_type=jnp.float32)
    s = jnp.where(pair.allow[:, None, None], s.reshape(b, hkv, r // bq, bq, bk) * scale, -jnp.inf)
    return s.reshape(b, hkv, r, bk), q_t, k_t


def _loop_pairs(body, carry, pairs: _Pairs):
    """Loop over the pair list, one pair per batch row per step (the working set stays in cache).

    It stops after the longest row's last pair, so layouts sparser than the static budget
    (documents) also run faster; the padding pairs of shorter rows are fully masked no-ops.
    """
    def pick(n):
        one = lambda x: jax.lax.dynamic_index_in_dim(x, n, axis=1, keepdims=False)  # noqa: E731
        return _Pairs(one(pairs.q_tile), one(pairs.k_tile), one(pairs.allow), pairs.steps)

    return jax.lax.fori_loop(0, pairs.steps, lambda n, c: body(c, pick(n)), carry)
