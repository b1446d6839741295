"""Block-sparse flash attention as a Pallas kernel (Triton lowering on GPU, interpret mode on CPU).

One program per (batch, query head, query tile). It walks the tile map's list for its query tile:
first the FULL key tiles without any mask, then the PARTIAL ones with the element mask evaluated
from the MaskSpec features (`masks.allowed`); EMPTY tiles are never loaded. Online softmax with
fp32 accumulators; the log-sum-exp is kept for the backward pass.

Backward (custom_vjp) is two Pallas kernels of the same shape: dQ walks the same per-query-tile
lists, dK/dV walks the transposed lists (per key tile, its non-empty query tiles). dK/dV are
produced per query head and summed over each GQA group outside the kernel.

Rows with no allowed key give output 0 and log-sum-exp +inf (so the backward sees p = 0).
Triton constraints are respected: tile sizes and head dim are powers of two >= 16, lists are
padded to a power of two, fp32 accumulation, only program_id / ref indexing / dot.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import tilemap
from kernels_pallas.block_sparse_attention.common import KernelConfig
from llada2_jax.core.masks import MaskSpec, allowed

DEFAULT_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class _Config(KernelConfig):
    interpret: bool


def attention(q, k, v, spec: MaskSpec, *, scale: float | None = None, interpret: bool = False,
              block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK):
    """q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D) in q's dtype."""
    b, t, hq, d, s, hkv = tilemap.check_shapes(q, k, spec)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two >= 16")
    scale = d ** -0.5 if scale is None else scale
    bq, bk = min(block_q, _pow2(t)), min(block_k, _pow2(s))
    feats = tilemap.pad_features(spec, bq, bk)
    classes = tilemap.classify(feats, bq, bk)
    aux = dict(rows=_lists(classes), cols=_lists(jnp.swapaxes(classes, 1, 2)),
               q_feats=(feats.q_stream, feats.q_block, feats.q_segment),
               k_feats=(feats.k_stream, feats.k_block, feats.k_segment))
    dp = _pow2(d)
    tp, sp = feats.q_block.shape[1], feats.k_block.shape[1]
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))  # noqa: E731
    cfg = _Config(spec.rule, float(scale), bq, bk, bool(interpret))
    out = _flash(cfg, pad(q, tp), pad(k, sp), pad(v, sp), aux)
    return out[:, :t, :, :d]


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _lists(classes):
    order, n_full, n_any = tilemap.tile_lists(classes)
    n = order.shape[-1]
    order = jnp.pad(order, ((0, 0), (0, 0), (0, _pow2(n) - n)))
    return order, n_full[..., None], n_any[..., None]


def _mask(rule, qf, kf):
    return allowed(rule, qf[0][:, None], qf[1][:, None], qf[2][:, None],
                   kf[0][None, :], kf[1][None, :], kf[2][None, :])


def _dot(a, b):
    # fp32 inputs: ask for full precision (Triton would otherwise use TF32)
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _walk(n_full_ref, n_any_ref, visit, carry):
    """FULL tiles first (no mask), then PARTIAL tiles (masked)."""
    n_full, n_any = n_full_ref[0], n_any_ref[0]
    carry = jax.lax.fori_loop(0, n_full, functools.partial(visit, masked=False), carry)
    return jax.lax.fori_loop(n_full, n_any, functools.partial(visit, masked=True), carry)


