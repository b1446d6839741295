"""Tile-skipping attention in plain XLA (runs anywhere, differentiable by autodiff).

The non-empty (query tile, key tile) pairs of the tile map are listed per batch row (row-major,
so pairs of one query tile are contiguous); only those pairs are gathered and multiplied. A
softmax across the pairs of a query tile is done with segment max / segment sums. Work and
memory scale with the number of non-empty tiles instead of T * S.

Static shapes: the pair list has a static length P.
  * concrete MaskSpec features (eager call, or features closed over as constants): P is the
    exact maximum count over the batch, computed on the host;
  * traced features (inside jit): P is a budget from the rule and shapes -- the tile count of
    the canonical single-document layout with block size = tile size, plus one tile of slack per
    query tile row (block boundaries not aligned with tiles). A `lax.cond` checks the real count at run time and falls back to the
    dense-mask reference when it exceeds the budget, so results are always exact; only speed
    depends on the layout matching the budget (BDLM with L_B <= tile size, causal, decode).
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from kernels_pallas import tilemap
from llada2_jax.diffusion.masks import MaskSpec, allowed

DEFAULT_BLOCK = 128  # best of 64/128 on the 2-core CPU bench (see BUILD_NOTES.md, Kernels)


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
    dense = lambda q, k, v: _dense(q, k, v, spec, scale)  # noqa: E731
    if budget >= nq * nk:
        return dense(q, k, v)
    sparse = lambda q, k, v: _sparse(q, k, v, feats, nonempty, max(budget, 1), bq, bk, scale, t)  # noqa: E731
    if exact is not None:
        return sparse(q, k, v)
    fits = nonempty.sum(-1).max() <= budget
    return jax.lax.cond(fits, sparse, dense, q, k, v)


def skipped_fraction(spec: MaskSpec, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> float:
    """Fraction of (padded) tiles the sparse path never touches (concrete features only)."""
    classes = tilemap.classify(tilemap.pad_features(spec, block_q, block_k), block_q, block_k)
    return float(np.mean(np.asarray(classes) == tilemap.EMPTY))


def _concrete_count(nonempty) -> int | None:
    try:
        return int(np.asarray(nonempty).sum(-1).max())
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _traced_budget(rule: str, t: int, s: int, bq: int, bk: int) -> int:
    nq, nk = -(-t // bq), -(-s // bk)
    if rule == "bidirectional" or t != s:
        return nq * nk
    seg = np.ones((1, t), np.int32)
    block_size = max(bq, bk)
    with jax.ensure_compile_time_eval():  # the canonical layout is a constant even under jit
        if rule == "causal":
            spec = MaskSpec.causal(seg)
        elif rule == "block_causal":
            spec = MaskSpec.block_causal(seg, block_size)
        elif t % 2 == 0 and (t // 2) % block_size == 0:  # block_diffusion over [x_t ; x_0]
            spec = MaskSpec.block_diffusion(seg[:, : t // 2], block_size)
        else:
            return nq * nk
        canonical = tilemap.classify(tilemap.pad_features(spec, bq, bk), bq, bk)
        count = int(np.sum(np.asarray(canonical) != tilemap.EMPTY))
    return min(nq * nk, count + nq)


def _dense(q, k, v, spec, scale):
    from llada2_jax.ops.attention import xla_attention
    return xla_attention(q, k, v, spec.dense(), scale=scale)


def _sparse(q, k, v, feats, nonempty, n_pairs, bq, bk, scale, t):
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nq, nk = feats.q_block.shape[1] // bq, feats.k_block.shape[1] // bk

    flat = jax.vmap(lambda row: jnp.nonzero(row, size=n_pairs, fill_value=nq * nk)[0])(nonempty)
    valid = flat < nq * nk
    qi = jnp.where(valid, flat // nk, nq)  # invalid pairs go to a dummy query tile nq
    ki = jnp.where(valid, flat % nk, 0)
    qi_src = jnp.minimum(qi, nq - 1)

    def tiles(x, n, size):  # (B, n*size, ...) -> (B, n, size, ...)
        x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, n, size) + x.shape[2:])

    def gather(x, idx):  # x (B, n, ...), idx (B, P) -> (B, P, ...)
        return jax.vmap(lambda xb, ib: xb[ib])(x, idx)

    q_t = gather(tiles(q, nq, bq).reshape(b, nq, bq, hkv, g, d), qi_src)
    k_t = gather(tiles(k, nk, bk), ki)
    v_t = gather(tiles(v, nk, bk), ki)
    f_q = [gather(x.reshape(b, nq, bq), qi_src)[:, :, :, None]
           for x in (feats.q_stream, feats.q_block, feats.q_segment)]
    f_k = [gather(x.reshape(b, nk, bk), ki)[:, :, None, :]
           for x in (feats.k_stream, feats.k_block, feats.k_segment)]
    allow = allowed(feats.rule, *f_q, *f_k) & valid[:, :, None, None]  # (B, P, bq, bk)
    allow = allow[:, :, None, None]  # (B, P, 1, 1, bq, bk) against (hkv, g)

    scores = jnp.einsum("bpqhgd,bpkhd->bphgqk", q_t, k_t, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allow, scores, -jnp.inf)

    def seg_reduce(x, op):  # (B, P, ...) -> (B, nq + 1, ...) by query tile
        fn = jax.ops.segment_max if op == "max" else jax.ops.segment_sum
        return jax.vmap(lambda xb, ib: fn(xb, ib, num_segments=nq + 1, indices_are_sorted=True))(x, qi)

    row_max = jax.lax.stop_gradient(seg_reduce(scores.max(-1), "max"))  # (B, nq+1, hkv, g, bq)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - gather(row_max, qi)[..., None])  # masked -> exp(-inf) = 0
    denom = seg_reduce(p.sum(-1), "sum")  # (B, nq+1, hkv, g, bq)
    out = seg_reduce(jnp.einsum("bphgqk,bpkhd->bpqhgd", p.astype(v.dtype), v_t,
                                preferred_element_type=jnp.float32), "sum")  # (B, nq+1, bq, hkv, g, d)
    denom = jnp.moveaxis(denom, -1, 2)[..., None]  # (B, nq+1, bq, hkv, g, 1)
    out = out / jnp.where(denom > 0, denom, 1.0)  # fully masked rows -> 0
    return out[:, :nq].reshape(b, nq * bq, hq, d)[:, :t].astype(q.dtype)
