"""Grouped matmul (MoE experts) as Pallas kernels: Triton lowering on GPU, interpret mode on CPU.

x (M, K) rows are sorted by group; group g (rows offsets[g] .. offsets[g+1]) multiplies w[g]
(K, N). Forward: one program per (row tile, column tile); it loops over the groups that
intersect its row tile (precomputed range, empty groups contribute nothing) and over K chunks,
masking the rows of other groups. Backward (custom_vjp): dX is the same kernel with w
transposed; dW[g] = X_g^T dY_g is a second kernel with one program per (group, K tile, N tile)
looping over the row tiles of its group (empty group -> zero gradient). Rows past
sum(group_sizes) give 0. Tiles are powers of two >= 16; fp32 accumulation.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from kernels_pallas.grouped_matmul.shapes import check_shapes


@dataclasses.dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_k: int
    interpret: bool
    out_dtype: jnp.dtype


def grouped_matmul(x, w, group_sizes, *, interpret: bool = False, preferred_element_type=jnp.float32,
                   block_m: int = 64, block_n: int = 64, block_k: int = 32):
    """(M, K) x (E, K, N) with group_sizes (E,) -> (M, N) in preferred_element_type."""
    m, kdim, e, n = check_shapes(x, w, group_sizes)
    cfg = _Config(block_m, block_n, block_k, bool(interpret), jnp.dtype(preferred_element_type))
    return _gmm(cfg, x, w, group_sizes.astype(jnp.int32))


def _round(n, m):
    return -(-n // m) * m


def _pow2(n):
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _offsets(group_sizes):
    ends = jnp.cumsum(group_sizes)
    return ends - group_sizes, ends


def _pad_groups(a):
    return jnp.pad(a, (0, _pow2(a.shape[0]) - a.shape[0]))


def _dot(a, b):
    # fp32 inputs: ask for full precision (Triton would otherwise use TF32)
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _gmm_kernel(lo_ref, count_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref, *, cfg: _Config, k_chunks: int):
    rows = pl.program_id(0) * cfg.block_m + jnp.arange(cfg.block_m)

    def per_group(t, acc):
        g = lo_ref[0] + t
        in_group = (rows >= starts_ref[g]) & (rows < ends_ref[g])

        def per_chunk(c, acc):
            span = pl.ds(pl.multiple_of(c * cfg.block_k, cfg.block_k), cfg.block_k)
            xs = jnp.where(in_group[:, None], x_ref[:, span], 0).astype(x_ref.dtype)
            return acc + _dot(xs, w_ref[g, span, :])

        return jax.lax.fori_loop(0, k_chunks, per_chunk, acc)

    acc = jax.lax.fori_loop(0, count_ref[0], per_group, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _forward(cfg: _Config, x, w, group_sizes):
    m, kdim = x.shape
    e, _, n = w.shape
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    mp, kp, np_ = _round(m, bm), _round(kdim, bk), _round(n, bn)
    x = jnp.pad(x, ((0, mp - m), (0, kp - kdim)))
    w = jnp.pad(w, ((0, 0), (0, kp - kdim), (0, np_ - n)))
    starts, ends = _offsets(group_sizes)
    # groups intersecting each row tile: [lo, lo + count)
    row0 = jnp.arange(mp // bm, dtype=jnp.int32) * bm
    row_last = jnp.minimum(row0 + bm, ends[-1]) - 1
    lo = jnp.searchsorted(ends, row0, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(ends, row_last, side="right").astype(jnp.int32)
    count = jnp.where(row0 < ends[-1], jnp.minimum(hi, e - 1) - lo + 1, 0).astype(jnp.int32)
    lo = jnp.minimum(lo, e - 1)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, cfg=cfg, k_chunks=kp // bk),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)), pl.BlockSpec((1,), lambda i, j: (i,)),
                  pl.BlockSpec((_pow2(e),), lambda i, j: (0,)), pl.BlockSpec((_pow2(e),), lambda i, j: (0,)),
                  pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((e, kp, bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), cfg.out_dtype),
        interpret=cfg.interpret, **_compiler_params(cfg),
    )(lo, count, _pad_groups(starts), _pad_groups(ends), x, w)
    return out[:m, :n]


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, cfg: _Config):
    g = pl.program_id(0)
    start, end = starts_ref[g], ends_ref[g]
    bm = cfg.block_m

    def per_rows(c, acc):
        rows = c * bm + jnp.arange(bm)
        span = pl.ds(pl.multiple_of(c * bm, bm), bm)
        xs = jnp.where(((rows >= start) & (rows < end))[:, None], x_ref[span, :], 0).astype(x_ref.dtype)
        return acc + _dot(xs.T, dy_ref[span, :])

    acc = jax.lax.fori_loop(start // bm, (end + bm - 1) // bm, per_rows, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _transposed(cfg: _Config, x, dy, group_sizes, e):
    """dW (E, K, N) = per group X_g^T dY_g."""
    m, kdim = x.shape
    n = dy.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    mp, kp, np_ = _round(m, bm), _round(kdim, bk), _round(n, bn)
    x = jnp.pad(x, ((0, mp - m), (0, kp - kdim)))
    dy = jnp.pad(dy, ((0, mp - m), (0, np_ - n)))
    starts, ends = _offsets(group_sizes)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, cfg=cfg), grid=(e, kp // bk, np_ // bn),
        in_specs=[pl.BlockSpec((_pow2(e),), lambda g, a, b: (0,)), pl.BlockSpec((_pow2(e),), lambda g, a, b: (0,)),
                  pl.BlockSpec((mp, bk), lambda g, a, b: (0, a)), pl.BlockSpec((mp, bn), lambda g, a, b: (0, b))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda g, a, b: (g, a, b)),
        out_shape=jax.ShapeDtypeStruct((e, kp, np_), jnp.float32),
        interpret=cfg.interpret, **_compiler_params(cfg),
    )(_pad_groups(starts), _pad_groups(ends), x, dy)
    return out[:, :kdim, :n]


def _compiler_params(cfg: _Config) -> dict:
    if cfg.interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu
    return dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg, x, w, group_sizes):
    return _forward(cfg, x, w, group_sizes)


def _gmm_fwd(cfg, x, w, group_sizes):
    return _forward(cfg, x, w, group_sizes), (x, w, group_sizes)


def _gmm_bwd(cfg, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx_cfg = dataclasses.replace(cfg, out_dtype=jnp.dtype(jnp.float32))
    dx = _forward(dx_cfg, dy, jnp.swapaxes(w, 1, 2), group_sizes).astype(x.dtype)
    dw = _transposed(cfg, x, dy, group_sizes, w.shape[0]).astype(w.dtype)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