# ---------------------------------------------------------------- forward
def _fwd_kernel(order_ref, n_full_ref, n_any_ref, qs_ref, qb_ref, qg_ref, ks_ref, kb_ref, kg_ref,
                q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    q = q_ref[...]
    qf = (qs_ref[...], qb_ref[...], qg_ref[...])

    def visit(t, carry, masked):
        acc, m, l = carry
        span = pl.ds(pl.multiple_of(order_ref[t] * cfg.block_k, cfg.block_k), cfg.block_k)
        k, v = k_ref[span, :], v_ref[span, :]
        s = _dot(q, k.T) * cfg.scale
        if masked:
            s = jnp.where(_mask(cfg.rule, qf, (ks_ref[span], kb_ref[span], kg_ref[span])), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        return acc * corr[:, None] + _dot(p.astype(v.dtype), v), m_new, l * corr + p.sum(axis=-1)

    bq, dp = q.shape
    init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = _walk(n_full_ref, n_any_ref, visit, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def _forward(cfg: _Config, q, k, v, aux):
    b, tp, hq, dp = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    bq, bk = cfg.block_q, cfg.block_k
    order, n_full, n_any = aux["rows"]
    row = lambda b_, h, i: (b_, i, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, order.shape[-1]), row),
        pl.BlockSpec((None, None, 1), row),
        pl.BlockSpec((None, None, 1), row),
        *[pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))] * 3,
        *[pl.BlockSpec((None, sp), lambda b_, h, i: (b_, 0))] * 3,
        pl.BlockSpec((None, bq, None, dp), lambda b_, h, i: (b_, i, h, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda b_, h, i: (b_, 0, h // g, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda b_, h, i: (b_, 0, h // g, 0)),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, dp), lambda b_, h, i: (b_, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), grid=(b, hq, tp // bq), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
        **_compiler_params(cfg),
    )(order, n_full, n_any, *aux["q_feats"], *aux["k_feats"], q, k, v)


# ---------------------------------------------------------------- backward
def _dq_kernel(order_ref, n_full_ref, n_any_ref, qs_ref, qb_ref, qg_ref, ks_ref, kb_ref, kg_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qf = (qs_ref[...], qb_ref[...], qg_ref[...])

    def visit(t, dq, masked):
        span = pl.ds(pl.multiple_of(order_ref[t] * cfg.block_k, cfg.block_k), cfg.block_k)
        k, v = k_ref[span, :], v_ref[span, :]
        s = _dot(q, k.T) * cfg.scale
        if masked:
            s = jnp.where(_mask(cfg.rule, qf, (ks_ref[span], kb_ref[span], kg_ref[span])), s, -jnp.inf)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _walk(n_full_ref, n_any_ref, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(order_ref, n_full_ref, n_any_ref, qs_ref, qb_ref, qg_ref, ks_ref, kb_ref, kg_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
    k, v = k_ref[...], v_ref[...]
    kf = (ks_ref[...], kb_ref[...], kg_ref[...])

    def visit(t, carry, masked):
        dk, dv = carry
        span = pl.ds(pl.multiple_of(order_ref[t] * cfg.block_q, cfg.block_q), cfg.block_q)
        q, do = q_ref[span, :], do_ref[span, :]
        lse, delta = lse_ref[span], delta_ref[span]
        s = _dot(q, k.T) * cfg.scale
        if masked:
            s = jnp.where(_mask(cfg.rule, (qs_ref[span], qb_ref[span], qg_ref[span]), kf), s, -jnp.inf)
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype).T, do)
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dk + _dot(ds.astype(q.dtype).T, q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _walk(n_full_ref, n_any_ref, visit, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg: _Config, q, k, v, aux, o, lse, do):
    b, tp, hq, dp = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    bq, bk = cfg.block_q, cfg.block_k
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    feats = (*aux["q_feats"], *aux["k_feats"])
    params = dict(interpret=cfg.interpret, **_compiler_params(cfg))

    order, n_full, n_any = aux["rows"]
    row = lambda b_, h, i: (b_, i, 0)  # noqa: E731
    q_tile = pl.BlockSpec((None, bq, None, dp), lambda b_, h, i: (b_, i, h, 0))
    kv_all = pl.BlockSpec((None, sp, None, dp), lambda b_, h, i: (b_, 0, h // g, 0))
    stat_tile = pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), grid=(b, hq, tp // bq),
        in_specs=[pl.BlockSpec((None, None, order.shape[-1]), row), pl.BlockSpec((None, None, 1), row),
                  pl.BlockSpec((None, None, 1), row),
                  *[pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))] * 3,
                  *[pl.BlockSpec((None, sp), lambda b_, h, i: (b_, 0))] * 3,
                  q_tile, kv_all, kv_all, q_tile, stat_tile, stat_tile],
        out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), **params,
    )(order, n_full, n_any, *feats, q, k, v, do, lse, delta)

    order, n_full, n_any = aux["cols"]
    col = lambda b_, h, j: (b_, j, 0)  # noqa: E731
    k_tile = pl.BlockSpec((None, bk, None, dp), lambda b_, h, j: (b_, j, h // g, 0))
    q_all = pl.BlockSpec((None, tp, None, dp), lambda b_, h, j: (b_, 0, h, 0))
    stat_all = pl.BlockSpec((None, None, tp), lambda b_, h, j: (b_, h, 0))
    per_head = pl.BlockSpec((None, bk, None, dp), lambda b_, h, j: (b_, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg), grid=(b, hq, sp // bk),
        in_specs=[pl.BlockSpec((None, None, order.shape[-1]), col), pl.BlockSpec((None, None, 1), col),
                  pl.BlockSpec((None, None, 1), col),
                  *[pl.BlockSpec((None, tp), lambda b_, h, j: (b_, 0))] * 3,
                  *[pl.BlockSpec((None, bk), lambda b_, h, j: (b_, j))] * 3,
                  q_all, k_tile, k_tile, q_all, stat_all, stat_all],
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct((b, sp, hq, dp), jnp.float32)] * 2, **params,
    )(order, n_full, n_any, *feats, q, k, v, do, lse, delta)
    dk = dk.reshape(b, sp, hkv, g, dp).sum(3).astype(k.dtype)
    dv = dv.reshape(b, sp, hkv, g, dp).sum(3).astype(v.dtype)
    return dq, dk, dv


def _compiler_params(cfg: _Config) -> dict:
    if cfg.interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu
    return dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, aux):
    return _forward(cfg, q, k, v, aux)[0]


def _flash_fwd(cfg, q, k, v, aux):
    o, lse = _forward(cfg, q, k, v, aux)
    return o, (q, k, v, aux, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, aux, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, aux, o, lse, do)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
